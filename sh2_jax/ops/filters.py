"""Inner-filter parametrisations of the Hyena operators (SPEC.md section 2).

- SE: explicit short filter [G, K] (K = 7), used as is.
- MR: explicit [G, K] (K = 128) times a fixed exponential decay per group.
- LI: implicit modal filter with N real poles per channel,
    h[c, t] = sum_n R[c, n] exp(log_pole[c, n] t),  log_pole = -exp(p + gamma) < 0,
  generated chunk-wise so [C, N, L] never exists at once.

All filters follow h[..., 0] on the current token; LI math stays in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MODAL_CHUNK = 4096


def mr_decay(groups: int, num_taps: int, train_len: int) -> jax.Array:
  """[G, K] fixed decay exp(-r_g n / (train_len - 1)), r_g = logspace(-2, 2, G)[g]."""
  rates = jnp.logspace(-2.0, 2.0, groups, dtype=jnp.float32)
  taps = jnp.arange(num_taps, dtype=jnp.float32)
  return jnp.exp(-rates[:, None] * taps[None, :] / max(train_len - 1, 1))


def mr_filter(hhat_GK: jax.Array, train_len: int, decay: bool = True) -> jax.Array:
  """Effective MR filter: hhat * decay (float32), or hhat itself if `decay` is False."""
  hhat = hhat_GK.astype(jnp.float32)
  if not decay:
    return hhat
  return hhat * mr_decay(hhat.shape[0], hhat.shape[1], train_len)


def modal_log_poles(p_CN: jax.Array, gamma_CN: jax.Array) -> jax.Array:
  """log_pole = -exp(p) * exp(gamma), float32, always < 0 (stable, decaying modes)."""
  return -jnp.exp(p_CN.astype(jnp.float32) + gamma_CN.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("length", "chunk"))
def modal_filter(log_poles_CN: jax.Array, residues_CN: jax.Array, length: int,
                 chunk: int = MODAL_CHUNK) -> jax.Array:
  """Materialises h[c, t] = sum_n R[c, n] exp(log_pole[c, n] t) for t < length, float32.

  Memory-safe at any length, forward and backward: each chunk of `chunk` positions is a fused
  multiply-reduce over the poles (never [C, N, L]), and a custom VJP recomputes the modes in
  the backward instead of saving them (autodiff would keep exp(log_pole t), 34 GiB at
  D=4096, L=131K):
    dR[c, n] = sum_t g[c, t] pole^t,   dlog_pole[c, n] = R[c, n] sum_t g[c, t] t pole^t.

  Args:
    log_poles_CN: [C, N] log of the real poles (negative).
    residues_CN: [C, N] residues.
    length: L.
    chunk: positions generated per step.

  Returns:
    [C, L] float32.
  """
  return _modal_filter(log_poles_CN.astype(jnp.float32), residues_CN.astype(jnp.float32),
                       length, min(chunk, length))


def _chunk_times(start: jax.Array, chunk: int) -> jax.Array:
  return (start + jnp.arange(chunk)).astype(jnp.float32)


def _modal_filter_forward(log_poles: jax.Array, residues: jax.Array, length: int,
                          chunk: int) -> jax.Array:
  num_chunks = -(-length // chunk)

  def one_chunk(start):
    modes_CNT = jnp.exp(log_poles[:, :, None] * _chunk_times(start, chunk))
    return jnp.sum(residues[:, :, None] * modes_CNT, axis=1)

  h_SCT = jax.lax.map(one_chunk, jnp.arange(num_chunks) * chunk)
  return jnp.moveaxis(h_SCT, 0, 1).reshape(log_poles.shape[0], num_chunks * chunk)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _modal_filter(log_poles, residues, length, chunk):
  return _modal_filter_forward(log_poles, residues, length, chunk)


def _modal_filter_fwd(log_poles, residues, length, chunk):
  return _modal_filter_forward(log_poles, residues, length, chunk), (log_poles, residues)


def _modal_filter_bwd(length, chunk, saved, g_CL):
  log_poles, residues = saved
  num_chunks = -(-length // chunk)
  g = jnp.pad(g_CL.astype(jnp.float32), ((0, 0), (0, num_chunks * chunk - length)))
  g_SCT = jnp.moveaxis(g.reshape(g.shape[0], num_chunks, chunk), 1, 0)

  def one_chunk(sums, inputs):
    start, g_CT = inputs
    t = _chunk_times(start, chunk)
    weighted_CNT = g_CT[:, None, :] * jnp.exp(log_poles[:, :, None] * t)
    d_res, d_tsum = sums
    return (d_res + jnp.sum(weighted_CNT, axis=2), d_tsum + jnp.sum(weighted_CNT * t, axis=2)), None

  zeros = jnp.zeros_like(log_poles)
  (d_res, d_tsum), _ = jax.lax.scan(one_chunk, (zeros, zeros),
                                    (jnp.arange(num_chunks) * chunk, g_SCT))
  return residues * d_tsum, d_res


_modal_filter.defvjp(_modal_filter_fwd, _modal_filter_bwd)


def modal_scan(u_BLC: jax.Array, log_poles_CN: jax.Array, residues_CN: jax.Array,
               state_BCN: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Recurrent form of the modal convolution: s_t = pole * s_(t-1) + u_t, y_t = sum_n R_n s_t,n.

  Equal to `causal_conv(u, modal_filter(...))` for a zero initial state; used for generation
  and as an independent check of the FFT path.

  Args:
    u_BLC: [B, L, C] input.
    log_poles_CN, residues_CN: [C, N].
    state_BCN: [B, C, N] float32 initial state, or None for zeros.

  Returns:
    (y_BLC float32, final state_BCN float32).
  """
  poles = jnp.exp(log_poles_CN.astype(jnp.float32))
  residues = residues_CN.astype(jnp.float32)
  batch, _, channels = u_BLC.shape
  if state_BCN is None:
    state_BCN = jnp.zeros((batch, channels, poles.shape[-1]), jnp.float32)

  def step(state, u_BC):
    state = poles * state + u_BC[:, :, None]
    return state, jnp.einsum("bcn,cn->bc", state, residues, precision=jax.lax.Precision.HIGHEST)

  state, y_LBC = jax.lax.scan(step, state_BCN, jnp.moveaxis(u_BLC.astype(jnp.float32), 1, 0))
  return jnp.moveaxis(y_LBC, 0, 1), state


