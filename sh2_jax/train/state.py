"""Train state (params, optimizer state, step, RNG) and its creation with mesh shardings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sh2_jax.config import MeshConfig, ModelConfig
from sh2_jax.model import StripedHyena2
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


def create_train_state(model_config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, seed: int, mesh_config: MeshConfig | None = None
                       ) -> tuple[TrainState, TrainState]:
  """Initialises the state directly into its shardings; returns (state, shardings)."""
  _, shardings = state_shardings(model_config, optimizer, mesh, mesh_config)
  init = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model_config, optimizer, r)),
                 out_shardings=shardings)
  return init(jax.random.key(seed)), shardings
