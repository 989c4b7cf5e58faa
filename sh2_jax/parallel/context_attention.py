"""Causal attention with the sequence sharded over a mesh axis: all-gather K/V, or a ring.

Both run INSIDE `jax.shard_map` over `axis_name` and mask by token positions
(query i sees key j iff pos_q[i] >= pos_k[j]), so they hold for any layout of the sequence
over the ranks (contiguous blocks or zigzag chunks); RoPE is applied outside, with the same
positions.

- all-gather: gather K, V and their positions; the backward (custom VJP, which keeps only the
  local K, V) gathers them again and reduce-scatters dK, dV.
- ring: N steps; at step s rank r holds the K/V block of rank r - s (ppermute i -> i+1) and
  folds it into an online softmax (running max m, sum l, unnormalised output o). The backward
  (custom VJP) runs the ring again: each visiting block carries its dK/dV accumulators (in
  the inputs' dtype, as all-gather's reduce-scatter sums) with it and they arrive home after
  the N-th rotation. Per device memory is O(L/N): one K/V block
  in flight, no [L, L] scores.

Inside a block, by `KERNEL`:
- "cudnn" (GPU, bf16/fp16, positions ascending within every rank's block, as the contiguous
  and zigzag layouts give): query and key blocks are cut into half-blocks (one zigzag chunk
  each) and every pair is, by its positions, skipped (keys all later), one unmasked cuDNN
  call (keys all earlier), one causal cuDNN call (the same positions), or, for any other
  layout, the Pallas kernel; pairs combine through the lse and their backward runs cuDNN's
  with the final output and lse (`cudnn_blocks`).
- "pallas": the Pallas flash-attention kernels (pallas_kernels.flash_attention: one program
  per query tile, key tiles wholly in the future skipped, the mask applied only to partly
  visible tiles); interpret mode off GPU, for tests.
- "xla": XLA tiles (`lax.map` over query tiles, `lax.scan` over key tiles, a tile pair
  skipped by `lax.cond`); the backward recomputes the probabilities from the saved lse.
"auto" takes cuDNN where it applies, else Pallas on GPU, else XLA. Scores, softmax,
dQ and output accumulators are float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention as flash
from sh2_jax.parallel import cudnn_blocks

NEG_INF = flash.NEG_INF
TILE = 512
STRATEGIES = ("allgather", "ring")
KERNELS = ("auto", "cudnn", "pallas", "xla")
KERNEL = "auto"  # block kernel: "auto" (cuDNN, else Pallas on GPU, else XLA) or one of those
F32 = jnp.float32


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _half_block(length: int) -> int:
  """Length of the query sub-blocks of the cuDNN path: half a rank's block (a zigzag chunk)."""
  return length // 2 if length % 2 == 0 else length


def _cudnn_reason(q: jax.Array, k: jax.Array, order: tuple[bool, bool, bool]) -> str | None:
  """Why the cuDNN pair path cannot run these blocks (None when it can)."""
  if not (order[0] and order[2]):
    return "the queries or the key blocks are not known to ascend in position"
  if k.shape[1] % _half_block(q.shape[1]):
    return (f"{k.shape[1]} keys are not a multiple of the query half-block "
            f"{_half_block(q.shape[1])}")
  return cudnn_blocks.unsupported_reason(q.dtype, q.shape[-1])


def _kernel(q: jax.Array, k: jax.Array, order: tuple[bool, bool, bool]) -> str:
  """The block kernel for these blocks: "cudnn", "pallas" or "xla" (see the module doc).

  order: (queries ascend, keys ascend, keys ascend within every run of len(queries)).
  """
  if KERNEL not in KERNELS:
    raise ValueError(f"context_attention.KERNEL={KERNEL!r}: choose one of {KERNELS}")
  if KERNEL in ("auto", "cudnn"):
    reason = _cudnn_reason(q, k, order)
    if reason is None:
      return "cudnn"
    if KERNEL == "cudnn":
      raise ValueError(f"context_attention.KERNEL='cudnn' cannot run here: {reason}; "
                       "set it to 'auto' or 'pallas'")
  return "pallas" if KERNEL == "pallas" or (KERNEL == "auto" and _on_gpu()) else "xla"


