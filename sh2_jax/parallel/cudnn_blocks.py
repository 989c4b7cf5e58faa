"""cuDNN flash attention for the blocks of a sharded causal attention (GPU only).

Context-parallel attention combines, per query block, key blocks that lie wholly before it
(no mask) and the block on its own positions (causal, aligned top-left), through the
log-sum-exp. jax's public cuDNN API cannot do this with gradients (it drops the lse
cotangent), but FlashAttention-2's identity makes a block's gradients its backward run with
the FINAL output and lse of its queries, and jax's private cuDNN primitives take exactly
those. This module wraps them:

- `block_forward(q, k, v, causal, scale)` -> (o [B, T, N, H] in q's dtype, lse [B, N, T] f32);
- `block_backward(q, k, v, out, lse, d_out, causal, scale)` -> (dq, dk, dv) in q's dtype,
  with out and lse the final (combined) ones of the queries.

`experiments/check_cudnn_blocks.py` checks the contract on a GPU (two blocks combined by lse
against full causal cuDNN attention, values and gradients). Inside a fully manual shard_map
the primitives lower straight to the cuDNN custom calls (custom_partitioning inlines there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128


def _private():
  from jax._src.cudnn import fused_attention_stablehlo as fas
  return fas


@functools.cache
def unavailable_reason() -> str | None:
  """Why this process cannot run the cuDNN blocks (None when it can)."""
  if jax.default_backend() != "gpu":
    return f"cuDNN attention needs a CUDA GPU (backend is {jax.default_backend()})"
  try:
    fas = _private()
    version = fas.check_cudnn_version()
    fas._dot_product_attention_bwd_p_wrapper  # noqa: B018 - the private backward must exist
  except (ImportError, AttributeError, RuntimeError) as error:
    return f"jax {jax.__version__} has no usable private cuDNN attention ({error})"
  if version < 8904:
    return f"cuDNN {version} is older than the 8.9.4 that flash attention needs"
  if not fas.check_compute_capability("8.0"):
    return "cuDNN flash attention needs compute capability 8.0 or newer"
  return None


def unsupported_reason(dtype: jnp.dtype, head_dim: int) -> str | None:
  """Why cuDNN cannot take blocks of this dtype / head size (None when it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    return f"cuDNN attention takes bfloat16 or float16, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > MAX_HEAD_DIM:
    return f"cuDNN attention needs a head size that is a multiple of 8 up to {MAX_HEAD_DIM}"
  return unavailable_reason()


def _mask(causal: bool):
  fas = _private()
  return fas.MaskType.CAUSAL if causal else fas.MaskType.NO_MASK


def block_forward(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, causal: bool,
                  scale: float) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, N, H] in q's dtype, lse [B, N, T] float32, natural log) of one block.

  causal: query i sees key j iff j <= i (T == S: the block on the queries' own positions).
  """
  out, lse = _private().dot_product_attention(
      q_BTNH, k_BSNH, v_BSNH, scale=scale, mask_type=_mask(causal), qkv_layout="BTNH",
      return_residual=True)
  return out, lse.astype(jnp.float32)


def block_backward(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, out_BTNH: jax.Array,
                   lse_BNT: jax.Array, d_out_BTNH: jax.Array, causal: bool,
                   scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) of one block in q's dtype, given the queries' FINAL output and lse."""
  fas = _private()
  unused = jnp.zeros(0, dtype=q_BTNH.dtype)
  grads = fas._dot_product_attention_bwd_p_wrapper.bind(
      q_BTNH, k_BSNH, v_BSNH, unused, unused, unused, unused, unused, unused, unused,
      lse_BNT.astype(jnp.float32), out_BTNH.astype(q_BTNH.dtype), d_out_BTNH.astype(q_BTNH.dtype),
      scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False),
      mask_type=_mask(causal), layout=fas.AttentionLayout.BTNH.value,
      sliding_window_length=None)
  return grads[0], grads[1], grads[2]
