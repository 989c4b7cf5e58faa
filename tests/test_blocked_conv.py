"""pallas_kernels.blocked_conv (two-stage blocked convolution, SPEC.md section 5) vs numpy.

References are float64 numpy: explicit H0/H1 loops, a naive causal convolution, and its
analytic VJP (itself checked against finite differences on a tiny case). The blocked code
computes in float32 by design, so float64 (x64) inputs get float32-level tolerances.
"""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blocked_conv
from tests.helpers import DTYPES, x64  # noqa: F401 - x64 is a fixture
from tests.helpers import assert_close as _assert_close
from tests.helpers import jax_vjp as _jax_vjp
from tests.helpers import random_array as _rand
from tests.helpers import seeded_rng as _rng

# (rtol, atol as a fraction of max |expected|) per input dtype.
TOL = {"float64": (2e-5, 2e-6), "float32": (5e-5, 5e-6), "bfloat16": (2e-2, 1e-2)}
GRAD_TOL = (1e-4, 1e-5)


pytestmark = pytest.mark.usefixtures("x64")


# ---------------------------------------------------------------------------------------------
# numpy float64 references
# ---------------------------------------------------------------------------------------------

def np_toeplitz_blocks(h_GK: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """H0[g, i, j] = h[g, i - j] (0 <= i - j < K), H1[g, i, j] = h[g, i - j + T] (< K)."""
  groups, taps = h_GK.shape
  h0 = np.zeros((groups, chunk, chunk))
  h1 = np.zeros((groups, chunk, chunk))
  for i in range(chunk):
    for j in range(chunk):
      if 0 <= i - j < taps:
        h0[:, i, j] = h_GK[:, i - j]
      if 0 <= i - j + chunk < taps:
        h1[:, i, j] = h_GK[:, i - j + chunk]
  return h0, h1


def np_causal_conv(x_BLC: np.ndarray, h_GK: np.ndarray) -> np.ndarray:
  """y[b, t, c] = sum_{k <= t} h[c // dg, k] x[b, t - k, c] (explicit double loop)."""
  _, length, channels = x_BLC.shape
  groups, taps = h_GK.shape
  dg = channels // groups
  y = np.zeros_like(x_BLC)
  for t in range(length):
    for k in range(min(taps, t + 1)):
      y[:, t] += np.repeat(h_GK[:, k], dg) * x_BLC[:, t - k]
  return y


def np_causal_conv_vjp(x_BLC: np.ndarray, h_GK: np.ndarray,
                       g_BLC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(dx, dh) of sum(g * conv(x, h)): dx[s] = sum_k h[k] g[s + k]; dh[k] = sum_t g[t] x[t - k]."""
  _, length, channels = x_BLC.shape
  groups, taps = h_GK.shape
  h_CK = np.repeat(h_GK, channels // groups, axis=0)
  dx = np.zeros_like(x_BLC)
  dh_CK = np.zeros((channels, taps))
  for k in range(min(taps, length)):
    dx[:, :length - k] += h_CK[:, k] * g_BLC[:, k:]
    dh_CK[:, k] = np.sum(g_BLC[:, k:] * x_BLC[:, :length - k], axis=(0, 1))
  return dx, dh_CK.reshape(groups, channels // groups, taps).sum(1)


def np_gate_conv_gate(post, pre, v, h_GK, dskip):
  u = pre * v
  y = np_causal_conv(u, h_GK) + (0.0 if dskip is None else dskip * u)
  return post * y


# ---------------------------------------------------------------------------------------------
# Toeplitz stages
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,taps,chunk", [(1, 1, 4), (2, 3, 8), (3, 8, 8), (2, 7, 16),
                                               (1, 128, 128)])
def test_toeplitz_blocks(groups, taps, chunk):
  rng = _rng("toeplitz", groups, taps, chunk)
  h = rng.standard_normal((groups, taps))
  h0, h1 = blocked_conv.toeplitz_blocks(jnp.asarray(h), chunk)
  h0_ref, h1_ref = np_toeplitz_blocks(h, chunk)
  assert h0.shape == h1.shape == (groups, chunk, chunk)
  np.testing.assert_array_equal(np.asarray(h0), h0_ref)
  np.testing.assert_array_equal(np.asarray(h1), h1_ref)


def test_reference_stages_reproduce_naive_conv():
  """The SPEC's Y_n = H0 X_n + H1 X_(n-1) with the numpy H0/H1 equals the naive convolution."""
  rng = _rng("stages")
  chunk, taps, length = 8, 6, 29
  h = rng.standard_normal((1, taps))
  x = rng.standard_normal((length, 1))
  h0, h1 = np_toeplitz_blocks(h, chunk)
  padded = np.zeros((-(-length // chunk) * chunk, 1))
  padded[:length] = x
  blocks = padded.reshape(-1, chunk)
  y = [h0[0] @ blocks[n] + (h1[0] @ blocks[n - 1] if n else 0.0) for n in range(len(blocks))]
  np.testing.assert_allclose(np.concatenate(y)[:length], np_causal_conv(x[None], h)[0, :, 0],
                             atol=1e-12)


def test_reference_vjp_matches_finite_differences():
  rng = _rng("ref_vjp")
  x, h, g = rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 3)), rng.standard_normal((2, 6, 4))
  dx, dh = np_causal_conv_vjp(x, h, g)
  eps = 1e-6
  for arr, grad, f in ((x, dx, lambda a: np.sum(g * np_causal_conv(a, h))),
                       (h, dh, lambda a: np.sum(g * np_causal_conv(x, a)))):
    fd = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
      ap, am = arr.copy(), arr.copy()
      ap[idx] += eps
      am[idx] -= eps
      fd[idx] = (f(ap) - f(am)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Blocked convolution and gate-conv-gate
# ---------------------------------------------------------------------------------------------

# (batch, length, channels, groups, taps, chunk)
CASES = [
    (1, 1, 4, 1, 3, 16),       # L = 1
    (2, 5, 6, 3, 7, 16),       # L < chunk, B > 1
    (2, 64, 4, 2, 16, 16),     # K == chunk, L = 4 chunks
    (1, 65, 4, 4, 16, 16),     # K == chunk, L = 4 chunks + 1, depthwise
    (1, 33, 8, 2, 1, 16),      # K == 1 (pure scaling), L = 2 chunks + 1
    (2, 130, 8, 1, 7, 64),     # one group, L not a multiple of the chunk
    (1, 300, 4, 2, 128, 128),  # MR: 128 taps with chunk 128
    (1, 96, 6, 3, 5, 32),      # L = 3 chunks
]
IDS = ["-".join(map(str, c)) for c in CASES]


def _inputs(case, dtype, tag):
  batch, length, channels, groups, taps, _ = case
  rng = _rng(tag, case, dtype)
  x, x64 = _rand(rng, (batch, length, channels), dtype)
  h, h64 = _rand(rng, (groups, taps), dtype, 1 / np.sqrt(taps))
  return rng, x, x64, h, h64


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_blocked_causal_conv(case, dtype):
  _, x, x64, h, h64 = _inputs(case, dtype, "blocked")
  out = blocked_conv.blocked_causal_conv(x, h, chunk=case[5])
  assert out.dtype == x.dtype and out.shape == x.shape
  _assert_close(out, np_causal_conv(x64, h64), TOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_blocked_causal_conv_grads(case):
  rng, x, x64, h, h64 = _inputs(case, "float64", "blocked_grad")
  cot = rng.standard_normal(x.shape)
  dx, dh = _jax_vjp(lambda a, b: blocked_conv.blocked_causal_conv(a, b, chunk=case[5]), (x, h),
                    cot, (0, 1))
  dx_ref, dh_ref = np_causal_conv_vjp(x64, h64, cot)
  _assert_close(dx, dx_ref, GRAD_TOL, err_msg="dx")
  _assert_close(dh, dh_ref, GRAD_TOL, err_msg="dh")


def _gate_inputs(case, dtype, with_dskip, tag):
  batch, length, channels, groups, taps, _ = case
  rng = _rng(tag, case, dtype, with_dskip)
  shape = (batch, length, channels)
  (post, post64), (pre, pre64), (v, v64) = (_rand(rng, shape, dtype) for _ in range(3))
  h, h64 = _rand(rng, (groups, taps), dtype, 1 / np.sqrt(taps))
  dskip, dskip64 = _rand(rng, (channels,), dtype) if with_dskip else (None, None)
  return rng, (post, pre, v, h, dskip), (post64, pre64, v64, h64, dskip64)


GATE_DTYPE_CASES = ([(c, "float64", s) for c in CASES for s in (True, False)]
                    + [(CASES[i], d, True) for i in (1, 6) for d in ("float32", "bfloat16")])


@pytest.mark.parametrize("case,dtype,with_dskip", GATE_DTYPE_CASES,
                         ids=[f"{'-'.join(map(str, c))}-{d}-{s}" for c, d, s in GATE_DTYPE_CASES])
def test_gate_conv_gate(case, dtype, with_dskip):
  _, args, args64 = _gate_inputs(case, dtype, with_dskip, "gcg")
  out = blocked_conv.gate_conv_gate(*args, chunk=case[5])
  assert out.dtype == DTYPES[dtype]
  _assert_close(out, np_gate_conv_gate(*args64), TOL[dtype])


def test_gate_conv_gate_default_has_no_skip():
  _, args, args64 = _gate_inputs(CASES[1], "float64", False, "gcg_default")
  _assert_close(blocked_conv.gate_conv_gate(*args[:4], chunk=16), np_gate_conv_gate(*args64),
                TOL["float64"])


@pytest.mark.parametrize("with_dskip", [True, False])
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3, 5, 6)], ids=[IDS[i] for i in (1, 3, 5, 6)])
def test_gate_conv_gate_grads(case, with_dskip):
  rng, args, args64 = _gate_inputs(case, "float64", with_dskip, "gcg_grad")
  cot = rng.standard_normal(args[0].shape)
  argnums = (0, 1, 2, 3, 4) if with_dskip else (0, 1, 2, 3)
  grads = _jax_vjp(lambda *a: blocked_conv.gate_conv_gate(*a, chunk=case[5]), args, cot, argnums)
  post, pre, v, h, dskip = args64
  u = pre * v
  y = np_causal_conv(u, h) + (0.0 if dskip is None else dskip * u)
  g_y = cot * post
  du, dh = np_causal_conv_vjp(u, h, g_y)
  if dskip is not None:
    du = du + dskip * g_y
  expected = [cot * y, du * v, du * pre, dh]
  if dskip is not None:
    expected.append(np.sum(g_y * u, axis=(0, 1)))
  for name, grad, ref in zip(("post", "pre", "v", "h", "dskip"), grads, expected):
    _assert_close(grad, ref, GRAD_TOL, err_msg=f"d{name}")


# ---------------------------------------------------------------------------------------------
# Errors and independence
# ---------------------------------------------------------------------------------------------

def test_filter_longer_than_chunk_is_refused():
  x, h = jnp.ones((1, 40, 4)), jnp.ones((2, 17))
  with pytest.raises(ValueError, match="chunk"):
    blocked_conv.toeplitz_blocks(h, 16)
  with pytest.raises(ValueError, match="chunk"):
    blocked_conv.blocked_causal_conv(x, h, chunk=16)
  with pytest.raises(ValueError, match="chunk"):
    blocked_conv.gate_conv_gate(x, x, x, h, None, chunk=16)


def test_channels_not_divisible_by_groups_is_refused():
  x, h = jnp.ones((1, 40, 10)), jnp.ones((4, 3))
  with pytest.raises(ValueError, match="divisible"):
    blocked_conv.blocked_causal_conv(x, h, chunk=16)
  with pytest.raises(ValueError, match="divisible"):
    blocked_conv.gate_conv_gate(x, x, x, h, jnp.ones(10), chunk=16)


def test_pallas_kernels_does_not_import_sh2_jax():
  code = ("import pallas_kernels, sys; "
          "bad = [m for m in sys.modules if m.startswith('sh2_jax')]; "
          "assert not bad, bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
