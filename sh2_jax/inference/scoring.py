"""Sequence scoring: per-sequence log-likelihood of byte sequences (variant-effect scoring)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.inference.cache import init_state
from sh2_jax.inference.engine import extend_jit, with_chunk_retry
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
  return _scored_sum(logits, tokens_BL, lengths_B, 0)


def _scored_sum(logits_BTV: jax.Array, tokens_BL: jax.Array, lengths_B: jax.Array,
                start: int) -> jax.Array:
  """sum over positions p = start .. start + T - 1 with p + 1 < len of log p(x_(p+1)), [B]."""
  num = logits_BTV.shape[1]
  targets = jnp.pad(tokens_BL, ((0, 0), (0, 1)))[:, start + 1:start + 1 + num]
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = start + 1 + jnp.arange(num)[None, :] < lengths_B[:, None]
  return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


_scored_sum_jit = jax.jit(_scored_sum, static_argnames=("start",))


def score_in_chunks(params: dict, config: ModelConfig, tokens_BL: jax.Array, lengths_B: jax.Array,
                    chunk: int) -> jax.Array:
  """`score` through the recurrent path, `chunk` tokens at a time (the first chunk on the
  parallel path, the rest continuing its state): activation memory of one chunk. [B] float32."""
  batch, length = tokens_BL.shape
  state = init_state(config, batch, length)
  total = jnp.zeros((batch,), jnp.float32)
  for start in range(0, length, chunk):
    logits, state = extend_jit(params, config, state, tokens_BL[:, start:start + chunk],
                               fresh=start == 0)
    total = total + _scored_sum_jit(logits, tokens_BL, lengths_B, start)
  return total


def score_sequences(params: dict, config: ModelConfig, tokens_BL: jax.Array,
                    lengths_B: jax.Array) -> jax.Array:
  """`score` in one pass, or in chunks when the device runs out of memory (with a warning)."""
  length = tokens_BL.shape[1]

  def run(chunk: int) -> jax.Array:
    if chunk >= length:
      return jax.block_until_ready(score(params, config, tokens_BL, lengths_B))
    return jax.block_until_ready(score_in_chunks(params, config, tokens_BL, lengths_B, chunk))

  return with_chunk_retry(run, length, f"scoring (batch {tokens_BL.shape[0]})")
