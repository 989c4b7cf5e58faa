"""The Hyena mixer core shared by SE, MR and LI, given its filters (SPEC.md section 2).

    post, pre, v = (featurizer(x @ W_in[:, s]) for s in 0, 1, 2)  # W_in [D, 3, D]; causal
                                                                # depthwise conv of 3 taps
    u = pre * v
    out = post * (conv(u, h) + dskip * u)  # dskip absent for SE

Projections live in the modules; this file holds the array math between them. Gates and the
convolution run in float32 and return the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import (blocked_conv, featurized_conv, featurized_short_conv, modal_conv,
                            output_projection)
from sh2_jax.ops import conv, filters

LI_CHUNKED_MIN_LEN = 1 << 16


# Checkpoint name of project_and_featurize's outputs (remat policy "save_dots_features").
FEATURIZED = "hyena_featurized"
# Checkpoint name of the in-projection weight's per-stream slices [D, D] (the unfused and LI
# paths): weight-sized, so remat policies keep them rather than rebuild them in the backward
# (0.09-0.11 ms a step per mixer kind at evo2-1b on an H100).
WEIGHT_VIEWS = "hyena_weight_views"
# Checkpoint name of the output projection's weight cast to the compute dtype, where the
# projected kernels apply W_out in another dtype (remat policies "save_dots*").
OUT_WEIGHT_VIEW = output_projection.WEIGHT_VIEW
# Checkpoint name of the LI kernels' segment-start states (remat policies "save_dots*").
SEGMENT_STATES = modal_conv.SEGMENT_STATES


def project_and_featurize(x_BLD: jax.Array, w_in_DSC: jax.Array,
                          w_feat_SCK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """In-projection and featurizer, returning contiguous (post_gate, pre_gate, v) [B, L, D].

  Three [D, D] products write the three streams contiguously, and the depthwise featurizer
  runs on each with its channels' taps.

  Args:
    x_BLD: [B, L, D] normalised input, in the compute dtype.
    w_in_DSC: [D, 3, D] in-projection, streams (post, pre, v) on the middle axis.
    w_feat_SCK: [3, D, K] featurizer taps of the three streams, w[..., 0] on the current token.

  The three outputs are named FEATURIZED for rematerialisation policies.
  """
  check_stream_weights(w_in_DSC, w_feat_SCK)
  return tuple(checkpoint_name(featurize(z, w), FEATURIZED)
               for z, w in zip(project_streams(x_BLD, w_in_DSC), w_feat_SCK))


def check_stream_weights(w_in_DSC: jax.Array, w_feat_SCK: jax.Array | None = None) -> None:
  """Raises ValueError unless w_in is [D, 3, D'] and w_feat (if given) [3, D', K]."""
  if w_in_DSC.ndim != 3 or w_in_DSC.shape[1] != 3:
    raise ValueError(f"in-projection {tuple(w_in_DSC.shape)} must be [D, 3, D] (streams post, pre, "
                     "v on the middle axis); an Evo 2 [D, 3D] interleaved weight goes through "
                     "sh2_jax.convert.evo2.in_proj_from_vortex")
  if w_feat_SCK is not None and (w_feat_SCK.ndim != 3 or w_feat_SCK.shape[:2] != (3, w_in_DSC.shape[2])):
    raise ValueError(f"featurizer taps {tuple(w_feat_SCK.shape)} must be [3, {w_in_DSC.shape[2]}, K] "
                     "(streams first); an Evo 2 [3D, 1, K] weight goes through "
                     "sh2_jax.convert.evo2.featurizer_from_vortex")


def project_streams(x_BLD: jax.Array, w_in_DSC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The featurizer's inputs (post, pre, v) [B, L, D], contiguous: x @ w_in[:, s] for the
  three streams s (the weight slices named WEIGHT_VIEWS)."""
  check_stream_weights(w_in_DSC)
  return tuple(x_BLD @ checkpoint_name(w_in_DSC[:, s], WEIGHT_VIEWS) for s in range(3))


