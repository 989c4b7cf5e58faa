"""Rotary position embedding, non-interleaved (rotate_half) over the full head dimension."""

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """inv_freq[j] = base^(-2j / head_dim), j < head_dim / 2, float32."""
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates halves: [a0, a1] -> [a0 cos - a1 sin, a0 sin + a1 cos], angle = pos * inv_freq.

  Args:
    x_BLNH: [B, L, N, H] queries or keys.
    positions_BL: [B, L] (or [L]) integer positions.
    base: RoPE base.

  Returns:
    [B, L, N, H] in x's dtype; the rotation is computed in float32.
  """
  head_dim = x_BLNH.shape[-1]
  inv_freq = rope_frequencies(head_dim, base)
  positions = jnp.asarray(positions_BL, jnp.float32)
  if positions.ndim == 1:
    positions = positions[None, :]
  angle_BLh = positions[..., None] * inv_freq
  cos = jnp.cos(angle_BLh)[:, :, None, :]
  sin = jnp.sin(angle_BLh)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  a0, a1 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([a0 * cos - a1 * sin, a0 * sin + a1 * cos], axis=-1)
  return out.astype(x_BLNH.dtype)
