"""Stateful pieces of the operators: a FIR with a cache of past rows, the LI modal state from a
whole chunk (no step loop), and attention of new queries over a KV cache.

All filters follow the repository convention: h[..., 0] multiplies the current token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sh2_jax.ops import conv, filters

HI = jax.lax.Precision.HIGHEST
DIRECT_MAX_LEN = 16       # extend by at most this many tokens with the direct window sum
MODAL_STATE_CHUNK = 256   # positions per step of the LI state reduction
SCORE_BYTES = 2**28       # float32 scores per block of the cached attention (sets the query block)
KEY_BLOCK = 2048          # keys per online-softmax step of the cached attention
DECODE_KEY_BLOCK = 16384  # keys x batch per step for a few queries (decode): fewer, larger steps


def last_rows(x_BTC: jax.Array, cache_BKC: jax.Array) -> jax.Array:
  """The last K rows of concat(cache, x) along time: the FIR cache after consuming x."""
  keep = cache_BKC.shape[1]
  if keep == 0:
    return cache_BKC
  ext = jnp.concatenate([cache_BKC.astype(x_BTC.dtype), x_BTC], axis=1)
  return ext[:, ext.shape[1] - keep:].astype(cache_BKC.dtype)


def fir_extend(x_BTC: jax.Array, cache_BKC: jax.Array, h_GK: jax.Array, method: str = "auto",
               chunk: int = 128) -> jax.Array:
  """Causal grouped FIR of x continuing a history: y[t] = sum_k h[k] ext[t - k], where ext is
  the cached K - 1 previous rows (oldest first) followed by x.

  Args:
    x_BTC: [B, T, C] new rows.
    cache_BKC: [B, K - 1, C] previous rows (zeros before the sequence start).
    h_GK: [G, K] grouped filter, h[:, 0] on the current token.
    method, chunk: convolution method for long T (ops.conv.causal_conv).

  Returns:
    [B, T, C] in x's dtype, accumulated in float32.
  """
  length, channels = x_BTC.shape[1], x_BTC.shape[2]
  num_taps = h_GK.shape[-1]
  ext = jnp.concatenate([cache_BKC.astype(jnp.float32), x_BTC.astype(jnp.float32)], axis=1)
  if length > DIRECT_MAX_LEN:
    return conv.causal_conv(ext, h_GK, method, chunk)[:, num_taps - 1:].astype(x_BTC.dtype)
  h_CK = conv.expand_groups(h_GK, channels).astype(jnp.float32)
  if length == 1:  # a decode step: one reduction over the window (newest row on h[:, 0])
    y = jnp.sum(ext[:, ::-1] * h_CK.T[None], axis=1)
    return y[:, None].astype(x_BTC.dtype)
  y = jnp.zeros(x_BTC.shape, jnp.float32)
  for k in range(num_taps):  # same order of accumulation as ops.conv.direct_conv
    y = y + h_CK[:, k] * jax.lax.slice_in_dim(ext, num_taps - 1 - k, num_taps - 1 - k + length, axis=1)
  return y.astype(x_BTC.dtype)


def modal_state(u_BTC: jax.Array, log_poles_CN: jax.Array, state_BCN: jax.Array | None = None,
                chunk: int = MODAL_STATE_CHUNK) -> jax.Array:
  """LI modal state after consuming u: s = pole^T s0 + sum_t pole^(T - 1 - t) u_t, float32.

  A chunked weighted sum (a [C, N, chunk] weight table and a short scan over chunks), not a
  per-token loop; memory O(B C N + C N chunk).

  Args:
    u_BTC: [B, T, C] inputs.
    log_poles_CN: [C, N] log of the real poles (negative).
    state_BCN: [B, C, N] state before u, or None for zeros.

  Returns:
    [B, C, N] float32.
  """
  batch, length, channels = u_BTC.shape
  log_poles = log_poles_CN.astype(jnp.float32)
  chunk = max(1, min(chunk, length))
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  # zeros in front are inputs before the start: they add nothing to the state
  u = jnp.pad(u_BTC.astype(jnp.float32), ((0, 0), (pad, 0), (0, 0)))
  u_SBTC = jnp.moveaxis(u.reshape(batch, num_chunks, chunk, channels), 1, 0)
  weights_CNT = jnp.exp(log_poles[:, :, None] * (chunk - 1.0 - jnp.arange(chunk, dtype=jnp.float32)))
  chunk_decay_CN = jnp.exp(log_poles * chunk)

  def one_chunk(s_BCN, u_BTC_chunk):
    s_BCN = chunk_decay_CN * s_BCN + jnp.einsum("cnt,btc->bcn", weights_CNT, u_BTC_chunk, precision=HI)
    return s_BCN, None

  s0 = jnp.zeros((batch, channels, log_poles.shape[-1]), jnp.float32)
  s, _ = jax.lax.scan(one_chunk, s0, u_SBTC)
  if state_BCN is not None:
    s = s + jnp.exp(log_poles * length) * state_BCN.astype(jnp.float32)
  return s


def modal_state_readout(state_BCN: jax.Array, log_poles_CN: jax.Array, residues_CN: jax.Array,
                        length: int) -> jax.Array:
  """What an earlier state adds to the next `length` outputs: y[t] = sum_n R_n pole_n^(t+1) s_n.

  Returns:
    [B, length, C] float32 (generated chunk-wise by ops.filters.modal_filter).
  """
  batch, channels, order = state_BCN.shape
  log_poles = log_poles_CN.astype(jnp.float32)
  weights_BCN = residues_CN.astype(jnp.float32) * jnp.exp(log_poles) * state_BCN
  h = filters.modal_filter(jnp.broadcast_to(log_poles, (batch, channels, order)).reshape(-1, order),
                           weights_BCN.reshape(-1, order), length)
  return jnp.swapaxes(h.reshape(batch, channels, length), 1, 2)


def modal_step(u_BC: jax.Array, state_BCN: jax.Array, log_poles_CN: jax.Array,
               residues_CN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token of the LI recurrence: s <- pole s + u, y = sum_n R_n s_n. Returns (y_BC, s)."""
  poles = jnp.exp(log_poles_CN.astype(jnp.float32))
  state = poles * state_BCN + u_BC.astype(jnp.float32)[:, :, None]
  return jnp.sum(state * residues_CN.astype(jnp.float32), axis=-1), state


