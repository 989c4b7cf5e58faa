"""RMSNorm module (scale initialised to 1)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sh2_jax.layers import params as P
from sh2_jax.ops.norms import rms_norm


class RMSNorm(nn.Module):
  """[..., D] -> [..., D] in out_dtype (None: x's dtype); computed in float32."""
  eps: float = 1e-6
  param_dtype: str = "float32"
  out_dtype: str | None = None

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    scale = P.declare(self, "scale", P.constant(1.0), (x_BLD.shape[-1],), ("norm",),
                      jnp.dtype(self.param_dtype))
    y = rms_norm(x_BLD, scale, self.eps)
    return y if self.out_dtype is None else y.astype(self.out_dtype)
