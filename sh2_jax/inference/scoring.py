"""Sequence scoring: per-sequence log-likelihood of byte sequences (variant-effect scoring)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.model import StripedHyena2


@functools.partial(jax.jit, static_argnames=("config",))
def score(params: dict, config: ModelConfig, tokens_BL: jax.Array,
          lengths_B: jax.Array) -> jax.Array:
  """sum_{1 <= t < len} log p(x_t | x_<t) per sequence, float32 [B].

  Sequences are right-padded to L (any pad value): the model is causal, so padding never
  reaches the scored positions, and positions >= len are masked out. The first token of each
  sequence is the context for the rest (it is not scored).
  """
  logits = StripedHyena2(config).apply({"params": params}, tokens_BL)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens_BL[:, 1:, None], axis=-1)[..., 0]
  mask = jnp.arange(1, tokens_BL.shape[1])[None, :] < lengths_B[:, None]
  return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)
