"""Gated MLP: y = W3(act(W1 x) * (W2 x)), no biases."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.ops.mlp import sliced_gated_mlp

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "identity": lambda x: x,
    "silu": jax.nn.silu,
}


class GatedMLP(nn.Module):
  """Evo 2 MLP; the activation is per layer (GELU in layer 0 only under the "evo2" setting)."""
  config: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    d, f = cfg.d_model, cfg.ffn_dim
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    w1 = P.declare(self, "w1", P.normal(cfg.init_std), (d, f), ("embed", "mlp"), pdt)
    w2 = P.declare(self, "w2", P.normal(cfg.init_std), (d, f), ("embed", "mlp"), pdt)
    w3 = P.declare(self, "w3", P.normal(P.output_std(cfg.init_std, cfg.num_layers)), (f, d),
                   ("mlp", "embed"), pdt)
    act = ACTIVATIONS[cfg.activation(self.layer)]
    return sliced_gated_mlp(x_BLD, w1, w2, w3, act, dt, cfg.mlp_slices)
