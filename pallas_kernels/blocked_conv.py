"""Two-stage blocked causal convolution with fused gates (SPEC.md section 5): Pallas GPU kernels.

A causal FIR `y[t] = sum_k h[k] x[t - k]` (h[0] on the current token) with filter length
K <= chunk T is computed chunk by chunk: with X_n the n-th block of T rows,

    Y_n = H0 X_n + H1 X_(n-1),   X_(-1) = 0,
    H0[i, j] = h[i - j]        (0 <= i - j < K, lower-triangular Toeplitz),
    H1[i, j] = h[i - j + T]    (i - j + T < K).

Channels are grouped: G groups of `dg` contiguous channels share one filter, so each stage is
a (T x T) @ (T x dg) matrix product per group. The Hyena gate-conv-gate fuses the gates:

    out = post_gate * (conv(pre_gate * v, h) + dskip * (pre_gate * v)).

Layout of the Pallas (Triton) kernels: one program per (batch, channel tile of `dc` channels
inside one group, segment of the sequence); it builds H0/H1 on chip by a gather from the
group's padded filter row (no Toeplitz tile is read from HBM), then loops over its chunks in
`fori_loop`, carrying the previous chunk, so every input byte is read once (plus one chunk
per segment boundary) and every output byte written once. The backward either gathers
H0^T/H1^T too or contracts H0/H1 over their rows (`BlockSizes.bwd_transpose_by_dot`).

  forward:  y_n = H0 u_n + H1 u_(n-1) (+ dskip u_n),  out_n = post_n y_n,  u = pre * v.
  backward: a reverse loop over chunks with g = dout * post,
            du_n = H0^T g_n + H1^T g_(n+1) + dskip g_n  (anti-causal),
            dpost_n = dout_n y_n (y recomputed, not stored), dpre = du v, dv = du pre,
            A0 = sum_n g_n u_n^T, A1 = sum_n g_n u_(n-1)^T (T x T, fp32, per program);
            dh[k] = sum of A0 along diagonal i - j = k plus A1 along i - j = k - T, i.e.
            M = tril(A0) + strict_triu(A1) summed along wrapped diagonals (i - j) mod T
            (the per-program M are reduced over batch and group tiles by XLA),
            ddskip = sum_t g u (per-program partial, reduced by XLA).

Numerics: gates, the skip and every accumulation in float32; the matrix products take
operands in the I/O dtype (bf16 operands with bf16 I/O, float32 operands at HIGHEST
precision, i.e. IEEE on Triton, with float32 I/O).

`gate_conv_gate_auto` picks the kernel on GPU and the plain-JAX reference elsewhere or for
unsupported shapes; `gate_conv_gate_proj_pallas` also applies the output projection, with the
backward kernel writing the output that dW_out needs (pallas_kernels/output_projection.py).
The plain-JAX (einsum) functions at the end of this module are the numerical reference. This
module depends on jax and pallas_kernels.output_projection only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import output_projection

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 128
SHORT_FILTER_CHUNK = 64  # default chunk for filters of <= 64 taps (faster on an H100)
MIN_DOT_DIM = 16  # Triton tensor-core dots want every dimension >= 16.
TARGET_PROGRAMS = 256  # block_c heuristic: about two programs per SM on a 132-SM H100/H200.
MAX_BLOCK_C = 64  # block_c heuristic: widest channel tile it picks.
TARGET_PROGRAMS_SEGMENTS = 512  # segment heuristic: split L until the grid has this many
# (backward; forward: TARGET_PROGRAMS * DEFAULT_CHUNK / chunk, as fewer T = 128 programs fit
# on an SM and a second wave cost more than it hid on an H100).
MIN_SEGMENT_CHUNKS_FWD = 8  # segment heuristic: fewest chunks per forward program.
MIN_SEGMENT_CHUNKS_BWD = 32  # ... per backward program (each writes a T x T partial).


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and launch parameters of the blocked gate-conv-gate kernels.

  Every field left None is picked per call by the heuristic given here (tuned on an H100,
  bf16, B=1, C=4096; experiments/results/blocked_conv_h100.md).

  Attributes:
    chunk: T, rows per chunk; the Toeplitz tiles are T x T. A power of two >= 16 and >= the
      filter length K. None: SHORT_FILTER_CHUNK (64) for K <= 64, else DEFAULT_CHUNK (128).
    block_c: dc, channels per program: a power of two >= 16 that divides the group width
      C // G, so that a tile never straddles two filters. None: the widest such tile up to
      MAX_BLOCK_C that still leaves at least TARGET_PROGRAMS programs (B * C / dc).
    num_segments_fwd: programs along the sequence in the forward kernel (each loops over
      its own contiguous run of chunks and first reads the chunk before it); must divide
      the number of chunks. None: doubled from 1 while the grid has fewer than
      TARGET_PROGRAMS * DEFAULT_CHUNK / T programs and each segment keeps
      >= MIN_SEGMENT_CHUNKS_FWD chunks.
    num_segments_bwd: the same for the backward kernel with TARGET_PROGRAMS_SEGMENTS; every
      segment writes its own T x T filter-gradient partial, hence the longer minimum
      (MIN_SEGMENT_CHUNKS_BWD).
    num_warps_fwd: Triton warps per program of the forward kernel. None: 4.
    num_stages_fwd: software-pipelining depth of the forward chunk loop. None: 4 for 16-bit
      I/O, 2 for float32 (shared memory).
    num_warps_bwd: warps of the backward kernel, which carries two T x T float32
      accumulators. None: 8 for T >= 128, else 4.
    num_stages_bwd: pipelining depth of the backward chunk loop. None: 3 for 16-bit I/O,
      2 for float32.
    bwd_transpose_by_dot: the backward computes H^T g by a dot that contracts H's rows
      (one pair of Toeplitz tiles on chip) instead of gathering H0^T and H1^T (two pairs;
      float32 at T = 128 then overflows shared memory). None: True for T >= 128 or float32.
    bwd_dh_in_kernel: the backward kernel accumulates the filter gradient's two T x T float32
      partials itself (the default); False leaves them to XLA (two batched products of the
      chunked g = dout * post and u = pre * v, `_dh_xla`), which frees the kernel of 2 T^2
      float32 accumulators (at T = 128: 64 KiB of registers or shared memory each) for two
      extra reads of the four streams. The blocked kernel only (MR); None: True.
    halo_fwd, halo_bwd: the fused featurizer kernels (featurized_conv) only; the blocked
      kernels carry the previous chunk and ignore them. Chunks of T rows overlap by
      H = K - 1 rows, so each chunk computes its T - H outputs from its own rows with one
      Toeplitz product (H0) and carries nothing: one product per chunk in the forward instead
      of two, three in the backward instead of six, for T / (T - H) more chunks. Need
      T >= 2 K; the backward also tap_grads="xla". None: forward False; backward True where
      T >= 2 K (SE: T = 64, K = 7) and tap_grads is "xla". H100, L = 8K, C = 4096, SE: backward
      gate kernel 0.397 ms against 0.467, forward 0.229 against 0.221
      (experiments/results/probe_tile_bandwidth_nvidia_h100_80gb_hbm3.md).
  """
  chunk: int | None = None
  block_c: int | None = None
  num_segments_fwd: int | None = None
  num_segments_bwd: int | None = None
  num_warps_fwd: int | None = None
  num_stages_fwd: int | None = None
  num_warps_bwd: int | None = None
  num_stages_bwd: int | None = None
  bwd_transpose_by_dot: bool | None = None
  bwd_dh_in_kernel: bool | None = None
  halo_fwd: bool | None = None
  halo_bwd: bool | None = None

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unsupported_reason(shape_BLC: tuple[int, ...], shape_GK: tuple[int, ...],
                       block_sizes: BlockSizes | None = None) -> str | None:
  """Why the Pallas kernels cannot take these shapes, or None when they can.

  Args:
    shape_BLC: shape of the gates and v, [B, L, C].
    shape_GK: shape of the filter, [G, K].
    block_sizes: requested tiles (None: defaults).

  Returns:
    A sentence giving the value, the constraint and the fix; None if supported.
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  if len(shape_BLC) != 3 or len(shape_GK) != 2:
    return f"expected gates of rank 3 and a filter of rank 2, got {shape_BLC} and {shape_GK}"
  channels = shape_BLC[2]
  groups, num_taps = shape_GK
  chunk = _pick_chunk(block_sizes, num_taps)
  if channels % groups:
    return f"channels {channels} must be divisible by filter groups {groups}"
  if not _is_pow2(chunk) or chunk < MIN_DOT_DIM:
    return f"chunk {chunk} must be a power of two >= {MIN_DOT_DIM} (Triton dot shapes)"
  if num_taps > chunk:
    return f"filter length {num_taps} must be <= chunk {chunk}; raise BlockSizes.chunk"
  group_width = channels // groups
  if group_width % MIN_DOT_DIM:
    return (f"group width C/G = {group_width} must be a multiple of {MIN_DOT_DIM} (a channel "
            "tile lies in one group and Triton dots need >= 16 columns); use the reference")
  block_c = block_sizes.block_c
  if block_c is not None and (not _is_pow2(block_c) or block_c < MIN_DOT_DIM
                              or group_width % block_c):
    return (f"block_c {block_c} must be a power of two >= {MIN_DOT_DIM} dividing the group "
            f"width {group_width}")
  num_chunks = -(-shape_BLC[1] // chunk)
  for name in ("num_segments_fwd", "num_segments_bwd"):
    segments = getattr(block_sizes, name)
    if segments is not None and (segments < 1 or num_chunks % segments):
      return f"{name} {segments} must divide the number of chunks {num_chunks}"
  return None


def _pick_chunk(block_sizes: BlockSizes, num_taps: int) -> int:
  if block_sizes.chunk is not None:
    return block_sizes.chunk
  return SHORT_FILTER_CHUNK if num_taps <= SHORT_FILTER_CHUNK else DEFAULT_CHUNK


def _pick_block_c(batch: int, channels: int, groups: int, block_sizes: BlockSizes) -> int:
  """Channels per program: block_sizes.block_c, else the heuristic in BlockSizes."""
  if block_sizes.block_c is not None:
    return block_sizes.block_c
  group_width = channels // groups
  block_c = MIN_DOT_DIM
  while (2 * block_c <= min(group_width, MAX_BLOCK_C) and group_width % (2 * block_c) == 0
         and batch * channels // (2 * block_c) >= TARGET_PROGRAMS):
    block_c *= 2
  return block_c


def _pick_segments(requested: int | None, programs: int, num_chunks: int, min_chunks: int,
                   target_programs: int) -> int:
  """Programs along L: `requested`, else the heuristic in BlockSizes."""
  if requested is not None:
    return requested
  segments = 1
  while (programs * segments < target_programs and num_chunks % (2 * segments) == 0
         and num_chunks // (2 * segments) >= min_chunks):
    segments *= 2
  return segments


def _dot_config(dtype: jnp.dtype) -> tuple[jnp.dtype, jax.lax.Precision | None]:
  """Operand dtype and precision of the kernels' matrix products for an I/O dtype."""
  if jnp.dtype(dtype).itemsize <= 2:
    return jnp.dtype(dtype), None
  return jnp.dtype(jnp.float32), jax.lax.Precision.HIGHEST