@functools.partial(jax.jit, static_argnames=("chunk",))
def modal_chunked_conv(u_BLC: jax.Array, log_poles_CN: jax.Array, residues_CN: jax.Array,
                       chunk: int = 256) -> jax.Array:
  """Modal convolution by chunks: exact Toeplitz inside a chunk, an N-state carry between.

  For chunk j starting at t0 and offset i: y = sum_{i' <= i} h[i - i'] u[t0 + i']
  + sum_n R_n pole_n^(i + 1) s_n, where s is the state after the previous chunk and
  s <- pole^T s + sum_i pole^(T - 1 - i) u[t0 + i]. Reads u once; memory O(B C (T + N)).

  Args:
    u_BLC: [B, L, C]; L is zero-padded to a multiple of the chunk.
    log_poles_CN, residues_CN: [C, N].

  Returns:
    [B, L, C] float32.
  """
  batch, length, channels = u_BLC.shape
  log_poles = log_poles_CN.astype(jnp.float32)
  residues = residues_CN.astype(jnp.float32)
  chunk = min(chunk, length)
  padded = -(-length // chunk) * chunk
  u = jnp.pad(u_BLC.astype(jnp.float32), ((0, 0), (0, padded - length), (0, 0)))
  u_NBTC = jnp.moveaxis(u.reshape(batch, padded // chunk, chunk, channels), 1, 0)

  offsets = jnp.arange(chunk, dtype=jnp.float32)
  h_CT = modal_filter(log_poles, residues, chunk)
  lag = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  toeplitz_CTT = jnp.where(lag >= 0, h_CT[:, jnp.clip(lag, 0, chunk - 1)], 0.0)
  out_decay_CNT = jnp.exp(log_poles[:, :, None] * (offsets + 1.0))
  readout_CTN = jnp.einsum("cn,cnt->ctn", residues, out_decay_CNT)
  in_decay_CNT = jnp.exp(log_poles[:, :, None] * (chunk - 1.0 - offsets))
  chunk_decay_CN = jnp.exp(log_poles * chunk)
  hi = jax.lax.Precision.HIGHEST

  def step(state_BCN, u_BTC):
    y = jnp.einsum("cij,bjc->bic", toeplitz_CTT, u_BTC, precision=hi)
    y = y + jnp.einsum("ctn,bcn->btc", readout_CTN, state_BCN, precision=hi)
    state_BCN = chunk_decay_CN * state_BCN + jnp.einsum("cnt,btc->bcn", in_decay_CNT, u_BTC,
                                                        precision=hi)
    return state_BCN, y

  state0 = jnp.zeros((batch, channels, log_poles.shape[-1]), jnp.float32)
  _, y_NBTC = jax.lax.scan(step, state0, u_NBTC)
  return jnp.moveaxis(y_NBTC, 0, 1).reshape(batch, padded, channels)[:, :length]
