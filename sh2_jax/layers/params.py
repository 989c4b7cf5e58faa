"""Parameter declaration with logical axis names, and the initialisers the modules share."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# Parameters that the layers use only as matrix-product operands in the compute dtype.
COMPUTE_WEIGHTS = frozenset({"in_proj", "out_proj", "qkv", "w1", "w2", "w3"})


def cast_compute_weights(params: Any, dtype: jnp.dtype) -> Any:
  """`params` (a module's parameter tree) with every COMPUTE_WEIGHTS leaf cast to `dtype`."""
  def cast(path, leaf):
    names = {key.key for key in path if isinstance(key, jax.tree_util.DictKey)}
    if names & COMPUTE_WEIGHTS and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def declare(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
            axes: Sequence[str | None], dtype: jnp.dtype) -> jax.Array:
  """`module.param` whose value carries logical axis names (mapped to the mesh by the rules)."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def matmul_precision(dtype: jnp.dtype) -> contextlib.AbstractContextManager:
  """Context in which float32 compute means IEEE float32 products (no TF32 on GPU); other
  compute dtypes leave the global precision setting alone."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


def uniform_symmetric(bound: float) -> Initializer:
  """U(-bound, bound), the PyTorch Conv1d default with bound = 1 / sqrt(fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)
  return init


def log_uniform_log(low: float, high: float) -> Initializer:
  """log U[low, high]: the LI gamma init."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, low, high))
  return init


def output_std(init_std: float, num_layers: int) -> float:
  """Init std of projections that write into the residual stream (GPT-2 style scaling)."""
  return init_std / math.sqrt(2 * num_layers)
