"""Gated MLP y = (act(x W1) * (x W2)) W3, optionally in token slices to bound its memory."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def gated_mlp(x_BLD: jax.Array, w1_DF: jax.Array, w2_DF: jax.Array, w3_FD: jax.Array,
              act: Callable[[jax.Array], jax.Array], dtype: jnp.dtype) -> jax.Array:
  """[B, L, D] -> [B, L, D] in `dtype`; the weights are cast to `dtype` here."""
  x = x_BLD.astype(dtype)
  hidden_BLF = act(x @ w1_DF.astype(dtype)) * (x @ w2_DF.astype(dtype))
  return hidden_BLF @ w3_FD.astype(dtype)


def sliced_gated_mlp(x_BLD: jax.Array, w1_DF: jax.Array, w2_DF: jax.Array, w3_FD: jax.Array,
                     act: Callable[[jax.Array], jax.Array], dtype: jnp.dtype,
                     slices: int) -> jax.Array:
  """`gated_mlp` over `slices` token slices in turn, each under `jax.checkpoint`: the [*, F]
  hidden values of one slice at a time exist, forward and backward (the backward recomputes
  a slice's x W1 and x W2: about 2/9 more MLP FLOPs).

  Slice j holds tokens j, j + slices, j + 2 slices, ...: strided, not contiguous, so that a
  sequence sharded in contiguous blocks over a mesh axis keeps every slice sharded the same
  way (no communication). The weights enter each slice in their own dtype, so their gradients
  accumulate across slices in it (float32 master weights: float32 sums). An L that is not a
  multiple of `slices` runs in gcd(L, slices) slices (one token while decoding: unsliced).
  """
  batch, length, width = x_BLD.shape
  slices = math.gcd(length, slices)
  if slices <= 1:
    return gated_mlp(x_BLD, w1_DF, w2_DF, w3_FD, act, dtype)
  x_SBMD = jnp.moveaxis(x_BLD.astype(dtype).reshape(batch, length // slices, slices, width), 2, 0)

  @jax.checkpoint
  def one_slice(x_BMD: jax.Array) -> jax.Array:
    return gated_mlp(x_BMD, w1_DF, w2_DF, w3_FD, act, dtype)

  y_SBMD = jax.lax.map(one_slice, x_SBMD)
  return jnp.moveaxis(y_SBMD, 0, 2).reshape(batch, length, -1)
