"""Context-parallel Hyena primitives: p2p halo exchange and all-to-all resharding (SPEC.md s6).

The sequence is sharded in contiguous blocks over a mesh axis (rank r of N holds positions
[r L/N, (r+1) L/N)), or, with `zigzag`, in 2N chunks of c = L/2N where rank r holds chunks r
and 2N-1-r (balances causal attention; the sequence is permuted once at the input, see
`zigzag_order`). Two strategies keep the causal convolutions exact:
- p2p (featurizer, SE, MR while K-1 <= local length): each shard receives the last K-1 rows of
  its causal predecessor by `jax.lax.ppermute` (i -> i+1, zeros on shard 0), prepends them,
  runs the local causal convolution and drops the first K-1 outputs. Autodiff of ppermute is
  the reverse ppermute, so the halo gradients flow back to the predecessor. Under zigzag a
  rank's two chunks have different predecessors: chunk r's is rank r-1's first chunk, chunk
  2N-1-r's is rank r+1's second chunk (rank N-1: its own first chunk).
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
  local_len = x_BLC.shape[1]
  if halo < 0:
    raise ValueError(f"halo {halo} must be >= 0")
  if halo > local_len:
    raise ValueError(f"halo {halo} is longer than the local block of {local_len} rows: p2p context "
                     f"parallelism needs K-1 <= L/N; use the all-to-all strategy instead")
  if halo == 0:
    return x_BLC
  num_shards = jax.lax.axis_size(axis_name)
  tail_BHC = x_BLC[:, local_len - halo:]
  perm = [(i, i + 1) for i in range(num_shards - 1)]
  # ppermute leaves zeros on ranks that receive nothing (shard 0): the causal left padding.
  received_BHC = jax.lax.ppermute(tail_BHC, axis_name, perm) if perm else jnp.zeros_like(tail_BHC)
  return jnp.concatenate([received_BHC, x_BLC], axis=1)


def zigzag_halo_exchange(x_BLC: jax.Array, halo: int, axis_name: str) -> jax.Array:
  """Halos of a zigzag shard: [B, 2c, C] (chunks r, 2N-1-r) -> [2, B, halo + c, C].

  Chunk r gets the tail of chunk r-1 (rank r-1's first chunk; zeros on rank 0); chunk 2N-1-r
  gets the tail of chunk 2N-2-r (rank r+1's second chunk; rank N-1's own first chunk).
  """
  local_len = x_BLC.shape[1]
  if local_len % 2:
    raise ValueError(f"a zigzag shard holds two equal chunks; got {local_len} rows")
  first_BcC, second_BcC = jnp.split(x_BLC, 2, axis=1)
  if halo == 0:
    return jnp.stack([first_BcC, second_BcC])
  padded_first = halo_exchange(first_BcC, halo, axis_name)
  num_shards = jax.lax.axis_size(axis_name)
  tail_second = second_BcC[:, second_BcC.shape[1] - halo:]
  perm = [(i + 1, i) for i in range(num_shards - 1)]
  received = jax.lax.ppermute(tail_second, axis_name, perm) if perm else jnp.zeros_like(tail_second)
  own_first_tail = padded_first[:, padded_first.shape[1] - halo:]
  last = jax.lax.axis_index(axis_name) == num_shards - 1
  halo_second = jnp.where(last, own_first_tail, received)
  return jnp.stack([padded_first, jnp.concatenate([halo_second, second_BcC], axis=1)])


def cp_causal_conv_p2p(x_BLC: jax.Array, h_GK: jax.Array, axis_name: str,
                       method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                       zigzag: bool = False) -> jax.Array:
  """Grouped causal convolution of a sequence-sharded input by halo exchange (featurizer, SE, MR).

  Equals the local shard of `conv.causal_conv` on the full sequence (in zigzag order with
  `zigzag`).

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
  if not zigzag:
    padded_BLC = halo_exchange(x_BLC, halo, axis_name)
    return conv.causal_conv(padded_BLC, h_GK, method=method, chunk=chunk)[:, halo:]
  padded_2BLC = zigzag_halo_exchange(x_BLC, halo, axis_name)
  two, batch = padded_2BLC.shape[:2]
  y = conv.causal_conv(padded_2BLC.reshape(two * batch, *padded_2BLC.shape[2:]), h_GK,
                       method=method, chunk=chunk)[:, halo:]
  first, second = jnp.split(y, 2, axis=0)
  return jnp.concatenate([first, second], axis=1)


def cp_gate_conv_gate_p2p(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                          h_GK: jax.Array, dskip_D: jax.Array | None, axis_name: str,
                          method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                          zigzag: bool = False) -> jax.Array:
  """post * (conv(pre * v, h) + dskip * pre * v) on a sequence-sharded input, p2p (SE, MR).

  Only u = pre * v crosses shards (K-1 rows); the gates are pointwise. The local convolution
  runs through `conv.causal_conv` ("pallas" runs as its "blocked" reference here).

  Args:
    post_BLD, pre_BLD, v_BLD: [B, L_local, D] local blocks.
    h_GK: [G, K] grouped filter (replicated), K-1 <= L_local.
    dskip_D: [D] skip weights (replicated) or None.
    axis_name: the shard_map axis holding the sequence.
    zigzag: the shard holds chunks r and 2N-1-r.

  Returns:
    [B, L_local, D] in v's dtype.
  """
  h = h_GK.astype(jnp.float32)
  return hyena.gated(post_BLD, pre_BLD, v_BLD, dskip_D,
                     lambda u: cp_causal_conv_p2p(u, h, axis_name, method, chunk, zigzag))


def cp_gate_conv_gate_p2p_fused(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                                h_GK: jax.Array, dskip_D: jax.Array | None, axis_name: str,
                                method: str = "auto", chunk: int = blocked_conv.DEFAULT_CHUNK,
                                zigzag: bool = False,
                                align: int = blocked_conv.DEFAULT_CHUNK) -> jax.Array:
  """p2p gate-conv-gate through the single-device fused op (`hyena.gate_conv_gate`: the Pallas
  kernel on GPU, the blocked reference elsewhere).

  The halos of pre and v (not of u) are exchanged; post is zero-padded (the padded rows'
  outputs are dropped). The front padding is rounded up to a multiple of `align` rows so a
  local length the kernel tiles stays tileable.

  Args: as `cp_gate_conv_gate_p2p`; method: "pallas" | "blocked" | ... for gate_conv_gate.

  Returns:
    [B, L_local, D] in v's dtype.
  """
  halo = h_GK.shape[-1] - 1
  pad = -(-halo // align) * align

  def with_halo(x):  # [S, B, pad + c, D], S = 2 chunks under zigzag
    xs = zigzag_halo_exchange(x, halo, axis_name) if zigzag else halo_exchange(x, halo, axis_name)[None]
    return jnp.pad(xs, ((0, 0), (0, 0), (pad - halo, 0), (0, 0)))

  def zero_padded(x):
    xs = jnp.stack(jnp.split(x, 2, axis=1)) if zigzag else x[None]
    return jnp.pad(xs, ((0, 0), (0, 0), (pad, 0), (0, 0)))

  post, pre, v = zero_padded(post_BLD), with_halo(pre_BLD), with_halo(v_BLD)
  segments, batch = v.shape[:2]
  merge = lambda x: x.reshape(segments * batch, *x.shape[2:])
  y = hyena.gate_conv_gate(merge(post), merge(pre), merge(v), h_GK, dskip_D, method, chunk)
  y = y[:, pad:].reshape(segments, batch, -1, y.shape[-1])
  return jnp.concatenate(list(y), axis=1)


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
