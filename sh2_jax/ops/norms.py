"""RMSNorm as Evo 2 computes it: eps added to the RMS, outside the square root."""

import jax
import jax.numpy as jnp


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float = 1e-6) -> jax.Array:
  """y = scale * x / (sqrt(mean(x^2)) + eps), over the last axis, in float32.

  Args:
    x_BLD: [..., D] input of any float dtype.
    scale_D: [D] gain.
    eps: added to the RMS (not inside the sqrt; SPEC.md section 1).

  Returns:
    [..., D] in x's dtype.
  """
  x32 = x_BLD.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True))
  return (scale_D.astype(jnp.float32) * x32 / (rms + eps)).astype(x_BLD.dtype)
