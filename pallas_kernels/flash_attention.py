"""Flash attention with a position mask, forward and backward blocks (Pallas GPU).

    s[i, j] = scale q_i . k_j,   visible iff pos_q[i] >= pos_k[j],
    o_i = sum_j softmax_j(s[i, :] | visible) v_j,   lse_i = log sum_{visible j} exp(s[i, j])

for any placement of the tokens (contiguous blocks, zigzag chunks, all-gathered shards, ring
blocks): the mask comes from the positions, not from array indices. That is what context
parallelism needs and what cuDNN's causal mask (top-left aligned, Lq == Lk) does not give.

The wrappers sort queries and keys by position (a gather; identity when already sorted), so
for every query tile the keys it sees form a prefix of key tiles: `[0, full)` wholly visible
(no mask), `[full, visible)` partly (masked), the rest skipped. Those bounds are computed per
tile from the positions before the kernel runs. Padding rows get position INT32_MAX (padded
keys are seen by no real query; padded queries have a zero cotangent).

- `attention_block_forward`: (o, lse) of one query block against one key block; o is
  normalised, lse = -1e30 where a query sees no key (o = 0 there). Blocks combine through lse
  (online softmax), as in ring attention.
- `attention_block_backward`: (dq, dk, dv) of one block given the FINAL lse and
  delta = rowsum(dout * out) of the queries (FlashAttention-2: one kernel for dK/dV over query
  tiles, one for dQ over key tiles; no atomics).
- `flash_attention`: the single-block attention with its custom VJP.

Scores, softmax and accumulators are float32; dots take the inputs' dtype (bf16 on GPU).
Depends on jax only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG_INF = -1e30
LOG2E = math.log2(math.e)
PAD_POSITION = np.iinfo(np.int32).max
F32 = jnp.float32


@dataclasses.dataclass(frozen=True, slots=True)
class FlashBlockSizes:
  """Tiles of the three kernels (powers of two >= 16); forward defaults timed on an H200 at
  64K (experiments/results/attention_nvidia_h200.md).

  Attributes:
    block_q, block_k, num_warps, num_stages: forward (query rows per program, key rows per
      loop step).
    block_k_dkdv, block_q_dkdv: dK/dV kernel (keys per program, queries per loop step).
    block_q_dq, block_k_dq: dQ kernel (queries per program, keys per loop step).
    num_warps_bwd, num_stages_bwd: both backward kernels.
  """
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  block_k_dkdv: int = 64
  block_q_dkdv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2


def _pow2_at_least_16(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def unsupported_reason(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                       v_shape: tuple[int, ...]) -> str | None:
  """Why these shapes cannot go through the kernels (a sentence with the fix), or None."""
  if len(q_shape) != 4 or k_shape != v_shape or len(k_shape) != 4:
    return f"expected q [B, Lq, N, H] and k, v [B, Lk, N, H]; got {q_shape}, {k_shape}, {v_shape}"
  if q_shape[0] != k_shape[0] or q_shape[2:] != k_shape[2:]:
    return (f"q {q_shape} and k {k_shape} must share batch, heads and head size (repeat K/V "
            "heads for grouped-query attention)")
  return None


# ---- tile bounds (XLA, before the kernels) ---------------------------------------------------

def _tile_min_max(pos: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  tiles = pos.reshape(-1, block)
  return tiles.min(axis=1), tiles.max(axis=1)


def _key_ranges(pos_q: jax.Array, pos_k: jax.Array, block_q: int, block_k: int):
  """Per query tile: (key tiles wholly visible, key tiles at least partly visible), both
  prefix lengths (keys sorted by position)."""
  q_min, q_max = _tile_min_max(pos_q, block_q)
  k_min, k_max = _tile_min_max(pos_k, block_k)
  # counts #{k_max <= q_min} and #{k_min <= q_max} over the (ascending) key tiles
  full = jnp.searchsorted(k_max, q_min, side="right").astype(jnp.int32)
  visible = jnp.searchsorted(k_min, q_max, side="right").astype(jnp.int32)
  return full, jnp.maximum(visible, full)


def _query_ranges(pos_q: jax.Array, pos_k: jax.Array, block_q: int, block_k: int):
  """Per key tile: (first query tile that sees part of it, first that sees all of it); the
  tiles from there on form suffixes (queries sorted by position)."""
  q_min, q_max = _tile_min_max(pos_q, block_q)
  k_min, k_max = _tile_min_max(pos_k, block_k)
  # counts #{q_max < k_min} and #{q_min < k_max} over the (ascending) query tiles
  first_visible = jnp.searchsorted(q_max, k_min, side="left").astype(jnp.int32)
  first_full = jnp.searchsorted(q_min, k_max, side="left").astype(jnp.int32)
  return first_visible, jnp.maximum(first_full, first_visible)


# ---- kernels -----------------------------------------------------------------------------------

def _fwd_kernel(full_ref, visible_ref, q_ref, k_ref, v_ref, pq_ref, pk_ref, o_ref, lse_ref, *,
                scale: float, block_k: int):
  # Raw scores s = q.k; the running max m is in raw units and the exponentials are base 2:
  # exp(scale (s - m)) = exp2(s c - m c), c = scale log2(e) (one FMA per score).
  tile = pl.program_id(2)
  q = q_ref[...]
  pq = pq_ref[...]
  block_q, head_dim = q.shape
  c = scale * LOG2E

  def step(j, carry, masked):
    o, m, l = carry
    rows = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[rows, :], v_ref[rows, :]
    s = plgpu.dot(q, k, trans_b=True)
    if masked:
      seen = pq[:, None] >= pk_ref[rows][None, :]
      s = jnp.where(seen, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s * c - (m_new * c)[:, None])
    if masked:
      p = jnp.where(seen, p, 0.0)
    alpha = jnp.exp2((m - m_new) * c)
    o = o * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return o, m_new, l * alpha + jnp.sum(p, axis=1)

  init = (jnp.zeros((block_q, head_dim), F32), jnp.full((block_q,), NEG_INF, F32),
          jnp.zeros((block_q,), F32))
  full, visible = full_ref[tile], visible_ref[tile]
  carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), init)
  o, m, l = jax.lax.fori_loop(full, visible, functools.partial(step, masked=True), carry)
  seen_any = l > 0.0
  l_safe = jnp.where(seen_any, l, 1.0)
  o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen_any, m * scale + jnp.log(l_safe), NEG_INF)


def _probabilities(q, k, lse, scale, seen):
  """exp(scale q.k - lse) as exp2(q.k c - lse log2(e)), zero where not seen."""
  p = jnp.exp2(plgpu.dot(q, k, trans_b=True) * (scale * LOG2E) - (lse * LOG2E)[:, None])
  return p if seen is None else jnp.where(seen, p, 0.0)


def _dkdv_kernel(first_visible_ref, first_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, pq_ref, pk_ref, dk_ref, dv_ref, *, scale: float, block_q: int,
                 num_q_tiles: int):
  tile = pl.program_id(2)
  k, v, pk = k_ref[...], v_ref[...], pk_ref[...]

  def step(i, carry, masked):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    seen = pq_ref[rows][:, None] >= pk[None, :] if masked else None
    p = _probabilities(q, k, lse_ref[rows], scale, seen)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

  init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
  first_visible, first_full = first_visible_ref[tile], first_full_ref[tile]
  carry = jax.lax.fori_loop(first_visible, first_full, functools.partial(step, masked=True), init)
  dk, dv = jax.lax.fori_loop(first_full, num_q_tiles, functools.partial(step, masked=False), carry)
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(full_ref, visible_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pq_ref,
               pk_ref, dq_ref, *, scale: float, block_k: int):
  tile = pl.program_id(2)
  q, do, lse, delta, pq = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], pq_ref[...]

  def step(j, dq, masked):
    rows = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[rows, :], v_ref[rows, :]
    seen = pq[:, None] >= pk_ref[rows][None, :] if masked else None
    p = _probabilities(q, k, lse, scale, seen)
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  full, visible = full_ref[tile], visible_ref[tile]
  dq = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), jnp.zeros(q.shape, F32))
  dq = jax.lax.fori_loop(full, visible, functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ---- calls -------------------------------------------------------------------------------------

def _row_tile(block: int, head_dim: int) -> pl.BlockSpec:
  """BlockSpec over [B, L, N, H]: rows [t block, (t + 1) block) of one (batch, head)."""
  return pl.BlockSpec((None, block, None, head_dim), lambda b, n, t: (b, t, n, 0))


def _all_rows(length: int, head_dim: int) -> pl.BlockSpec:
  """BlockSpec over [B, L, N, H]: every row of one (batch, head) (the kernel slices them)."""
  return pl.BlockSpec((None, length, None, head_dim), lambda b, n, t: (b, 0, n, 0))


def _stats(block: int | None, length: int) -> pl.BlockSpec:
  """BlockSpec over [B, N, L] row statistics (lse, delta)."""
  if block is None:
    return pl.BlockSpec((None, None, length), lambda b, n, t: (b, n, 0))
  return pl.BlockSpec((None, None, block), lambda b, n, t: (b, n, t))


def _whole(length: int) -> pl.BlockSpec:
  return pl.BlockSpec((length,), lambda b, n, t: (0,))


def _tiled(block: int) -> pl.BlockSpec:
  return pl.BlockSpec((block,), lambda b, n, t: (t,))


def _fwd_call(q, k, v, pos_q, pos_k, scale, out_dtype, bs: FlashBlockSizes, interpret: bool):
  batch, len_q, heads, head_dim = q.shape
  len_k = k.shape[1]
  full, visible = _key_ranges(pos_q, pos_k, bs.block_q, bs.block_k)
  num_q_tiles = len_q // bs.block_q
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=bs.block_k),
      grid=(batch, heads, num_q_tiles),
      in_specs=[_whole(num_q_tiles), _whole(num_q_tiles), _row_tile(bs.block_q, head_dim),
                _all_rows(len_k, head_dim), _all_rows(len_k, head_dim), _tiled(bs.block_q),
                _whole(len_k)],
      out_specs=(_row_tile(bs.block_q, head_dim), _stats(bs.block_q, len_q)),
      out_shape=(jax.ShapeDtypeStruct(q.shape, out_dtype),
                 jax.ShapeDtypeStruct((batch, heads, len_q), F32)),
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name="flash_attention_fwd",
  )(full, visible, q, k, v, pos_q, pos_k)


def _bwd_call(q, k, v, pos_q, pos_k, do, lse, delta, scale, out_dtype, bs: FlashBlockSizes,
              interpret: bool):
  batch, len_q, heads, head_dim = q.shape
  len_k = k.shape[1]
  bq, bk = bs.block_q_dkdv, bs.block_k_dkdv
  params = plgpu.CompilerParams(num_warps=bs.num_warps_bwd, num_stages=bs.num_stages_bwd)
  num_q_tiles, num_k_tiles = len_q // bq, len_k // bk
  first_visible, first_full = _query_ranges(pos_q, pos_k, bq, bk)
  whole_q, whole_k = _all_rows(len_q, head_dim), _all_rows(len_k, head_dim)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, block_q=bq, num_q_tiles=num_q_tiles),
      grid=(batch, heads, num_k_tiles),
      in_specs=[_whole(num_k_tiles), _whole(num_k_tiles), whole_q, _row_tile(bk, head_dim),
                _row_tile(bk, head_dim), whole_q, _stats(None, len_q), _stats(None, len_q),
                _whole(len_q), _tiled(bk)],
      out_specs=(_row_tile(bk, head_dim), _row_tile(bk, head_dim)),
      out_shape=(jax.ShapeDtypeStruct(k.shape, out_dtype),
                 jax.ShapeDtypeStruct(v.shape, out_dtype)),
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dkdv",
  )(first_visible, first_full, q, k, v, do, lse, delta, pos_q, pos_k)
  bq, bk = bs.block_q_dq, bs.block_k_dq
  num_q_tiles = len_q // bq
  full, visible = _key_ranges(pos_q, pos_k, bq, bk)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=bk),
      grid=(batch, heads, num_q_tiles),
      in_specs=[_whole(num_q_tiles), _whole(num_q_tiles), _row_tile(bq, head_dim), whole_k, whole_k,
                _row_tile(bq, head_dim), _stats(bq, len_q), _stats(bq, len_q), _tiled(bq),
                _whole(len_k)],
      out_specs=_row_tile(bq, head_dim),
      out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(full, visible, q, k, v, do, lse, delta, pos_q, pos_k)
  return dq, dk, dv


# ---- layout: sort by position, pad rows and head size ------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Layout:
  """Sorted, padded view of one side (queries or keys): rows in position order, then padding.

  With `presorted` (the caller guarantees ascending positions) no rows are gathered.
  """
  order: jax.Array | None  # [L] storage index of the i-th smallest position; None: identity
  positions: jax.Array     # [Lp] sorted positions, PAD_POSITION past L
  length: int
  padded: int

  @classmethod
  def of(cls, pos: jax.Array, multiple: int, presorted: bool = False) -> _Layout:
    length = pos.shape[0]
    padded = -(-length // multiple) * multiple
    order = None if presorted else jnp.argsort(pos, stable=True)
    positions = jnp.pad((pos if order is None else pos[order]).astype(jnp.int32),
                        (0, padded - length), constant_values=PAD_POSITION)
    return cls(order, positions, length, padded)

  def rows(self, x: jax.Array, axis: int = 1, head_dim: int | None = None) -> jax.Array:
    """Gathers x's rows (axis) into sorted order and pads them (and the last axis to head_dim)."""
    if self.order is not None:
      x = jnp.take(x, self.order, axis=axis)
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, self.padded - self.length)
    if head_dim is not None:
      pads[-1] = (0, head_dim - x.shape[-1])
    return jnp.pad(x, pads) if any(p != (0, 0) for p in pads) else x

  def unrows(self, x: jax.Array, axis: int = 1, head_dim: int | None = None) -> jax.Array:
    """Inverse of `rows`: drops padding and scatters rows back to storage order."""
    if self.padded != self.length:
      x = jax.lax.slice_in_dim(x, 0, self.length, axis=axis)
    if head_dim is not None and head_dim != x.shape[-1]:
      x = x[..., :head_dim]
    if self.order is None:
      return x
    inverse = jnp.zeros_like(self.order).at[self.order].set(
        jnp.arange(self.length, dtype=self.order.dtype))
    return jnp.take(x, inverse, axis=axis)