def featurize(z_BLC: jax.Array, w_CK: jax.Array) -> jax.Array:
  """Causal depthwise short convolution (one filter per channel, w[:, 0] on the current token).

  On GPU (where `featurizer_backward_reason` allows) the backward is one Pallas pass over the
  cotangent and z for both gradients (featurize_with_pallas_backward); elsewhere autodiff.
  """
  if jax.default_backend() == "gpu" and featurizer_backward_reason(z_BLC.shape, w_CK.shape) is None:
    return featurize_with_pallas_backward(z_BLC, w_CK, False)
  return conv.direct_conv(z_BLC, w_CK)


def featurizer_backward_reason(shape_BLC: tuple[int, ...], shape_CK: tuple[int, ...]) -> str | None:
  """Why the Pallas featurizer backward cannot take these shapes, or None if it can."""
  if shape_BLC[-1] % 16:
    return f"channels {shape_BLC[-1]} not a multiple of 16"
  if shape_CK[0] != shape_BLC[-1]:
    return f"grouped taps {shape_CK} (the kernel takes one filter per channel)"
  if shape_CK[1] > featurized_conv.FEAT_BWD_CHUNK:
    return f"{shape_CK[1]} taps > {featurized_conv.FEAT_BWD_CHUNK}"
  return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def featurize_with_pallas_backward(z_BLC: jax.Array, w_CK: jax.Array, interpret: bool) -> jax.Array:
  """`featurize` whose gradients come from featurized_conv.featurizer_backward_pallas: dz and
  dw in one read of the cotangent and z (XLA's autodiff of the shifted sum takes two passes
  and a partial reduction per stream). Forward: conv.direct_conv. [B, L, C] in z's dtype."""
  return conv.direct_conv(z_BLC, w_CK)


def _featurize_fwd(z_BLC, w_CK, interpret):
  return conv.direct_conv(z_BLC, w_CK), (z_BLC, w_CK)


def _featurize_bwd(interpret, residuals, df_BLC):
  z_BLC, w_CK = residuals
  return featurized_conv.featurizer_backward(df_BLC, z_BLC, w_CK, interpret=interpret)


featurize_with_pallas_backward.defvjp(_featurize_fwd, _featurize_bwd)


