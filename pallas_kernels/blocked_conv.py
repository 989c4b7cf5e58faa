"""Two-stage blocked causal convolution with fused gates (SPEC.md section 5).

A causal FIR `y[t] = sum_k h[k] x[t - k]` (h[0] on the current token) with filter length
K <= chunk T is computed chunk by chunk: with X_n the n-th block of T rows,

    Y_n = H0 X_n + H1 X_(n-1),   X_(-1) = 0,
    H0[i, j] = h[i - j]        (0 <= i - j < K, lower-triangular Toeplitz),
    H1[i, j] = h[i - j + T]    (i - j + T < K).

Channels are grouped: G groups of `dg` contiguous channels share one filter, so each stage is
a (T x T) @ (T x dg) matrix product per group. The Hyena gate-conv-gate fuses the gates:

    out = post_gate * (conv(pre_gate * v, h) + dskip * (pre_gate * v)).

This module holds the plain-JAX (einsum) version, which is the numerical reference that the
Pallas GPU kernels must match. It depends on jax only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128


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
