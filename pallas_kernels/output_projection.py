"""A gate kernel followed by its output projection, with the gate output taken from the backward.

A Hyena mixer ends in out = y @ W_out, y the gate-conv-gate kernel's output. Autodiff of that
product needs y for dW_out = y^T dout, so a training step that rematerialises the block
(anything but saving every kernel output) reruns the forward kernel in the backward pass just
to produce y. The gate kernels' backward computes the convolution of pre * v anyway (for
dpost = dy * conv), so it can also write y = post * (conv + skip) at the cost of one store per
element. `project_output` wires that: its backward computes dy = dout @ W_out^T, runs the
kernel backward that also returns y, then dW_out = y^T dout; the forward kernel is never
rerun when the operator's residuals are the block's saved values (inputs, matrix products).
This module depends on jax only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# forward(operands) -> (y [B, L, C], residuals); backward(residuals, dy) -> (y, operand grads).
Forward = Callable[[tuple], tuple[jax.Array, Any]]
Backward = Callable[[Any, jax.Array], tuple[jax.Array, tuple]]


def _project(y_BLC: jax.Array, w_out_CE: jax.Array) -> jax.Array:
  # The product is written in y's dtype (float32 accumulation inside the GEMM): a float32
  # result and a separate rounding pass cost 0.22 ms a step over 21 Hyena layers at evo2-1b,
  # L = 8K (H200 profile, 2026-12-06).
  return jnp.einsum("blc,ce->ble", y_BLC, w_out_CE.astype(y_BLC.dtype),
                    preferred_element_type=y_BLC.dtype)


# Checkpoint name of W_out cast to y's dtype (a W_out in another dtype only). A remat policy
# that saves it keeps the rematerialised block from recomputing it: the recomputation reruns
# the jitted operator with the forward kernel left in its jaxpr, which XLA alone may prune.
WEIGHT_VIEW = "output_projection_weight_view"


def _weight_view(w_out_CE: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """W_out in the products' dtype. The barrier keeps the one cast for both products: without
  it XLA folds the cast into the forward GEMM (a Triton fusion, slower than cuBLAS, whose bias
  epilogue it then loses) and casts again for dy in the backward."""
  if w_out_CE.dtype == dtype:
    return w_out_CE
  return checkpoint_name(jax.lax.optimization_barrier(w_out_CE.astype(dtype)), WEIGHT_VIEW)


# w_view: W_out in y's dtype (W_out itself where the dtypes agree), an input so that it is a
# residual computed before the forward rule. Its cotangent is None; W_out's comes whole.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _projected(forward: Forward, backward: Backward, w_dtype: jnp.dtype, operands: tuple,
               w_out_CE: jax.Array, w_view_CE: jax.Array):
  return _project(forward(operands)[0], w_view_CE)


def _projected_fwd(forward, backward, w_dtype, operands, w_out_CE, w_view_CE):
  y_BLC, residuals = forward(operands)
  if y_BLC.dtype != w_view_CE.dtype:
    raise ValueError(f"project_output: the kernel's output is {y_BLC.dtype}, not the dtype of "
                     f"operands[0] ({w_view_CE.dtype}) that W_out was cast to")
  return _project(y_BLC, w_view_CE), (residuals, w_view_CE)


def _projected_bwd(forward, backward, w_dtype, saved, dout_BLE):
  residuals, w_view_CE = saved
  dy_BLC = jnp.einsum("ble,ce->blc", dout_BLE, w_view_CE.astype(dout_BLE.dtype),
                      preferred_element_type=jnp.float32).astype(dout_BLE.dtype)
  y_BLC, operand_grads = backward(residuals, dy_BLC)
  # accumulated in float32 and written in W_out's dtype by the GEMM: a float32 W_out gets its
  # gradient without a rounding to y's dtype and without a conversion pass
  dw_out_CE = jnp.einsum("blc,ble->ce", y_BLC, dout_BLE.astype(y_BLC.dtype),
                         preferred_element_type=jnp.float32)
  return operand_grads, dw_out_CE.astype(w_dtype), None


_projected.defvjp(_projected_fwd, _projected_bwd)


def project_output(forward: Forward, backward: Backward, operands: tuple,
                   w_out_CE: jax.Array) -> jax.Array:
  """forward(operands)[0] @ w_out, differentiable, y for dW_out from `backward`.

  Args:
    forward: operands -> (y [B, L, C], residuals for backward); y in the I/O dtype, that of
      operands[0].
    backward: (residuals, dy [B, L, C] in y's dtype) -> (y recomputed by the backward kernel,
      cotangents of `operands`, one per operand with its shape and dtype).
    operands: tuple of arrays, the kernel's differentiable inputs.
    w_out_CE: [C, E] projection in any float dtype (float32 master weights included): cast
      once to y's dtype for both products (float32 accumulation; the cast named WEIGHT_VIEW);
      its gradient comes in its own dtype straight from the float32 accumulation.

  Returns:
    [B, L, E] in y's dtype. forward and backward must be hashable (functions or
    functools.partial of hashable arguments): they are static to the custom_vjp.
  """
  operands = tuple(operands)
  return _projected(forward, backward, jnp.dtype(w_out_CE.dtype), operands, w_out_CE,
                    _weight_view(w_out_CE, operands[0].dtype))
