"""Context-parallel Hyena primitives: p2p halo exchange and all-to-all resharding (SPEC.md s6).

The sequence is sharded in contiguous blocks over a mesh axis (rank r of N holds positions
[r L/N, (r+1) L/N)), or, with `zigzag`, in 2N chunks of c = L/2N where rank r holds chunks r
and 2N-1-r (balances causal attention; the sequence is permuted once at the input, see
`zigzag_order`). Two strategies keep the causal convolutions exact:
- p2p (featurizer, SE, MR while K-1 <= local length): each shard receives the last K-1 rows of
  its causal predecessor by `jax.lax.ppermute` (i -> i+1, zeros on shard 0), runs the local
  operator on its own rows as they are, and adds what the received rows contribute to the first
  K-1 outputs (a small direct convolution): no halo-extended copy of the activations.
  Autodiff of ppermute is the reverse ppermute, so the halo gradients flow back to the
  predecessor. Under zigzag a rank's two chunks are two segments with different predecessors:
  chunk r's is rank r-1's first chunk, chunk 2N-1-r's is rank r+1's second chunk (rank N-1:
  its own first chunk).
- all-to-all (LI, optionally MR): `jax.lax.all_to_all` switches from sequence sharding
  [B, L/N, C] to channel sharding [B, L, C/N], the full-length convolution runs on the rank's
  channels (whole filter groups), and a second all-to-all switches back. Under zigzag the
  gathered sequence arrives in rank-major chunk order and is put in natural order (a local
  gather of chunks) around the convolution.

The `cp_*`, `halo_exchange`, `seq_to_channels` and `channels_to_seq` functions are pure and run
INSIDE `jax.shard_map` over the axis named by `axis_name`; filters, poles, residues and skips
are passed whole (replicated over that axis) and each rank slices its own rows by
`jax.lax.axis_index`; shard_map then sums their gradients over the axis. The
`context_parallel_*` wrappers build the shard_map over a mesh, validate the sequence length
and take/return sequence-sharded arrays ([B, L, C] with the spec P(None, axis, None)).

Convention as in ops/conv.py: h[:, 0] multiplies the current token; the math runs in float32.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import blocked_conv
from sh2_jax.config import ConfigError
from sh2_jax.ops import conv, hyena

STRATEGIES = ("p2p", "a2a")


# ---- zigzag layout ---------------------------------------------------------------------------


def zigzag_chunks(num_shards: int) -> np.ndarray:
  """Chunk ids in zigzag storage order: [0, 2N-1, 1, 2N-2, ..., N-1, N] (rank r: r, 2N-1-r)."""
  ranks = np.arange(num_shards)
  return np.stack([ranks, 2 * num_shards - 1 - ranks], axis=1).reshape(-1)


def zigzag_order(length: int, num_shards: int) -> np.ndarray:
  """Positions in zigzag storage order: permuted = natural[..., order] ([L] int32).

  Sharding the permuted sequence contiguously over N ranks gives rank r the chunks r and
  2N-1-r of length L/2N; `np.argsort(order)` undoes it.
  """
  if length % (2 * num_shards):
    raise ValueError(f"length {length} must be divisible by 2N = {2 * num_shards} for zigzag")
  chunk = length // (2 * num_shards)
  starts = zigzag_chunks(num_shards) * chunk
  return (starts[:, None] + np.arange(chunk)[None, :]).reshape(-1).astype(np.int32)


# ---- pure functions, called inside jax.shard_map ------------------------------------------


def halo_exchange(x_BLC: jax.Array, halo: int, axis_name: str) -> jax.Array:
  """Prepends the last `halo` rows of the causal predecessor shard (zeros on shard 0).

  Args:
    x_BLC: [B, L_local, C] local block of a sequence sharded over `axis_name`.
    halo: rows to receive; must be <= L_local.
    axis_name: the shard_map axis holding the sequence.

  Returns:
    [B, halo + L_local, C] in x's dtype.
  """
  if halo < 0:
    raise ValueError(f"halo {halo} must be >= 0")
  if halo == 0:
    return x_BLC
  return jnp.concatenate([segment_halos(x_BLC, halo, axis_name), x_BLC], axis=1)


def segment_halos(x_BLC: jax.Array, halo: int, axis_name: str, zigzag: bool = False) -> jax.Array:
  """The `halo` rows before each segment of this shard in the full sequence (zeros before
  position 0): [B * S, halo, C], segments as `x.reshape(B * S, L_local / S, C)`.

  S = 1, or 2 under zigzag, where chunk r's predecessor is rank r-1's first chunk and chunk
  2N-1-r's is rank r+1's second chunk (rank N-1: its own first chunk).
  """
  batch, local_len, channels = x_BLC.shape
  segments = 2 if zigzag else 1
  if local_len % segments:
    raise ValueError(f"a zigzag shard holds two equal chunks; got {local_len} rows")
  seg_len = local_len // segments
  if halo > seg_len:
    raise ValueError(f"halo {halo} is longer than the local block of {seg_len} rows: p2p context "
                     f"parallelism needs K-1 <= L/N; use the all-to-all strategy instead")
  num_shards = jax.lax.axis_size(axis_name)
  forward = [(i, i + 1) for i in range(num_shards - 1)]
  first_tail = x_BLC[:, seg_len - halo:seg_len]
  # ppermute leaves zeros on ranks that receive nothing (shard 0): the causal left padding.
  before_first = jax.lax.ppermute(first_tail, axis_name, forward) if forward else jnp.zeros_like(first_tail)
  if not zigzag:
    return before_first
  second_tail = x_BLC[:, local_len - halo:]
  backward = [(i + 1, i) for i in range(num_shards - 1)]
  received = jax.lax.ppermute(second_tail, axis_name, backward) if backward else jnp.zeros_like(second_tail)
  last = jax.lax.axis_index(axis_name) == num_shards - 1
  before_second = jnp.where(last, first_tail, received)
  return jnp.stack([before_first, before_second], axis=1).reshape(batch * 2, halo, channels)


def _segments(x_BLC: jax.Array, zigzag: bool) -> jax.Array:
  """[B, L_local, C] -> [B * S, L_local / S, C] (a reshape: no copy)."""
  segments = 2 if zigzag else 1
  return x_BLC.reshape(x_BLC.shape[0] * segments, -1, x_BLC.shape[-1])


def _plus_heads(y_SLC: jax.Array, head_SHC: jax.Array, batch: int) -> jax.Array:
  """y with head added to the first rows of every segment, back to [B, L_local, C].

  A scatter-add: its transpose passes y's cotangent through whole (no zeroed copy)."""
  rows = head_SHC.shape[1]
  y_SLC = y_SLC.at[:, :rows].add(head_SHC.astype(y_SLC.dtype), indices_are_sorted=True,
                                 unique_indices=True)
  return y_SLC.reshape(batch, -1, y_SLC.shape[-1])


