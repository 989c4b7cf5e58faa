"""Per-mixer recurrent state for generation (SPEC.md sections 2-3), as explicit pytrees.

- Hyena featurizer (every SE/MR/LI layer): the last Kf - 1 projected rows of the three streams
  (post gate, pre gate, value), before the short conv, oldest first, in the compute dtype.
- SE / MR inner filter: the last K - 1 rows of u = pre * v, oldest first, float32.
- LI: N float32 modal states per channel, s_n <- pole_n s_n + u.
- MHA: a preallocated KV cache [B, N, S, H] holding keys after RoPE, in the compute dtype (heads
  before slots: the layout the attention dots read, so XLA never re-lays the cache out).
`DecodeState.pos` counts the tokens consumed so far (shared by the batch).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig


class HyenaCache(NamedTuple):
  """feat: [3, B, Kf - 1, D] (post, pre, v streams). inner: SE/MR [B, K - 1, D] float32 rows of
  u; LI [B, D, N] float32 modal states."""
  feat: jax.Array
  inner: jax.Array


class AttentionCache(NamedTuple):
  """k, v: [B, N, S, H] for positions < S (keys after RoPE); slots >= pos are unused."""
  k: jax.Array
  v: jax.Array


class DecodeState(NamedTuple):
  """pos: int32 scalar, tokens consumed; layers: one HyenaCache or AttentionCache per layer."""
  pos: jax.Array
  layers: tuple


def inner_taps(config: ModelConfig, kind: str) -> int:
  return {"SE": config.se_filter_len, "MR": config.mr_filter_len}[kind]


def init_state(config: ModelConfig, batch: int, max_len: int) -> DecodeState:
  """Zero state for `batch` sequences of at most `max_len` tokens (prompt + generated)."""
  dt = jnp.dtype(config.dtype)
  d = config.d_model
  layers = []
  for kind in config.layers:
    if kind == "MHA":
      shape = (batch, config.num_heads, max_len, config.head_dim)
      layers.append(AttentionCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)))
      continue
    feat = jnp.zeros((3, batch, config.featurizer_len - 1, d), dt)
    if kind == "LI":
      inner = jnp.zeros((batch, d, config.li_order), jnp.float32)
    else:
      inner = jnp.zeros((batch, inner_taps(config, kind) - 1, d), jnp.float32)
    layers.append(HyenaCache(feat, inner))
  return DecodeState(jnp.zeros((), jnp.int32), tuple(layers))


def state_bytes(state: DecodeState) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
