"""One StripedHyena 2 block: pre-norm mixer and pre-norm gated MLP, each with a residual."""

from __future__ import annotations

import flax.linen as nn
import jax

from sh2_jax.config import ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.layers.attention import MHA
from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE
from sh2_jax.layers.mlp import GatedMLP
from sh2_jax.layers.norm import RMSNorm
from sh2_jax.parallel.context_sharding import ContextSharding

MIXERS = {"SE": HyenaSE, "MR": HyenaMR, "LI": HyenaLI, "MHA": MHA}


class Block(nn.Module):
  """x = x + Mixer(RMSNorm(x)); x = x + MLP(RMSNorm(x)). The residual stays in x's dtype."""
  config: ModelConfig
  layer: int
  parallel: ContextSharding | None = None

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    kind = cfg.layers[self.layer]
    with P.matmul_precision(cfg.dtype):
      mixer = MIXERS[kind](cfg, self.parallel, name="mixer")
      h = mixer(RMSNorm(cfg.norm_eps, cfg.param_dtype, name="pre_norm")(x_BLD))
      x_BLD = x_BLD + h.astype(x_BLD.dtype)
      h = GatedMLP(cfg, self.layer, name="mlp")(RMSNorm(cfg.norm_eps, cfg.param_dtype,
                                                        name="post_norm")(x_BLD))
      return x_BLD + h.astype(x_BLD.dtype)
