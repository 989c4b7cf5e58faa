"""Train state (params, optimizer state, step, RNG) and its creation with mesh shardings."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from sh2_jax.config import MeshConfig, ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.model import StripedHyena2, abstract_params
from sh2_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator.

  step: int32 scalar, optimizer updates done. params: float32 master weights (plain arrays).
  opt_state: optax state. rng: uint32 key data [2] for any randomness of later steps.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def _init_boxed(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = StripedHyena2(model_config).init(init_rng, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=jax.random.key_data(state_rng))


def state_shardings(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh, mesh_config: MeshConfig | None = None
                    ) -> tuple[TrainState, TrainState]:
  """(abstract unboxed state, NamedShardings) from abstract evaluation: nothing allocated.

  Optimizer moments inherit their parameter's logical axes (optax maps over the boxes).
  mesh_config: picks the rule table (`mesh_lib.logical_axis_rules`; None: the default).
  """
  boxed = jax.eval_shape(lambda r: _init_boxed(model_config, optimizer, r), jax.random.key(0))
  shardings = mesh_lib.logical_shardings(boxed, mesh, mesh_lib.logical_axis_rules(mesh_config))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


Sampler = tuple[P.Initializer, tuple[int, ...], jnp.dtype, jax.sharding.Sharding | None]
_COMPILED: dict[Sampler, Any] = {}  # compiled samplers, by (initializer, shape, dtype, sharding)


def _compiled_samplers(samplers: set[Sampler], key_data: np.ndarray) -> dict[Sampler, Any]:
  """Compiled (key data, index) -> initializer(fold_in(key, index), shape, dtype) programs,
  placed in their sharding; new ones compile in parallel threads (XLA releases the GIL)."""
  def draw(key_data: jax.Array, index: jax.Array, initializer: P.Initializer,
           shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return initializer(jax.random.fold_in(jax.random.wrap_key_data(key_data), index), shape, dtype)

  new = {}
  for sampler in samplers - _COMPILED.keys():
    initializer, shape, dtype, sharding = sampler
    fn = functools.partial(draw, initializer=initializer, shape=shape, dtype=dtype)
    jitted = jax.jit(fn) if sharding is None else jax.jit(fn, out_shardings=sharding)
    new[sampler] = jitted.lower(key_data, np.int32(0))
  if new:
    with concurrent.futures.ThreadPoolExecutor(min(len(new), os.cpu_count() or 1)) as pool:
      futures = {sampler: pool.submit(lowered.compile) for sampler, lowered in new.items()}
    _COMPILED.update((sampler, future.result()) for sampler, future in futures.items())
  return {sampler: _COMPILED[sampler] for sampler in samplers}


def init_params(model_config: ModelConfig, rng: jax.Array, shardings: Any = None) -> Any:
  """Fresh parameters of StripedHyena2(model_config), unboxed.

  Leaf i of the parameter tree (flattened order) is its declared initialiser applied to
  fold_in(rng, i). Each leaf is drawn by a small compiled sampler shared by all leaves with an
  equal (initialiser, shape, dtype, sharding), 16 for every preset, compiled in parallel:
  one program with a random generator per parameter took 72 s to compile for evo2-7b on an
  H100 (2.6 s this way: experiments/results/startup_nvidia_h100_80gb_hbm3.md). The values do
  not depend on the shardings.

  Args:
    rng: a typed key (jax.random.key) of the default implementation.
    shardings: a tree of shardings like the unboxed parameters, or None (default device).
  """
  is_declared = lambda x: isinstance(x, P.Declared)  # noqa: E731
  boxed = abstract_params(model_config)
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_declared)
  placements = [None] * len(with_paths) if shardings is None else treedef.flatten_up_to(shardings)
  samplers = []
  for (path, leaf), sharding in zip(with_paths, placements, strict=True):
    if not is_declared(leaf) or leaf.initializer is None:
      raise TypeError(f"parameter {jax.tree_util.keystr(path)} was not declared with "
                      "sh2_jax.layers.params.declare: declare it there so that init_params "
                      "knows its initialiser")
    samplers.append((leaf.initializer, tuple(leaf.value.shape), jnp.dtype(leaf.value.dtype),
                     sharding))
  key_data = np.asarray(jax.random.key_data(rng))  # host data: the same on every process
  compiled = _compiled_samplers(set(samplers), key_data)
  return jax.tree.unflatten(treedef, [compiled[sampler](key_data, np.int32(index))
                                      for index, sampler in enumerate(samplers)])


def create_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, seed: int, mesh_config: MeshConfig | None = None,
                       shardings: TrainState | None = None) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings (init_params, then the optimizer's
  init and the scalars under their shardings); returns (state, shardings).

  shardings: state_shardings(...)[1] when the caller has it (saves tracing the init again).
  """
  if shardings is None:
    _, shardings = state_shardings(model_config, optimizer, mesh, mesh_config)
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = init_params(model_config, init_rng, shardings.params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step, rng = jax.jit(lambda key_data: (jnp.zeros((), jnp.int32), key_data),
                      out_shardings=(shardings.step, shardings.rng)
                      )(np.asarray(jax.random.key_data(state_rng)))
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng), shardings
