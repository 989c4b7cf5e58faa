"""Loss, jit-compiled train step (gradient accumulation) and eval step."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from sh2_jax.config import MeshConfig, ModelConfig, TrainConfig
from sh2_jax.layers import params as P
from sh2_jax.model import StripedHyena2
from sh2_jax.parallel import context_sharding
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train.optim import learning_rate_schedule
from sh2_jax.train.state import TrainState

LN2 = math.log(2.0)


def global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every leaf, float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def next_token_nll(model: StripedHyena2, params: Any, window_BL1: jax.Array) -> jax.Array:
  """Per-position negative log-likelihood (nats, float32) of window[:, 1:] given window[:, :-1].

  Under context parallelism with zigzag, inputs and targets are permuted once into the
  storage order, the logits stay in it, and only the per-token losses are put back.

  Args:
    window_BL1: [B, L + 1] int tokens.

  Returns:
    [B, L] float32, natural order.
  """
  inputs_BL, targets_BL = window_BL1[:, :-1], window_BL1[:, 1:]
  cp = model.parallel
  if cp is None:
    logits_BLV = model.apply({"params": params}, inputs_BL)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  logits_BLV = model.apply({"params": params}, cp.to_layout(inputs_BL), in_layout=True)
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, cp.to_layout(targets_BL))
  return cp.from_layout(nll_BL)


def make_model(model_config: ModelConfig, mesh: Mesh,
               mesh_config: MeshConfig | None = None) -> StripedHyena2:
  """The model for `mesh`: context-parallel when its context axis is > 1 (strategies from
  `mesh_config`, default MeshConfig())."""
  return StripedHyena2(model_config, context_sharding.from_mesh(mesh, mesh_config))


def make_train_step(model_config: ModelConfig, train_config: TrainConfig,
                    optimizer: optax.GradientTransformation, mesh: Mesh,
                    shardings: TrainState, mesh_config: MeshConfig | None = None,
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """A jitted `(state, window_BL1) -> (state, metrics)`; the state buffer is donated.

  The batch is split into `grad_accum` micro-batches scanned sequentially; gradients are
  averaged in float32. Metrics: loss (nats/token), bpb, grad_norm, lr. A mesh with context > 1
  trains context-parallel (`make_model`; strategies from `mesh_config`).
  """
  model = make_model(model_config, mesh, mesh_config)
  accum = train_config.grad_accum
  schedule = learning_rate_schedule(train_config)

  compute_dtype = jnp.dtype(model_config.dtype)
  cast_once = (model_config.remat and model_config.cast_weights_once
               and compute_dtype != jnp.dtype(model_config.param_dtype))

  def loss_fn(params, window):
    if cast_once:  # outside the rematerialised blocks: not recomputed in the backward pass
      params = P.cast_compute_weights(params, compute_dtype)
    return jnp.mean(next_token_nll(model, params, window))

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state: TrainState, window_BL1: jax.Array) -> tuple[TrainState, dict]:
    if accum == 1:
      loss, grads = grad_fn(state.params, window_BL1)
    else:
      micro = window_BL1.reshape(accum, window_BL1.shape[0] // accum, window_BL1.shape[1])

      def body(carry, window):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state.params, window)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "bpb": loss / LN2, "grad_norm": global_norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model_config: ModelConfig, mesh: Mesh, param_shardings: Any,
                   mesh_config: MeshConfig | None = None,
                   ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """A jitted `(params, window_BL1) -> (sum of nll in nats, number of predicted tokens)`."""
  model = make_model(model_config, mesh, mesh_config)

  def step(params, window_BL1):
    nll = next_token_nll(model, params, window_BL1)
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)

  return jax.jit(step, in_shardings=(param_shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))