def _tile(length: int, target: int = TILE) -> int:
  """Largest divisor of `length` that is <= target."""
  for size in range(min(length, target), 0, -1):
    if length % size == 0:
      return size
  return 1


def _split(x: jax.Array, tile: int, axis: int) -> jax.Array:
  """[..., L, ...] -> [L / tile, ..., tile, ...] (the tile index first)."""
  shape = x.shape
  x = x.reshape(shape[:axis] + (shape[axis] // tile, tile) + shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _merge(x: jax.Array, axis: int) -> jax.Array:
  """Inverse of `_split`."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _full(shape, value, like: jax.Array) -> jax.Array:
  """float32 constant with the varying mesh axes of `like` (for shard_map's type checks)."""
  return jnp.full_like(like, value, dtype=F32, shape=shape)


def _map(fn, xs):
  """lax.map over the leading axis; a single tile is called directly (smaller programs)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(fn, xs)


def _scan(fn, init, xs):
  """lax.scan over the leading axis; a single tile is called directly."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, y = fn(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda v: v[None], y)
  return jax.lax.scan(fn, init, xs)


def _scores(q_BQNH, k_BKNH, pos_Q, pos_K, scale):
  s_BNQK = jnp.einsum("bqnh,bknh->bnqk", q_BQNH, k_BKNH, preferred_element_type=F32) * scale
  return s_BNQK, pos_Q[:, None] >= pos_K[None, :]


def _visible(pos_Q, pos_K):
  """Some key of the tile is at or before some query of the tile."""
  return jnp.max(pos_Q) >= jnp.min(pos_K)


def _fold(o, m, l, o_blk, lse_blk):
  """Folds a normalised block result (o_blk [B, Lq, N, H], lse_blk [B, N, Lq]) into the
  online-softmax state (o unnormalised f32, running max m, sum l)."""
  m_new = jnp.maximum(m, lse_blk)
  alpha, beta = jnp.exp(m - m_new), jnp.exp(lse_blk - m_new)
  weight = lambda w: jnp.swapaxes(w, 1, 2)[..., None]
  return (o * weight(alpha) + o_blk.astype(F32) * weight(beta), m_new,
          alpha * l + jnp.where(lse_blk > NEG_INF / 2, beta, 0.0))


def _normalise(o, m, l):
  """Online-softmax state -> (o / l, lse); rows that saw nothing get o = 0, lse = NEG_INF."""
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return o / jnp.swapaxes(l_safe, 1, 2)[..., None], jnp.where(seen, m + jnp.log(l_safe), NEG_INF)


def _runs(x: jax.Array, size: int, axis: int) -> list[jax.Array]:
  return [jax.lax.slice_in_dim(x, i * size, (i + 1) * size, axis=axis)
          for i in range(x.shape[axis] // size)]


def _relation(pos_q: jax.Array, pos_k: jax.Array) -> jax.Array:
  """0: no key visible, 1: every key visible, 2: the same positions (causal), 3: anything
  else; for ascending positions on both sides."""
  skip, full = pos_q[-1] < pos_k[0], pos_q[0] >= pos_k[-1]
  same = jnp.all(pos_q == pos_k) if pos_q.shape == pos_k.shape else jnp.bool_(False)
  return jnp.where(skip, 0, jnp.where(full, 1, jnp.where(same, 2, 3))).astype(jnp.int32)


def _general_kernel() -> str:
  return "pallas" if _on_gpu() else "xla"


def _cudnn_block_forward(q, k, v, pos_q, pos_k, scale):
  """(o [B, Lq, N, H] f32 normalised, lse [B, N, Lq]) of q against one key block, from cuDNN
  calls on the pairs of half-blocks (see the module doc). Each pair's o is in q's dtype (what
  cuDNN writes): every pair's switch holds its own output buffers."""
  sub = _half_block(q.shape[1])

  def skip(q_a, k_b, v_b, pq_a, pk_b):
    return (jnp.zeros_like(q_a), _full((q_a.shape[0], q_a.shape[2], sub), NEG_INF, q_a))

  def cudnn(causal):
    def call(q_a, k_b, v_b, pq_a, pk_b):
      return cudnn_blocks.block_forward(q_a, k_b, v_b, causal, scale)
    return call

  def general(q_a, k_b, v_b, pq_a, pk_b):
    return _kernel_block_attention(q_a, k_b, v_b, pq_a, pk_b, scale, _general_kernel(),
                                   (True, True, True), out_dtype=q_a.dtype)

  branches = (skip, cudnn(False), cudnn(True), general)
  outs, lses = [], []
  for q_a, pq_a in zip(_runs(q, sub, 1), _runs(pos_q, sub, 0)):
    state = (_full(q_a.shape, 0.0, q_a), _full((q.shape[0], q.shape[2], sub), NEG_INF, q_a),
             _full((q.shape[0], q.shape[2], sub), 0.0, q_a))
    for k_b, v_b, pk_b in zip(_runs(k, sub, 1), _runs(v, sub, 1), _runs(pos_k, sub, 0)):
      state = _fold(*state, *jax.lax.switch(_relation(pq_a, pk_b), branches,
                                             q_a, k_b, v_b, pq_a, pk_b))
    o_a, lse_a = _normalise(*state)
    outs.append(o_a)
    lses.append(lse_a)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _cudnn_block_backward(q, k, v, pos_q, pos_k, out, d_out, lse, delta, scale, out_dtype):
  """Gradients of one key block by pairs of half-blocks (see `_cudnn_block_forward`):
  (dq [B, Lq, N, H], dk, dv [B, Lk, N, H]) in out_dtype. Each pair's gradients are in q's
  dtype (what cuDNN writes), summed in float32."""
  sub = _half_block(q.shape[1])

  def skip(q_a, k_b, v_b, pq_a, pk_b, o_a, do_a, lse_a, delta_a):
    return jnp.zeros_like(q_a), jnp.zeros_like(k_b), jnp.zeros_like(v_b)

  def cudnn(causal):
    def call(q_a, k_b, v_b, pq_a, pk_b, o_a, do_a, lse_a, delta_a):
      return cudnn_blocks.block_backward(q_a, k_b, v_b, o_a, lse_a, do_a, causal, scale)
    return call

  def general(q_a, k_b, v_b, pq_a, pk_b, o_a, do_a, lse_a, delta_a):
    return _kernel_block_backward(q_a, k_b, v_b, pq_a, pk_b, do_a, lse_a, delta_a, scale,
                                  q_a.dtype, _general_kernel(), (True, True, True))

  branches = (skip, cudnn(False), cudnn(True), general)
  queries = list(zip(_runs(q, sub, 1), _runs(pos_q, sub, 0), _runs(out, sub, 1),
                     _runs(d_out, sub, 1), _runs(lse, sub, 2), _runs(delta, sub, 2)))
  dqs = [_full(q_a.shape, 0.0, q_a) for q_a, *_ in queries]
  dks, dvs = [], []
  for k_b, v_b, pk_b in zip(_runs(k, sub, 1), _runs(v, sub, 1), _runs(pos_k, sub, 0)):
    dk_b = dv_b = 0.0
    for a, (q_a, pq_a, o_a, do_a, lse_a, delta_a) in enumerate(queries):
      dq, dk, dv = jax.lax.switch(_relation(pq_a, pk_b), branches,
                                  q_a, k_b, v_b, pq_a, pk_b, o_a, do_a, lse_a, delta_a)
      dqs[a], dk_b, dv_b = dqs[a] + dq.astype(F32), dk_b + dk.astype(F32), dv_b + dv.astype(F32)
    dks.append(dk_b.astype(out_dtype))  # each key half-block done: no f32 dK/dV of length Lk
    dvs.append(dv_b.astype(out_dtype))
  return (jnp.concatenate(dqs, axis=1).astype(out_dtype), jnp.concatenate(dks, axis=1),
          jnp.concatenate(dvs, axis=1))


def _kernel_block_attention(q, k, v, pos_q, pos_k, scale, kernel, order, out_dtype=F32):
  """(o [B, Lq, N, H] normalised in out_dtype, lse [B, N, Lq]) of q against one key block."""
  if kernel == "cudnn":
    o, lse = _cudnn_block_forward(q, k, v, pos_q, pos_k, scale)
    return o.astype(out_dtype), lse
  if kernel == "pallas":
    return flash.attention_block_forward(q, k, v, pos_q, pos_k, scale=scale, out_dtype=out_dtype,
                                         interpret=not _on_gpu(), sorted_q=order[0],
                                         sorted_k=order[1])
  batch, length_q, heads, _ = q.shape
  state = (_full(q.shape, 0.0, q), _full((batch, heads, length_q), NEG_INF, q),
           _full((batch, heads, length_q), 0.0, q))
  o, lse = _normalise(*_xla_block_forward(q, k, v, pos_q, pos_k, *state, scale))
  return o.astype(out_dtype), lse


def _block_forward(q, k, v, pos_q, pos_k, o, m, l, scale, kernel, order):
  """Folds one key block into the online-softmax state.

  q [B, Lq, N, H], k/v [B, Lk, N, H], pos [Lq]/[Lk] int; o [B, Lq, N, H] f32, m/l [B, N, Lq] f32.
  kernel: "cudnn" | "pallas" | "xla"; order: (queries ascend, keys ascend, keys ascend within
  every run of Lq), which spares the kernels their sorts.
  """
  if kernel == "xla":
    return _xla_block_forward(q, k, v, pos_q, pos_k, o, m, l, scale)
  return _fold(o, m, l, *_kernel_block_attention(q, k, v, pos_q, pos_k, scale, kernel, order))


def _xla_block_forward(q, k, v, pos_q, pos_k, o, m, l, scale):
  tq, tk = _tile(q.shape[1]), _tile(k.shape[1])
  ks, vs, pks = _split(k, tk, 1), _split(v, tk, 1), _split(pos_k, tk, 0)

  def q_tile(args):
    q_i, pq_i, o_i, m_i, l_i = args

    def k_tile(carry, kargs):
      k_j, v_j, pk_j = kargs

      def update(carry):
        o_i, m_i, l_i = carry
        s, mask = _scores(q_i, k_j, pq_i, pk_j, scale)
        m_new = jnp.maximum(m_i, jnp.max(jnp.where(mask, s, NEG_INF), axis=-1))
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s - m_new[..., None], NEG_INF)), 0.0)
        alpha = jnp.exp(m_i - m_new)
        pv = jnp.einsum("bnqk,bknh->bqnh", p.astype(v_j.dtype), v_j, preferred_element_type=F32)
        return o_i * jnp.swapaxes(alpha, 1, 2)[..., None] + pv, m_new, alpha * l_i + p.sum(-1)

      return jax.lax.cond(_visible(pq_i, pk_j), update, lambda c: c, carry), None

    carry, _ = _scan(k_tile, (o_i, m_i, l_i), (ks, vs, pks))
    return carry

  o, m, l = _map(q_tile, (_split(q, tq, 1), _split(pos_q, tq, 0), _split(o, tq, 1),
                                 _split(m, tq, 2), _split(l, tq, 2)))
  return _merge(o, 1), _merge(m, 2), _merge(l, 2)


def _kernel_block_backward(q, k, v, pos_q, pos_k, d_out, lse, delta, scale, out_dtype, kernel,
                           order, out=None):
  """Gradients of one key block: (dq [B, Lq, N, H], dk, dv [B, Lk, N, H]) in out_dtype.

  lse, delta: [B, N, Lq] final log-sum-exp and rowsum(d_out * out) of the queries; out: their
  final output [B, Lq, N, H] (needed by "cudnn"). kernel, order: as `_block_forward`.
  """
  if kernel == "cudnn":
    return _cudnn_block_backward(q, k, v, pos_q, pos_k, out, d_out, lse, delta, scale, out_dtype)
  if kernel == "pallas":
    return flash.attention_block_backward(q, k, v, pos_q, pos_k, d_out, lse, delta, scale=scale,
                                          out_dtype=out_dtype, interpret=not _on_gpu(),
                                          sorted_q=order[0], sorted_k=order[1])
  tq, tk = _tile(q.shape[1]), _tile(k.shape[1])
  qs, pqs, dos = _split(q, tq, 1), _split(pos_q, tq, 0), _split(d_out, tq, 1)
  lses, deltas = _split(lse, tq, 2), _split(delta, tq, 2)

  def k_tile(dq, kargs):
    k_j, v_j, pk_j = kargs

    def q_tile(dkv, qargs):
      q_i, pq_i, do_i, lse_i, delta_i = qargs

      def grads(_):
        s, mask = _scores(q_i, k_j, pq_i, pk_j, scale)
        p = jnp.where(mask, jnp.exp(jnp.where(mask, s - lse_i[..., None], NEG_INF)), 0.0)
        dv = jnp.einsum("bnqk,bqnh->bknh", p.astype(do_i.dtype), do_i, preferred_element_type=F32)
        dp = jnp.einsum("bqnh,bknh->bnqk", do_i, v_j, preferred_element_type=F32)
        ds = p * (dp - delta_i[..., None])
        dq_i = jnp.einsum("bnqk,bknh->bqnh", ds.astype(k_j.dtype), k_j,
                          preferred_element_type=F32) * scale
        dk = jnp.einsum("bnqk,bqnh->bknh", ds.astype(q_i.dtype), q_i,
                        preferred_element_type=F32) * scale
        return dq_i, dk, dv

      def nothing(_):
        return (_full(q_i.shape, 0.0, q_i), _full(k_j.shape, 0.0, q_i), _full(v_j.shape, 0.0, q_i))

      dq_i, dk, dv = jax.lax.cond(_visible(pq_i, pk_j), grads, nothing, None)
      return (dkv[0] + dk, dkv[1] + dv), dq_i

    zeros = (_full(k_j.shape, 0.0, q), _full(v_j.shape, 0.0, q))
    (dk_j, dv_j), dq_tiles = _scan(q_tile, zeros, (qs, pqs, dos, lses, deltas))
    return dq + dq_tiles, (dk_j, dv_j)

  dq, (dks, dvs) = _scan(k_tile, _full(qs.shape, 0.0, q),
                                (_split(k, tk, 1), _split(v, tk, 1), _split(pos_k, tk, 0)))
  return tuple(_merge(g, 1).astype(out_dtype) for g in (dq, dks, dvs))


def _rotate(xs, axis_name):
  """Sends every array one rank forward around the ring (i -> i+1 mod N)."""
  n = jax.lax.axis_size(axis_name)
  perm = [(i, (i + 1) % n) for i in range(n)]
  return tuple(jax.lax.ppermute(x, axis_name, perm) for x in xs)


def _num_blocks(axis_name):
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _attention_forward(q, k, v, pos_q, pos_k, axis_name, order):
  batch, length_q, heads, head_dim = q.shape
  scale = 1.0 / math.sqrt(head_dim)
  kernel = _kernel(q, k, order)
  if _num_blocks(axis_name) == 1 and kernel == "pallas":  # one block: the kernel's (o, lse)
    return flash.attention_block_forward(q, k, v, pos_q, pos_k, scale=scale,
                                         interpret=not _on_gpu(), sorted_q=order[0],
                                         sorted_k=order[1])
  if _num_blocks(axis_name) == 1 and kernel == "cudnn":
    out, lse = _cudnn_block_forward(q, k, v, pos_q, pos_k, scale)
    return out.astype(q.dtype), lse
  state = (_full(q.shape, 0.0, q), _full((batch, heads, length_q), NEG_INF, q),
           _full((batch, heads, length_q), 0.0, q))

  def step(carry, _):  # fold the visiting block in, pass it on (one K/V block in flight)
    state, block = carry
    state = _block_forward(q, block[0], block[1], pos_q, block[2], *state, scale, kernel, order)
    return (state, _rotate(block, axis_name)), None

  block = (k, v, pos_k)
  if _num_blocks(axis_name) > 1:
    (state, block), _ = jax.lax.scan(step, (state, block), None, length=_num_blocks(axis_name) - 1)
  o, m, l = _block_forward(q, block[0], block[1], pos_q, block[2], *state, scale, kernel, order)
  out = (o / jnp.swapaxes(l, 1, 2)[..., None]).astype(q.dtype)
  return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, pos_q, pos_k, axis_name, order=(False, False, False)):
  return _attention_forward(q, k, v, pos_q, pos_k, axis_name, order)[0]


def _attention_fwd(q, k, v, pos_q, pos_k, axis_name, order=(False, False, False)):
  out, lse = _attention_forward(q, k, v, pos_q, pos_k, axis_name, order)
  return out, (q, k, v, pos_q, pos_k, out, lse)


def _attention_bwd(axis_name, order, saved, d_out):
  q, k, v, pos_q, pos_k, out, lse = saved
  scale = 1.0 / math.sqrt(q.shape[-1])
  kernel = _kernel(q, k, order)
  d_out = d_out.astype(q.dtype)
  delta = jnp.einsum("bqnh,bqnh->bnq", d_out.astype(F32), out.astype(F32))

  def grads(dq, block, dkv):
    # Each block's gradients come in the inputs' dtype (cuDNN's pairs are already in it); dQ
    # sums them in float32, the travelling dK/dV in the inputs' dtype: the same rounding as
    # all-gather's reduce-scatter of dK/dV, at half the memory of float32 accumulators.
    dq_s, dk_s, dv_s = _kernel_block_backward(q, block[0], block[1], pos_q, block[2], d_out, lse,
                                              delta, scale, q.dtype, kernel, order, out)
    return dq + dq_s.astype(F32), (dkv[0] + dk_s, dkv[1] + dv_s)

  def step(carry, _):  # the visiting block's dK/dV travel with it and arrive home after N
    dq, block, dkv = carry
    dq, dkv = grads(dq, block, dkv)
    return (dq, _rotate(block, axis_name), _rotate(dkv, axis_name)), None

  if _num_blocks(axis_name) == 1 and kernel != "xla":
    # One block (all-gather, one device): the kernels write the input dtypes directly, with
    # no float32 dK/dV of the gathered length in between.
    return (*_kernel_block_backward(q, k, v, pos_q, pos_k, d_out, lse, delta, scale, q.dtype,
                                    kernel, order, out), None, None)
  carry = (_full(q.shape, 0.0, q), (k, v, pos_k), (jnp.zeros_like(k), jnp.zeros_like(v)))
  if _num_blocks(axis_name) > 1:
    carry, _ = jax.lax.scan(step, carry, None, length=_num_blocks(axis_name) - 1)
  dq, dkv = grads(*carry)
  if axis_name is not None:
    dkv = _rotate(dkv, axis_name)
  return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  """Inputs' dtype on GPU; float32 elsewhere (XLA:CPU lacks some bf16 x bf16 -> f32 dots)."""
  if jax.default_backend() == "gpu":
    return x.dtype
  return jnp.promote_types(x.dtype, F32)


def masked_attention(q_BQNH: jax.Array, k_BKNH: jax.Array, v_BKNH: jax.Array, pos_Q: jax.Array,
                     pos_K: jax.Array, sorted_q: bool = False,
                     sorted_k_runs: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H), pos_q >= pos_k) v on one device, tiled (no [Q, K] scores).

  Every query must see at least one key (true for causal attention over its own position).
  sorted_q: pos_Q is known to ascend (spares the Pallas kernels a sort of the queries).
  sorted_k_runs: pos_K ascends within every run of Q keys (all-gathered blocks of ranks whose
    positions ascend); with sorted_q it lets the cuDNN pair path run.
  Returns [B, Q, N, H] in q's dtype.
  """
  cdt = _compute_dtype(q_BQNH)
  out = _attention(q_BQNH.astype(cdt), k_BKNH.astype(cdt), v_BKNH.astype(cdt),
                   pos_Q.astype(jnp.int32), pos_K.astype(jnp.int32), None,
                   (sorted_q, False, sorted_q and sorted_k_runs))
  return out.astype(q_BQNH.dtype)


def ring_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array, pos_L: jax.Array,
                   axis_name: str, local_sorted: bool = False) -> jax.Array:
  """Causal attention of a sequence sharded over `axis_name`, K/V passed around a ring.

  Args:
    q_BLNH, k_BLNH, v_BLNH: [B, L_local, N, H] local blocks (RoPE applied).
    pos_L: [L_local] int positions of the local tokens in the full sequence.
    axis_name: the shard_map axis holding the sequence.
    local_sorted: every rank's pos_L ascends (contiguous and zigzag layouts), so the kernels
      need not sort queries or visiting key blocks, and cuDNN can run the blocks.

  Returns:
    [B, L_local, N, H] in q's dtype.
  """
  cdt = _compute_dtype(q_BLNH)
  pos = pos_L.astype(jnp.int32)
  out = _attention(q_BLNH.astype(cdt), k_BLNH.astype(cdt), v_BLNH.astype(cdt), pos, pos, axis_name,
                   (local_sorted,) * 3)
  return out.astype(q_BLNH.dtype)


def _gather(x: jax.Array, axis_name: str, axis: int) -> jax.Array:
  return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gathered_attention(q, k, v, pos, axis_name, order):
  return _gathered_attention_fwd(q, k, v, pos, axis_name, order)[0]


def _gathered_attention_fwd(q, k, v, pos, axis_name, order):
  out, lse = _attention_forward(q, _gather(k, axis_name, 1), _gather(v, axis_name, 1), pos,
                                _gather(pos, axis_name, 0), None, order)
  # The local K/V are saved, not the gathered ones (N times larger, alive from the forward
  # through the rest of the block's backward): the backward gathers them again.
  return out, (q, k, v, pos, out, lse)


def _gathered_attention_bwd(axis_name, order, saved, d_out):
  q, k, v, pos, out, lse = saved
  gathered = (q, _gather(k, axis_name, 1), _gather(v, axis_name, 1), pos,
              _gather(pos, axis_name, 0), out, lse)
  dq, dk, dv, _, _ = _attention_bwd(None, order, gathered, d_out)
  scatter = lambda g: jax.lax.psum_scatter(g, axis_name, scatter_dimension=1, tiled=True)
  return dq, scatter(dk), scatter(dv), None


_gathered_attention.defvjp(_gathered_attention_fwd, _gathered_attention_bwd)


def allgather_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array,
                        pos_L: jax.Array, axis_name: str, local_sorted: bool = False) -> jax.Array:
  """Causal attention of a sequence sharded over `axis_name` by all-gathering K, V (same
  arguments as `ring_attention`); the backward gathers K, V again and reduce-scatters dK, dV.
  Keeps only the local K, V for the backward."""
  cdt = _compute_dtype(q_BLNH)
  out = _gathered_attention(q_BLNH.astype(cdt), k_BLNH.astype(cdt), v_BLNH.astype(cdt),
                            pos_L.astype(jnp.int32), axis_name,
                            (local_sorted, False, local_sorted))
  return out.astype(q_BLNH.dtype)


def context_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array, pos_L: jax.Array,
                      axis_name: str, strategy: str, local_sorted: bool = False) -> jax.Array:
  """Dispatches to `allgather_attention` or `ring_attention`."""
  if strategy == "allgather":
    return allgather_attention(q_BLNH, k_BLNH, v_BLNH, pos_L, axis_name, local_sorted)
  if strategy == "ring":
    return ring_attention(q_BLNH, k_BLNH, v_BLNH, pos_L, axis_name, local_sorted)
  raise ValueError(f"context-parallel attention {strategy!r}: choose one of {STRATEGIES}")


def masked_attention_reference(q_BQNH: jax.Array, k_BKNH: jax.Array, v_BKNH: jax.Array,
                               pos_Q: jax.Array, pos_K: jax.Array) -> jax.Array:
  """Plain float32 softmax attention with the position mask (materialises [B, N, Q, K])."""
  s, mask = _scores(q_BQNH.astype(F32), k_BKNH.astype(F32), pos_Q, pos_K,
                    1.0 / math.sqrt(q_BQNH.shape[-1]))
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return jnp.einsum("bnqk,bknh->bqnh", p, v_BKNH.astype(F32)).astype(q_BQNH.dtype)
