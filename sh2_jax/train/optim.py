"""AdamW with warmup + cosine, global-norm clipping, weight decay on matrices only."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sh2_jax.config import TrainConfig

# Parameters that are projection matrices (decayed); filters, poles, norms, biases and skips are not.
DECAYED_PARAMS = frozenset({"embedding", "in_proj", "out_proj", "qkv", "w1", "w2", "w3"})


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the last step."""
  warmup = min(config.warmup_steps, max(config.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for leaves whose name is a projection matrix (see DECAYED_PARAMS)."""
  def is_matrix(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED_PARAMS
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
