"""Parameter declaration with logical axis names, and the initialisers the modules share."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# Parameters that the layers use only as matrix-product operands in the compute dtype.
COMPUTE_WEIGHTS = frozenset({"in_proj", "out_proj", "qkv", "w1", "w2", "w3"})


# Parameters whose layout changed, with what a checkpoint of the old layout needs.
_MIGRATE = ("re-run `sh2 convert` on the original Evo 2 state dict, or export a trained model "
            "with sh2-jax 0.1 (`sh2_jax.convert.evo2.params_to_vortex`) and `sh2 convert` that")
LAYOUT_CHANGES = {
    "in_proj": "Hyena in_proj is stored [D, 3, D] (streams on the middle axis) since sh2-jax "
               f"0.2 and a [D, 3D] checkpoint predates it: {_MIGRATE}",
    "featurizer": "the Hyena featurizer is stored [3, D, K] since sh2-jax 0.2 and a [3D, K] "
                  f"checkpoint predates it: {_MIGRATE}",
}


def _path_name(path: tuple) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def stored_shape_mismatch(stored: Any, expected: Any) -> str | None:
  """A one-line reason when a checkpoint's arrays (`stored`: a tree of anything with .shape,
  e.g. Orbax array metadata) differ in shape from `expected` at the same path, else None
  (also when `stored` is None: no metadata to compare)."""
  if stored is None:
    return None
  expected_shapes = {_path_name(path): tuple(leaf.shape)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
                     if hasattr(leaf, "shape")}
  for path, leaf in jax.tree_util.tree_leaves_with_path(stored):
    name = _path_name(path)
    shape = getattr(leaf, "shape", None)
    want = expected_shapes.get(name)
    if shape is None or want is None or tuple(shape) == want:
      continue
    hint = LAYOUT_CHANGES.get(name.rsplit(".", 1)[-1])
    return (f"{name} is {tuple(shape)} in the checkpoint but {want} for this config: "
            + (hint if hint and len(shape) != len(want) else
               "the checkpoint was written with another model config"))
  return None


def cast_compute_weights(params: Any, dtype: jnp.dtype) -> Any:
  """`params` (a module's parameter tree) with every COMPUTE_WEIGHTS leaf cast to `dtype`."""
  def cast(path, leaf):
    names = {key.key for key in path if isinstance(key, jax.tree_util.DictKey)}
    if names & COMPUTE_WEIGHTS and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(cast, params)


@flax.struct.dataclass
class Declared(nn.LogicallyPartitioned):
  """A parameter boxed with its logical axis names and the initialiser that drew it (so its
  value can be redrawn from the abstract tree alone: train.state.init_params)."""
  initializer: Initializer | None = flax.struct.field(pytree_node=False, default=None)


def declare(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
            axes: Sequence[str | None], dtype: jnp.dtype) -> jax.Array:
  """`module.param` whose value carries logical axis names (mapped to the mesh by the rules)
  and its initialiser (a `Declared` box)."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")

  def boxed(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> Declared:
    return Declared(init(key, shape, dtype), tuple(axes), initializer=init)

  return module.param(name, boxed, tuple(shape), dtype)


def matmul_precision(dtype: jnp.dtype) -> contextlib.AbstractContextManager:
  """Context in which float32 compute means IEEE float32 products (no TF32 on GPU); other
  compute dtypes leave the global precision setting alone."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Normal:
  """N(0, std^2)."""
  std: float

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
               ) -> jax.Array:
    return jax.random.normal(key, shape, dtype) * jnp.array(self.std, dtype)


@dataclasses.dataclass(frozen=True)
class UniformSymmetric:
  """U(-bound, bound), the PyTorch Conv1d default with bound = 1 / sqrt(fan_in)."""
  bound: float

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
               ) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -self.bound, self.bound)


@dataclasses.dataclass(frozen=True)
class Constant:
  """Every element `value` (the key is unused)."""
  value: float

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
               ) -> jax.Array:
    del key
    return jnp.full(shape, self.value, dtype)


@dataclasses.dataclass(frozen=True)
class LogUniformLog:
  """log U[low, high]: the LI gamma init."""
  low: float
  high: float

  def __call__(self, key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32
               ) -> jax.Array:
    return jnp.log(jax.random.uniform(key, shape, dtype, self.low, self.high))


# Hashable initialisers (frozen dataclasses): equal ones share one compiled sampler in
# train.state.init_params.
def normal(std: float) -> Initializer:
  return Normal(float(std))


def uniform_symmetric(bound: float) -> Initializer:
  return UniformSymmetric(float(bound))


def constant(value: float) -> Initializer:
  return Constant(float(value))


def log_uniform_log(low: float, high: float) -> Initializer:
  return LogUniformLog(float(low), float(high))


def output_std(init_std: float, num_layers: int) -> float:
  """Init std of projections that write into the residual stream (GPT-2 style scaling)."""
  return init_std / math.sqrt(2 * num_layers)