def _resolve(block_sizes: BlockSizes | None, shape_BLC: tuple[int, ...],
             shape_GK: tuple[int, ...], dtype: jnp.dtype) -> BlockSizes:
  """Fills every None field of block_sizes by its heuristic (see BlockSizes)."""
  block_sizes = block_sizes or BlockSizes.get_default()
  batch, length, channels = shape_BLC
  groups, num_taps = shape_GK
  chunk = _pick_chunk(block_sizes, num_taps)
  block_c = _pick_block_c(batch, channels, groups, block_sizes)
  num_chunks = -(-length // chunk)
  programs = batch * channels // block_c
  wide = jnp.dtype(_dot_config(dtype)[0]).itemsize > 2

  def pick(value, default):
    return default if value is None else value

  return BlockSizes(
      chunk=chunk,
      block_c=block_c,
      num_segments_fwd=_pick_segments(block_sizes.num_segments_fwd, programs, num_chunks,
                                      MIN_SEGMENT_CHUNKS_FWD,
                                      TARGET_PROGRAMS * DEFAULT_CHUNK // chunk),
      num_segments_bwd=_pick_segments(block_sizes.num_segments_bwd, programs, num_chunks,
                                      MIN_SEGMENT_CHUNKS_BWD, TARGET_PROGRAMS_SEGMENTS),
      num_warps_fwd=pick(block_sizes.num_warps_fwd, 4),
      num_stages_fwd=pick(block_sizes.num_stages_fwd, 2 if wide else 4),
      num_warps_bwd=pick(block_sizes.num_warps_bwd, 8 if chunk >= 128 else 4),
      num_stages_bwd=pick(block_sizes.num_stages_bwd, 2 if wide else 3),
      bwd_transpose_by_dot=pick(block_sizes.bwd_transpose_by_dot, chunk >= 128 or wide),
      bwd_dh_in_kernel=pick(block_sizes.bwd_dh_in_kernel, True),
      halo_fwd=pick(block_sizes.halo_fwd, False),
      halo_bwd=pick(block_sizes.halo_bwd, 2 * num_taps <= chunk),
  )


def _padded_filter(h_GK: jax.Array, chunk: int) -> jax.Array:
  """[G, K] -> [G, 4T] float32 row hp with hp[T + k] = h[k] and zeros elsewhere.

  With this padding H0[i, j] = hp[T + i - j], H1[i, j] = hp[2T + i - j] and the transposes
  swap i and j: every gather index lies in [1, 3T) and no mask is needed.
  """
  num_taps = h_GK.shape[1]
  return jnp.pad(h_GK.astype(jnp.float32), ((0, 0), (chunk, 3 * chunk - num_taps)))


def _toeplitz_tile(hp_ref, chunk: int, offset: int, transpose: bool, dtype) -> jax.Array:
  """On-chip T x T tile hp[offset + i - j] (transpose: hp[offset + j - i]) by a gather."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  lag = cols - rows if transpose else rows - cols
  return hp_ref[lag + offset].astype(dtype)


def _chunk_rows(n, chunk: int):
  return pl.ds(pl.multiple_of(n * chunk, chunk), chunk)


class ToeplitzOps(NamedTuple):
  """A kernel's on-chip Toeplitz tiles and float32-accumulating products (see _toeplitz_ops)."""
  h0_TT: jax.Array  # current chunk's taps
  h1_TT: jax.Array  # previous chunk's taps
  dot: Callable[[jax.Array, jax.Array], jax.Array]
  dot_general: Callable[[jax.Array, jax.Array, tuple], jax.Array]  # (a, b, contracting dims)
  h0t_dot: Callable[[jax.Array], jax.Array] | None  # g -> H0^T g (backward only)
  h1t_dot: Callable[[jax.Array], jax.Array] | None  # g -> H1^T g (backward only)


def _toeplitz_ops(hp_ref, chunk: int, dot_dtype, precision: jax.lax.Precision | None,
                  backward: bool = False, transpose_by_dot: bool = False) -> ToeplitzOps:
  """H0, H1 built from the padded filter row, the products, and for the backward the products
  by H0^T, H1^T: as dots contracting the tiles' rows (transpose_by_dot) or with transposed
  tiles gathered on chip."""
  f32 = jnp.float32
  h0_TT = _toeplitz_tile(hp_ref, chunk, chunk, False, dot_dtype)
  h1_TT = _toeplitz_tile(hp_ref, chunk, 2 * chunk, False, dot_dtype)
  dot = functools.partial(jnp.dot, precision=precision, preferred_element_type=f32)

  def dot_general(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                               preferred_element_type=f32)

  h0t_dot = h1t_dot = None
  if backward and transpose_by_dot:
    h0t_dot = lambda g: dot_general(h0_TT, g, ((0,), (0,)))  # noqa: E731
    h1t_dot = lambda g: dot_general(h1_TT, g, ((0,), (0,)))  # noqa: E731
  elif backward:
    h0t_dot = functools.partial(dot, _toeplitz_tile(hp_ref, chunk, chunk, True, dot_dtype))
    h1t_dot = functools.partial(dot, _toeplitz_tile(hp_ref, chunk, 2 * chunk, True, dot_dtype))
  return ToeplitzOps(h0_TT, h1_TT, dot, dot_general, h0t_dot, h1t_dot)


def _gcg_fwd_kernel(
    # Inputs
    hp_ref,  # [4T] padded filter row of this tile's group, float32
    dskip_ref,  # [dc] skip weights, float32
    post_ref,  # [Lp, dc] output gate
    pre_ref,  # [Lp, dc] input gate
    v_ref,  # [Lp, dc]
    # Outputs
    out_ref,  # [Lp, dc]; this program writes its segment's rows
    *,
    chunk: int,
    segment_chunks: int,
    dot_dtype: jnp.dtype,
    precision: jax.lax.Precision | None,
):
  f32 = jnp.float32
  h0_TT, h1_TT, dot, *_ = _toeplitz_ops(hp_ref, chunk, dot_dtype, precision)
  dskip_1C = dskip_ref[...].astype(f32)[None, :]
  first = pl.program_id(2) * segment_chunks
  last = first + segment_chunks - 1

  def body(step, carry):
    u_prev_TC, post_TC = carry
    n = first + step
    rows = _chunk_rows(n, chunk)
    post_next_TC = post_ref[_chunk_rows(jnp.minimum(n + 1, last), chunk), :]
    u_TC = pre_ref[rows, :].astype(f32) * v_ref[rows, :].astype(f32)
    u_dot_TC = u_TC.astype(dot_dtype)
    y_TC = dot(h0_TT, u_dot_TC) + dot(h1_TT, u_prev_TC) + dskip_1C * u_TC
    out_ref[rows, :] = (post_TC.astype(f32) * y_TC).astype(out_ref.dtype)
    return u_dot_TC, post_next_TC

  # The chunk before the segment (zero before the sequence start).
  rows_prev = _chunk_rows(jnp.maximum(first - 1, 0), chunk)
  u_prev_TC = pre_ref[rows_prev, :].astype(f32) * v_ref[rows_prev, :].astype(f32)
  u_prev_TC = jnp.where(first > 0, u_prev_TC, 0.0).astype(dot_dtype)
  # The output gate is read a chunk ahead, as the loop carry: Triton's pipeliner prefetches only
  # the loads that feed a matrix product (pre, v), so a gate load in its own chunk would wait
  # out the memory latency every chunk after the products.
  jax.lax.fori_loop(0, segment_chunks, body, (u_prev_TC, post_ref[_chunk_rows(first, chunk), :]))


def _gcg_bwd_kernel(
    # Inputs
    hp_ref,  # [4T] padded filter row of this tile's group, float32
    dskip_ref,  # [dc] skip weights, float32
    post_ref,  # [Lp, dc]
    pre_ref,  # [Lp, dc]
    v_ref,  # [Lp, dc]
    dout_ref,  # [Lp, dc] cotangent of the output
    # Outputs
    dpost_ref,  # [Lp, dc]
    dpre_ref,  # [Lp, dc]
    dv_ref,  # [Lp, dc]
    *part_and_out_refs,  # dh_part_ref (with_dh), ddskip_part_ref, optional out_ref:
    # dh_part_ref [T, T] float32: tril(sum g_n u_n^T) + strict_triu(sum g_n u_(n-1)^T);
    # ddskip_part_ref [dc] float32: sum_t g u; out_ref [Lp, dc]: the forward's output post * y
    # (output_projection)
    chunk: int,
    segment_chunks: int,
    num_chunks: int,
    dot_dtype: jnp.dtype,
    precision: jax.lax.Precision | None,
    transpose_by_dot: bool,
    with_dh: bool = True,
):
  f32 = jnp.float32
  dh_part_ref, ddskip_part_ref, *out_ref = (part_and_out_refs if with_dh
                                            else (None, *part_and_out_refs))
  block_c = dv_ref.shape[-1]
  h0_TT, h1_TT, dot, dot_general, h0t_dot, h1t_dot = _toeplitz_ops(
      hp_ref, chunk, dot_dtype, precision, backward=True, transpose_by_dot=transpose_by_dot)
  dskip_1C = dskip_ref[...].astype(f32)[None, :]

  end = (pl.program_id(2) + 1) * segment_chunks  # one past the segment's last chunk

  def body(step, carry):
    pre_TC, v_TC, g_next_TC, a0_TT, a1_TT, ddskip_TC = carry
    n = end - 1 - step
    rows = _chunk_rows(n, chunk)
    rows_prev = _chunk_rows(jnp.maximum(n - 1, 0), chunk)
    has_prev = n > 0
    pre_prev_TC = jnp.where(has_prev, pre_ref[rows_prev, :], 0).astype(pre_TC.dtype)
    v_prev_TC = jnp.where(has_prev, v_ref[rows_prev, :], 0).astype(v_TC.dtype)
    u_TC = pre_TC.astype(f32) * v_TC.astype(f32)
    u_dot_TC = u_TC.astype(dot_dtype)
    u_prev_dot_TC = (pre_prev_TC.astype(f32) * v_prev_TC.astype(f32)).astype(dot_dtype)
    dout_TC = dout_ref[rows, :].astype(f32)
    # Recompute y rather than store it: one T x T product pair instead of an HBM round trip.
    y_TC = dot(h0_TT, u_dot_TC) + dot(h1_TT, u_prev_dot_TC) + dskip_1C * u_TC
    dpost_ref[rows, :] = (dout_TC * y_TC).astype(dpost_ref.dtype)
    post_TC = post_ref[rows, :].astype(f32)
    for ref in out_ref:
      ref[rows, :] = (post_TC * y_TC).astype(ref.dtype)
    g_TC = dout_TC * post_TC
    g_dot_TC = g_TC.astype(dot_dtype)
    du_TC = h0t_dot(g_dot_TC) + h1t_dot(g_next_TC) + dskip_1C * g_TC
    dpre_ref[rows, :] = (du_TC * v_TC.astype(f32)).astype(dpre_ref.dtype)
    dv_ref[rows, :] = (du_TC * pre_TC.astype(f32)).astype(dv_ref.dtype)
    if with_dh:
      a0_TT = a0_TT + dot_general(g_dot_TC, u_dot_TC, ((1,), (1,)))
      a1_TT = a1_TT + dot_general(g_dot_TC, u_prev_dot_TC, ((1,), (1,)))
    ddskip_TC = ddskip_TC + g_TC * u_TC
    return pre_prev_TC, v_prev_TC, g_dot_TC, a0_TT, a1_TT, ddskip_TC

  # The segment's last chunk, and g of the chunk after it (zero past the sequence end).
  rows_last = _chunk_rows(end - 1, chunk)
  rows_next = _chunk_rows(jnp.minimum(end, num_chunks - 1), chunk)
  g_next_TC = dout_ref[rows_next, :].astype(f32) * post_ref[rows_next, :].astype(f32)
  g_next_TC = jnp.where(end < num_chunks, g_next_TC, 0.0).astype(dot_dtype)
  accumulator_shape = (chunk, chunk) if with_dh else (1, 1)  # unused 1 x 1 without dh
  init = (pre_ref[rows_last, :], v_ref[rows_last, :], g_next_TC,
          jnp.zeros(accumulator_shape, f32), jnp.zeros(accumulator_shape, f32),
          jnp.zeros((chunk, block_c), f32))
  _, _, _, a0_TT, a1_TT, ddskip_TC = jax.lax.fori_loop(0, segment_chunks, body, init)
  if with_dh:
    rows_TT = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    cols_TT = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    dh_part_ref[...] = jnp.where(rows_TT >= cols_TT, a0_TT, a1_TT)
  ddskip_part_ref[...] = jnp.sum(ddskip_TC, axis=0)


def _pad_rows(x_BLC: jax.Array, padded_len: int) -> jax.Array:
  pad = padded_len - x_BLC.shape[1]
  return jnp.pad(x_BLC, ((0, 0), (0, pad), (0, 0))) if pad else x_BLC


def _specs(batch: int, padded_len: int, channels: int, groups: int, block_c: int,
           chunk: int, segments: int):
  """Grid (B, C / dc, segments) and the BlockSpecs that the kernels share."""
  tiles_per_group = channels // groups // block_c
  grid = (batch, channels // block_c, segments)
  tile = pl.BlockSpec((None, padded_len, block_c), lambda b, c, s: (b, 0, c))
  filter_row = pl.BlockSpec((None, 4 * chunk), lambda b, c, s: (c // tiles_per_group, 0))
  skip = pl.BlockSpec((block_c,), lambda b, c, s: (c,))
  return grid, tile, filter_row, skip


def _gcg_fwd_call(post_BLC, pre_BLC, v_BLC, hp_GX, dskip_C, *, block_sizes: BlockSizes,
                  interpret: bool) -> jax.Array:
  batch, padded_len, channels = v_BLC.shape
  chunk, block_c = block_sizes.chunk, block_sizes.block_c
  num_chunks = padded_len // chunk
  segments = block_sizes.num_segments_fwd
  grid, tile, filter_row, skip = _specs(batch, padded_len, channels, hp_GX.shape[0], block_c,
                                        chunk, segments)
  dot_dtype, precision = _dot_config(v_BLC.dtype)
  kernel = functools.partial(_gcg_fwd_kernel, chunk=chunk,
                             segment_chunks=num_chunks // segments, dot_dtype=dot_dtype,
                             precision=precision)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[filter_row, skip, tile, tile, tile],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(v_BLC.shape, v_BLC.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps_fwd,
                                           num_stages=block_sizes.num_stages_fwd),
      interpret=interpret,
      name="gate_conv_gate_fwd",
  )(hp_GX, dskip_C, post_BLC, pre_BLC, v_BLC)


def _gcg_bwd_call(post_BLC, pre_BLC, v_BLC, dout_BLC, hp_GX, dskip_C, *,
                  block_sizes: BlockSizes, interpret: bool, with_output: bool = False):
  """(dpost, dpre, dv, dh partials, ddskip partials) and, with_output, the forward's output;
  without the dh partials when block_sizes.bwd_dh_in_kernel is False."""
  batch, padded_len, channels = v_BLC.shape
  chunk, block_c = block_sizes.chunk, block_sizes.block_c
  num_chunks = padded_len // chunk
  num_tiles = channels // block_c
  segments = block_sizes.num_segments_bwd
  grid, tile, filter_row, skip = _specs(batch, padded_len, channels, hp_GX.shape[0], block_c,
                                        chunk, segments)
  dot_dtype, precision = _dot_config(v_BLC.dtype)
  kernel = functools.partial(_gcg_bwd_kernel, chunk=chunk,
                             segment_chunks=num_chunks // segments, num_chunks=num_chunks,
                             dot_dtype=dot_dtype, precision=precision,
                             transpose_by_dot=block_sizes.bwd_transpose_by_dot,
                             with_dh=block_sizes.bwd_dh_in_kernel)
  out_shape = (
      jax.ShapeDtypeStruct(post_BLC.shape, post_BLC.dtype),
      jax.ShapeDtypeStruct(pre_BLC.shape, pre_BLC.dtype),
      jax.ShapeDtypeStruct(v_BLC.shape, v_BLC.dtype),
      jax.ShapeDtypeStruct((batch, num_tiles, segments, chunk, chunk), jnp.float32),
      jax.ShapeDtypeStruct((batch, segments, channels), jnp.float32),
  )
  out_specs = (
      tile, tile, tile,
      pl.BlockSpec((None, None, None, chunk, chunk), lambda b, c, s: (b, c, s, 0, 0)),
      pl.BlockSpec((None, None, block_c), lambda b, c, s: (b, s, c)),
  )
  if not block_sizes.bwd_dh_in_kernel:
    out_shape, out_specs = out_shape[:3] + out_shape[4:], out_specs[:3] + out_specs[4:]
  if with_output:
    out_shape += (jax.ShapeDtypeStruct(v_BLC.shape, v_BLC.dtype),)
    out_specs += (tile,)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[filter_row, skip, tile, tile, tile, tile],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd,
                                           num_stages=block_sizes.num_stages_bwd),
      interpret=interpret,
      name="gate_conv_gate_bwd",
  )(hp_GX, dskip_C, post_BLC, pre_BLC, v_BLC, dout_BLC)


def _dh_from_partials(dh_part_BNSTT: jax.Array, groups: int, num_taps: int) -> jax.Array:
  """[B, C/dc, S, T, T] per-program partials -> [G, K]:
  dh[g, k] = sum_i M[g, i, (i - k) mod T], M summed over batch, tiles and segments."""
  batch, num_tiles, segments, chunk, _ = dh_part_BNSTT.shape
  m_GTT = dh_part_BNSTT.reshape(batch, groups, num_tiles // groups * segments, chunk,
                                chunk).sum((0, 2))
  # a [T, K] literal (XLA rebuilt the jnp version in a kernel of its own on every call)
  lags_TK = ((np.arange(chunk)[:, None] - np.arange(num_taps)[None, :]) % chunk).astype(np.int32)
  cols_GTK = jnp.broadcast_to(lags_TK, (groups, chunk, num_taps))
  return jnp.take_along_axis(m_GTT, cols_GTK, axis=2).sum(1)


def _dh_xla(post_BLC: jax.Array, pre_BLC: jax.Array, v_BLC: jax.Array, dout_BLC: jax.Array,
            chunk: int, groups: int) -> jax.Array:
  """The backward kernel's filter-gradient partials, by XLA: [1, G, 1, T, T] float32 (the
  layout _dh_from_partials reads), tril(sum_n g_n u_n^T) + strict_triu(sum_n g_n u_(n-1)^T)
  per group, g = dout * post and u = pre * v rounded to the kernel's dot dtype, over padded
  [B, Lp, C] streams (Lp a multiple of T)."""
  batch, padded_len, channels = v_BLC.shape
  dot_dtype, precision = _dot_config(v_BLC.dtype)
  f32 = jnp.float32
  shape_BNTGC = (batch, padded_len // chunk, chunk, groups, channels // groups)
  g = (dout_BLC.astype(f32) * post_BLC.astype(f32)).astype(dot_dtype).reshape(shape_BNTGC)
  u = (pre_BLC.astype(f32) * v_BLC.astype(f32)).astype(dot_dtype).reshape(shape_BNTGC)
  a0_GTT = jnp.einsum("bntgc,bnsgc->gts", g, u, precision=precision, preferred_element_type=f32)
  # chunk n against chunk n - 1 (none before the first)
  a1_GTT = jnp.einsum("bntgc,bnsgc->gts", g[:, 1:], u[:, :-1], precision=precision,
                      preferred_element_type=f32)
  rows = jnp.arange(chunk)[:, None]
  cols = jnp.arange(chunk)[None, :]
  return jnp.where(rows >= cols, a0_GTT, a1_GTT)[None, :, None]


def _padded_len(length: int, chunk: int) -> int:
  return -(-length // chunk) * chunk


def _gcg_fwd_impl(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes, interpret):
  length = v_BLC.shape[1]
  chunk = block_sizes.chunk
  pad = functools.partial(_pad_rows, padded_len=_padded_len(length, chunk))
  out = _gcg_fwd_call(pad(post_BLC), pad(pre_BLC), pad(v_BLC), _padded_filter(h_GK, chunk),
                      dskip_C.astype(jnp.float32), block_sizes=block_sizes,
                      interpret=interpret)
  return out[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gcg(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes, interpret):
  return _gcg_fwd_impl(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes, interpret)


def _gcg_fwd(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes, interpret):
  out = _gcg_fwd_impl(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes, interpret)
  return out, (post_BLC, pre_BLC, v_BLC, h_GK, dskip_C)


def _gcg_bwd_impl(block_sizes, interpret, residuals, dout_BLC, with_output=False):
  """The five input gradients, then (with_output) the forward's output [B, L, C]."""
  post_BLC, pre_BLC, v_BLC, h_GK, dskip_C = residuals
  length = v_BLC.shape[1]
  chunk = block_sizes.chunk
  pad = functools.partial(_pad_rows, padded_len=_padded_len(length, chunk))
  post, pre, v, dout = (pad(x) for x in (post_BLC, pre_BLC, v_BLC, dout_BLC.astype(v_BLC.dtype)))
  dpost, dpre, dv, *parts_and_out = _gcg_bwd_call(
      post, pre, v, dout, _padded_filter(h_GK, chunk), dskip_C.astype(jnp.float32),
      block_sizes=block_sizes, interpret=interpret, with_output=with_output)
  if block_sizes.bwd_dh_in_kernel:
    dh_part, ddskip_part, *out = parts_and_out
  else:
    (ddskip_part, *out), dh_part = parts_and_out, _dh_xla(post, pre, v, dout, chunk,
                                                           h_GK.shape[0])
  dh_GK = _dh_from_partials(dh_part, h_GK.shape[0], h_GK.shape[1]).astype(h_GK.dtype)
  ddskip_C = ddskip_part.sum((0, 1)).astype(dskip_C.dtype)
  return (dpost[:, :length], dpre[:, :length], dv[:, :length], dh_GK, ddskip_C) + tuple(
      y[:, :length] for y in out)


def _gcg_bwd(block_sizes, interpret, residuals, dout_BLC):
  return _gcg_bwd_impl(block_sizes, interpret, residuals, dout_BLC)


_gcg.defvjp(_gcg_fwd, _gcg_bwd)


def _gcg_projected_fwd(block_sizes, interpret, operands):
  return _gcg_fwd_impl(*operands, block_sizes, interpret), operands


def _gcg_projected_bwd(block_sizes, interpret, residuals, dy_BLC):
  *grads, y_BLC = _gcg_bwd_impl(block_sizes, interpret, residuals, dy_BLC, with_output=True)
  return y_BLC, tuple(grads)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gate_conv_gate_pallas(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                          h_GK: jax.Array, dskip_C: jax.Array | None = None, *,
                          block_sizes: BlockSizes | None = None,
                          interpret: bool = False) -> jax.Array:
  """Hyena gate-conv-gate by the blocked Pallas (Triton) kernels, differentiable.

  out = post_gate * (conv(u, h) + dskip * u), u = pre_gate * v, conv(x, h)[t] =
  sum_{k<K} h[g, k] x[t - k] (h[:, 0] on the current token; causal); float32 accumulation.
  Gradients (custom_vjp) for all five inputs come from a blocked backward kernel.

  Args:
    post_gate_BLC, pre_gate_BLC, v_BLC: [B, L, C] (x1, x2, v of the Hyena projection), bf16
      or float32; any L (padded internally to a multiple of the chunk).
    h_GK: [G, K] grouped filter: channel c uses row c // (C // G); K <= chunk.
    dskip_C: [C] skip weights, or None (Hyena-SE has none).
    block_sizes: tiles and launch parameters; None: BlockSizes.get_default().
    interpret: run the kernels in Pallas interpret mode (CPU), for tests.

  Returns:
    [B, L, C] in v's dtype.

  Raises:
    ValueError: shapes the kernels do not take (see `unsupported_reason`); use
      `gate_conv_gate_auto` to fall back to the reference instead.
  """
  dskip_C, resolved = _checked(post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C, block_sizes)
  return _gcg(post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C, resolved, interpret)


def _checked(post_BLC, pre_BLC, v_BLC, h_GK, dskip_C, block_sizes):
  """(dskip, resolved block sizes) after checking the shapes; ValueError says what is wrong."""
  if not pre_BLC.shape == post_BLC.shape == v_BLC.shape:
    raise ValueError(f"gates and v must share one shape, got {post_BLC.shape}, "
                     f"{pre_BLC.shape}, {v_BLC.shape}")
  reason = unsupported_reason(v_BLC.shape, h_GK.shape, block_sizes)
  if reason:
    raise ValueError(reason)
  channels = v_BLC.shape[2]
  if dskip_C is None:
    dskip_C = jnp.zeros((channels,), jnp.float32)
  elif dskip_C.shape != (channels,):
    raise ValueError(f"dskip shape {dskip_C.shape} must be ({channels},)")
  return dskip_C, _resolve(block_sizes, v_BLC.shape, h_GK.shape, v_BLC.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gate_conv_gate_proj_pallas(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array,
                               v_BLC: jax.Array, h_GK: jax.Array, dskip_C: jax.Array | None,
                               w_out_CE: jax.Array, *, block_sizes: BlockSizes | None = None,
                               interpret: bool = False) -> jax.Array:
  """gate_conv_gate_pallas(...) @ w_out, whose backward takes the gate output for dW_out from
  the backward kernel (output_projection.project_output): a rematerialised block does not
  rerun the forward kernel. Arguments as gate_conv_gate_pallas, plus w_out_CE [C, E].

  Returns:
    [B, L, E] in v's dtype. Gradients for the five kernel inputs and w_out.
  """
  dskip_C, resolved = _checked(post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C, block_sizes)
  if w_out_CE.ndim != 2 or w_out_CE.shape[0] != v_BLC.shape[2]:
    raise ValueError(f"w_out shape {w_out_CE.shape} must be ({v_BLC.shape[2]}, E)")
  return output_projection.project_output(
      functools.partial(_gcg_projected_fwd, resolved, interpret),
      functools.partial(_gcg_projected_bwd, resolved, interpret),
      (post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C), w_out_CE)


def gate_conv_gate_auto(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                        h_GK: jax.Array, dskip_C: jax.Array | None = None, *,
                        chunk: int | None = None,
                        block_sizes: BlockSizes | None = None) -> jax.Array:
  """Gate-conv-gate by the Pallas kernels on GPU, else by the plain-JAX reference.

  Same arguments and result as `gate_conv_gate_pallas`; `chunk` applies when block_sizes is
  None (None: the kernel's heuristic, DEFAULT_CHUNK for the reference). The reference is used
  off GPU and for shapes the kernels do not take (the reason is logged at debug level).
  """
  block_sizes = block_sizes or BlockSizes(chunk=chunk)
  backend = jax.default_backend()
  reason = None if backend == "gpu" else f"backend {backend!r} is not a GPU"
  reason = reason or unsupported_reason(v_BLC.shape, h_GK.shape, block_sizes)
  if reason:
    logger.debug("gate_conv_gate_auto: plain-JAX reference (%s)", reason)
    return gate_conv_gate(post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C,
                          chunk=block_sizes.chunk or DEFAULT_CHUNK)
  return gate_conv_gate_pallas(post_gate_BLC, pre_gate_BLC, v_BLC, h_GK, dskip_C,
                               block_sizes=block_sizes)


# ---------------------------------------------------------------------------------------------
# Plain-JAX reference (einsum), the numerical reference of the kernels above.
# ---------------------------------------------------------------------------------------------


def toeplitz_blocks(h_GK: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Builds the two Toeplitz stages of a grouped causal filter.

  Args:
    h_GK: [G, K] filter, h[:, 0] on the current token; K <= chunk.
    chunk: block length T.

  Returns:
    (H0_GTT, H1_GTT): H0[g, i, j] = h[g, i - j], H1[g, i, j] = h[g, i - j + T], zero elsewhere.
  """
  num_taps = h_GK.shape[-1]
  if num_taps > chunk:
    raise ValueError(f"filter length {num_taps} must be <= chunk {chunk}; raise the chunk")
  rows = jnp.arange(chunk)[:, None]
  cols = jnp.arange(chunk)[None, :]
  lag0 = rows - cols
  lag1 = lag0 + chunk
  valid0 = (lag0 >= 0) & (lag0 < num_taps)
  valid1 = lag1 < num_taps
  h0 = jnp.where(valid0, jnp.take(h_GK, jnp.clip(lag0, 0, num_taps - 1), axis=-1), 0)
  h1 = jnp.where(valid1, jnp.take(h_GK, jnp.clip(lag1, 0, num_taps - 1), axis=-1), 0)
  return h0, h1


def _to_blocks(x_BLC: jax.Array, chunk: int, groups: int) -> jax.Array:
  """[B, L, C] -> [B, N, T, G, dg], zero-padding L up to a multiple of the chunk."""
  batch, length, channels = x_BLC.shape
  padded = -(-length // chunk) * chunk
  x_BLC = jnp.pad(x_BLC, ((0, 0), (0, padded - length), (0, 0)))
  return x_BLC.reshape(batch, padded // chunk, chunk, groups, channels // groups)


@functools.partial(jax.jit, static_argnames=("chunk",))
def blocked_causal_conv(x_BLC: jax.Array, h_GK: jax.Array, chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """Grouped causal convolution by two chunked matrix products (plain JAX).

  Args:
    x_BLC: [B, L, C] input, any L (padded internally).
    h_GK: [G, K] filters, G divides C, channel c uses group c // (C // G); h[:, 0] on the
      current token; K <= chunk.
    chunk: block length T.

  Returns:
    [B, L, C] in x's dtype; products accumulate in float32.
  """
  batch, length, channels = x_BLC.shape
  groups = h_GK.shape[0]
  if channels % groups:
    raise ValueError(f"channels {channels} must be divisible by filter groups {groups}")
  h0, h1 = toeplitz_blocks(h_GK.astype(jnp.float32), chunk)
  x_BNTGd = _to_blocks(x_BLC, chunk, groups).astype(jnp.float32)
  x_prev = jnp.pad(x_BNTGd, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
  precision = jax.lax.Precision.HIGHEST
  y = (jnp.einsum("gij,bnjgd->bnigd", h0, x_BNTGd, precision=precision)
       + jnp.einsum("gij,bnjgd->bnigd", h1, x_prev, precision=precision))
  return y.reshape(batch, -1, channels)[:, :length].astype(x_BLC.dtype)


@functools.partial(jax.jit, static_argnames=("chunk",))
def gate_conv_gate(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                   h_GK: jax.Array, dskip_C: jax.Array | None = None,
                   chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """Hyena gate-conv-gate by the blocked convolution (plain-JAX reference).

  out = post_gate * (conv(u, h) + dskip * u), u = pre_gate * v; gates and the skip in float32.

  Args:
    post_gate_BLC, pre_gate_BLC, v_BLC: [B, L, C] (x1, x2, v of the Hyena projection).
    h_GK: [G, K] grouped filter, h[:, 0] on the current token.
    dskip_C: [C] skip weights, or None (Hyena-SE has none).
    chunk: block length T >= K.

  Returns:
    [B, L, C] in v's dtype.
  """
  u = pre_gate_BLC.astype(jnp.float32) * v_BLC.astype(jnp.float32)
  y = blocked_causal_conv(u, h_GK, chunk)
  if dskip_C is not None:
    y = y + dskip_C.astype(jnp.float32) * u
  return (post_gate_BLC.astype(jnp.float32) * y).astype(v_BLC.dtype)
