"""Hyena-SE fused and direct: featurizer + short grouped FIR + gates on CUDA cores (Pallas GPU).

The operator of featurized_conv.featurized_gate_conv_gate_pallas for filters of at most
MAX_TAPS taps, evaluated without Toeplitz tiles: every program computes the K-tap FIR directly
from shifted row windows of z (contiguous masked loads that hit L1/L2 after the first), with
per-channel taps. So a channel tile may span any number of filter groups (64 channels by
default, where the Toeplitz kernels are held to one 16-wide group at G = 256), and no chunk
carries state into the next (sequence segments are independent programs).

    f_s(r) = sum_j w_s[j] z_s[r - j]           (featurizer, J <= 4 taps, z = 0 before row 0)
    u(r) = f_pre(r) f_v(r),  y(t) = sum_k h[k] u(t - k) + dskip u(t),  out(t) = f_post(t) y(t)

  backward: g(t) = dout(t) f_post(t),  du(t) = sum_k h[k] g(t + k) + dskip g(t),
            df_post = dout y,  df_pre = du f_v,  df_v = du f_pre   (one [B, L, 3C] array),
            dh_c[k] = sum_t g(t) u(t - k) per channel (XLA sums a group's channels; the skip's
            gradient is dh_c[0]); then featurized_conv.featurizer_backward_pallas turns df
            into dz and the featurizer-tap gradient.

z's columns are "blocked" ([post | pre | v]) or "interleaved" (triples 3i + s), as in
featurized_conv. Gates, FIR and accumulation in float32; I/O in z's dtype. Depends on jax and
pallas_kernels.blocked_conv / featurized_conv only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import blocked_conv as bc
from pallas_kernels import featurized_conv as fc

MAX_TAPS = 16
_STREAMS = 3


@dataclasses.dataclass(frozen=True, slots=True)
class ShortBlockSizes:
  """Tiles of the direct kernels.

  Attributes:
    block_c: channels per program, a power of two >= 16 dividing C (None: the widest up to 64).
    chunk_fwd / chunk_bwd: rows per loop step (powers of two; the backward holds K [T, dc]
      float32 accumulators, hence its shorter default).
    rows_per_program: rows of one program (a multiple of both chunks); the sequence is split
      into independent segments of this length.
    num_warps: Triton warps per program.
  """
  block_c: int | None = None
  chunk_fwd: int = 32
  chunk_bwd: int = 16
  rows_per_program: int = 512
  num_warps: int = 4


def unsupported_reason(shape_BL3C: tuple[int, ...], shape_3CJ: tuple[int, ...],
                       shape_GK: tuple[int, ...], itemsize: int = 2) -> str | None:
  """Why the direct kernels cannot take these shapes (a sentence with the fix), or None.

  itemsize: bytes per element of z (2 for bf16).
  """
  if len(shape_BL3C) != 3 or len(shape_3CJ) != 2 or len(shape_GK) != 2:
    return f"expected z [B, L, 3C], taps [3C, J], filter [G, K]; got {shape_BL3C}, {shape_3CJ}, {shape_GK}"
  if reason := fc.size_reason(shape_BL3C, itemsize):
    return reason
  width3 = shape_BL3C[-1]
  channels = width3 // _STREAMS
  if width3 % _STREAMS or channels % 16:
    return f"z width {width3} must be 3 C with C a multiple of 16"
  if shape_3CJ[0] != width3 or not 1 <= shape_3CJ[1] <= fc.MAX_FEATURIZER_TAPS:
    return f"featurizer taps {shape_3CJ} must be [{width3}, J <= {fc.MAX_FEATURIZER_TAPS}]"
  groups, taps = shape_GK
  if channels % groups:
    return f"{groups} filter groups must divide C = {channels}"
  if not 1 <= taps <= MAX_TAPS:
    return (f"filter length {taps} must be <= {MAX_TAPS} for the direct kernel; use the "
            "Toeplitz kernels (featurized_conv) for longer filters")
  return None


def _block_c(channels: int, block_sizes: ShortBlockSizes) -> int:
  if block_sizes.block_c is not None:
    if channels % block_sizes.block_c or block_sizes.block_c < 16:
      raise ValueError(f"block_c {block_sizes.block_c} must be >= 16 and divide C = {channels}")
    return block_sizes.block_c
  block_c = 64
  while channels % block_c:
    block_c //= 2
  return block_c


def _feat(z_ref, wf_ref, stream: int, start, chunk: int, num_taps_f: int, padded_len: int,
          windows: bool, cols) -> jax.Array:
  """f_stream at rows start .. start + chunk - 1, float32 [T, dc] (0 outside [0, Lp))."""
  acc = None
  for j in range(num_taps_f):
    term = wf_ref[stream, j, :].astype(jnp.float32)[None, :] * fc._rows_window(
        z_ref, start - j, chunk, padded_len, windows, cols)
    acc = term if acc is None else acc + term
  return acc


def _fwd_kernel(hc_ref, dskip_ref, wf_ref, zpost_ref, zpre_ref, zv_ref, out_ref, *, chunk: int,
                segment_chunks: int, num_taps: int, num_taps_f: int, windows: bool,
                layout: str):
  """hc_ref [Kp, dc] per-channel taps; dskip_ref [dc]; wf_ref [4, Jp, dc]; z refs as in
  featurized_conv; out_ref [Lp, dc]."""
  f32 = jnp.float32
  padded_len = out_ref.shape[0]
  cols = fc._stream_columns(layout, out_ref.shape[-1])
  feat = functools.partial(_feat, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           padded_len=padded_len, windows=windows)
  dskip_1C = dskip_ref[...].astype(f32)[None, :]
  first = pl.program_id(2) * segment_chunks

  def body(step, carry):
    start = (first + step) * chunk
    y_TC = None
    for k in range(num_taps):
      u_TC = (feat(zpre_ref, stream=1, start=start - k, cols=cols[1])
              * feat(zv_ref, stream=2, start=start - k, cols=cols[2]))
      term = hc_ref[k, :].astype(f32)[None, :] * u_TC
      y_TC = term + dskip_1C * u_TC if k == 0 else y_TC + term
    post_TC = feat(zpost_ref, stream=0, start=start, cols=cols[0])
    out_ref[pl.ds(pl.multiple_of(start, chunk), chunk), :] = (post_TC * y_TC).astype(out_ref.dtype)
    return carry

  jax.lax.fori_loop(0, segment_chunks, body, 0)


def _bwd_kernel(hc_ref, dskip_ref, wf_ref, zpost_ref, zpre_ref, zv_ref, dout_ref, df_ref,
                dh_part_ref, *, chunk: int, segment_chunks: int, num_taps: int, num_taps_f: int,
                windows: bool, layout: str):
  """As _fwd_kernel plus dout_ref [Lp, dc]; writes df_ref [Lp, 3C] (this program's columns of
  each stream, in z's layout) and dh_part_ref [Kp, dc] = sum_t g(t) u(t - k) per channel."""
  f32 = jnp.float32
  block_c = dout_ref.shape[-1]
  padded_len = dout_ref.shape[0]
  channels = df_ref.shape[-1] // _STREAMS
  cols = fc._stream_columns(layout, block_c)
  tile = pl.program_id(1)
  if layout == "interleaved":
    df_cols = [pl.ds(_STREAMS * tile * block_c + s, block_c, stride=_STREAMS)
               for s in range(_STREAMS)]
  else:
    df_cols = [pl.ds(pl.multiple_of(s * channels + tile * block_c, block_c), block_c)
               for s in range(_STREAMS)]
  feat = functools.partial(_feat, wf_ref=wf_ref, chunk=chunk, num_taps_f=num_taps_f,
                           padded_len=padded_len, windows=windows)
  dskip_1C = dskip_ref[...].astype(f32)[None, :]
  taps_1C = [hc_ref[k, :].astype(f32)[None, :] for k in range(num_taps)]
  first = pl.program_id(2) * segment_chunks

  def body(step, acc):
    start = (first + step) * chunk
    rows = pl.ds(pl.multiple_of(start, chunk), chunk)
    pre_TC = feat(zpre_ref, stream=1, start=start, cols=cols[1])
    v_TC = feat(zv_ref, stream=2, start=start, cols=cols[2])
    dout_TC = dout_ref[rows, :].astype(f32)
    g_TC = dout_TC * feat(zpost_ref, stream=0, start=start, cols=cols[0])
    y_TC = dskip_1C * pre_TC * v_TC
    du_TC = dskip_1C * g_TC
    new_acc = []
    for k in range(num_taps):
      if k == 0:
        u_TC = pre_TC * v_TC
      else:
        u_TC = (feat(zpre_ref, stream=1, start=start - k, cols=cols[1])
                * feat(zv_ref, stream=2, start=start - k, cols=cols[2]))
        g_ahead_TC = (fc._rows_window(dout_ref, start + k, chunk, padded_len, windows)
                      * feat(zpost_ref, stream=0, start=start + k, cols=cols[0]))
      y_TC = y_TC + taps_1C[k] * u_TC
      du_TC = du_TC + taps_1C[k] * (g_TC if k == 0 else g_ahead_TC)
      new_acc.append(acc[k] + g_TC * u_TC)
    for cols_s, df_TC in zip(df_cols, (dout_TC * y_TC, du_TC * v_TC, du_TC * pre_TC)):
      df_ref[rows, cols_s] = df_TC.astype(df_ref.dtype)
    return tuple(new_acc)

  zeros = jnp.zeros((chunk, block_c), f32)
  acc = jax.lax.fori_loop(0, segment_chunks, body, (zeros,) * num_taps)
  for k in range(dh_part_ref.shape[0]):
    dh_part_ref[k, :] = jnp.sum(acc[k], axis=0) if k < num_taps else jnp.zeros((block_c,), f32)


def _channel_taps(h_GK: jax.Array, channels: int) -> jax.Array:
  """[G, K] group filters -> [Kp, C] float32 per-channel taps (rows past K zero)."""
  groups, taps = h_GK.shape
  h_CK = jnp.repeat(h_GK.astype(jnp.float32), channels // groups, axis=0)
  return jnp.pad(h_CK.T, ((0, fc._taps_pad(taps) - taps), (0, 0)))


def _call(kernel, z_BL3C, dout_BLC, hc_KC, dskip_C, wf_SJC, *, num_taps: int, num_taps_f: int,
          chunk: int, block_sizes: ShortBlockSizes, interpret: bool, layout: str, name: str):
  batch, padded_len, width3 = z_BL3C.shape
  channels = width3 // _STREAMS
  block_c = _block_c(channels, block_sizes)
  tiles = channels // block_c
  rows = min(block_sizes.rows_per_program, padded_len)
  segments = padded_len // rows
  if layout == "interleaved":
    z_specs = [pl.BlockSpec((None, padded_len, _STREAMS * block_c), lambda b, c, s: (b, 0, c))] * 3
  else:
    z_specs = [pl.BlockSpec((None, padded_len, block_c), lambda b, c, s, k=k: (b, 0, c + k * tiles))
               for k in range(_STREAMS)]
  tile = pl.BlockSpec((None, padded_len, block_c), lambda b, c, s: (b, 0, c))
  in_specs = [pl.BlockSpec((hc_KC.shape[0], block_c), lambda b, c, s: (0, c)),
              pl.BlockSpec((block_c,), lambda b, c, s: (c,)),
              pl.BlockSpec((wf_SJC.shape[0], wf_SJC.shape[1], block_c), lambda b, c, s: (0, 0, c)),
              *z_specs]
  operands = [hc_KC, dskip_C, wf_SJC, z_BL3C, z_BL3C, z_BL3C]
  if dout_BLC is None:
    out_specs = tile
    out_shape = jax.ShapeDtypeStruct((batch, padded_len, channels), z_BL3C.dtype)
  else:
    in_specs.append(tile)
    operands.append(dout_BLC)
    out_specs = (pl.BlockSpec((None, padded_len, width3), lambda b, c, s: (b, 0, 0)),
                 pl.BlockSpec((None, None, hc_KC.shape[0], block_c), lambda b, c, s: (b, s, 0, c)))
    out_shape = (jax.ShapeDtypeStruct(z_BL3C.shape, z_BL3C.dtype),
                 jax.ShapeDtypeStruct((batch, segments, hc_KC.shape[0], channels), jnp.float32))
  body = functools.partial(kernel, chunk=chunk, segment_chunks=rows // chunk, num_taps=num_taps,
                           num_taps_f=num_taps_f, windows=not interpret,
                           layout=layout)
  return pl.pallas_call(
      body,
      grid=(batch, tiles, segments),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=1),
      interpret=interpret,
      name=name,
  )(*operands)


def _padded_len(length: int, block_sizes: ShortBlockSizes) -> int:
  """L rounded up to a multiple of rows_per_program (or of the longer chunk when shorter)."""
  unit = max(block_sizes.chunk_fwd, block_sizes.chunk_bwd)
  padded = -(-length // unit) * unit
  if padded > block_sizes.rows_per_program:
    padded = -(-length // block_sizes.rows_per_program) * block_sizes.rows_per_program
  return padded


def _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout):
  length, width3 = z_BL3C.shape[1:]
  z = bc._pad_rows(z_BL3C, _padded_len(length, block_sizes))
  out = _call(_fwd_kernel, z, None, _channel_taps(h_GK, width3 // _STREAMS),
              dskip_C.astype(jnp.float32), fc._kernel_taps(w_feat_3CJ, layout),
              num_taps=h_GK.shape[1], num_taps_f=w_feat_3CJ.shape[1], chunk=block_sizes.chunk_fwd,
              block_sizes=block_sizes, interpret=interpret, layout=layout,
              name="featurized_short_conv_fwd")
  return out[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fsc(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout):
  return _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout)


def _fsc_fwd(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout):
  out = _fwd_impl(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes, interpret, layout)
  return out, (z_BL3C, w_feat_3CJ, h_GK, dskip_C)


def _fsc_bwd(block_sizes, interpret, layout, residuals, dout_BLC):
  z_BL3C, w_feat_3CJ, h_GK, dskip_C = residuals
  length, width3 = z_BL3C.shape[1:]
  channels = width3 // _STREAMS
  groups, num_taps = h_GK.shape
  padded_len = _padded_len(length, block_sizes)
  z = bc._pad_rows(z_BL3C, padded_len)
  dout = bc._pad_rows(dout_BLC.astype(z_BL3C.dtype), padded_len)
  df_BL3C, dh_part = _call(_bwd_kernel, z, dout, _channel_taps(h_GK, channels),
                           dskip_C.astype(jnp.float32), fc._kernel_taps(w_feat_3CJ, layout),
                           num_taps=num_taps, num_taps_f=w_feat_3CJ.shape[1],
                           chunk=block_sizes.chunk_bwd, block_sizes=block_sizes,
                           interpret=interpret, layout=layout, name="featurized_short_conv_bwd")
  dz_BL3C, dw_3CJ = fc.featurizer_backward_pallas(
      df_BL3C, z, w_feat_3CJ, chunk=min(block_sizes.chunk_bwd, fc.FEAT_BWD_CHUNK),
      interpret=interpret)
  dh_KC = dh_part.sum((0, 1))[:num_taps]
  dh_GK = dh_KC.T.reshape(groups, channels // groups, num_taps).sum(1)
  return (dz_BL3C[:, :length], dw_3CJ.astype(w_feat_3CJ.dtype), dh_GK.astype(h_GK.dtype),
          dh_KC[0].astype(dskip_C.dtype))


_fsc.defvjp(_fsc_fwd, _fsc_bwd)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "layout"))
def featurized_short_conv_pallas(z_BL3C: jax.Array, w_feat_3CJ: jax.Array, h_GK: jax.Array,
                                 dskip_C: jax.Array | None = None, *,
                                 block_sizes: ShortBlockSizes | None = None,
                                 interpret: bool = False, layout: str = "blocked") -> jax.Array:
  """Featurizer + short grouped FIR + Hyena gates, direct (no Toeplitz tiles), differentiable.

  Args:
    z_BL3C: [B, L, 3C] in-projection product in `layout` ("blocked" [post | pre | v] or
      "interleaved" triples); bf16 or float32; any L (padded internally).
    w_feat_3CJ: [3C, J] featurizer taps in the same column order, w[:, 0] on the current token.
    h_GK: [G, K] grouped filter, h[:, 0] on the current token, K <= MAX_TAPS.
    dskip_C: [C] skip weights, or None (Hyena-SE).
    block_sizes: ShortBlockSizes; None: defaults.
    interpret: Pallas interpret mode (CPU), for tests.
    layout: column order of z, the taps and dz.

  Returns:
    [B, L, C] in z's dtype. Gradients (custom_vjp) for z, the taps, h and dskip.

  Raises:
    ValueError: shapes the kernels do not take (see `unsupported_reason`).
  """
  reason = unsupported_reason(z_BL3C.shape, w_feat_3CJ.shape, h_GK.shape, z_BL3C.dtype.itemsize)
  if reason:
    raise ValueError(reason)
  if layout not in fc.LAYOUTS:
    raise ValueError(f"layout={layout!r}: choose one of {fc.LAYOUTS}")
  channels = z_BL3C.shape[-1] // _STREAMS
  if dskip_C is None:
    dskip_C = jnp.zeros((channels,), jnp.float32)
  elif dskip_C.shape != (channels,):
    raise ValueError(f"dskip shape {dskip_C.shape} must be ({channels},)")
  return _fsc(z_BL3C, w_feat_3CJ, h_GK, dskip_C, block_sizes or ShortBlockSizes(), interpret,
              layout)