def _check(q, k, v, pos_q, pos_k):
  reason = unsupported_reason(q.shape, k.shape, v.shape)
  if reason:
    raise ValueError(reason)
  if pos_q.shape != (q.shape[1],) or pos_k.shape != (k.shape[1],):
    raise ValueError(f"positions {pos_q.shape}, {pos_k.shape} must be [Lq] = [{q.shape[1]}] and "
                     f"[Lk] = [{k.shape[1]}]")


@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "block_sizes", "interpret",
                                             "sorted_q", "sorted_k"))
def attention_block_forward(q_BQNH: jax.Array, k_BKNH: jax.Array, v_BKNH: jax.Array,
                            pos_Q: jax.Array, pos_K: jax.Array, *, scale: float | None = None,
                            out_dtype=None, block_sizes: FlashBlockSizes | None = None,
                            interpret: bool = False, sorted_q: bool = False,
                            sorted_k: bool = False) -> tuple[jax.Array, jax.Array]:
  """One query block against one key block (not differentiable: see `flash_attention`).

  Args:
    q_BQNH: [B, Lq, N, H]; k_BKNH, v_BKNH: [B, Lk, N, H], same dtype (bf16 or float32).
    pos_Q, pos_K: [Lq], [Lk] int positions; query i sees key j iff pos_Q[i] >= pos_K[j].
    scale: score scale (default 1/sqrt(H)).
    out_dtype: dtype of o (default q's).
    sorted_q, sorted_k: the caller guarantees ascending positions on that side, so no rows are
      gathered into position order (wrong results if they are not sorted).

  Returns:
    o [B, Lq, N, H] normalised over the keys each query sees (0 where it sees none),
    lse [B, N, Lq] float32 log-sum-exp of the scaled scores (-1e30 where it sees none).
  """
  _check(q_BQNH, k_BKNH, v_BKNH, pos_Q, pos_K)
  bs = block_sizes or FlashBlockSizes()
  head_dim = q_BQNH.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  hp = _pow2_at_least_16(head_dim)
  lq, lk = _Layout.of(pos_Q, bs.block_q, sorted_q), _Layout.of(pos_K, bs.block_k, sorted_k)
  o, lse = _fwd_call(lq.rows(q_BQNH, head_dim=hp), lk.rows(k_BKNH, head_dim=hp),
                     lk.rows(v_BKNH, head_dim=hp), lq.positions, lk.positions, scale,
                     jnp.dtype(out_dtype or q_BQNH.dtype), bs, interpret)
  return lq.unrows(o, head_dim=head_dim), lq.unrows(lse, axis=2)


