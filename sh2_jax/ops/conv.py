"""Causal depthwise / grouped convolutions: direct, FFT and blocked methods, with dispatch.

Convention everywhere: h[..., 0] multiplies the current token, `y[t] = sum_k h[k] x[t - k]`
(a true causal convolution). Filters come per group: h_GK with G dividing the channel count C,
channel c using filter c // (C // G); G == C is the depthwise (ungrouped) case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import blocked_conv

METHODS = ("direct", "fft", "blocked", "pallas", "pallas_fused", "pallas_unfused", "auto")
DIRECT_MAX_TAPS = 16


def expand_groups(h_GK: jax.Array, channels: int) -> jax.Array:
  """[G, K] group filters -> [C, K] per-channel filters (contiguous groups)."""
  groups = h_GK.shape[0]
  if channels % groups:
    raise ValueError(f"channels {channels} must be divisible by filter groups {groups}")
  return jnp.repeat(h_GK, channels // groups, axis=0)


def direct_conv(x_BLC: jax.Array, h_GK: jax.Array) -> jax.Array:
  """Causal convolution as a sum of K shifted, scaled copies (float32 accumulation).

  Args:
    x_BLC: [B, L, C].
    h_GK: [G, K] with h[:, 0] on the current token.

  Returns:
    [B, L, C] in x's dtype.
  """
  length, channels = x_BLC.shape[1], x_BLC.shape[2]
  num_taps = h_GK.shape[-1]
  h_CK = expand_groups(h_GK, channels).astype(jnp.float32)
  x32 = x_BLC.astype(jnp.float32)
  padded = jnp.pad(x32, ((0, 0), (num_taps - 1, 0), (0, 0)))
  y = jnp.zeros_like(x32)
  for k in range(min(num_taps, length + num_taps - 1)):
    start = num_taps - 1 - k
    y = y + h_CK[:, k] * jax.lax.dynamic_slice_in_dim(padded, start, length, axis=1)
  return y.astype(x_BLC.dtype)


def fft_conv(x_BLC: jax.Array, h_CK: jax.Array) -> jax.Array:
  """Causal (linear) convolution by real FFT in float32, zero-padded to avoid wrap-around.

  Args:
    x_BLC: [B, L, C].
    h_CK: [G, K] (grouped) or [C, K] filters, h[:, 0] on the current token; K may exceed L
      (taps past L cannot reach any output and are dropped).

  Returns:
    [B, L, C] in x's dtype.
  """
  length, channels = x_BLC.shape[1], x_BLC.shape[2]
  h_CK = expand_groups(h_CK[:, :length], channels).astype(jnp.float32)
  num_taps = h_CK.shape[-1]
  n_fft = _fft_size(length + num_taps - 1)
  x_f = jnp.fft.rfft(x_BLC.astype(jnp.float32), n=n_fft, axis=1)
  h_f = jnp.fft.rfft(h_CK, n=n_fft, axis=-1).T
  y = jnp.fft.irfft(x_f * h_f[None], n=n_fft, axis=1)[:, :length]
  return y.astype(x_BLC.dtype)


def _fft_size(n: int) -> int:
  """Smallest 2^a 3^b >= n (fast sizes for every FFT backend)."""
  best = 1 << max(0, (n - 1).bit_length())
  power3 = 1
  while power3 < best:
    size = power3
    while size < n:
      size *= 2
    best = min(best, size)
    power3 *= 3
  return best


def resolve_method(method: str, num_taps: int, chunk: int, fused: bool = False) -> str:
  """Picks a concrete method for "auto".

  With `fused` (a gate-conv-gate that the Pallas kernel can take), "auto" is "pallas" on GPU.
  Otherwise: direct for short filters, blocked up to the chunk, FFT beyond it. "pallas"
  without `fused` (a bare convolution) runs as "blocked", the kernel's reference.
  """
  if method not in METHODS:
    raise ValueError(f"conv method {method!r}: choose one of {METHODS}")
  if method in ("pallas_fused", "pallas_unfused"):  # the featurizer: ops.hyena.explicit_mixer
    method = "pallas"
  if method == "pallas" and not fused:
    return "blocked"
  if method != "auto":
    return method
  if fused and jax.default_backend() == "gpu" and num_taps <= chunk:
    return "pallas"
  if num_taps <= DIRECT_MAX_TAPS:
    return "direct"
  if num_taps <= chunk:
    return "blocked"
  return "fft"


def causal_conv(x_BLC: jax.Array, h_GK: jax.Array, method: str = "auto",
                chunk: int = blocked_conv.DEFAULT_CHUNK) -> jax.Array:
  """Grouped causal convolution by the chosen method ("direct", "fft", "blocked", "auto").

  Args:
    x_BLC: [B, L, C].
    h_GK: [G, K] grouped filters, h[:, 0] on the current token.
    method: see `resolve_method`.
    chunk: block length of the blocked method (must be >= K).

  Returns:
    [B, L, C] in x's dtype; every method accumulates in float32.
  """
  method = resolve_method(method, h_GK.shape[-1], chunk)
  if method == "direct":
    return direct_conv(x_BLC, h_GK)
  if method == "fft":
    return fft_conv(x_BLC, h_GK)
  return blocked_conv.blocked_causal_conv(x_BLC, h_GK, chunk=chunk)