def gated(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array, dskip_D: jax.Array | None,
          inner_conv: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """post * (inner_conv(u) + dskip * u) with u = pre * v, in float32; returns v's dtype.

  The one place the Hyena gates and skip are written; `inner_conv` maps u [B, L, D] float32 to
  the convolved [B, L, D] (single-device, p2p or all-to-all).
  """
  u = pre_BLD.astype(jnp.float32) * v_BLD.astype(jnp.float32)
  y = inner_conv(u).astype(jnp.float32)
  if dskip_D is not None:
    y = y + dskip_D.astype(jnp.float32) * u
  return (post_BLD.astype(jnp.float32) * y).astype(v_BLD.dtype)


def matmul_weight_in_own_dtype(x_BLD: jax.Array, w_DE: jax.Array) -> jax.Array:
  """x @ w.astype(x.dtype) [B, L, E], whose weight gradient the GEMM writes in w's dtype.

  With float32 master weights and bf16 compute, autodiff would write dW in bf16 and cast it to
  float32 in a weight-sized pass (0.10 ms for a [4096, 12288] weight on an H100); here the
  product accumulates and stores float32 itself (0.02 ms more:
  experiments/results/probe_weight_casts_nvidia_h100_80gb_hbm3.md), and dW is not rounded to
  bf16 on the way. Weights already in x's dtype take the plain product.
  """
  if w_DE.dtype == x_BLD.dtype:
    return x_BLD @ w_DE
  return _matmul_cast(x_BLD, w_DE, jnp.dtype(w_DE.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_cast(x_BLD: jax.Array, w_DE: jax.Array, w_dtype: jnp.dtype) -> jax.Array:
  return x_BLD @ w_DE.astype(x_BLD.dtype)


def _matmul_cast_fwd(x_BLD, w_DE, w_dtype):
  # The barrier keeps the one cast: without it XLA recomputes the cast for dx in the backward
  # (a second weight-sized pass, 0.095 ms at [4096, 12288] on an H100).
  w_view = jax.lax.optimization_barrier(w_DE.astype(x_BLD.dtype))
  return x_BLD @ w_view, (x_BLD, w_view)


def _matmul_cast_bwd(w_dtype, residuals, dz_BLE):
  x_BLD, w_view = residuals
  dx_BLD = dz_BLE @ w_view.T
  dw_DE = jnp.einsum("bld,ble->de", x_BLD, dz_BLE, preferred_element_type=w_dtype)
  return dx_BLD, dw_DE


_matmul_cast.defvjp(_matmul_cast_fwd, _matmul_cast_bwd)


def project(y_BLD: jax.Array, w_out_DE: jax.Array | None) -> jax.Array:
  """y @ w_out in y's dtype (the mixers' output projection, as the modules apply it; w_out in
  any float dtype, its gradient in that dtype: matmul_weight_in_own_dtype); y when w_out is
  None."""
  return y_BLD if w_out_DE is None else matmul_weight_in_own_dtype(y_BLD, w_out_DE)


def gate_conv_gate(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array, h_GK: jax.Array,
                   dskip_D: jax.Array | None, method: str = "auto",
                   chunk: int = blocked_conv.DEFAULT_CHUNK,
                   w_out_DE: jax.Array | None = None) -> jax.Array:
  """post * (conv(pre * v, h) + dskip * pre * v) with a grouped explicit filter (SE, MR).

  Args:
    post_BLD, pre_BLD, v_BLD: [B, L, D] gates and value.
    h_GK: [G, K] grouped filter, h[:, 0] on the current token.
    dskip_D: [D] skip weights or None.
    method: "direct" | "fft" | "blocked" | "pallas" | "auto" (see ops.conv.resolve_method;
      "pallas" on GPU falls back to the blocked reference for shapes the kernel does not take,
      and runs in interpret mode off GPU).
    chunk: block length of the blocked method.
    w_out_DE: [D, E] output projection (any float dtype, its gradient in that dtype), or None.
      Given, returns project(out, w_out); where the Pallas kernel runs, by
      blocked_conv.gate_conv_gate_proj_pallas (dW_out from the backward kernel: no
      forward-kernel rerun in a rematerialised block).

  Returns:
    [B, L, D] (or [B, L, E]) in v's dtype.
  """
  method = conv.resolve_method(method, h_GK.shape[-1], chunk, fused=True)
  if method == "pallas":
    on_gpu = jax.default_backend() == "gpu"
    if w_out_DE is not None and (not on_gpu or blocked_conv.unsupported_reason(
        v_BLD.shape, h_GK.shape) is None):
      return blocked_conv.gate_conv_gate_proj_pallas(post_BLD, pre_BLD, v_BLD, h_GK, dskip_D,
                                                     w_out_DE, interpret=not on_gpu)
    kernel = (blocked_conv.gate_conv_gate_auto if on_gpu else
              functools.partial(blocked_conv.gate_conv_gate_pallas, interpret=True))
    return project(kernel(post_BLD, pre_BLD, v_BLD, h_GK, dskip_D), w_out_DE)
  if method == "blocked":
    return project(blocked_conv.gate_conv_gate(post_BLD, pre_BLD, v_BLD, h_GK, dskip_D,
                                               chunk=chunk), w_out_DE)
  h = h_GK.astype(jnp.float32)
  return project(gated(post_BLD, pre_BLD, v_BLD, dskip_D,
                       lambda u: conv.causal_conv(u, h, method=method, chunk=chunk)), w_out_DE)


# "pallas"/"auto" fuse the featurizer for filters up to this many taps. H100, D = 4096, fwd+bwd:
# SE (7 taps) 3.08 vs 3.58 ms at 4K, 21.5 vs 22.2 at 32K; MR (128 taps) fused was slower (the
# T = 128 backward kernel): experiments/results/ops_nvidia_h100_80gb_hbm3.md.
FUSED_FEATURIZER_MAX_TAPS = 64
# Kernel of the fused path for short filters: "toeplitz" (featurized_conv) or "direct"
# (featurized_short_conv: the FIR on CUDA cores from shifted windows, 64-channel tiles across
# groups; fwd+bwd within 2.5% of the Toeplitz kernel on an H100, ops results' fifth run).
SHORT_FILTER_KERNEL = "toeplitz"


def fuses_featurizer(method: str, num_taps: int) -> bool:
  """Whether explicit_mixer runs the featurizer inside the gate kernel for this method/filter.

  "pallas_fused" always, "pallas_unfused" never; "pallas" (and "auto" on GPU) for filters of
  at most FUSED_FEATURIZER_MAX_TAPS taps, where the fused kernel measured faster on an H100.
  """
  if method == "pallas_fused":
    return True
  if method == "pallas" or (method == "auto" and jax.default_backend() == "gpu"):
    return num_taps <= FUSED_FEATURIZER_MAX_TAPS
  return False


def explicit_mixer(x_BLD: jax.Array, w_in_DSC: jax.Array, w_feat_SCK: jax.Array, h_GK: jax.Array,
                   dskip_D: jax.Array | None, method: str = "auto",
                   chunk: int = blocked_conv.DEFAULT_CHUNK,
                   w_out_DE: jax.Array | None = None) -> jax.Array:
  """Hyena-SE/MR between the projections: project, featurize, gate-conv-gate.

  Where `fuses_featurizer(method, K)` and a fused kernel takes the shapes (and z stays under
  4 GiB: featurized_conv.size_reason), one [D, 3D] product writes z (its columns the blocks
  [post | pre | v]: w_in reshaped, no copy; a w_in in another dtype than x is cast and gets its
  gradient in its own dtype from the GEMM, `matmul_weight_in_own_dtype`) and one kernel
  featurizes and gates it:
  pallas_kernels/featurized_conv.py (Toeplitz tiles), or featurized_short_conv.py (direct FIR)
  when SHORT_FILTER_KERNEL is "direct"; interpret mode off GPU. Otherwise
  project_and_featurize + gate_conv_gate with `method`.

  Args:
    x_BLD: [B, L, D] normalised input in the compute dtype.
    w_in_DSC, w_feat_SCK: in-projection [D, 3, D] (any float dtype: cast to x's) and
      featurizer taps [3, D, K] (module layout, streams post, pre, v).
    h_GK, dskip_D, method, chunk: as in gate_conv_gate.
    w_out_DE: [D, E] output projection or None, as in gate_conv_gate (the Toeplitz fused
      kernel: featurized_conv.featurized_gate_conv_gate_proj_pallas).

  Returns:
    [B, L, D] (or [B, L, E]) in x's dtype.
  """
  check_stream_weights(w_in_DSC, w_feat_SCK)
  width = x_BLD.shape[2]
  shape_BL3D = (x_BLD.shape[0], x_BLD.shape[1], 3 * width)
  if fuses_featurizer(method, h_GK.shape[-1]):
    interpret = jax.default_backend() != "gpu"
    itemsize = x_BLD.dtype.itemsize
    w_feat = w_feat_SCK.reshape(3 * width, w_feat_SCK.shape[-1])
    direct = SHORT_FILTER_KERNEL == "direct" and featurized_short_conv.unsupported_reason(
        shape_BL3D, w_feat.shape, h_GK.shape, itemsize) is None
    if direct or featurized_conv.unsupported_reason(shape_BL3D, w_feat.shape, h_GK.shape,
                                                    itemsize=itemsize) is None:
      z = matmul_weight_in_own_dtype(x_BLD, w_in_DSC.reshape(width, 3 * width))
      if direct:
        return project(featurized_short_conv.featurized_short_conv_pallas(
            z, w_feat, h_GK, dskip_D, interpret=interpret), w_out_DE)
      if w_out_DE is not None:
        return featurized_conv.featurized_gate_conv_gate_proj_pallas(
            z, w_feat, h_GK, dskip_D, w_out_DE, interpret=interpret)
      return featurized_conv.featurized_gate_conv_gate_pallas(
          z, w_feat, h_GK, dskip_D, interpret=interpret)
  post, pre, v = project_and_featurize(x_BLD, w_in_DSC.astype(x_BLD.dtype), w_feat_SCK)
  return gate_conv_gate(post, pre, v, h_GK, dskip_D, method, chunk, w_out_DE)


LI_METHODS = ("auto", "fft", "chunked", "pallas", "pallas_fused")


def resolve_li_method(method: str, length: int, shape_BLD: tuple[int, ...] | None = None,
                      order: int | None = None) -> str:
  """"auto": the Pallas modal-recurrence kernel on GPU where it takes the shape (given
  `shape_BLD` and `order`), else FFT up to 64K tokens and the chunked recurrence beyond.
  "pallas_fused" (the featurizer inside the kernels: `li_mixer`) is "pallas" for callers that
  hold featurized streams already."""
  if method == "pallas_fused":
    return "pallas"
  if method == "auto":
    if (jax.default_backend() == "gpu" and shape_BLD is not None and order is not None
        and modal_conv.unsupported_reason(shape_BLD, (shape_BLD[-1], order)) is None):
      return "pallas"
    return "fft" if length < LI_CHUNKED_MIN_LEN else "chunked"
  if method not in LI_METHODS[1:]:
    raise ValueError(f"LI method {method!r}: choose one of {LI_METHODS}")
  return method


def _li_pallas(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
               log_poles_DN: jax.Array, residues_DN: jax.Array,
               dskip_D: jax.Array | None) -> jax.Array:
  """The modal kernel on GPU (the FFT path for shapes it does not take), interpret mode off GPU."""
  if jax.default_backend() != "gpu":
    return modal_conv.gate_conv_gate_pallas(post_BLD, pre_BLD, v_BLD, log_poles_DN, residues_DN,
                                            dskip_D, interpret=True)
  if modal_conv.unsupported_reason(v_BLD.shape, log_poles_DN.shape) is not None:
    return gated(post_BLD, pre_BLD, v_BLD, dskip_D,
                 lambda u: li_long_conv(u, log_poles_DN, residues_DN, "fft"))
  return modal_conv.gate_conv_gate_pallas(post_BLD, pre_BLD, v_BLD, log_poles_DN, residues_DN,
                                          dskip_D)


def li_long_conv(u_BLD: jax.Array, log_poles_DN: jax.Array, residues_DN: jax.Array,
                 method: str = "auto") -> jax.Array:
  """Causal convolution of u with the modal filter, float32.

  Args:
    u_BLD: [B, L, D].
    log_poles_DN, residues_DN: [D, N] (one modal system per channel).
    method: "fft" | "chunked" | "pallas" | "auto" (see resolve_li_method).

  Returns:
    [B, L, D] float32.
  """
  length = u_BLD.shape[1]
  method = resolve_li_method(method, length, u_BLD.shape, log_poles_DN.shape[-1])
  if method == "pallas":
    u = u_BLD.astype(jnp.float32)
    ones = jnp.ones_like(u)
    return _li_pallas(ones, ones, u, log_poles_DN, residues_DN, None)
  if method == "chunked":
    return filters.modal_chunked_conv(u_BLD, log_poles_DN, residues_DN)
  h_DL = filters.modal_filter(log_poles_DN, residues_DN, length)
  return conv.fft_conv(u_BLD.astype(jnp.float32), h_DL)


def li_mixer(x_BLD: jax.Array, w_in_DSC: jax.Array, w_feat_SCK: jax.Array,
             log_poles_DN: jax.Array, residues_DN: jax.Array, dskip_D: jax.Array,
             method: str = "auto", w_out_DE: jax.Array | None = None) -> jax.Array:
  """Hyena-LI between the projections: project, featurize, modal gate-conv-gate.

  With method "pallas_fused", and "auto" on GPU (where modal_conv.featurized_unsupported_reason
  allows; interpret mode off GPU) the three [D, D] products' streams go straight into the modal
  kernels, which featurize them (modal_conv.featurized_gate_conv_gate_pallas): neither the
  featurized streams nor their gradients reach memory (the backward walks apply the featurizer's
  transpose). H100, D = 4096, fwd+bwd: 3.34 vs 3.52 ms at 4K, 5.65 vs 5.83 at 8K, equal at 16K
  and 32K (experiments/results/ops_nvidia_h100_80gb_hbm3.md, seventh run, before the transpose
  moved into the walks: 1.2% faster again at the evo2-1b shape under remat, train results'
  ninth measurement), and closer to float32 in bf16 (no rounding of the featurized streams).
  Otherwise project_and_featurize + li_gate_conv_gate with `method`.

  Args:
    x_BLD: [B, L, D] normalised input in the compute dtype.
    w_in_DSC, w_feat_SCK: in-projection [D, 3, D] and featurizer taps [3, D, K] (module layout).
    log_poles_DN, residues_DN, dskip_D, method: as in li_gate_conv_gate.
    w_out_DE: [D, E] output projection, or None. Given, returns project(out, w_out); on the
      featurized kernels by modal_conv.featurized_gate_conv_gate_proj_pallas (dW_out from the
      backward's forward walk: no main forward kernel in a rematerialised block).

  Returns:
    [B, L, D] (or [B, L, E]) in x's dtype.
  """
  check_stream_weights(w_in_DSC, w_feat_SCK)
  fused = method == "pallas_fused" or (method == "auto" and jax.default_backend() == "gpu")
  if fused and modal_conv.featurized_unsupported_reason(
      x_BLD.shape, (x_BLD.shape[-1], w_feat_SCK.shape[-1]), log_poles_DN.shape) is None:
    operands = (*project_streams(x_BLD, w_in_DSC), *w_feat_SCK, log_poles_DN,
                residues_DN, dskip_D)
    interpret = jax.default_backend() != "gpu"
    if w_out_DE is not None:
      return modal_conv.featurized_gate_conv_gate_proj_pallas(
          *operands, w_out_DE, interpret=interpret).astype(x_BLD.dtype)
    return modal_conv.featurized_gate_conv_gate_pallas(
        *operands, interpret=interpret).astype(x_BLD.dtype)
  post, pre, v = project_and_featurize(x_BLD, w_in_DSC, w_feat_SCK)
  return project(li_gate_conv_gate(post, pre, v, log_poles_DN, residues_DN, dskip_D, method),
                 w_out_DE)


def li_gate_conv_gate(post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                      log_poles_DN: jax.Array, residues_DN: jax.Array, dskip_D: jax.Array,
                      method: str = "auto") -> jax.Array:
  """Hyena-LI: post * (modal_conv(pre * v) + dskip * pre * v); returns v's dtype.

  "pallas" (and "auto" on GPU) runs the fused modal-recurrence kernel
  (pallas_kernels/modal_conv.py): gates, skip and recurrence in one pass.
  """
  method = resolve_li_method(method, v_BLD.shape[1], v_BLD.shape, log_poles_DN.shape[-1])
  if method == "pallas":
    return _li_pallas(post_BLD, pre_BLD, v_BLD, log_poles_DN, residues_DN, dskip_D)
  return gated(post_BLD, pre_BLD, v_BLD, dskip_D,
               lambda u: li_long_conv(u, log_poles_DN, residues_DN, method))