@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "block_sizes", "interpret",
                                             "sorted_q", "sorted_k"))
def attention_block_backward(q_BQNH: jax.Array, k_BKNH: jax.Array, v_BKNH: jax.Array,
                             pos_Q: jax.Array, pos_K: jax.Array, dout_BQNH: jax.Array,
                             lse_BNQ: jax.Array, delta_BNQ: jax.Array, *,
                             scale: float | None = None, out_dtype=None,
                             block_sizes: FlashBlockSizes | None = None,
                             interpret: bool = False, sorted_q: bool = False,
                             sorted_k: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of one block given the queries' final statistics.

  Args: as `attention_block_forward`, plus dout_BQNH [B, Lq, N, H] (cast to q's dtype),
    lse_BNQ [B, N, Lq] the queries' log-sum-exp over ALL key blocks, delta_BNQ [B, N, Lq] =
    rowsum(dout * out) with the final output.

  Returns:
    dq [B, Lq, N, H], dk, dv [B, Lk, N, H] in out_dtype (default float32; the kernels accumulate
    in float32 either way): this key block's share of dq and its dk, dv.
  """
  _check(q_BQNH, k_BKNH, v_BKNH, pos_Q, pos_K)
  bs = block_sizes or FlashBlockSizes()
  head_dim = q_BQNH.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  hp = _pow2_at_least_16(head_dim)
  lq = _Layout.of(pos_Q, max(bs.block_q_dkdv, bs.block_q_dq), sorted_q)
  lk = _Layout.of(pos_K, max(bs.block_k_dkdv, bs.block_k_dq), sorted_k)
  # padded queries: lse 0 and a zero cotangent, so they add nothing to dk, dv
  dq, dk, dv = _bwd_call(lq.rows(q_BQNH, head_dim=hp), lk.rows(k_BKNH, head_dim=hp),
                         lk.rows(v_BKNH, head_dim=hp), lq.positions, lk.positions,
                         lq.rows(dout_BQNH.astype(q_BQNH.dtype), head_dim=hp),
                         lq.rows(lse_BNQ.astype(F32), axis=2),
                         lq.rows(delta_BNQ.astype(F32), axis=2), scale,
                         jnp.dtype(out_dtype or F32), bs, interpret)
  return (lq.unrows(dq, head_dim=head_dim), lk.unrows(dk, head_dim=head_dim),
          lk.unrows(dv, head_dim=head_dim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, pos_q, pos_k, block_sizes, interpret):
  return attention_block_forward(q, k, v, pos_q, pos_k, block_sizes=block_sizes,
                                 interpret=interpret)[0]


def _flash_fwd(q, k, v, pos_q, pos_k, block_sizes, interpret):
  out, lse = attention_block_forward(q, k, v, pos_q, pos_k, block_sizes=block_sizes,
                                     interpret=interpret)
  return out, (q, k, v, pos_q, pos_k, out, lse)


def _flash_bwd(block_sizes, interpret, saved, dout):
  q, k, v, pos_q, pos_k, out, lse = saved
  delta = jnp.einsum("bqnh,bqnh->bnq", dout.astype(F32), out.astype(F32))
  dq, dk, dv = attention_block_backward(q, k, v, pos_q, pos_k, dout, lse, delta,
                                        out_dtype=q.dtype, block_sizes=block_sizes,
                                        interpret=interpret)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BQNH: jax.Array, k_BKNH: jax.Array, v_BKNH: jax.Array, pos_Q: jax.Array,
                    pos_K: jax.Array, *, block_sizes: FlashBlockSizes | None = None,
                    interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H) | pos_Q >= pos_K) v, differentiable in q, k, v.

  Shapes as `attention_block_forward`; returns [B, Lq, N, H] in q's dtype (0 for a query that
  sees no key). Positions are integer arrays (no gradient).
  """
  return _flash(q_BQNH, k_BKNH, v_BKNH, pos_Q.astype(jnp.int32), pos_K.astype(jnp.int32),
                block_sizes or FlashBlockSizes(), interpret)
