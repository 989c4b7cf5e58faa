"""Causal multi-head attention through jax.nn.dot_product_attention (cuDNN on GPU, XLA elsewhere)."""

import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)


def causal_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array) -> jax.Array:
  """Softmax(q k^T / sqrt(H), causal) v.

  Args:
    q_BLNH, k_BLNH, v_BLNH: [B, L, N, H] in one dtype.

  Returns:
    [B, L, N, H] in q's dtype. On GPU, bf16/fp16 inputs go to cuDNN; elsewhere the XLA path
    runs in float32 (XLA:CPU has no bf16 x bf16 -> f32 dot for some shapes).
  """
  if jax.default_backend() == "gpu" and q_BLNH.dtype in (jnp.bfloat16, jnp.float16):
    try:  # implementation=None would pick XLA, which materialises the [L, L] scores
      return jax.nn.dot_product_attention(q_BLNH, k_BLNH, v_BLNH, is_causal=True,
                                          implementation="cudnn")
    except Exception as error:  # noqa: BLE001 - cuDNN refuses some shapes at trace time
      logger.debug("cuDNN attention unavailable (%s); using XLA", error)
  upcast = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  out = jax.nn.dot_product_attention(upcast(q_BLNH), upcast(k_BLNH), upcast(v_BLNH),
                                     is_causal=True, implementation="xla")
  return out.astype(q_BLNH.dtype)
