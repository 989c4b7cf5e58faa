"""Pallas gate-conv-gate kernels (pallas_kernels/blocked_conv.py) in interpret mode vs a
float64 numpy reference (output and all five gradients), poisoning, fallbacks, and lowering
for CUDA on a CPU-only machine (Triton block-shape errors fail here, not on the GPU).

Interpret mode fills every output buffer with NaN before the kernel runs (jax's
hlo_interpreter `uninitialized_value`), so an unwritten tile shows as NaN and fails the
comparisons; test_unwritten_tile_is_caught proves that for both kernels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import blocked_conv as bc
from tests import helpers

# Relative L2 error ||kernel - reference|| / ||reference||, per I/O dtype.
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}


def _reference_f64(post, pre, v, h, dskip, cotangent):
  """Output and gradients by a loop over taps in float64: y[t] = sum_k h[k] u[t - k]."""
  post, pre, v, h, dskip, ct = (np.asarray(x, np.float64)
                                for x in (post, pre, v, h, dskip, cotangent))
  batch, length, channels = v.shape
  groups, num_taps = h.shape
  h_KC = np.repeat(h, channels // groups, axis=0).T  # [K, C]
  u = pre * v
  y = dskip * u
  for k in range(min(num_taps, length)):
    y[:, k:] += h_KC[k] * u[:, :length - k]
  out = post * y
  g = ct * post
  du = dskip * g
  dh_KC = np.zeros((num_taps, channels))
  for k in range(min(num_taps, length)):
    du[:, :length - k] += h_KC[k] * g[:, k:]
    dh_KC[k] = np.einsum("blc,blc->c", g[:, k:], u[:, :length - k])
  dh = dh_KC.T.reshape(groups, channels // groups, num_taps).sum(1)
  return out, (ct * y, du * v, du * pre, dh, np.einsum("blc,blc->c", g, u))


def _inputs(seed, batch, length, channels, groups, taps, dtype):
  rng = np.random.default_rng(seed)
  gates = [rng.standard_normal((batch, length, channels)).astype(np.float32) for _ in range(4)]
  post, pre, v, ct = (jnp.asarray(x, dtype) for x in gates)
  h = jnp.asarray(rng.standard_normal((groups, taps)) / np.sqrt(taps), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  return post, pre, v, h, dskip, ct


def _rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got)), "non-finite values (unwritten, NaN-poisoned tile?)"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check_against_reference(args, block_sizes, dtype, with_dskip=True):
  post, pre, v, h, dskip, ct = args
  kernel = functools.partial(bc.gate_conv_gate_pallas, block_sizes=block_sizes, interpret=True)
  if with_dskip:
    out, vjp = jax.vjp(kernel, post, pre, v, h, dskip)
  else:
    out, vjp = jax.vjp(lambda a, b, c, d: kernel(a, b, c, d, None), post, pre, v, h)
    dskip = jnp.zeros_like(dskip)
  grads = vjp(ct)
  want_out, want_grads = _reference_f64(post, pre, v, h, dskip, ct)
  assert out.dtype == v.dtype
  names = ["dpost", "dpre", "dv", "dh", "ddskip"][:len(grads)]
  errs = {"out": _rel_err(out, want_out)}
  errs.update({n: _rel_err(g, w) for n, g, w in zip(names, grads, want_grads)})
  assert max(errs.values()) < TOLERANCE[dtype], errs


CASES = [
    # (batch, length, channels, groups, taps, dtype, block sizes): L not a multiple of T in
    # most; one group and many; B > 1; K = 3, 7, 128 with T = 128.
    (1, 300, 32, 1, 3, jnp.float32, bc.BlockSizes(chunk=128)),
    (2, 200, 64, 4, 7, jnp.bfloat16, bc.BlockSizes(chunk=128)),
    (2, 200, 64, 4, 7, jnp.float32, bc.BlockSizes(chunk=128, bwd_transpose_by_dot=False)),
    (1, 260, 32, 2, 128, jnp.float32, bc.BlockSizes(chunk=128)),
    (2, 150, 32, 1, 128, jnp.bfloat16, bc.BlockSizes(chunk=128)),
    # Heuristic block sizes (T = 64 for K <= 64): 4 groups of 16.
    (1, 300, 64, 4, 7, jnp.bfloat16, None),
    # Several programs along L (segments) and along one group (dc = 16 < dg = 32).
    (1, 256, 64, 2, 16, jnp.float32, bc.BlockSizes(chunk=32, block_c=16, num_segments_fwd=4,
                                                    num_segments_bwd=2)),
    (2, 224, 32, 1, 32, jnp.float32, bc.BlockSizes(chunk=32, num_segments_fwd=7,
                                                    num_segments_bwd=7,
                                                    bwd_transpose_by_dot=True)),
    # The filter gradient by XLA (bwd_dh_in_kernel=False): T = 128 with K = 7 and 128, one
    # group and many, segments along L.
    (2, 200, 64, 4, 7, jnp.bfloat16, bc.BlockSizes(chunk=128, bwd_dh_in_kernel=False)),
    (1, 260, 32, 2, 128, jnp.float32, bc.BlockSizes(chunk=128, bwd_dh_in_kernel=False)),
    (2, 224, 32, 1, 32, jnp.float32, bc.BlockSizes(chunk=32, num_segments_bwd=7,
                                                    bwd_dh_in_kernel=False)),
]


@pytest.mark.parametrize("batch,length,channels,groups,taps,dtype,block_sizes", CASES)
def test_matches_float64_reference(batch, length, channels, groups, taps, dtype, block_sizes):
  seed = hash((batch, length, channels, groups, taps, str(dtype))) % 2**31
  args = _inputs(seed, batch, length, channels, groups, taps, dtype)
  _check_against_reference(args, block_sizes, dtype)


@pytest.mark.parametrize("dh_in_kernel", [True, False])
def test_projected_op_matches_float64_reference(dh_in_kernel):
  """gate_conv_gate_proj_pallas (the backward kernel also writes the gate output for dW_out),
  with the filter gradient in the kernel or by XLA: output and all six gradients against the
  float64 reference, the projection applied in float64."""
  post, pre, v, h, dskip, _ = _inputs(11, 2, 150, 32, 2, 16, jnp.float32)
  rng = np.random.default_rng(12)
  w_out = jnp.asarray(rng.standard_normal((32, 24)) / np.sqrt(32), jnp.float32)
  ct_E = jnp.asarray(rng.standard_normal((2, 150, 24)), jnp.float32)
  kernel = functools.partial(bc.gate_conv_gate_proj_pallas, interpret=True,
                             block_sizes=bc.BlockSizes(chunk=32, bwd_dh_in_kernel=dh_in_kernel))
  out, vjp = jax.vjp(kernel, post, pre, v, h, dskip, w_out)
  grads = vjp(ct_E)
  w64 = np.asarray(w_out, np.float64)
  ct_C = np.asarray(ct_E, np.float64) @ w64.T
  gate_out, want_grads = _reference_f64(post, pre, v, h, dskip, ct_C)
  want_dw = np.einsum("blc,ble->ce", gate_out, np.asarray(ct_E, np.float64))
  errs = {"out": _rel_err(out, gate_out @ w64), "dw_out": _rel_err(grads[5], want_dw)}
  errs.update({n: _rel_err(g, w) for n, g, w in zip(["dpost", "dpre", "dv", "dh", "ddskip"],
                                                      grads[:5], want_grads)})
  assert max(errs.values()) < TOLERANCE[jnp.float32], errs


def test_without_dskip():
  args = _inputs(7, 1, 140, 32, 2, 7, jnp.float32)
  _check_against_reference(args, bc.BlockSizes(chunk=32), jnp.float32, with_dskip=False)


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_unwritten_tile_is_caught(monkeypatch, which):
  """A kernel that leaves one tile unwritten must fail the reference comparison."""
  name = "_gcg_fwd_kernel" if which == "fwd" else "_gcg_bwd_kernel"
  monkeypatch.setattr(bc, name, helpers.skip_one_program(getattr(bc, name), bc, (0, 1, 0)))
  jax.clear_caches()  # no trace of the intact kernel may be reused, and none of this kept
  try:
    args = _inputs(3, 1, 96, 32, 1, 5, jnp.float32)
    with pytest.raises(AssertionError, match="non-finite"):
      _check_against_reference(args, bc.BlockSizes(chunk=32, block_c=16), jnp.float32)
  finally:
    jax.clear_caches()


def _lower_for_cuda(fn, *shapes):
  return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype,taps,block_sizes", [
    (jnp.bfloat16, 7, None),
    (jnp.bfloat16, 128, None),
    (jnp.float32, 128, None),
    (jnp.bfloat16, 128, bc.BlockSizes(bwd_transpose_by_dot=False)),
    (jnp.bfloat16, 128, bc.BlockSizes(bwd_dh_in_kernel=False)),
    (jnp.bfloat16, 3, bc.BlockSizes(chunk=32, block_c=32, num_segments_fwd=5)),
])
def test_lowers_for_cuda(dtype, taps, block_sizes):
  """The Triton lowering (power-of-two shapes etc.) runs for both kernels on a CPU machine."""
  batch, length, channels, groups = 2, 4000, 512, 8
  x = jax.ShapeDtypeStruct((batch, length, channels), dtype)
  h = jax.ShapeDtypeStruct((groups, taps), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  kernel = functools.partial(bc.gate_conv_gate_pallas, block_sizes=block_sizes)
  fwd_text = _lower_for_cuda(kernel, x, x, x, h, dskip)
  assert fwd_text.count("__gpu$xla.gpu.triton") == 1 and "gate_conv_gate_fwd" in fwd_text

  def fwd_bwd(post, pre, v, h, dskip, ct):
    out, vjp = jax.vjp(kernel, post, pre, v, h, dskip)
    return out, vjp(ct)

  text = _lower_for_cuda(fwd_bwd, x, x, x, h, dskip, x)
  assert "gate_conv_gate_fwd" in text and "gate_conv_gate_bwd" in text


def test_cuda_lowering_catches_bad_block_shapes():
  """The CPU lowering check is not vacuous: a non-power-of-two tile is rejected."""

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def fn(x):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((12, 12), jnp.float32),
                          compiler_params=plgpu.CompilerParams())(x)

  with pytest.raises(ValueError, match="power of 2"):
    _lower_for_cuda(fn, jax.ShapeDtypeStruct((12, 12), jnp.float32))


def test_unsupported_shapes_raise_and_auto_falls_back():
  args = _inputs(5, 1, 70, 32, 4, 7, jnp.float32)  # group width 8 < 16
  post, pre, v, h, dskip, _ = args
  assert "group width" in bc.unsupported_reason(v.shape, h.shape)
  with pytest.raises(ValueError, match="group width"):
    bc.gate_conv_gate_pallas(post, pre, v, h, dskip, interpret=True)
  want = bc.gate_conv_gate(post, pre, v, h, dskip)
  np.testing.assert_array_equal(bc.gate_conv_gate_auto(post, pre, v, h, dskip), want)
  assert "filter length" in bc.unsupported_reason((1, 70, 32), (1, 200))
  assert "must divide" in bc.unsupported_reason(
      (1, 256, 32), (1, 7), bc.BlockSizes(chunk=64, num_segments_fwd=3))


def test_auto_uses_reference_off_gpu():
  args = _inputs(6, 1, 90, 32, 1, 7, jnp.float32)
  post, pre, v, h, dskip, _ = args
  assert jax.default_backend() != "gpu"
  np.testing.assert_array_equal(bc.gate_conv_gate_auto(post, pre, v, h, dskip, chunk=32),
                                bc.gate_conv_gate(post, pre, v, h, dskip, chunk=32))


def test_block_sizes_heuristics():
  resolved = bc._resolve(bc.BlockSizes.get_default(), (1, 16384, 4096), (256, 128),
                         jnp.bfloat16)
  assert resolved.chunk == 128 and resolved.block_c == 16
  assert (16384 // 128) % resolved.num_segments_fwd == 0
  assert None not in [getattr(resolved, f) for f in resolved.__dataclass_fields__]
  assert bc._resolve(None, (1, 4096, 4096), (256, 7), jnp.bfloat16).chunk == 64
  assert bc._resolve(None, (2, 512, 256), (2, 128), jnp.float32).bwd_transpose_by_dot