def cached_attention(q_BTNH: jax.Array, k_BNSH: jax.Array, v_BNSH: jax.Array,
                     q_positions_T: jax.Array, block: int | None = None,
                     key_block: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax attention of queries at absolute positions over a KV cache (float32 softmax and
  accumulation; products in the cache's dtype, as flash attention does).

  Key slot j is visible to the query at position p iff j <= p. Keys go in blocks of
  `key_block` with an online softmax, in a loop that stops after the block holding the last
  query's position: the cost grows with the filled length, not the cache size. Queries go in
  blocks of `block` (default: as many as keep the [B, N, block, key_block] float32 scores
  under SCORE_BYTES, 64 to 4096: few large steps, which a GPU needs).

  The caches are [B, N, S, H] (the layout both dots read: with slots before heads XLA:GPU
  carried a transposed copy of every cache through the decode loop). They go through the
  loops as carried values and come back out, so the caller returns the buffer the loops read.

  Returns:
    ([B, T, N, H] in q's dtype, k_BNSH, v_BNSH).
  """
  batch, length, heads, dim = q_BTNH.shape
  slots = k_BNSH.shape[2]
  if key_block is None:
    key_block = max(KEY_BLOCK, DECODE_KEY_BLOCK // batch) if length <= DIRECT_MAX_LEN else KEY_BLOCK
  key_block = min(key_block, slots)
  if block is None:
    block = 2 ** int(math.log2(max(1, SCORE_BYTES // (4 * batch * heads * key_block))))
    block = min(max(block, 64), 4096)

  # products take the cache's dtype with float32 accumulation: converting blocks of the cache
  # would be hoisted by XLA into a per-step conversion of the whole cache
  q_cast = q_BTNH.dtype if q_BTNH.dtype == k_BNSH.dtype else jnp.float32

  def attend(q_blk, pos_blk, k_cache, v_cache):
    q_blk = q_blk.astype(q_cast)
    num_blocks = jnp.max(pos_blk) // key_block + 1

    def body(carry):
      j, m, l, acc, k_cache, v_cache = carry
      start = jnp.minimum(j * key_block, slots - key_block)  # the last block may overlap ...
      k = jax.lax.dynamic_slice_in_dim(k_cache, start, key_block, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v_cache, start, key_block, axis=2)
      idx = start + jnp.arange(key_block)
      visible = (idx[None, :] <= pos_blk[:, None]) & (idx[None, :] >= j * key_block)  # ... not recount
      s = jnp.einsum("btnh,bnsh->bnts", q_blk, k.astype(q_cast), precision=HI,
                     preferred_element_type=jnp.float32) / math.sqrt(dim)
      s = jnp.where(visible[None, None], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      scale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
      l = l * scale + jnp.sum(p, axis=-1)
      acc = acc * scale[..., None] + jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), v, precision=HI,
                                                preferred_element_type=jnp.float32)
      return j + 1, m_new, l, acc, k_cache, v_cache

    t = q_blk.shape[1]
    init = (jnp.zeros((), jnp.int32), jnp.full((batch, heads, t), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, t), jnp.float32), jnp.zeros((batch, heads, t, dim), jnp.float32),
            k_cache, v_cache)
    _, _, l, acc, k_cache, v_cache = jax.lax.while_loop(lambda c: c[0] < num_blocks, body, init)
    return jnp.swapaxes(acc / l[..., None], 1, 2), k_cache, v_cache

  if length <= block:
    out, k_BNSH, v_BNSH = attend(q_BTNH, q_positions_T, k_BNSH, v_BNSH)
    return out.astype(q_BTNH.dtype), k_BNSH, v_BNSH
  num = -(-length // block)
  pad = num * block - length
  q = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
  pos = jnp.pad(q_positions_T, (0, pad))
  q_SBTNH = jnp.moveaxis(q.reshape(batch, num, block, heads, dim), 1, 0)

  def one_block(caches, args):
    out, k_cache, v_cache = attend(*args, *caches)
    return (k_cache, v_cache), out

  (k_BNSH, v_BNSH), out = jax.lax.scan(one_block, (k_BNSH, v_BNSH), (q_SBTNH, pos.reshape(num, block)))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, num * block, heads, dim)[:, :length]
  return out.astype(q_BTNH.dtype), k_BNSH, v_BNSH
