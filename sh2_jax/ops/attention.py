"""Causal multi-head attention through jax.nn.dot_product_attention (cuDNN on GPU, XLA elsewhere)."""

import jax
import jax.numpy as jnp


def causal_attention(q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array) -> jax.Array:
  """Softmax(q k^T / sqrt(H), causal) v.

  Args:
    q_BLNH, k_BLNH, v_BLNH: [B, L, N, H] in one dtype.

  Returns:
    [B, L, N, H] in q's dtype. cuDNN is used on GPU for bf16/fp16 inputs, XLA otherwise.
  """
  implementation = None
  if jax.default_backend() != "gpu" or q_BLNH.dtype == jnp.float32:
    implementation = "xla"
  return jax.nn.dot_product_attention(q_BLNH, k_BLNH, v_BLNH, is_causal=True,
                                      implementation=implementation)
