"""StripedHyena 2: byte embedding, a stripe of Hyena/MHA blocks, final norm, tied logits."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sh2_jax.config import ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.layers.block import Block
from sh2_jax.layers.norm import RMSNorm
from sh2_jax.ops import hyena as hyena_ops
from sh2_jax.parallel.context_sharding import ContextSharding

REMAT_POLICIES = {  # model.remat_policy -> what jax.checkpoint keeps of a block's forward
    "full": None,
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(hyena_ops.SEGMENT_STATES,
                                                      hyena_ops.WEIGHT_VIEWS,
                                                      hyena_ops.OUT_WEIGHT_VIEW)),
    "save_dots_features": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(hyena_ops.SEGMENT_STATES,
                                                      hyena_ops.WEIGHT_VIEWS,
                                                      hyena_ops.OUT_WEIGHT_VIEW,
                                                      hyena_ops.FEATURIZED)),
}
RESIDUAL = "residual_stream"  # checkpoint name of each block's input (model.offload_residuals)
OFFLOAD_RESIDUALS = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=[RESIDUAL],
    offload_src="device", offload_dst="pinned_host")


class StripedHyena2(nn.Module):
  """Byte-level multi-hybrid LM (SPEC.md section 1).

  Call with int tokens [B, L]; returns float32 logits [B, L, V]. The residual stream is kept
  in float32; matrix products run in `config.dtype`. With `mutable=["intermediates"]`, the
  residual after each block is sown as intermediates["hidden_{i}"].

  With `parallel` (a mesh whose context axis is > 1, see parallel.context_sharding) the
  sequence is sharded over the context axis and every mixer runs context-parallel. Under
  zigzag, `in_layout=True` says the tokens are already in storage order (`parallel.to_layout`)
  and the logits (and sown hiddens) stay in it; the default takes and returns natural order.
  """
  config: ModelConfig
  parallel: ContextSharding | None = None

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, in_layout: bool = False) -> jax.Array:
    cfg = self.config
    cp = self.parallel
    constrain = (lambda x: x) if cp is None else cp.constrain
    if cp is not None and not in_layout:
      tokens_BL = cp.to_layout(tokens_BL)
    embedding_VD = P.declare(self, "embedding", P.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                             ("vocab", "embed"), jnp.dtype(cfg.param_dtype))
    x_BLD = constrain(jnp.take(embedding_VD, tokens_BL, axis=0).astype(jnp.float32))
    x_BLD = self._stack(x_BLD) if not cfg.offload_residuals else nn.remat(
        StripedHyena2._stack, policy=OFFLOAD_RESIDUALS)(self, x_BLD)
    dt = jnp.dtype(cfg.dtype)
    with P.matmul_precision(dt):
      logits_BLV = constrain(jnp.einsum("BLD,VD->BLV", x_BLD, embedding_VD.astype(dt),
                                        preferred_element_type=jnp.float32))
    if cp is not None and not in_layout:
      logits_BLV = cp.from_layout(logits_BLV)
    return logits_BLV

  def _stack(self, x_BLD: jax.Array) -> jax.Array:
    """The blocks and the final norm: float32 [B, L, D] -> `config.dtype` [B, L, D]. Each block's
    input is named RESIDUAL (offloaded to host memory under `model.offload_residuals`)."""
    cfg = self.config
    constrain = (lambda x: x) if self.parallel is None else self.parallel.constrain
    policy = REMAT_POLICIES[cfg.remat_policy]
    block_cls = nn.remat(Block, static_argnums=(), policy=policy) if cfg.remat else Block
    for i in range(cfg.num_layers):
      x_BLD = checkpoint_name(x_BLD, RESIDUAL)
      x_BLD = constrain(block_cls(cfg, i, self.parallel, name=f"block_{i}")(x_BLD))
      self.sow("intermediates", f"hidden_{i}", x_BLD)
    # Rematerialised with the blocks: the backward keeps the norm's dt output, not its float32
    # intermediates (two [B, L, D] float32 values).
    norm_cls = nn.remat(RMSNorm) if cfg.remat else RMSNorm
    return norm_cls(cfg.norm_eps, cfg.param_dtype, cfg.dtype,
                    name="final_norm")(checkpoint_name(x_BLD, RESIDUAL))


def abstract_params(config: ModelConfig, length: int = 8) -> dict:
  """Parameter shapes (boxed with logical axes) from abstract evaluation: no allocation."""
  model = StripedHyena2(config)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))["params"]


def count_params(params) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))