def _halo_contribution(before_SHC: jax.Array, h_GK: jax.Array) -> jax.Array:
  """What the K-1 rows before each segment add to its first K-1 convolution outputs:
  [S, K-1, C] float32, y[t] += sum_k h[k] x[t - k] over the taps that reach before row 0
  (one banded [K-1, K-1] product per filter group, contiguous channel groups)."""
  halo = h_GK.shape[-1] - 1
  tap = np.arange(halo)[:, None] - np.arange(halo)[None, :] + halo  # [t, s]: 1 .. 2(K-1)-1
  h = h_GK.astype(jnp.float32)
  toeplitz_GTS = jnp.where(tap <= halo, h[:, np.minimum(tap, halo)], 0.0)
  segments, _, channels = before_SHC.shape
  groups = h.shape[0]
  x_SHGc = before_SHC.astype(jnp.float32).reshape(segments, halo, groups, channels // groups)
  y = jnp.einsum("gts,bsgc->btgc", toeplitz_GTS, x_SHGc, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(segments, halo, channels)


def cp_causal_conv_p2p(x_BLC: jax.Array, h_GK: jax.Array, axis_name: str,
                       method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                       zigzag: bool = False) -> jax.Array:
  """Grouped causal convolution of a sequence-sharded input by halo exchange (featurizer, SE, MR).

  Equals the local shard of `conv.causal_conv` on the full sequence (in zigzag order with
  `zigzag`). The local convolution runs on the shard's segments as they are (as if each
  started the sequence), then what the received halo rows contribute to the first K-1 outputs
  of each segment is added: no halo-extended copy of the activations.

  Args:
    x_BLC: [B, L_local, C] local block.
    h_GK: [G, K] grouped filter (replicated), h[:, 0] on the current token; K-1 <= L_local
      (K-1 <= L_local / 2 with zigzag).
    axis_name: the shard_map axis holding the sequence.
    method, chunk: as in `conv.causal_conv`.
    zigzag: the shard holds chunks r and 2N-1-r (see `zigzag_order`).

  Returns:
    [B, L_local, C] in x's dtype.
  """
  halo = h_GK.shape[-1] - 1
  if halo == 0:
    return conv.causal_conv(x_BLC, h_GK, method=method, chunk=chunk)
  halos = segment_halos(x_BLC, halo, axis_name, zigzag)
  x_SLC = _segments(x_BLC, zigzag)
  y_SLC = conv.causal_conv(x_SLC, h_GK, method=method, chunk=chunk)
  # The convolution is linear: the halo rows' share of the first K-1 outputs is added.
  return _plus_heads(y_SLC, _halo_contribution(halos, h_GK), x_BLC.shape[0])


def cp_gate_conv_gate_p2p(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                          h_GK: jax.Array, dskip_D: jax.Array | None, axis_name: str,
                          method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                          zigzag: bool = False) -> jax.Array:
  """post * (conv(pre * v, h) + dskip * pre * v) on a sequence-sharded input, p2p (SE, MR).

  The single-device operator (`hyena.gate_conv_gate` with `method`: the Pallas kernel on GPU)
  runs on the shard's segments as they are; then post * conv(u) of the K-1 rows of u = pre * v
  before each segment (pre and v exchanged) is added to its first K-1 outputs. No
  halo-extended copies of post, pre or v.

  Args:
    post_BLD, pre_BLD, v_BLD: [B, L_local, D] local blocks.
    h_GK: [G, K] grouped filter (replicated), K-1 <= L_local (L_local / 2 under zigzag).
    dskip_D: [D] skip weights (replicated) or None.
    axis_name: the shard_map axis holding the sequence.
    method, chunk: as in `hyena.gate_conv_gate`.
    zigzag: the shard holds chunks r and 2N-1-r.

  Returns:
    [B, L_local, D] in v's dtype.
  """
  halo = h_GK.shape[-1] - 1
  if halo == 0:
    return hyena.gate_conv_gate(post_BLD, pre_BLD, v_BLD, h_GK, dskip_D, method, chunk)
  post, pre, v = (_segments(x, zigzag) for x in (post_BLD, pre_BLD, v_BLD))
  y = hyena.gate_conv_gate(post, pre, v, h_GK, dskip_D, method, chunk)
  # What u = pre * v of the halo rows adds to the first K-1 outputs: post * conv(u_halo).
  u_halo = (segment_halos(pre_BLD, halo, axis_name, zigzag).astype(jnp.float32)
            * segment_halos(v_BLD, halo, axis_name, zigzag).astype(jnp.float32))
  missing = post[:, :halo].astype(jnp.float32) * _halo_contribution(u_halo, h_GK)
  return _plus_heads(y, missing, post_BLD.shape[0])


def _reorder_chunks(x_BLC: jax.Array, chunk_ids: np.ndarray) -> jax.Array:
  """Chunk k of the result is chunk chunk_ids[k] of x (a static local gather along L)."""
  batch, length, channels = x_BLC.shape
  chunks = x_BLC.reshape(batch, len(chunk_ids), length // len(chunk_ids), channels)
  return chunks[:, chunk_ids].reshape(batch, length, channels)


def seq_to_channels(x_BLC: jax.Array, axis_name: str, zigzag: bool = False) -> jax.Array:
  """[B, L/N, C] sequence-sharded -> [B, L, C/N] channel-sharded (rank r: channel block r).

  With `zigzag` the input shards hold chunks r, 2N-1-r; the output is in natural order.
  """
  num_shards = jax.lax.axis_size(axis_name)
  channels = x_BLC.shape[-1]
  if channels % num_shards:
    raise ValueError(f"channels {channels} must be divisible by the {num_shards} shards of axis "
                     f"{axis_name!r} for the all-to-all strategy")
  y = jax.lax.all_to_all(x_BLC, axis_name, split_axis=2, concat_axis=1, tiled=True)
  return _reorder_chunks(y, np.argsort(zigzag_chunks(num_shards))) if zigzag else y


def channels_to_seq(x_BLC: jax.Array, axis_name: str, zigzag: bool = False) -> jax.Array:
  """[B, L, C/N] channel-sharded -> [B, L/N, C] sequence-sharded (inverse of seq_to_channels)."""
  num_shards = jax.lax.axis_size(axis_name)
  length = x_BLC.shape[1]
  if length % (2 * num_shards if zigzag else num_shards):
    raise ValueError(f"length {length} must be divisible by the {num_shards} shards of axis "
                     f"{axis_name!r}{' (2N chunks with zigzag)' if zigzag else ''}")
  if zigzag:
    x_BLC = _reorder_chunks(x_BLC, zigzag_chunks(num_shards))
  return jax.lax.all_to_all(x_BLC, axis_name, split_axis=1, concat_axis=2, tiled=True)


def local_rows(w_CX: jax.Array, axis_name: str) -> jax.Array:
  """The rank's contiguous block of rows of a replicated per-channel array: [C, X] -> [C/N, X]."""
  num_shards = jax.lax.axis_size(axis_name)
  rows = w_CX.shape[0]
  if rows % num_shards:
    raise ValueError(f"{rows} rows must be divisible by the {num_shards} shards of {axis_name!r}")
  size = rows // num_shards
  return jax.lax.dynamic_slice_in_dim(w_CX, jax.lax.axis_index(axis_name) * size, size, axis=0)


def local_groups(h_GK: jax.Array, channels: int, axis_name: str) -> jax.Array:
  """Filters of the rank's channel block [r C/N, (r+1) C/N) of a grouped filter [G, K].

  Whole groups per rank when N divides G ([G/N, K]); a rank inside one group when G divides N
  ([1, K]); anything else splits a group across ranks unevenly and is refused.
  """
  num_shards = jax.lax.axis_size(axis_name)
  groups = h_GK.shape[0]
  if channels % num_shards or channels % groups:
    raise ValueError(f"channels {channels} must be divisible by the {num_shards} shards and the "
                     f"{groups} filter groups")
  if groups % num_shards == 0:
    return local_rows(h_GK, axis_name)
  if num_shards % groups == 0:
    per_group = num_shards // groups
    return jax.lax.dynamic_slice_in_dim(h_GK, jax.lax.axis_index(axis_name) // per_group, 1, axis=0)
  raise ValueError(f"{groups} filter groups over {num_shards} shards: the channel block C/N = "
                   f"{channels // num_shards} must be a multiple or a divisor of the group width "
                   f"{channels // groups}; choose N dividing G or G dividing N")


def cp_gate_conv_gate_a2a(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                          h_GK: jax.Array, dskip_D: jax.Array | None, axis_name: str,
                          method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                          zigzag: bool = False) -> jax.Array:
  """Grouped gate-conv-gate by all-to-all (MR at any K): u goes channel-sharded, full length.

  Args:
    post_BLD, pre_BLD, v_BLD: [B, L_local, D] local blocks.
    h_GK: [G, K] grouped filter, whole (replicated); the rank takes its groups by axis_index.
    dskip_D: [D] (replicated) or None; applied in the sequence-sharded layout.
    axis_name: the shard_map axis holding the sequence.
    zigzag: the shard holds chunks r and 2N-1-r.

  Returns:
    [B, L_local, D] in v's dtype.
  """
  h_local = local_groups(h_GK.astype(jnp.float32), v_BLD.shape[-1], axis_name)

  def inner_conv(u):
    y_ch = conv.causal_conv(seq_to_channels(u, axis_name, zigzag), h_local, method=method,
                            chunk=chunk)
    return channels_to_seq(y_ch, axis_name, zigzag)

  return hyena.gated(post_BLD, pre_BLD, v_BLD, dskip_D, inner_conv)


def cp_li_gate_conv_gate_a2a(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                             log_poles_DN: jax.Array, residues_DN: jax.Array, dskip_D: jax.Array,
                             axis_name: str, method: str = "auto",
                             zigzag: bool = False) -> jax.Array:
  """Hyena-LI post * (modal_conv(pre * v) + dskip * pre * v) by all-to-all.

  With the fused modal kernel ("pallas"; "auto" on GPU), post, pre and v switch to channel
  sharding in their own dtype (bf16 in training), the single-device operator
  (`hyena.li_gate_conv_gate`: gates and skip inside the kernel) runs on the rank's D/N
  channels over the full length, and its output switches back: no float32 [B, L, D/N]
  buffers. Otherwise (FFT, chunked) the gates stay in the sequence layout and u = pre * v and
  the convolution cross in float32 (fewer buffers for those methods). Either way the same bytes
  cross the axis.

  Args:
    post_BLD, pre_BLD, v_BLD: [B, L_local, D] local blocks.
    log_poles_DN, residues_DN: [D, N] whole (replicated); the rank takes its D/N rows by
      axis_index.
    dskip_D: [D] whole.
    axis_name: the shard_map axis holding the sequence.
    method: as in `hyena.li_gate_conv_gate`, resolved against the full length.
    zigzag: the shard holds chunks r and 2N-1-r.

  Returns:
    [B, L_local, D] in v's dtype.
  """
  rows = lambda w: local_rows(w, axis_name)
  num_shards = jax.lax.axis_size(axis_name)
  batch, length_local, channels = v_BLD.shape
  shape_ch = (batch, length_local * num_shards, channels // num_shards)
  method = hyena.resolve_li_method(method, shape_ch[1], shape_ch, log_poles_DN.shape[-1])
  log_poles, residues = rows(log_poles_DN), rows(residues_DN)
  if method == "pallas":
    post, pre, v = (seq_to_channels(x, axis_name, zigzag) for x in (post_BLD, pre_BLD, v_BLD))
    y_ch = hyena.li_gate_conv_gate(post, pre, v, log_poles, residues, rows(dskip_D[:, None])[:, 0],
                                   method)
    return channels_to_seq(y_ch, axis_name, zigzag)

  def inner_conv(u):
    y_ch = hyena.li_long_conv(seq_to_channels(u, axis_name, zigzag), log_poles, residues, method)
    return channels_to_seq(y_ch, axis_name, zigzag)

  return hyena.gated(post_BLD, pre_BLD, v_BLD, dskip_D, inner_conv)


# ---- wrappers building the shard_map --------------------------------------------------------


def validate_length(length: int, num_shards: int, halo: int = 0, zigzag: bool = False) -> None:
  """Raises ValueError (a ConfigError) unless `length` splits into equal blocks of at least
  `halo` rows: N blocks, or 2N chunks with `zigzag`."""
  blocks = 2 * num_shards if zigzag else num_shards
  minimum = max(halo * blocks, blocks)
  if length % blocks or length < minimum:
    what = f"2N = {blocks} zigzag chunks" if zigzag else f"{num_shards} context shards"
    need = f"multiples of {blocks}" + (f" that are >= (K-1)*{'2N' if zigzag else 'N'} = "
                                       f"{halo}*{blocks} = {halo * blocks} (p2p halo), or use the "
                                       f"all-to-all strategy" if halo else "")
    raise ConfigError(f"sequence length {length} cannot be sharded over {what}: valid lengths "
                      f"are {need}")


def _shard(body: Callable[..., jax.Array], mesh: Mesh, axis_name: str,
           seq_args: tuple[jax.Array, ...],
           rep_args: tuple[jax.Array, ...]) -> jax.Array:
  """shard_map of body(*seq_args, *rep_args): seq args sequence-sharded, the rest replicated."""
  seq_spec = P(None, axis_name, None)
  in_specs = (seq_spec,) * len(seq_args) + (P(),) * len(rep_args)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=seq_spec)(*seq_args, *rep_args)


def context_parallel_halo_exchange(x_BLC: jax.Array, halo: int, mesh: Mesh,
                                   axis_name: str = "context") -> jax.Array:
  """[B, L, C] -> [B, N (halo + L/N), C]: every shard's block with its halo prepended."""
  validate_length(x_BLC.shape[1], mesh.shape[axis_name])
  return _shard(lambda x: halo_exchange(x, halo, axis_name), mesh, axis_name, (x_BLC,), ())


def context_parallel_causal_conv(x_BLC: jax.Array, h_GK: jax.Array, mesh: Mesh,
                                 axis_name: str = "context", method: str = "auto") -> jax.Array:
  """`conv.causal_conv` with the sequence sharded over `axis_name` (p2p)."""
  validate_length(x_BLC.shape[1], mesh.shape[axis_name], h_GK.shape[-1] - 1)
  return _shard(lambda x, h: cp_causal_conv_p2p(x, h, axis_name, method), mesh, axis_name,
                (x_BLC,), (h_GK,))


def context_parallel_gate_conv_gate(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                                    h_GK: jax.Array, dskip_D: jax.Array | None, mesh: Mesh,
                                    axis_name: str = "context", strategy: str = "p2p",
                                    method: str = "auto") -> jax.Array:
  """`hyena.gate_conv_gate` with the sequence sharded over `axis_name` ("p2p" or "a2a")."""
  if strategy not in STRATEGIES:
    raise ValueError(f"context-parallel strategy {strategy!r}: choose one of {STRATEGIES}")
  halo = h_GK.shape[-1] - 1 if strategy == "p2p" else 0
  validate_length(v_BLD.shape[1], mesh.shape[axis_name], halo)
  fn = cp_gate_conv_gate_p2p if strategy == "p2p" else cp_gate_conv_gate_a2a
  rep_args = (h_GK,) if dskip_D is None else (h_GK, dskip_D)

  def body(post, pre, v, h, dskip=None):
    return fn(post, pre, v, h, dskip, axis_name, method)

  return _shard(body, mesh, axis_name, (post_BLD, pre_BLD, v_BLD), rep_args)


def context_parallel_li_gate_conv_gate(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                                       log_poles_DN: jax.Array, residues_DN: jax.Array,
                                       dskip_D: jax.Array, mesh: Mesh, axis_name: str = "context",
                                       method: str = "auto") -> jax.Array:
  """`hyena.li_gate_conv_gate` with the sequence sharded over `axis_name` (all-to-all)."""
  validate_length(v_BLD.shape[1], mesh.shape[axis_name])

  def body(post, pre, v, log_poles, residues, dskip):
    return cp_li_gate_conv_gate_a2a(post, pre, v, log_poles, residues, dskip, axis_name, method)

  return _shard(body, mesh, axis_name, (post_BLD, pre_BLD, v_BLD),
                (log_poles_DN, residues_DN, dskip_D))
