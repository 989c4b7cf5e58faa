"""The Hyena-SE/MR core after the in-projection, fused: featurizer + gate-conv-gate (Pallas GPU).

Input is the in-projection product z = x @ W with its 3C columns in three contiguous blocks
[post | pre | v] (layout "blocked": the interleave of Evo 2 checkpoints undone on the weights)
or in the checkpoints' interleaved triples 3i + s (layout "interleaved"). Per stream s the
featurizer is a causal depthwise FIR of J <= 4 taps, then the gate-conv-gate of
blocked_conv.py:

    f_s[t] = sum_j w_s[j] z_s[t - j]                       (w[:, 0] on the current token)
    out = f_post * (conv(u, h) + dskip * u),  u = f_pre * f_v,  conv grouped, K <= chunk.

Fusing the featurizer into the kernels removes its memory passes: the forward reads z once
(its J shifted row windows come from cache) and never writes f; the backward recomputes f
from z (carrying the previous chunk's featurized pre/v) and writes df = dL/df for all three
streams into one [B, L, 3C] array. A second, memory-bound kernel (`featurizer_backward_pallas`)
then reads df and z once and writes dz[t] = sum_j w[j] df[t + j] in the same [B, L, 3C] layout
(the in-projection's gradient products take it as is: no concatenation) and the featurizer-tap
gradient. On an H100 at L = 32K (bf16, D = 4096, K = 7) the three kernels take 3.3 ms
forward+backward against 5.1 ms for the XLA featurizer + blocked_conv pair
(experiments/results/se_overhead_nvidia_h100_80gb_hbm3.md). tap_grads="kernel" keeps the
older variant that reduces the tap gradient inside the gate kernel (slower: register pressure).

Kernel layout, Toeplitz tiles, numerics and BlockSizes are those of blocked_conv.py: one
program per (batch, channel tile, sequence segment), chunks of T rows in a fori_loop,
float32 gates and accumulation, matrix-product operands in the I/O dtype. The three streams
are read from the one z array through three BlockSpecs (channel tile offsets 0, C, 2C; or,
interleaved, one [Lp, 3 dc] tile read at column stride 3), so no slice of z is ever copied.

With BlockSizes.halo_bwd (the default for SE) or halo_fwd the chunks overlap by K - 1 rows
instead: each computes the outputs whose taps it holds, from its own rows, with the one
Toeplitz tile H0 and no carry between chunks (`_fgcg_fwd_halo_kernel`, `_fgcg_bwd_halo_kernel`;
the section above them says which rows each chunk writes). That halves the tile products
(forward 2 -> 1, backward 6 -> 3 a chunk) and the on-chip state, for T / (T - K + 1) as many
chunks (1.1x for SE's K = 7, T = 64).

`featurized_gate_conv_gate_proj_pallas` also applies the output projection, with the backward
kernel writing the output that dW_out needs (pallas_kernels/output_projection.py).
`featurized_gate_conv_gate` (plain JAX, at the end) is the numerical reference and the path
off GPU. This module depends on jax and pallas_kernels.blocked_conv / output_projection only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import blocked_conv as bc
from pallas_kernels import output_projection

logger = logging.getLogger(__name__)

MAX_FEATURIZER_TAPS = 4
LAYOUTS = ("blocked", "interleaved")  # column order of z: [post | pre | v] or triples 3i+s
# Where the featurizer-tap gradient is reduced (see featurized_gate_conv_gate_pallas). Tried
# and dropped: the whole featurizer backward inside the gate backward kernel (df rows shifted
# through a per-program ring in L2 behind a CTA barrier): on an H100 that kernel took 2.3-3.7x
# the two kernels it replaced, and Triton's pipelining issued the ring reads before the barrier
# (wrong gradients at 2-3 stages): experiments/results/ops_nvidia_h100_80gb_hbm3.md, twelfth run.
# Also dropped: the overlapping backward applying the featurizer's backward itself (chunks
# overlapping by K - 1 + J - 1 rows, dz from exact one-row shift products of df, tap sums per
# chunk): 1.6x the two kernels it replaced on an H100 at 4K and 8K
# (experiments/results/probe_tile_bandwidth_nvidia_h100_80gb_hbm3.md, twenty-sixth session).
TAP_GRADS = ("kernel", "xla")
FUSED_BWD_STAGES_LONG_CHUNK = 1
# Forward pipelining depth for 16-bit I/O and T < 128 (the blocked kernel's 4 costs this one,
# whose loads are 3 J shifted windows a stream, 1.2-1.6x): H100, L = 8K, K = 7, J = 3, forward
# kernel alone, 3 / 2 / 4 stages: 0.222 / 0.232 / 0.351 ms at C = 4096 (256 groups), 0.116 /
# 0.123 / 0.140 at C = 1920 (experiments/results/probe_tile_bandwidth_nvidia_h100_80gb_hbm3.md).
FUSED_FWD_STAGES = 3
# Backward pipelining depth of the overlapping (halo_bwd) kernel for 16-bit I/O and T < 128 (the
# blocked kernel's 3 costs it 4-11%): H100, K = 7, J = 3, that kernel alone, 3 / 4 / 5 / 6 / 8
# stages at L = 8K, C = 4096: 0.446 / 0.398 / 0.404 / 0.523 / 0.610 ms; at 4K 0.228 / 0.207 /
# 0.211 / 0.276 / 0.316; at L = 8K, C = 1920 0.221 / 0.212
# (experiments/results/probe_tile_bandwidth_nvidia_h100_80gb_hbm3.md).
FUSED_HALO_BWD_STAGES = 4
_STREAMS = 3  # post, pre, v
_STREAMS_PADDED = 4  # Triton block dims are powers of two


# Over 4 GiB Pallas's Triton lowering indexes an array with 64-bit offsets and zero-extends a
# dynamic row start, so a masked window that starts before row 0 (the featurizer's and the
# short filter's shifted windows) addresses ~2^32 rows past the array: an illegal address on an
# H200 at L = 256K, D = 4096. z (with its padding rows) must stay below that.
MAX_WINDOWED_BYTES = 2**32 - 2**27


def size_reason(shape_BL3C: tuple[int, ...], itemsize: int) -> str | None:
  """Why z of this shape is too large for kernels with shifted windows, or None."""
  nbytes = math.prod(shape_BL3C) * itemsize
  if nbytes <= MAX_WINDOWED_BYTES:
    return None
  return (f"z {tuple(shape_BL3C)} takes {nbytes / 2**30:.1f} GiB: over 4 GiB the fused kernels' "
          "shifted windows are mis-addressed (Pallas 64-bit indexing); use the unfused path "
          "(ops.hyena.project_and_featurize + gate_conv_gate) or a shorter sequence per call")


def unsupported_reason(shape_BL3C: tuple[int, ...], shape_3CJ: tuple[int, ...],
                       shape_GK: tuple[int, ...],
                       block_sizes: bc.BlockSizes | None = None,
                       itemsize: int = 2) -> str | None:
  """Why the fused kernels cannot take these shapes (a sentence with the fix), or None.

  itemsize: bytes per element of z (2 for bf16).
  """
  if len(shape_BL3C) != 3 or len(shape_3CJ) != 2:
    return f"expected z of rank 3 and featurizer taps of rank 2, got {shape_BL3C}, {shape_3CJ}"
  batch, length, width3 = shape_BL3C
  if reason := size_reason(shape_BL3C, itemsize):
    return reason
  if width3 % _STREAMS:
    return f"z width {width3} must be 3 C (post, pre and v blocks)"
  channels = width3 // _STREAMS
  if shape_3CJ[0] != width3:
    return f"featurizer taps {shape_3CJ} must have {width3} rows, one per column of z"
  num_taps_f = shape_3CJ[1]
  if not 1 <= num_taps_f <= MAX_FEATURIZER_TAPS:
    return (f"featurizer length {num_taps_f} must be in [1, {MAX_FEATURIZER_TAPS}]; use the "
            "unfused path (ops.hyena.project_and_featurize + gate_conv_gate)")
  requested = block_sizes or bc.BlockSizes.get_default()
  # segment counts are checked below, against the kernels that will run
  reason = bc.unsupported_reason((batch, length, channels), shape_GK, dataclasses.replace(
      requested, num_segments_fwd=None, num_segments_bwd=None))
  if reason:
    return reason
  resolved = bc._resolve(block_sizes, (batch, length, channels), shape_GK, jnp.bfloat16)
  if reason := _segments_reason(resolved, length):
    return reason
  if (requested.halo_fwd or requested.halo_bwd) and resolved.chunk < 2 * shape_GK[1]:
    return (f"halo_fwd / halo_bwd overlap chunks by K - 1 = {shape_GK[1] - 1} rows: they need a "
            f"chunk of at least 2 K = {2 * shape_GK[1]} (got {resolved.chunk}); raise "
            "BlockSizes.chunk or leave them None")
  if num_taps_f > resolved.chunk:
    return f"featurizer length {num_taps_f} must be <= chunk {resolved.chunk}"
  if not resolved.bwd_dh_in_kernel:
    return ("bwd_dh_in_kernel=False is a blocked-kernel (MR) option; the featurized kernel "
            "accumulates the filter gradient itself: leave it None")
  return None


def _segments_reason(resolved: bc.BlockSizes, length: int) -> str | None:
  """Why a kernel cannot split its chunks into the requested segments, or None. The carrying
  kernels need a divisor of the chunk count; the overlapping ones (halo_fwd / halo_bwd) give
  each segment ceil(chunks / segments) chunks and take any count >= 1."""
  num_chunks = -(-length // resolved.chunk)
  for name, halo in (("num_segments_fwd", resolved.halo_fwd),
                     ("num_segments_bwd", resolved.halo_bwd)):
    segments = getattr(resolved, name)
    if segments < 1 or (not halo and num_chunks % segments):
      return (f"{name} {segments} must divide the number of chunks {num_chunks} (or be any "
              f"count >= 1 with {name.replace('num_segments', 'halo')}=True)")
  return None


def _resolve(block_sizes: bc.BlockSizes | None, shape_BLC: tuple[int, ...],
             shape_GK: tuple[int, ...], dtype: jnp.dtype) -> bc.BlockSizes:
  """blocked_conv's heuristics, except the pipelining depths: the fused backward loads 5 J
  shifted tiles per chunk, so with T >= 128 it gets FUSED_BWD_STAGES_LONG_CHUNK (more stages
  overflow the H100's shared memory); with 16-bit I/O and T < 128 the forward gets
  FUSED_FWD_STAGES and the overlapping backward FUSED_HALO_BWD_STAGES. A depth set in
  block_sizes, or else in BlockSizes.get_default(), wins."""
  requested = block_sizes or bc.BlockSizes.get_default()
  resolved = bc._resolve(requested, shape_BLC, shape_GK, dtype)
  sixteen_bit = jnp.dtype(bc._dot_config(dtype)[0]).itemsize <= 2
  if requested.num_stages_bwd is None and resolved.chunk >= 128:
    resolved = dataclasses.replace(resolved, num_stages_bwd=FUSED_BWD_STAGES_LONG_CHUNK)
  elif requested.num_stages_bwd is None and resolved.halo_bwd and sixteen_bit:
    resolved = dataclasses.replace(resolved, num_stages_bwd=FUSED_HALO_BWD_STAGES)
  if requested.num_stages_fwd is None and resolved.chunk < 128 and sixteen_bit:
    resolved = dataclasses.replace(resolved, num_stages_fwd=FUSED_FWD_STAGES)
  return resolved


def _taps_pad(num_taps_f: int) -> int:
  return 1 << max(num_taps_f - 1, 0).bit_length()


def _kernel_taps(w_feat_3CJ: jax.Array, layout: str = "blocked") -> jax.Array:
  """[3C, J] (z's column order) -> [4, Jp, C] float32 (stream, tap, channel), zero-padded to
  powers of two."""
  width3, num_taps_f = w_feat_3CJ.shape
  w = w_feat_3CJ.astype(jnp.float32)
  if layout == "interleaved":
    w_SJC = jnp.transpose(w.reshape(width3 // _STREAMS, _STREAMS, num_taps_f), (1, 2, 0))
  else:
    w_SJC = jnp.swapaxes(w.reshape(_STREAMS, width3 // _STREAMS, num_taps_f), 1, 2)
  return jnp.pad(w_SJC, ((0, _STREAMS_PADDED - _STREAMS), (0, _taps_pad(num_taps_f) - num_taps_f),
                         (0, 0)))


def _stream_columns(layout: str, block_c: int) -> list:
  """Column indexers of the three streams in a program's z tile: the whole [Lp, dc] tile of
  each stream's own BlockSpec (blocked), or every third column of one [Lp, 3 dc] tile
  (interleaved)."""
  if layout == "interleaved":
    return [pl.ds(stream, block_c, stride=_STREAMS) for stream in range(_STREAMS)]
  return [slice(None)] * _STREAMS


def _df_columns(layout: str, block_c: int, channels: int) -> list:
  """Column indexers of this program's dc channels of each stream in the [Lp, 3C] df array:
  s C + c dc + i (blocked) or 3 (c dc + i) + s (interleaved), c = program_id(1)."""
  tile = pl.program_id(1)
  if layout == "interleaved":
    return [pl.ds(_STREAMS * tile * block_c + s, block_c, stride=_STREAMS)
            for s in range(_STREAMS)]
  return [pl.ds(pl.multiple_of(s * channels + tile * block_c, block_c), block_c)
          for s in range(_STREAMS)]


def _shifted_rows(z_ref, n, chunk: int, num_taps_f: int, windows: bool,
                  cols=slice(None), dtype: jnp.dtype | None = jnp.float32) -> list[jax.Array]:
  """z[t - j, cols] for the rows t of chunk n and j < J, [T, dc] each in `dtype` (None: z's);
  rows before 0 are 0.

  windows=True (GPU): masked loads of row windows starting at nT - j (contiguous, any start).
  windows=False (interpret mode, whose loads cannot start before row 0): clamped row
  gathers, then masked. Both read the same values.
  """
  dtype = dtype or z_ref.dtype
  out = [z_ref[bc._chunk_rows(n, chunk), cols].astype(dtype)]
  for j in range(1, num_taps_f):
    rows = n * chunk - j + jax.lax.iota(jnp.int32, chunk)
    valid = (rows >= 0)[:, None]
    if windows:
      z_TC = plgpu.load(z_ref.at[pl.ds(n * chunk - j, chunk), cols], mask=valid, other=0.0)
      out.append(z_TC.astype(dtype))
    else:
      z_TC = z_ref[jnp.maximum(rows, 0), cols].astype(dtype)
      out.append(jnp.where(valid, z_TC, jnp.zeros((), dtype)))
  return out


def _featurize(wf_ref, stream: int, shifted: list[jax.Array]) -> jax.Array:
  """f = sum_j w[stream, j] z[t - j], float32 [T, dc] (shifted: the J windows, any dtype)."""
  f32 = jnp.float32
  acc = wf_ref[stream, 0, :].astype(f32)[None, :] * shifted[0].astype(f32)
  for j in range(1, len(shifted)):
    acc = acc + wf_ref[stream, j, :].astype(f32)[None, :] * shifted[j].astype(f32)
  return acc


def _featurized(z_ref, wf_ref, stream: int, n, chunk: int, num_taps_f: int,
                windows: bool, stream_cols: list) -> jax.Array:
  """f_stream for chunk n, float32 [T, dc]."""
  return _featurize(wf_ref, stream, _shifted_rows(z_ref, n, chunk, num_taps_f, windows,
                                                  stream_cols[stream]))


def _fgcg_fwd_kernel(
    hp_ref,  # [4T] padded filter row of this tile's group, float32
    dskip_ref,  # [dc] float32
    wf_ref,  # [4, Jp, dc] featurizer taps, float32
    zpost_ref, zpre_ref, zv_ref,  # [Lp, dc] column tiles of z in the three streams (blocked);
    # interleaved: the same [Lp, 3 dc] tile three times
    out_ref,  # [Lp, dc]
    *,
    chunk: int,
    segment_chunks: int,
    num_taps_f: int,
    dot_dtype: jnp.dtype,
    precision: jax.lax.Precision | None,
    windows: bool,
    layout: str,
    has_skip: bool = True,
):
  """has_skip=False: no dskip term (Hyena-SE; dskip_ref unread): without it the skip product
  and its layout conversion to the product's register layout leave every chunk."""
  f32 = jnp.float32
  h0_TT, h1_TT, dot, *_ = bc._toeplitz_ops(hp_ref, chunk, dot_dtype, precision)
  dskip_1C = dskip_ref[...].astype(f32)[None, :] if has_skip else None
  stream_cols = _stream_columns(layout, out_ref.shape[-1])
  feat = functools.partial(_featurized, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           windows=windows, stream_cols=stream_cols)
  post_windows = functools.partial(_shifted_rows, zpost_ref, chunk=chunk, num_taps_f=num_taps_f,
                                   windows=windows, cols=stream_cols[0], dtype=None)
  first = pl.program_id(2) * segment_chunks
  last = first + segment_chunks - 1

  def body(step, carry):
    u_prev_TC, post_shifted = carry
    n = first + step
    post_next = post_windows(jnp.minimum(n + 1, last))
    post_TC = _featurize(wf_ref, 0, post_shifted)  # before the products: its tap loads overlap them
    u_TC = feat(zpre_ref, stream=1, n=n) * feat(zv_ref, stream=2, n=n)
    u_dot_TC = u_TC.astype(dot_dtype)
    y_TC = dot(h0_TT, u_dot_TC) + dot(h1_TT, u_prev_TC)
    if has_skip:
      y_TC = y_TC + dskip_1C * u_TC
    out_TC = post_TC * y_TC
    out_ref[bc._chunk_rows(n, chunk), :] = out_TC.astype(out_ref.dtype)
    return u_dot_TC, tuple(post_next)

  prev = jnp.maximum(first - 1, 0)
  u_prev_TC = feat(zpre_ref, stream=1, n=prev) * feat(zv_ref, stream=2, n=prev)
  u_prev_TC = jnp.where(first > 0, u_prev_TC, 0.0).astype(dot_dtype)
  # The post stream's windows are read a chunk ahead, as the loop carry (in z's dtype): Triton's
  # pipeliner prefetches only the loads that feed a matrix product (pre, v), so post loaded in
  # its own chunk would wait out the memory latency every chunk after the products.
  jax.lax.fori_loop(0, segment_chunks, body, (u_prev_TC, tuple(post_windows(first))))


def _fgcg_bwd_kernel(
    hp_ref, dskip_ref, wf_ref, zpost_ref, zpre_ref, zv_ref,
    dout_ref,  # [Lp, dc] cotangent of the output
    # Outputs
    df_ref,  # [Lp, 3C] gradient of the featurized streams in z's layout; this program writes
    # its dc channels of each stream (columns s C + c dc + i, or 3 (c dc + i) + s interleaved)
    dh_part_ref,  # [T, T] float32, as in blocked_conv
    ddskip_part_ref,  # [dc] float32
    *extra_refs,  # with_output: [Lp, dc], the forward's output (output_projection); then with
    # tap_grads == "kernel": [4, Jp, dc] float32, sum_t df_s[t] z_s[t - j]
    chunk: int,
    segment_chunks: int,
    num_chunks: int,
    num_taps_f: int,
    dot_dtype: jnp.dtype,
    precision: jax.lax.Precision | None,
    transpose_by_dot: bool,
    windows: bool,
    tap_grads: str,
    layout: str,
    with_output: bool = False,
):
  f32 = jnp.float32
  out_refs, dwf_part_ref = extra_refs[:int(with_output)], extra_refs[int(with_output):]
  block_c = dskip_ref.shape[-1]
  df_cols = _df_columns(layout, block_c, df_ref.shape[-1] // _STREAMS)
  z_cols = _stream_columns(layout, block_c)
  h0_TT, h1_TT, dot, dot_general, h0t_dot, h1t_dot = bc._toeplitz_ops(
      hp_ref, chunk, dot_dtype, precision, backward=True, transpose_by_dot=transpose_by_dot)
  dskip_1C = dskip_ref[...].astype(f32)[None, :]
  feat = functools.partial(_featurized, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           windows=windows, stream_cols=z_cols)
  z_refs = (zpost_ref, zpre_ref, zv_ref)

  end = (pl.program_id(2) + 1) * segment_chunks

  def grads_of_chunk(n, post_TC, pre_TC, v_TC, u_prev_dot_TC, g_next_TC):
    """Writes df of chunk n; returns (g, u, u_prev, df as stored) for the accumulators."""
    rows = bc._chunk_rows(n, chunk)
    u_TC = pre_TC * v_TC
    u_dot_TC = u_TC.astype(dot_dtype)
    dout_TC = dout_ref[rows, :].astype(f32)
    y_TC = dot(h0_TT, u_dot_TC) + dot(h1_TT, u_prev_dot_TC) + dskip_1C * u_TC
    for ref in out_refs:
      ref[rows, :] = (post_TC * y_TC).astype(ref.dtype)
    g_TC = dout_TC * post_TC
    g_dot_TC = g_TC.astype(dot_dtype)
    du_TC = h0t_dot(g_dot_TC) + h1t_dot(g_next_TC) + dskip_1C * g_TC
    stored = []
    for cols, df_TC in zip(df_cols, (dout_TC * y_TC, du_TC * v_TC, du_TC * pre_TC)):
      df_stored = df_TC.astype(df_ref.dtype)
      df_ref[rows, cols] = df_stored
      stored.append(df_stored)
    return g_TC, g_dot_TC, u_TC, u_dot_TC, stored

  def accumulate(a0_TT, a1_TT, ddskip_TC, g_TC, g_dot_TC, u_TC, u_dot_TC, u_prev_dot_TC):
    a0_TT = a0_TT + dot_general(g_dot_TC, u_dot_TC, ((1,), (1,)))
    a1_TT = a1_TT + dot_general(g_dot_TC, u_prev_dot_TC, ((1,), (1,)))
    return a0_TT, a1_TT, ddskip_TC + g_TC * u_TC

  def body_xla_taps(step, carry):
    # pre and v of chunk n come from the previous step (featurized there as its chunk n - 1)
    g_next_TC, a0_TT, a1_TT, ddskip_TC, pre_TC, v_TC = carry
    n = end - 1 - step
    prev = jnp.maximum(n - 1, 0)
    pre_prev_TC = jnp.where(n > 0, feat(zpre_ref, stream=1, n=prev), 0.0)
    v_prev_TC = jnp.where(n > 0, feat(zv_ref, stream=2, n=prev), 0.0)
    u_prev_dot_TC = (pre_prev_TC * v_prev_TC).astype(dot_dtype)
    g_TC, g_dot_TC, u_TC, u_dot_TC, _ = grads_of_chunk(
        n, feat(zpost_ref, stream=0, n=n), pre_TC, v_TC, u_prev_dot_TC, g_next_TC)
    a0_TT, a1_TT, ddskip_TC = accumulate(a0_TT, a1_TT, ddskip_TC, g_TC, g_dot_TC, u_TC, u_dot_TC,
                                         u_prev_dot_TC)
    return g_dot_TC, a0_TT, a1_TT, ddskip_TC, pre_prev_TC, v_prev_TC

  def body(step, carry):
    g_next_TC, a0_TT, a1_TT, ddskip_TC, dwf = carry
    n = end - 1 - step
    shifted = [_shifted_rows(z_ref, n, chunk, num_taps_f, windows, cols)
               for z_ref, cols in zip(z_refs, z_cols)]
    post_TC, pre_TC, v_TC = (_featurize(wf_ref, s, shifted[s]) for s in range(_STREAMS))
    prev = jnp.maximum(n - 1, 0)
    u_prev_TC = feat(zpre_ref, stream=1, n=prev) * feat(zv_ref, stream=2, n=prev)
    u_prev_dot_TC = jnp.where(n > 0, u_prev_TC, 0.0).astype(dot_dtype)
    g_TC, g_dot_TC, u_TC, u_dot_TC, stored = grads_of_chunk(n, post_TC, pre_TC, v_TC,
                                                            u_prev_dot_TC, g_next_TC)
    # The tap gradient uses df as stored (rounded to the I/O dtype), like the unfused path.
    new_dwf = [dwf[stream * num_taps_f + j] + shifted[stream][j] * stored[stream].astype(f32)
               for stream in range(_STREAMS) for j in range(num_taps_f)]
    a0_TT, a1_TT, ddskip_TC = accumulate(a0_TT, a1_TT, ddskip_TC, g_TC, g_dot_TC, u_TC, u_dot_TC,
                                         u_prev_dot_TC)
    return g_dot_TC, a0_TT, a1_TT, ddskip_TC, tuple(new_dwf)

  n_next = jnp.minimum(end, num_chunks - 1)
  g_next_TC = dout_ref[bc._chunk_rows(n_next, chunk), :].astype(f32) * feat(zpost_ref, stream=0, n=n_next)
  g_next_TC = jnp.where(end < num_chunks, g_next_TC, 0.0).astype(dot_dtype)
  zeros_C = jnp.zeros((block_c,), f32)
  zeros_TC = jnp.zeros((chunk, block_c), f32)
  init = (g_next_TC, jnp.zeros((chunk, chunk), f32), jnp.zeros((chunk, chunk), f32), zeros_TC)
  if tap_grads == "xla":
    last = end - 1
    init += (feat(zpre_ref, stream=1, n=last), feat(zv_ref, stream=2, n=last))
    _, a0_TT, a1_TT, ddskip_TC, _, _ = jax.lax.fori_loop(0, segment_chunks, body_xla_taps, init)
  else:
    init += ((zeros_TC,) * (_STREAMS * num_taps_f),)
    _, a0_TT, a1_TT, ddskip_TC, dwf = jax.lax.fori_loop(0, segment_chunks, body, init)
    (dwf_ref,) = dwf_part_ref
    for stream in range(_STREAMS_PADDED):
      for j in range(dwf_ref.shape[1]):
        real = stream < _STREAMS and j < num_taps_f
        dwf_ref[stream, j, :] = jnp.sum(dwf[stream * num_taps_f + j], axis=0) if real else zeros_C
  rows_TT = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols_TT = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  dh_part_ref[...] = jnp.where(rows_TT >= cols_TT, a0_TT, a1_TT)
  ddskip_part_ref[...] = jnp.sum(ddskip_TC, axis=0)


# ---------------------------------------------------------------------------------------------
# halo_fwd, halo_bwd: chunks overlap by H = K - 1 rows and carry nothing (BlockSizes).
#
# Chunk n covers the rows [s - H, s - H + T), s = n (T - H). Its rows o >= H have all K taps
# inside the chunk, so y = H0 u (+ dskip u) there: the forward writes those T - H rows (s ..
# s + T - H - 1). In the backward, du = H0^T g (+ dskip g) is complete for the rows o < T - H
# (their taps reach g up to row o + H), and the filter gradient pairs g of the rows o >= H with
# u of the same chunk: every row's y, df_post and dh term comes from the one chunk that holds it
# at o >= H, its du, df_pre, df_v from the one that holds it at o < T - H.
# ---------------------------------------------------------------------------------------------


def _halo_chunks(padded_len: int, chunk: int, halo: int, segments: int,
                 backward: bool) -> int:
  """Chunks per segment: the forward's outputs end at row n (T - H) + T - H, the backward's
  du rows H earlier, so the backward takes ceil((Lp + H) / (T - H)) chunks."""
  rows = padded_len + (halo if backward else 0)
  num_chunks = -(-rows // (chunk - halo))
  return -(-num_chunks // segments)


def _featurized_window(z_ref, wf_ref, stream: int, start, chunk: int, num_taps_f: int,
                       windows: bool, cols) -> jax.Array:
  """f_stream for the rows start .. start + T - 1, float32 [T, dc]; rows outside z are 0."""
  padded_len = z_ref.shape[0]
  shifted = [_rows_window(z_ref, start - j, chunk, padded_len, windows, cols)
             for j in range(num_taps_f)]
  return _featurize(wf_ref, stream, shifted)


def _store_window(ref, start, value_TC: jax.Array, keep_T: jax.Array, windows: bool,
                  cols=slice(None)) -> None:
  """ref[start + o, cols] = value[o] for the rows o with keep[o] that lie inside ref.

  windows=True (GPU): one masked store of the row window. Otherwise (interpret mode) a
  scatter whose other rows point past the end of ref, where it drops them.
  """
  padded_len, chunk = ref.shape[0], value_TC.shape[0]
  rows = start + jax.lax.iota(jnp.int32, chunk)
  keep = keep_T & (rows >= 0) & (rows < padded_len)
  if windows:
    plgpu.store(ref.at[pl.ds(start, chunk), cols], value_TC, mask=keep[:, None])
  else:
    ref[jnp.where(keep, rows, padded_len), cols] = value_TC


def _fgcg_fwd_halo_kernel(hp_ref, dskip_ref, wf_ref, zpost_ref, zpre_ref, zv_ref, out_ref, *,
                          chunk: int, halo: int, segment_chunks: int, num_taps_f: int,
                          dot_dtype: jnp.dtype, precision: jax.lax.Precision | None,
                          windows: bool, layout: str, has_skip: bool):
  """_fgcg_fwd_kernel's refs; chunk n writes the rows n (T - H) .. n (T - H) + T - H - 1.
  has_skip=False: no dskip term (Hyena-SE; dskip_ref unread)."""
  f32 = jnp.float32
  h0_TT, _, dot, *_ = bc._toeplitz_ops(hp_ref, chunk, dot_dtype, precision)
  dskip_1C = dskip_ref[...].astype(f32)[None, :] if has_skip else None
  cols = _stream_columns(layout, out_ref.shape[-1])
  feat = functools.partial(_featurized_window, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           windows=windows)
  outputs_T = jax.lax.iota(jnp.int32, chunk) >= halo
  first = pl.program_id(2) * segment_chunks
  padded_len = zpost_ref.shape[0]

  def post_windows(step):  # the post stream's J windows of chunk first + step, in z's dtype
    start = (first + step) * (chunk - halo) - halo
    return tuple(_rows_window(zpost_ref, start - j, chunk, padded_len, windows, cols[0],
                              dtype=None) for j in range(num_taps_f))

  def body(step, post_shifted):
    start = (first + step) * (chunk - halo) - halo
    post_next = post_windows(jnp.minimum(step + 1, segment_chunks - 1))
    post_TC = _featurize(wf_ref, 0, post_shifted)
    u_TC = (feat(zpre_ref, stream=1, start=start, cols=cols[1])
            * feat(zv_ref, stream=2, start=start, cols=cols[2]))
    y_TC = dot(h0_TT, u_TC.astype(dot_dtype))
    if has_skip:
      y_TC = y_TC + dskip_1C * u_TC
    out_TC = post_TC * y_TC
    _store_window(out_ref, start, out_TC.astype(out_ref.dtype), outputs_T, windows)
    return post_next

  # post a chunk ahead, as in _fgcg_fwd_kernel
  jax.lax.fori_loop(0, segment_chunks, body, post_windows(0))


def _fgcg_bwd_halo_kernel(hp_ref, dskip_ref, wf_ref, zpost_ref, zpre_ref, zv_ref, dout_ref,
                          df_ref, dh_part_ref, ddskip_part_ref, *out_refs, chunk: int, halo: int,
                          segment_chunks: int, num_taps_f: int, dot_dtype: jnp.dtype,
                          precision: jax.lax.Precision | None, transpose_by_dot: bool,
                          windows: bool, layout: str, has_skip: bool):
  """_fgcg_bwd_kernel's refs (tap_grads="xla"; out_refs: the forward's output or none).
  has_skip=False: no dskip term (Hyena-SE): dskip_ref unread, ddskip_part_ref written 0, and
  the kernel holds no ddskip accumulator (on sm_90 at 3 stages: 168 registers a thread instead
  of 182, 3 programs an SM instead of 2; at the default 4 stages shared memory holds it to 2)."""
  f32 = jnp.float32
  block_c = dskip_ref.shape[-1]
  df_cols = _df_columns(layout, block_c, df_ref.shape[-1] // _STREAMS)
  cols = _stream_columns(layout, block_c)
  # the previous chunk's tiles that _toeplitz_ops also builds go unused (Triton drops them)
  h0_TT, _, dot, dot_general, h0t_dot, _ = bc._toeplitz_ops(
      hp_ref, chunk, dot_dtype, precision, backward=True, transpose_by_dot=transpose_by_dot)
  dskip_1C = dskip_ref[...].astype(f32)[None, :] if has_skip else None
  feat = functools.partial(_featurized_window, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           windows=windows)
  rows_T = jax.lax.iota(jnp.int32, chunk)
  outputs_T, inputs_T = rows_T >= halo, rows_T < chunk - halo
  first = pl.program_id(2) * segment_chunks

  def body(step, carry):
    a_TT, *ddskip_TC = carry
    start = (first + step) * (chunk - halo) - halo
    post_TC = feat(zpost_ref, stream=0, start=start, cols=cols[0])
    pre_TC = feat(zpre_ref, stream=1, start=start, cols=cols[1])
    v_TC = feat(zv_ref, stream=2, start=start, cols=cols[2])
    dout_TC = _rows_window(dout_ref, start, chunk, dout_ref.shape[0], windows)
    u_TC = pre_TC * v_TC
    u_dot_TC = u_TC.astype(dot_dtype)
    y_TC = dot(h0_TT, u_dot_TC)
    if has_skip:
      y_TC = y_TC + dskip_1C * u_TC
    for ref in out_refs:
      _store_window(ref, start, (post_TC * y_TC).astype(ref.dtype), outputs_T, windows)
    g_TC = dout_TC * post_TC
    du_TC = h0t_dot(g_TC.astype(dot_dtype))
    if has_skip:
      du_TC = du_TC + dskip_1C * g_TC
    for df_TC, keep_T, df_col in ((dout_TC * y_TC, outputs_T, df_cols[0]),
                                  (du_TC * v_TC, inputs_T, df_cols[1]),
                                  (du_TC * pre_TC, inputs_T, df_cols[2])):
      _store_window(df_ref, start, df_TC.astype(df_ref.dtype), keep_T, windows, df_col)
    g_out_TC = jnp.where(outputs_T[:, None], g_TC, 0.0)
    a_TT = a_TT + dot_general(g_out_TC.astype(dot_dtype), u_dot_TC, ((1,), (1,)))
    return (a_TT, ddskip_TC[0] + g_out_TC * u_TC) if has_skip else (a_TT,)

  init = (jnp.zeros((chunk, chunk), f32),)
  if has_skip:
    init += (jnp.zeros((chunk, block_c), f32),)
  a_TT, *ddskip = jax.lax.fori_loop(0, segment_chunks, body, init)
  lower_TT = rows_T[:, None] >= rows_T[None, :]
  dh_part_ref[...] = jnp.where(lower_TT, a_TT, 0.0)  # lags o - i >= 0 (bc._dh_from_partials)
  ddskip_part_ref[...] = jnp.sum(ddskip[0], axis=0) if has_skip else jnp.zeros((block_c,), f32)


def _specs(batch: int, padded_len: int, channels: int, groups: int, taps_pad: int,
           block_sizes: bc.BlockSizes, segments: int, layout: str):
  chunk, block_c = block_sizes.chunk, block_sizes.block_c
  grid, tile, filter_row, skip = bc._specs(batch, padded_len, channels, groups, block_c, chunk,
                                           segments)
  tiles = channels // block_c
  if layout == "interleaved":
    z_tiles = [pl.BlockSpec((None, padded_len, _STREAMS * block_c), lambda b, c, s: (b, 0, c))] * _STREAMS
  else:
    z_tiles = [pl.BlockSpec((None, padded_len, block_c), lambda b, c, s, k=k: (b, 0, c + k * tiles))
               for k in range(_STREAMS)]
  taps = pl.BlockSpec((_STREAMS_PADDED, taps_pad, block_c), lambda b, c, s: (0, 0, c))
  return grid, tile, filter_row, skip, taps, z_tiles


def _fwd_call(z_BL3C, wf_SJC, hp_GX, dskip_C, *, num_taps_f: int, block_sizes: bc.BlockSizes,
              interpret: bool, layout: str, halo: int, has_skip: bool = True) -> jax.Array:
  """The forward kernel over z padded to whole chunks; halo: K - 1 (used with
  block_sizes.halo_fwd), has_skip: whether dskip is present."""
  batch, padded_len, width3 = z_BL3C.shape
  channels = width3 // _STREAMS
  num_chunks = padded_len // block_sizes.chunk
  segments = block_sizes.num_segments_fwd
  grid, tile, filter_row, skip, taps, z_tiles = _specs(
      batch, padded_len, channels, hp_GX.shape[0], wf_SJC.shape[1], block_sizes, segments, layout)
  dot_dtype, precision = bc._dot_config(z_BL3C.dtype)
  common = dict(chunk=block_sizes.chunk, num_taps_f=num_taps_f, dot_dtype=dot_dtype,
                precision=precision, windows=not interpret, layout=layout)
  if block_sizes.halo_fwd:
    segment_chunks = _halo_chunks(padded_len, block_sizes.chunk, halo, segments, backward=False)
    kernel = functools.partial(_fgcg_fwd_halo_kernel, halo=halo, has_skip=has_skip,
                               segment_chunks=segment_chunks, **common)
  else:
    kernel = functools.partial(_fgcg_fwd_kernel, segment_chunks=num_chunks // segments,
                               has_skip=has_skip, **common)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[filter_row, skip, taps, *z_tiles],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct((batch, padded_len, channels), z_BL3C.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps_fwd,
                                           num_stages=block_sizes.num_stages_fwd),
      interpret=interpret,
      name="featurized_gate_conv_gate_fwd",
  )(hp_GX, dskip_C, wf_SJC, z_BL3C, z_BL3C, z_BL3C)


def _bwd_call(z_BL3C, dout_BLC, wf_SJC, hp_GX, dskip_C, *, num_taps_f: int,
              block_sizes: bc.BlockSizes, interpret: bool, tap_grads: str, layout: str,
              halo: int, has_skip: bool = True, with_output: bool = False):
  """(df, dh partials, ddskip partials), then the forward's output if with_output, then the
  tap-gradient partials if tap_grads == "kernel"; halo: K - 1, has_skip: whether dskip is present
  (both used with block_sizes.halo_bwd)."""
  batch, padded_len, width3 = z_BL3C.shape
  channels = width3 // _STREAMS
  chunk, block_c = block_sizes.chunk, block_sizes.block_c
  num_chunks = padded_len // chunk
  segments = block_sizes.num_segments_bwd
  taps_pad = wf_SJC.shape[1]
  grid, tile, filter_row, skip, taps, z_tiles = _specs(
      batch, padded_len, channels, hp_GX.shape[0], taps_pad, block_sizes, segments, layout)
  dot_dtype, precision = bc._dot_config(z_BL3C.dtype)
  common = dict(chunk=chunk, num_taps_f=num_taps_f, dot_dtype=dot_dtype, precision=precision,
                transpose_by_dot=block_sizes.bwd_transpose_by_dot, windows=not interpret,
                layout=layout)
  if block_sizes.halo_bwd:
    segment_chunks = _halo_chunks(padded_len, chunk, halo, segments, backward=True)
    kernel = functools.partial(_fgcg_bwd_halo_kernel, halo=halo, has_skip=has_skip,
                               segment_chunks=segment_chunks, **common)
  else:
    kernel = functools.partial(_fgcg_bwd_kernel, segment_chunks=num_chunks // segments,
                               num_chunks=num_chunks, tap_grads=tap_grads,
                               with_output=with_output, **common)
  out_shape = (
      jax.ShapeDtypeStruct((batch, padded_len, width3), z_BL3C.dtype),
      jax.ShapeDtypeStruct((batch, channels // block_c, segments, chunk, chunk), jnp.float32),
      jax.ShapeDtypeStruct((batch, segments, channels), jnp.float32),
  )
  out_specs = (
      pl.BlockSpec((None, padded_len, width3), lambda b, c, s: (b, 0, 0)),
      pl.BlockSpec((None, None, None, chunk, chunk), lambda b, c, s: (b, c, s, 0, 0)),
      pl.BlockSpec((None, None, block_c), lambda b, c, s: (b, s, c)),
  )
  if with_output:
    out_shape += (jax.ShapeDtypeStruct((batch, padded_len, channels), z_BL3C.dtype),)
    out_specs += (tile,)
  if tap_grads == "kernel":
    out_shape += (jax.ShapeDtypeStruct((batch, segments, _STREAMS_PADDED, taps_pad, channels),
                                       jnp.float32),)
    out_specs += (pl.BlockSpec((None, None, _STREAMS_PADDED, taps_pad, block_c),
                               lambda b, c, s: (b, s, 0, 0, c)),)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[filter_row, skip, taps, *z_tiles, tile],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd,
                                           num_stages=block_sizes.num_stages_bwd),
      interpret=interpret,
      name="featurized_gate_conv_gate_bwd",
  )(hp_GX, dskip_C, wf_SJC, z_BL3C, z_BL3C, z_BL3C, dout_BLC)


def featurizer_transpose(df_BLC: jax.Array, w_CJ: jax.Array) -> jax.Array:
  """Adjoint of the causal depthwise FIR: dz[t] = sum_j w[:, j] df[t + j], float32."""
  length = df_BLC.shape[1]
  num_taps_f = w_CJ.shape[1]
  df = jnp.pad(df_BLC.astype(jnp.float32), ((0, 0), (0, num_taps_f - 1), (0, 0)))
  w = w_CJ.astype(jnp.float32)
  return sum(w[:, j] * df[:, j:j + length] for j in range(num_taps_f))


def featurizer_tap_grads(df_BLC: jax.Array, z_BLC: jax.Array, num_taps_f: int) -> jax.Array:
  """Gradient of the featurizer taps: dw[c, j] = sum_(b, t) df[b, t, c] z[b, t - j, c], float32 [C, J]."""
  length = df_BLC.shape[1]
  df, z = df_BLC.astype(jnp.float32), z_BLC.astype(jnp.float32)
  return jnp.stack([jnp.sum(df[:, j:] * z[:, :length - j], axis=(0, 1)) for j in range(num_taps_f)],
                   axis=-1)


FEAT_BWD_CHUNK = 32  # rows per step of the featurizer-backward kernel
FEAT_BWD_BLOCK_C = 64  # columns per program (128-byte bf16 rows)
# Sequence segments are doubled while the grid stays within this many programs. H100, L = 4K /
# 8K, kernel alone: 1536 programs 0.130 / 0.251 ms against 768 at 0.144 / 0.281 (X = 12288);
# 1440 programs 0.125 ms against 2880 at 0.130 (X = 5760, 8K)
# (experiments/results/tune_featurizer_bwd_nvidia_h100_80gb_hbm3.md).
FEAT_BWD_MAX_PROGRAMS = 1536
FEAT_BWD_NUM_WARPS = 4
FEAT_BWD_NUM_STAGES = 3


def _rows_window(ref, start, chunk: int, padded_len: int, windows: bool,
                 cols=slice(None), dtype: jnp.dtype | None = jnp.float32) -> jax.Array:
  """Rows start .. start + chunk - 1 (columns `cols`) of ref, [chunk, dc] in `dtype` (None:
  ref's); rows outside [0, Lp) are 0. windows: masked contiguous loads (GPU), else clamped row
  gathers (interpret mode, whose loads cannot start before row 0)."""
  dtype = dtype or ref.dtype
  rows = start + jax.lax.iota(jnp.int32, chunk)
  valid = ((rows >= 0) & (rows < padded_len))[:, None]
  if windows:
    return plgpu.load(ref.at[pl.ds(start, chunk), cols], mask=valid, other=0.0).astype(dtype)
  return jnp.where(valid, ref[jnp.clip(rows, 0, padded_len - 1), cols].astype(dtype),
                   jnp.zeros((), dtype))


def _featurizer_bwd_kernel(w_ref, df_ref, z_ref, dz_ref, dw_part_ref, *, chunk: int,
                           segment_chunks: int, num_taps_f: int, windows: bool):
  """One column tile, one segment: dz[t] = sum_j w_j df[t + j]; dw_j += sum_t df[t] z[t - j].

  w_ref [Jp, dc] float32; df_ref, z_ref, dz_ref [Lp, dc]; dw_part_ref [Jp, dc] float32.
  """
  f32 = jnp.float32
  padded_len = df_ref.shape[0]
  first = pl.program_id(2) * segment_chunks
  taps_1C = [w_ref[j, :].astype(f32)[None, :] for j in range(num_taps_f)]

  def body(step, acc):
    start = (first + step) * chunk
    df_TC = df_ref[pl.ds(pl.multiple_of(start, chunk), chunk), :].astype(f32)
    dz_TC = taps_1C[0] * df_TC
    for j in range(1, num_taps_f):
      dz_TC = dz_TC + taps_1C[j] * _rows_window(df_ref, start + j, chunk, padded_len, windows)
    dz_ref[pl.ds(pl.multiple_of(start, chunk), chunk), :] = dz_TC.astype(dz_ref.dtype)
    z_TC = z_ref[pl.ds(pl.multiple_of(start, chunk), chunk), :].astype(f32)
    new = [acc[0] + df_TC * z_TC]
    for j in range(1, num_taps_f):
      new.append(acc[j] + df_TC * _rows_window(z_ref, start - j, chunk, padded_len, windows))
    return tuple(new)

  zeros = jnp.zeros((chunk, dz_ref.shape[-1]), f32)
  acc = jax.lax.fori_loop(0, segment_chunks, body, (zeros,) * num_taps_f)
  for j in range(dw_part_ref.shape[0]):
    dw_part_ref[j, :] = jnp.sum(acc[j], axis=0) if j < num_taps_f else jnp.zeros_like(acc[0][0])


def featurizer_backward_pallas(df_BLX: jax.Array, z_BLX: jax.Array, w_XJ: jax.Array, *,
                               chunk: int = FEAT_BWD_CHUNK, interpret: bool = False,
                               block_c: int | None = None, max_programs: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """Both featurizer gradients in one pass over df and z (Pallas), for any channel count X.

  Args:
    df_BLX: [B, Lp, X] gradient of the featurized streams; Lp a multiple of `chunk`, rows past
      the sequence zero; X a multiple of 16.
    z_BLX: [B, Lp, X] featurizer input (rows past the sequence arbitrary: df is zero there).
    w_XJ: [X, J] taps, w[:, 0] on the current token.
    chunk: rows per loop step, a power of two >= J.
    interpret: Pallas interpret mode (CPU).
    block_c, max_programs, num_warps, num_stages: the launch (None: the FEAT_BWD_*
      defaults). block_c, a power of two >= 16, is halved until it divides X; sequence
      segments are doubled while the grid stays within max_programs programs and each
      segment keeps >= 8 chunks.

  Returns:
    dz [B, Lp, X] in z's dtype (dz[t] = sum_j w[:, j] df[t + j]) and dw [X, J] float32
    (sum over b, t of df[t] z[t - j]).
  """
  batch, padded_len, width = df_BLX.shape
  num_taps_f = w_XJ.shape[1]
  block_c = FEAT_BWD_BLOCK_C if block_c is None else block_c
  if not bc._is_pow2(block_c) or block_c < bc.MIN_DOT_DIM:
    raise ValueError(f"featurizer backward: block_c {block_c} must be a power of two >= "
                     f"{bc.MIN_DOT_DIM}")
  while width % block_c and block_c > bc.MIN_DOT_DIM:
    block_c //= 2
  if padded_len % chunk or width % block_c or not bc._is_pow2(chunk) or chunk < num_taps_f:
    raise ValueError(f"featurizer backward: rows {padded_len} must be a multiple of the chunk "
                     f"{chunk} (a power of two >= {num_taps_f} taps) and columns {width} of 16")
  num_chunks = padded_len // chunk
  max_programs = FEAT_BWD_MAX_PROGRAMS if max_programs is None else max_programs
  segments = 1
  while (batch * (width // block_c) * 2 * segments <= max_programs
         and num_chunks % (2 * segments) == 0 and num_chunks // (2 * segments) >= 8):
    segments *= 2
  taps_pad = _taps_pad(num_taps_f)
  w_JX = jnp.pad(w_XJ.astype(jnp.float32).T, ((0, taps_pad - num_taps_f), (0, 0)))
  tile = pl.BlockSpec((None, padded_len, block_c), lambda b, c, s: (b, 0, c))
  kernel = functools.partial(_featurizer_bwd_kernel, chunk=chunk,
                             segment_chunks=num_chunks // segments, num_taps_f=num_taps_f,
                             windows=not interpret)
  dz, dw_part = pl.pallas_call(
      kernel,
      grid=(batch, width // block_c, segments),
      in_specs=[pl.BlockSpec((taps_pad, block_c), lambda b, c, s: (0, c)), tile, tile],
      out_specs=(tile, pl.BlockSpec((None, None, taps_pad, block_c), lambda b, c, s: (b, s, 0, c))),
      out_shape=(jax.ShapeDtypeStruct(z_BLX.shape, z_BLX.dtype),
                 jax.ShapeDtypeStruct((batch, segments, taps_pad, width), jnp.float32)),
      compiler_params=plgpu.CompilerParams(
          num_warps=FEAT_BWD_NUM_WARPS if num_warps is None else num_warps,
          num_stages=FEAT_BWD_NUM_STAGES if num_stages is None else num_stages),
      interpret=interpret,
      name="featurizer_bwd",
  )(w_JX, df_BLX, z_BLX)
  return dz, dw_part.sum((0, 1))[:num_taps_f].T


def featurizer_backward(df_BLX: jax.Array, z_BLX: jax.Array, w_XJ: jax.Array, *,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """featurizer_backward_pallas for any number of rows L: pads df and z with zero rows to the
  kernel's chunk. Returns dz [B, L, X] in z's dtype and dw [X, J] in w's dtype."""
  length = z_BLX.shape[1]
  padded = bc._padded_len(length, FEAT_BWD_CHUNK)
  dz, dw = featurizer_backward_pallas(bc._pad_rows(df_BLX.astype(z_BLX.dtype), padded),
                                      bc._pad_rows(z_BLX, padded), w_XJ, chunk=FEAT_BWD_CHUNK,
                                      interpret=interpret)
  return dz[:, :length], dw.astype(w_XJ.dtype)


def _pad_rows(z_BL3C: jax.Array, chunk: int) -> jax.Array:
  return bc._pad_rows(z_BL3C, bc._padded_len(z_BL3C.shape[1], chunk))


def _kernel_skip(dskip_C: jax.Array | None, z_BL3C: jax.Array) -> jax.Array:
  """dskip as the kernels read it: float32 [C], zeros where there is none (Hyena-SE)."""
  if dskip_C is None:
    return jnp.zeros((z_BL3C.shape[-1] // _STREAMS,), jnp.float32)
  return dskip_C.astype(jnp.float32)


def _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout):
  length = z_BL3C.shape[1]
  chunk = block_sizes.chunk
  out = _fwd_call(_pad_rows(z_BL3C, chunk), _kernel_taps(w_feat_3CJ, layout),
                  bc._padded_filter(h_GK, chunk), _kernel_skip(dskip_C, z_BL3C),
                  num_taps_f=w_feat_3CJ.shape[1], block_sizes=block_sizes, interpret=interpret,
                  layout=layout, halo=h_GK.shape[1] - 1, has_skip=dskip_C is not None)
  return out[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fgcg(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, tap_grads, layout):
  return _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout)


def _fgcg_fwd(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, tap_grads, layout):
  out = _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout)
  return out, (z_BL3C, w_feat_3CJ, h_GK, dskip_C)


def _fgcg_bwd(block_sizes, interpret, tap_grads, layout, residuals, dout_BLC):
  return _fgcg_bwd_impl(block_sizes, interpret, tap_grads, layout, residuals, dout_BLC)


def _fgcg_bwd_impl(block_sizes, interpret, tap_grads, layout, residuals, dout_BLC,
                   with_output=False):
  """Gradients of z, the taps, h and dskip, then (with_output) the forward's output."""
  z_BL3C, w_feat_3CJ, h_GK, dskip_C = residuals
  length, width3 = z_BL3C.shape[1:]
  num_taps_f = w_feat_3CJ.shape[1]
  chunk = block_sizes.chunk
  dout = bc._pad_rows(dout_BLC.astype(z_BL3C.dtype), bc._padded_len(length, chunk))
  df_BL3C, dh_part, ddskip_part, *extra = _bwd_call(
      _pad_rows(z_BL3C, chunk), dout, _kernel_taps(w_feat_3CJ, layout),
      bc._padded_filter(h_GK, chunk), _kernel_skip(dskip_C, z_BL3C), num_taps_f=num_taps_f,
      block_sizes=block_sizes, interpret=interpret, tap_grads=tap_grads, layout=layout,
      halo=h_GK.shape[1] - 1, has_skip=dskip_C is not None, with_output=with_output)
  out, dwf_part = extra[:int(with_output)], extra[int(with_output):]
  if tap_grads == "kernel":
    df_BL3C = df_BL3C[:, :length]
    dz_BL3C = featurizer_transpose(df_BL3C, w_feat_3CJ).astype(z_BL3C.dtype)
    dw_SJC = dwf_part[0].sum((0, 1))[:_STREAMS, :num_taps_f]
    order = (2, 0, 1) if layout == "interleaved" else (0, 2, 1)
    dw_3CJ = jnp.transpose(dw_SJC, order).reshape(width3, num_taps_f)
  else:
    dz_BL3C, dw_3CJ = featurizer_backward_pallas(df_BL3C, _pad_rows(z_BL3C, chunk), w_feat_3CJ,
                                                 chunk=min(chunk, FEAT_BWD_CHUNK),
                                                 interpret=interpret)
    dz_BL3C = dz_BL3C[:, :length]
  dw_3CJ = dw_3CJ.astype(w_feat_3CJ.dtype)
  dh_GK = bc._dh_from_partials(dh_part, h_GK.shape[0], h_GK.shape[1]).astype(h_GK.dtype)
  ddskip_C = None if dskip_C is None else ddskip_part.sum((0, 1)).astype(dskip_C.dtype)
  return (dz_BL3C, dw_3CJ, dh_GK, ddskip_C) + tuple(y[:, :length] for y in out)


_fgcg.defvjp(_fgcg_fwd, _fgcg_bwd)


def _fgcg_projected_fwd(block_sizes, interpret, tap_grads, layout, operands):
  return _fwd_impl(*operands, block_sizes, interpret, layout), operands


def _fgcg_projected_bwd(block_sizes, interpret, tap_grads, layout, residuals, dy_BLC):
  *grads, y_BLC = _fgcg_bwd_impl(block_sizes, interpret, tap_grads, layout, residuals, dy_BLC,
                                 with_output=True)
  return y_BLC, tuple(grads)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "tap_grads", "layout"))
def featurized_gate_conv_gate_pallas(z_BL3C: jax.Array, w_feat_3CJ: jax.Array, h_GK: jax.Array,
                                     dskip_C: jax.Array | None = None, *,
                                     block_sizes: bc.BlockSizes | None = None,
                                     interpret: bool = False, tap_grads: str = "xla",
                                     layout: str = "blocked") -> jax.Array:
  """Featurizer + Hyena gate-conv-gate by the fused Pallas (Triton) kernels, differentiable.

  Args:
    z_BL3C: [B, L, 3C] in-projection product, columns [post | pre | v] (layout "blocked") or
      triples 3i + (0 post, 1 pre, 2 v) (layout "interleaved", the Evo 2 / module order);
      bf16 or float32; any L (padded internally).
    w_feat_3CJ: [3C, J] featurizer taps for the same columns, w[:, 0] on the current token,
      J <= MAX_FEATURIZER_TAPS.
    h_GK: [G, K] grouped filter (h[:, 0] on the current token), K <= chunk.
    dskip_C: [C] skip weights, or None (Hyena-SE).
    block_sizes: tiles and launch parameters (blocked_conv.BlockSizes); None: defaults.
    interpret: Pallas interpret mode (CPU), for tests.
    tap_grads: "xla" (default): the backward kernel writes df (overlapping its chunks, or
      with halo_bwd=False carrying the featurized pre/v of the previous chunk), and
      featurizer_backward_pallas reduces the featurizer-tap gradient (df * shifted z) while
      it writes dz; "kernel": the carrying backward kernel reduces it on chip (three [T, dc]
      accumulators per tap and stream, 2.4x slower fwd+bwd on an H100 at 8K:
      experiments/results/se_overhead_nvidia_h100_80gb_hbm3.md).
    layout: "blocked" or "interleaved" column order of z, the taps and dz. Interleaved lets the
      module feed x @ W_in with its parameter as stored (no per-call column reorder of the
      weight or of its gradient); the kernels then read and write every third column.

  Returns:
    [B, L, C] in z's dtype. Gradients (custom_vjp) for z, the taps, h and dskip.

  Raises:
    ValueError: shapes the kernels do not take (see `unsupported_reason`).
  """
  dskip_C, resolved = _checked(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, tap_grads, layout)
  return _fgcg(z_BL3C, w_feat_3CJ, h_GK, dskip_C, resolved, interpret, tap_grads, layout)


def _checked(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, tap_grads, layout):
  """(dskip, resolved block sizes) after checking shapes and options (ValueError otherwise)."""
  reason = unsupported_reason(z_BL3C.shape, w_feat_3CJ.shape, h_GK.shape, block_sizes,
                              z_BL3C.dtype.itemsize)
  if reason:
    raise ValueError(reason)
  batch, length, width3 = z_BL3C.shape
  channels = width3 // _STREAMS
  if dskip_C is not None and dskip_C.shape != (channels,):
    raise ValueError(f"dskip shape {dskip_C.shape} must be ({channels},)")
  if tap_grads not in TAP_GRADS:
    raise ValueError(f"tap_grads={tap_grads!r}: choose one of {TAP_GRADS}")
  resolved = _resolve(block_sizes, (batch, length, channels), h_GK.shape, z_BL3C.dtype)
  if tap_grads == "kernel" and resolved.halo_bwd:
    if (block_sizes or bc.BlockSizes.get_default()).halo_bwd:
      raise ValueError("halo_bwd=True leaves the featurizer-tap gradient to the "
                       "featurizer-backward kernel: use tap_grads='xla' (the default)")
    resolved = dataclasses.replace(resolved, halo_bwd=False)
    if reason := _segments_reason(resolved, length):
      raise ValueError(reason)
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}")
  return dskip_C, resolved


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "tap_grads", "layout"))
def featurized_gate_conv_gate_proj_pallas(z_BL3C: jax.Array, w_feat_3CJ: jax.Array,
                                          h_GK: jax.Array, dskip_C: jax.Array | None,
                                          w_out_CE: jax.Array, *,
                                          block_sizes: bc.BlockSizes | None = None,
                                          interpret: bool = False, tap_grads: str = "xla",
                                          layout: str = "blocked") -> jax.Array:
  """featurized_gate_conv_gate_pallas(...) @ w_out, whose backward takes the gate output for
  dW_out from the backward kernel (output_projection.project_output): a rematerialised block
  does not rerun the forward kernel. Arguments as featurized_gate_conv_gate_pallas, plus
  w_out_CE [C, E].

  Returns:
    [B, L, E] in z's dtype. Gradients for z, the taps, h, dskip and w_out.
  """
  dskip_C, resolved = _checked(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, tap_grads, layout)
  channels = z_BL3C.shape[2] // _STREAMS
  if w_out_CE.ndim != 2 or w_out_CE.shape[0] != channels:
    raise ValueError(f"w_out shape {w_out_CE.shape} must be ({channels}, E)")
  return output_projection.project_output(
      functools.partial(_fgcg_projected_fwd, resolved, interpret, tap_grads, layout),
      functools.partial(_fgcg_projected_bwd, resolved, interpret, tap_grads, layout),
      (z_BL3C, w_feat_3CJ, h_GK, dskip_C), w_out_CE)


# ---------------------------------------------------------------------------------------------
# Plain-JAX reference.
# ---------------------------------------------------------------------------------------------


def featurize_streams(z_BL3C: jax.Array, w_feat_3CJ: jax.Array,
                      layout: str = "blocked") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Featurizer on z, split into (post, pre, v) [B, L, C] in z's dtype (plain JAX)."""
  length, num_taps_f = z_BL3C.shape[1], w_feat_3CJ.shape[1]
  z = jnp.pad(z_BL3C.astype(jnp.float32), ((0, 0), (num_taps_f - 1, 0), (0, 0)))
  w = w_feat_3CJ.astype(jnp.float32)
  f = sum(w[:, j] * z[:, num_taps_f - 1 - j:num_taps_f - 1 - j + length] for j in range(num_taps_f))
  f = f.astype(z_BL3C.dtype)
  if layout == "interleaved":
    f = f.reshape(*f.shape[:-1], -1, _STREAMS)
    return f[..., 0], f[..., 1], f[..., 2]
  return tuple(jnp.split(f, _STREAMS, axis=-1))


def featurized_gate_conv_gate(z_BL3C: jax.Array, w_feat_3CJ: jax.Array, h_GK: jax.Array,
                              dskip_C: jax.Array | None = None, chunk: int = bc.DEFAULT_CHUNK,
                              layout: str = "blocked") -> jax.Array:
  """Reference of featurized_gate_conv_gate_pallas: featurizer, then blocked gate-conv-gate."""
  post, pre, v = featurize_streams(z_BL3C, w_feat_3CJ, layout)
  return bc.gate_conv_gate(post, pre, v, h_GK, dskip_C, chunk=max(chunk, h_GK.shape[1]))
