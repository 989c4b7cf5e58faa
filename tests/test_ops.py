"""sh2_jax.ops (norms, rotary, attention, conv, filters, hyena) vs float64 numpy references.

Every reference below is written from SPEC.md sections 1-5 with numpy only (explicit loops or
direct formulas); none calls the code under test. Gradients are checked as the VJP of a random
linear functional sum(out * cotangent): jax.grad against the reference's analytic VJP, which is
itself checked against central finite differences on tiny shapes.

The ops compute in float32 by design (SPEC.md: gates, FFT convs and LI math in fp32), so the
float64 (x64) cases check against float32-level tolerances, not 1e-9.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax.ops import attention, bias, conv, filters, hyena, norms, rotary
from tests.helpers import DTYPES, x64  # noqa: F401 - x64 is a fixture
from tests.helpers import assert_close as _assert_close
from tests.helpers import jax_vjp as _jax_vjp
from tests.helpers import random_array as _rand
from tests.helpers import np_causal_conv
from tests.helpers import seeded_rng as _rng

# (rtol, atol as a fraction of max |expected|) per input dtype.
TOL = {"float64": (2e-5, 2e-6), "float32": (5e-5, 5e-6), "bfloat16": (2e-2, 1e-2)}
GRAD_TOL = {"float64": (1e-4, 1e-5), "float32": (1e-4, 2e-5)}


pytestmark = pytest.mark.usefixtures("x64")


def _fd_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Central finite difference of a scalar float64 function, every entry of x."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


# ---------------------------------------------------------------------------------------------
# numpy float64 references
# ---------------------------------------------------------------------------------------------

def np_rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  return scale * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)


def np_rope(x_BLNH: np.ndarray, positions_BL: np.ndarray, base: float) -> np.ndarray:
  """Rotates each pair (j, j + H/2) by the angle pos * base^(-2j/H), one 2x2 matrix at a time."""
  batch, length, _, head_dim = x_BLNH.shape
  half = head_dim // 2
  out = np.empty_like(x_BLNH)
  for b in range(batch):
    for t in range(length):
      for j in range(half):
        theta = positions_BL[b, t] * base ** (-2.0 * j / head_dim)
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        pair = np.stack([x_BLNH[b, t, :, j], x_BLNH[b, t, :, j + half]])  # [2, N]
        out[b, t, :, j], out[b, t, :, j + half] = rot @ pair
  return out


def np_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  head_dim, length = q.shape[-1], q.shape[1]
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(head_dim)
  mask = np.tril(np.ones((length, length), bool))
  scores = np.where(mask, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", weights, v)


def np_causal_conv_vjp(x_BLC: np.ndarray, h_GK: np.ndarray,
                       g_BLC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(dx, dh) of sum(g * conv(x, h)):
  dx[b, s, c] = sum_k h[c // dg, k] g[b, s + k, c],
  dh[j, k] = sum over b, t >= k and channels c of group j of g[b, t, c] x[b, t - k, c]."""
  _, length, channels = x_BLC.shape
  groups, taps = h_GK.shape
  h_CK = np.repeat(h_GK, channels // groups, axis=0)
  dx = np.zeros_like(x_BLC)
  for s in range(length):
    n = min(taps, length - s)
    dx[:, s] = np.einsum("bkc,ck->bc", g_BLC[:, s:s + n], h_CK[:, :n])
  dh_CK = np.zeros((channels, taps))
  for k in range(min(taps, length)):
    dh_CK[:, k] = np.sum(g_BLC[:, k:] * x_BLC[:, :length - k], axis=(0, 1))
  return dx, dh_CK.reshape(groups, channels // groups, taps).sum(1)


def np_modal_filter(log_poles_CN: np.ndarray, residues_CN: np.ndarray, length: int) -> np.ndarray:
  t = np.arange(length, dtype=np.float64)
  return np.einsum("cn,cnt->ct", residues_CN, np.exp(log_poles_CN[:, :, None] * t))


def np_modal_filter_vjp(log_poles_CN: np.ndarray, residues_CN: np.ndarray,
                        g_CL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(d log_poles, d residues) of sum(g * h): dh/dR = e^(a t), dh/da = R t e^(a t)."""
  t = np.arange(g_CL.shape[-1], dtype=np.float64)
  modes_CNL = np.exp(log_poles_CN[:, :, None] * t)
  d_res = np.einsum("cl,cnl->cn", g_CL, modes_CNL)
  d_log = residues_CN * np.einsum("cl,cnl->cn", g_CL, modes_CNL * t)
  return d_log, d_res


def np_modal_recurrence(u_BLC: np.ndarray, log_poles_CN: np.ndarray, residues_CN: np.ndarray,
                        state_BCN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """s_t = pole * s_(t-1) + u_t per pole, y_t = sum_n R_n s_t,n."""
  poles = np.exp(log_poles_CN)
  state = state_BCN.copy()
  y = np.zeros_like(u_BLC)
  for t in range(u_BLC.shape[1]):
    state = poles * state + u_BLC[:, t, :, None]
    y[:, t] = np.einsum("bcn,cn->bc", state, residues_CN)
  return y, state


def np_gate_conv_gate(post, pre, v, h_GK, dskip):
  u = pre * v
  y = np_causal_conv(u, h_GK)
  if dskip is not None:
    y = y + dskip * u
  return post * y


def np_gate_conv_gate_vjp(post, pre, v, h_GK, dskip, g):
  """(dpost, dpre, dv, dh, ddskip) of sum(g * post * (conv(pre v, h) + dskip pre v))."""
  u = pre * v
  y = np_causal_conv(u, h_GK) + (0.0 if dskip is None else dskip * u)
  g_y = g * post
  du, dh = np_causal_conv_vjp(u, h_GK, g_y)
  if dskip is not None:
    du = du + dskip * g_y
  ddskip = None if dskip is None else np.sum(g_y * u, axis=(0, 1))
  return g * y, du * v, du * pre, dh, ddskip


# ---------------------------------------------------------------------------------------------
# The references' own VJPs against finite differences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,length,channels,groups,taps", [(1, 4, 2, 1, 3), (2, 6, 4, 2, 8)])
def test_reference_conv_vjp_matches_finite_differences(batch, length, channels, groups, taps):
  rng = _rng("ref_vjp", batch, length, channels, groups, taps)
  x = rng.standard_normal((batch, length, channels))
  h = rng.standard_normal((groups, taps))
  g = rng.standard_normal((batch, length, channels))
  dx, dh = np_causal_conv_vjp(x, h, g)
  np.testing.assert_allclose(dx, _fd_grad(lambda a: np.sum(g * np_causal_conv(a, h)), x),
                             atol=1e-8)
  np.testing.assert_allclose(dh, _fd_grad(lambda a: np.sum(g * np_causal_conv(x, a)), h),
                             atol=1e-8)


def test_reference_modal_and_gate_vjps_match_finite_differences():
  rng = _rng("ref_vjp_modal")
  log_poles = -np.exp(rng.uniform(-3, 0, (2, 3)))
  residues = rng.standard_normal((2, 3))
  g = rng.standard_normal((2, 9))
  d_log, d_res = np_modal_filter_vjp(log_poles, residues, g)
  np.testing.assert_allclose(
      d_log, _fd_grad(lambda a: np.sum(g * np_modal_filter(a, residues, 9)), log_poles), atol=1e-7)
  np.testing.assert_allclose(
      d_res, _fd_grad(lambda a: np.sum(g * np_modal_filter(log_poles, a, 9)), residues), atol=1e-7)

  post, pre, v, gy = (rng.standard_normal((2, 5, 4)) for _ in range(4))
  h, dskip = rng.standard_normal((2, 3)), rng.standard_normal(4)
  args = [post, pre, v, h, dskip]
  grads = np_gate_conv_gate_vjp(*args, gy)
  for i, grad in enumerate(grads):
    def f(a, i=i):
      return np.sum(gy * np_gate_conv_gate(*[a if j == i else args[j] for j in range(5)]))
    np.testing.assert_allclose(grad, _fd_grad(f, args[i]), atol=1e-7, err_msg=f"arg {i}")


# ---------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape,eps,x_scale", [
    ((2, 3, 8), 1e-6, 1.0),
    ((1, 1, 16), 1e-6, 1.0),
    ((3, 5, 33), 0.5, 1.0),      # large eps: (rms + eps) and sqrt(ms + eps) differ clearly
    ((2, 4, 8), 1e-6, 1e-3),     # tiny inputs: eps is comparable to the RMS
])
def test_rms_norm(dtype, shape, eps, x_scale):
  rng = _rng("rms", dtype, shape, eps, x_scale)
  x, x64 = _rand(rng, shape, dtype, x_scale)
  scale, scale64 = _rand(rng, shape[-1:], dtype)
  out = jax.jit(norms.rms_norm, static_argnums=2)(x, scale, eps)
  assert out.dtype == x.dtype
  _assert_close(out, np_rms_norm(x64, scale64, eps), TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_rms_norm_grads(dtype):
  rng = _rng("rms_grad", dtype)
  eps = 0.1
  x, x64 = _rand(rng, (2, 3, 6), dtype)
  scale, scale64 = _rand(rng, (6,), dtype)
  cot = rng.standard_normal((2, 3, 6))
  dx, dscale = _jax_vjp(lambda a, s: norms.rms_norm(a, s, eps), (x, scale), cot, (0, 1))
  _assert_close(dx, _fd_grad(lambda a: np.sum(cot * np_rms_norm(a, scale64, eps)), x64),
                GRAD_TOL[dtype])
  _assert_close(dscale, _fd_grad(lambda s: np.sum(cot * np_rms_norm(x64, s, eps)), scale64),
                GRAD_TOL[dtype])


@pytest.mark.parametrize("y_dtype,bias_dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                              ("float32", "float32")])
def test_add_bias_sums_its_gradient_in_float32(y_dtype, bias_dtype):
  """y + b in y's dtype, and db = the sum of the cotangent over 2 x 4096 tokens as float64
  gives it (then rounded to b's dtype): a sum accumulated in bf16 is ~1% off at this length."""
  rng = _rng("bias", y_dtype, bias_dtype)
  y, y64 = _rand(rng, (2, 4096, 16), y_dtype)
  b, b64 = _rand(rng, (16,), bias_dtype)
  cot, cot64 = _rand(rng, (2, 4096, 16), y_dtype)
  cot = cot + jnp.asarray(1.0, cot.dtype)  # a mean far from 0: the sum grows like L
  cot64 = np.asarray(cot).astype(np.float64)
  out, pullback = jax.vjp(jax.jit(bias.add_bias), y, b)
  dy, db = pullback(cot)
  assert out.dtype == y.dtype and dy.dtype == y.dtype and db.dtype == b.dtype
  want_out = np.asarray(jnp.asarray(y64 + np.asarray(b.astype(y.dtype)).astype(np.float64), y.dtype))
  np.testing.assert_array_equal(np.asarray(out), want_out)
  np.testing.assert_array_equal(np.asarray(dy), np.asarray(cot))
  want_db = cot64.sum(axis=(0, 1))
  rounding = 2.0 ** -8 if bias_dtype == "bfloat16" else 1e-6
  np.testing.assert_allclose(np.asarray(db, np.float64), want_db, rtol=rounding, atol=0)


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape,offset,per_batch,base", [
    ((2, 7, 3, 8), 0, False, 1e4),
    ((1, 5, 1, 2), 3, False, 1e4),
    ((2, 4, 2, 16), 0, True, 1e4),     # [B, L] positions, different offsets per sequence
    ((1, 6, 2, 8), 1000, False, 1e6),  # decode-like offset, 40B base
])
def test_apply_rope(dtype, shape, offset, per_batch, base):
  rng = _rng("rope", dtype, shape, offset, per_batch, base)
  batch, length = shape[:2]
  x, x64 = _rand(rng, shape, dtype)
  if per_batch:
    positions = np.arange(length)[None, :] + rng.integers(0, 50, (batch, 1))
  else:
    positions = np.arange(length) + offset
  out = jax.jit(rotary.apply_rope, static_argnums=2)(x, jnp.asarray(positions), base)
  assert out.dtype == x.dtype
  expected = np_rope(x64, np.broadcast_to(positions, (batch, length)), base)
  # float32 angles: pos * inv_freq is rounded at ~6e-8 * pos, i.e. 6e-5 rad at pos 1000.
  tol = TOL[dtype] if offset < 1000 or dtype == "bfloat16" else (1e-3, 2e-4)
  _assert_close(out, expected, tol)


def test_apply_rope_grad_and_position_zero():
  rng = _rng("rope_grad")
  x, x64 = _rand(rng, (2, 5, 2, 8), "float64")
  positions = np.arange(5) + 2
  cot = rng.standard_normal(x.shape)
  (dx,) = _jax_vjp(lambda a: rotary.apply_rope(a, jnp.asarray(positions)), (x,), cot, (0,))
  # RoPE is a rotation: its VJP is the rotation by the opposite angle.
  _assert_close(dx, np_rope(cot, np.broadcast_to(-positions, (2, 5)), 1e4), TOL["float64"])
  # Position 0 is the identity.
  np.testing.assert_allclose(np.asarray(rotary.apply_rope(x, jnp.zeros(5, jnp.int32))), x64,
                             rtol=1e-6)


def test_rope_rejects_odd_head_dim():
  with pytest.raises(ValueError, match="even"):
    rotary.apply_rope(jnp.ones((1, 2, 1, 5)), jnp.arange(2))


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 4), (2, 5, 2, 8), (1, 17, 3, 16)])
def test_causal_attention(dtype, shape):
  rng = _rng("attn", dtype, shape)
  (q, q64), (k, k64), (v, v64) = (_rand(rng, shape, dtype) for _ in range(3))
  out = jax.jit(attention.causal_attention)(q, k, v)
  assert out.dtype == q.dtype
  # jax.nn.dot_product_attention's XLA path takes logits in float32, float64 inputs included.
  _assert_close(out, np_causal_attention(q64, k64, v64), TOL[dtype])


def test_causal_attention_bf16_one_token_one_head_under_jit():
  """XLA:CPU cannot jit a bf16 x bf16 -> f32 dot for B = L = N = 1 (ALG_DOT_BF16_BF16_F32);
  causal_attention computes in float32 off GPU, so one-head bf16 decoding works on CPU."""
  q = jnp.ones((1, 1, 1, 4), jnp.bfloat16)
  out = jax.jit(attention.causal_attention)(q, q, q)
  np.testing.assert_allclose(np.asarray(out).astype(np.float64), 1.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_causal_attention_grads(dtype):
  rng = _rng("attn_grad", dtype)
  shape = (1, 5, 2, 4)
  (q, q64), (k, k64), (v, v64) = (_rand(rng, shape, dtype) for _ in range(3))
  cot = rng.standard_normal(shape)
  grads = _jax_vjp(attention.causal_attention, (q, k, v), cot, (0, 1, 2))
  args = [q64, k64, v64]
  for i, grad in enumerate(grads):
    def f(a, i=i):
      return np.sum(cot * np_causal_attention(*[a if j == i else args[j] for j in range(3)]))
    _assert_close(grad, _fd_grad(f, args[i]), GRAD_TOL[dtype], err_msg=f"d{'qkv'[i]}")


# ---------------------------------------------------------------------------------------------
# conv
# ---------------------------------------------------------------------------------------------

# (batch, length, channels, groups, taps, chunk)
CONV_CASES = [
    (1, 1, 4, 1, 3, 16),       # L = 1, one group
    (2, 5, 6, 3, 7, 16),       # L < chunk and L < K (FFT drops taps past L)
    (2, 130, 8, 8, 7, 128),    # depthwise (G == C), L = chunk + 2
    (1, 130, 8, 2, 3, 64),     # L not a multiple of the chunk
    (2, 64, 4, 2, 16, 16),     # K == chunk, L a multiple of the chunk
    (1, 65, 4, 1, 1, 16),      # K == 1, L = 4 chunks + 1
    (1, 300, 4, 2, 128, 128),  # MR-like: 128 taps, chunk 128
    (1, 50, 4, 2, 40, 32),     # K > chunk: auto picks FFT, blocked must refuse
]
CONV_IDS = ["-".join(map(str, c)) for c in CONV_CASES]
METHODS = ["direct", "fft", "blocked", "auto"]


def _conv_inputs(case, dtype, tag):
  batch, length, channels, groups, taps, _ = case
  rng = _rng(tag, case, dtype)
  x, x64 = _rand(rng, (batch, length, channels), dtype)
  h, h64 = _rand(rng, (groups, taps), dtype, 1 / np.sqrt(taps))
  return rng, x, x64, h, h64


CONV_DTYPE_CASES = ([(c, "float64") for c in CONV_CASES]
                    + [(CONV_CASES[i], d) for i in (1, 3, 6) for d in ("float32", "bfloat16")])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case,dtype", CONV_DTYPE_CASES,
                         ids=[f"{'-'.join(map(str, c))}-{d}" for c, d in CONV_DTYPE_CASES])
def test_causal_conv_matches_numpy(case, dtype, method):
  _, x, x64, h, h64 = _conv_inputs(case, dtype, "conv")
  taps, chunk = case[4], case[5]
  if method == "blocked" and taps > chunk:
    with pytest.raises(ValueError, match="chunk"):
      conv.causal_conv(x, h, method=method, chunk=chunk)
    return
  out = jax.jit(lambda a, b: conv.causal_conv(a, b, method=method, chunk=chunk))(x, h)
  assert out.dtype == x.dtype
  _assert_close(out, np_causal_conv(x64, h64), TOL[dtype])


@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 4, 7)],
                         ids=[CONV_IDS[i] for i in (1, 4, 7)])
def test_conv_methods_agree(case):
  _, x, _, h, _ = _conv_inputs(case, "float32", "agree")
  taps, chunk = case[4], case[5]
  outs = {"direct_conv": jax.jit(conv.direct_conv)(x, h), "fft_conv": jax.jit(conv.fft_conv)(x, h),
          "auto": jax.jit(lambda a, b: conv.causal_conv(a, b, chunk=chunk))(x, h)}
  if taps <= chunk:
    outs["blocked"] = jax.jit(lambda a, b: conv.causal_conv(a, b, "blocked", chunk))(x, h)
  reference = np.asarray(outs.pop("direct_conv"))
  for name, out in outs.items():
    _assert_close(out, reference, TOL["float32"], err_msg=name)


# Blocked with K > chunk is refused (see above); direct with K > 16 taps is never picked by
# "auto": its forward is covered above, its unrolled gradient only costs compile time.
CONV_GRAD_CASES = [(c, m) for c in CONV_CASES for m in ("direct", "fft", "blocked")
                   if not (m == "blocked" and c[4] > c[5])
                   and not (m == "direct" and c[4] > conv.DIRECT_MAX_TAPS)]


@pytest.mark.parametrize("case,method", CONV_GRAD_CASES,
                         ids=[f"{'-'.join(map(str, c))}-{m}" for c, m in CONV_GRAD_CASES])
def test_causal_conv_grads(case, method):
  rng, x, x64, h, h64 = _conv_inputs(case, "float64", "conv_grad")
  chunk = case[5]
  cot = rng.standard_normal(x.shape)
  dx, dh = _jax_vjp(lambda a, b: conv.causal_conv(a, b, method=method, chunk=chunk), (x, h),
                    cot, (0, 1))
  dx_ref, dh_ref = np_causal_conv_vjp(x64, h64, cot)
  _assert_close(dx, dx_ref, GRAD_TOL["float64"], err_msg="dx")
  _assert_close(dh, dh_ref, GRAD_TOL["float64"], err_msg="dh")


@pytest.mark.parametrize("length,taps", [(1, 7), (5, 9), (12, 12), (20, 3)])
def test_fft_and_direct_conv_per_channel_filters(length, taps):
  """[C, K] per-channel filters (G == C), including K > L."""
  rng = _rng("per_channel", length, taps)
  x, x64 = _rand(rng, (2, length, 5), "float64")
  h, h64 = _rand(rng, (5, taps), "float64")
  expected = np_causal_conv(x64, h64)
  _assert_close(jax.jit(conv.fft_conv)(x, h), expected, TOL["float64"], err_msg="fft")
  _assert_close(jax.jit(conv.direct_conv)(x, h), expected, TOL["float64"], err_msg="direct")


def test_conv_h0_is_current_token():
  """A unit impulse at t=3 through h = [a, b, c] puts a at t=3, b at t=4, c at t=5."""
  x = jnp.zeros((1, 8, 2), jnp.float64).at[0, 3].set(1.0)
  h = jnp.asarray([[2.0, 3.0, 5.0]], jnp.float64)
  expected = np.zeros((1, 8, 2))
  expected[0, 3:6] = np.array([2.0, 3.0, 5.0])[:, None]
  for method in ("direct", "fft", "blocked"):
    np.testing.assert_allclose(np.asarray(conv.causal_conv(x, h, method=method, chunk=4)),
                               expected, atol=1e-6, err_msg=method)


@pytest.mark.parametrize("groups,channels", [(1, 4), (2, 6), (6, 6)])
def test_expand_groups(groups, channels):
  h = np.arange(groups * 3, dtype=np.float64).reshape(groups, 3)
  out = np.asarray(conv.expand_groups(jnp.asarray(h), channels))
  for c in range(channels):
    np.testing.assert_array_equal(out[c], h[c // (channels // groups)])


def test_group_count_must_divide_channels():
  with pytest.raises(ValueError, match="divisible"):
    conv.expand_groups(jnp.ones((3, 4)), 8)
  for method in ("direct", "fft", "blocked"):
    with pytest.raises(ValueError, match="divisible"):
      conv.causal_conv(jnp.ones((1, 5, 8)), jnp.ones((3, 4)), method=method, chunk=8)


def test_fft_size():
  smooth = sorted(2**a * 3**b for a in range(12) for b in range(8))
  for n in range(1, 1100):
    assert conv._fft_size(n) == next(s for s in smooth if s >= n), n


def test_resolve_method():
  assert conv.resolve_method("auto", 7, 128) == "direct"
  assert conv.resolve_method("auto", 16, 128) == "direct"
  assert conv.resolve_method("auto", 17, 128) == "blocked"
  assert conv.resolve_method("auto", 128, 128) == "blocked"
  assert conv.resolve_method("auto", 129, 128) == "fft"
  assert conv.resolve_method("fft", 3, 128) == "fft"
  # The fused kernel: "auto" picks it on GPU only; a bare convolution runs its reference.
  assert conv.resolve_method("auto", 7, 128, fused=True) == (
      "pallas" if jax.default_backend() == "gpu" else "direct")
  assert conv.resolve_method("pallas", 7, 128, fused=True) == "pallas"
  assert conv.resolve_method("pallas", 7, 128) == "blocked"
  with pytest.raises(ValueError, match="choose one of"):
    conv.resolve_method("winograd", 3, 128)


# ---------------------------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,taps,train_len", [(1, 3, 64), (2, 16, 64), (5, 128, 8192),
                                                   (15, 7, 100)])
def test_mr_decay_and_filter(groups, taps, train_len):
  rates = 10.0 ** np.linspace(-2.0, 2.0, groups)
  expected = np.exp(-rates[:, None] * np.arange(taps)[None, :] / (train_len - 1))
  decay = filters.mr_decay(groups, taps, train_len)
  assert decay.shape == (groups, taps) and decay.dtype == jnp.float32
  _assert_close(decay, expected, (1e-6, 1e-7))
  rng = _rng("mr", groups, taps, train_len)
  hhat, hhat64 = _rand(rng, (groups, taps), "float64")
  out = filters.mr_filter(hhat, train_len)
  assert out.dtype == jnp.float32
  _assert_close(out, hhat64 * expected, (1e-6, 1e-7))
  _assert_close(filters.mr_filter(hhat, train_len, decay=False), hhat64, (1e-7, 1e-8))


def test_mr_filter_grad():
  rng = _rng("mr_grad")
  hhat, _ = _rand(rng, (3, 10), "float64")
  cot = rng.standard_normal((3, 10))
  (dh,) = _jax_vjp(lambda a: filters.mr_filter(a, 20), (hhat,), cot, (0,))
  rates = 10.0 ** np.linspace(-2.0, 2.0, 3)
  _assert_close(dh, cot * np.exp(-rates[:, None] * np.arange(10) / 19), (1e-6, 1e-7))


def test_modal_log_poles():
  rng = _rng("log_poles")
  p, gamma = rng.standard_normal((4, 3)), np.log(rng.uniform(0.01, 0.1, (4, 3)))
  out = filters.modal_log_poles(jnp.asarray(p), jnp.asarray(gamma))
  assert out.dtype == jnp.float32
  _assert_close(out, -np.exp(p) * np.exp(gamma), (1e-6, 1e-7))


def _modal_params(rng: np.random.Generator, channels: int, order: int):
  log_poles = -np.exp(rng.uniform(-4.0, 0.0, (channels, order)))  # poles in (0.37, 0.98)
  residues = rng.standard_normal((channels, order)) / order
  return log_poles, residues


# (batch, length, channels, order, chunk)
MODAL_CASES = [(1, 1, 3, 4, 16), (2, 5, 4, 16, 4), (1, 37, 3, 2, 8), (2, 130, 4, 4, 64),
               (1, 300, 2, 16, 128), (1, 20, 2, 3, 1)]
MODAL_IDS = ["-".join(map(str, c)) for c in MODAL_CASES]


@pytest.mark.parametrize("case", MODAL_CASES, ids=MODAL_IDS)
def test_modal_filter(case):
  _, length, channels, order, chunk = case
  rng = _rng("modal_filter", case)
  log_poles, residues = _modal_params(rng, channels, order)
  args = (jnp.asarray(log_poles), jnp.asarray(residues))
  h = filters.modal_filter(*args, length, chunk=chunk)
  assert h.shape == (channels, length) and h.dtype == jnp.float32
  _assert_close(h, np_modal_filter(log_poles, residues, length), (1e-5, 1e-6))
  _assert_close(filters.modal_filter(*args, length), h, (1e-6, 1e-7), err_msg="default chunk")
  cot = rng.standard_normal((channels, length))
  d_log, d_res = _jax_vjp(lambda a, r: filters.modal_filter(a, r, length, chunk=chunk), args,
                          cot, (0, 1))
  d_log_ref, d_res_ref = np_modal_filter_vjp(log_poles, residues, cot)
  _assert_close(d_log, d_log_ref, (1e-4, 1e-5), err_msg="d log_poles")
  _assert_close(d_res, d_res_ref, (1e-4, 1e-5), err_msg="d residues")


@pytest.mark.parametrize("case", MODAL_CASES, ids=MODAL_IDS)
def test_modal_scan_equals_fft_conv_of_modal_filter(case):
  """SPEC acceptance: the modal filter's FFT convolution equals its recurrent form."""
  batch, length, channels, order, _ = case
  rng = _rng("modal_scan", case)
  log_poles, residues = _modal_params(rng, channels, order)
  u, u64 = _rand(rng, (batch, length, channels), "float64")
  y_scan, state = jax.jit(filters.modal_scan)(u, jnp.asarray(log_poles), jnp.asarray(residues))
  h = filters.modal_filter(jnp.asarray(log_poles), jnp.asarray(residues), length)
  y_fft = jax.jit(conv.fft_conv)(u, h)
  assert y_scan.dtype == jnp.float32 and state.shape == (batch, channels, order)
  _assert_close(y_scan, y_fft, (1e-4, 1e-5))
  y_ref, state_ref = np_modal_recurrence(u64, log_poles, residues,
                                         np.zeros((batch, channels, order)))
  _assert_close(y_scan, y_ref, (1e-5, 1e-6))
  _assert_close(state, state_ref, (1e-5, 1e-6))
  _assert_close(y_ref, np_causal_conv(u64, np_modal_filter(log_poles, residues, length)),
                (1e-10, 1e-12), err_msg="numpy recurrence vs numpy convolution")


def test_modal_scan_with_initial_state_and_continuation():
  rng = _rng("modal_state")
  log_poles, residues = _modal_params(rng, 3, 5)
  lp, res = jnp.asarray(log_poles), jnp.asarray(residues)
  u, u64 = _rand(rng, (2, 23, 3), "float64")
  state0 = rng.standard_normal((2, 3, 5))
  y, state = filters.modal_scan(u, lp, res, jnp.asarray(state0, jnp.float32))
  y_ref, state_ref = np_modal_recurrence(u64, log_poles, residues, state0)
  _assert_close(y, y_ref, (1e-5, 1e-6))
  _assert_close(state, state_ref, (1e-5, 1e-6))
  # Scanning in two pieces, carrying the state, equals one scan (generation == prefill).
  y1, s1 = filters.modal_scan(u[:, :10], lp, res)
  y2, s2 = filters.modal_scan(u[:, 10:], lp, res, s1)
  y_all, s_all = filters.modal_scan(u, lp, res)
  _assert_close(jnp.concatenate([y1, y2], axis=1), y_all, (1e-6, 1e-7))
  _assert_close(s2, s_all, (1e-6, 1e-7))


@pytest.mark.parametrize("case", MODAL_CASES, ids=MODAL_IDS)
def test_modal_chunked_conv(case):
  batch, length, channels, order, chunk = case
  rng = _rng("modal_chunked", case)
  log_poles, residues = _modal_params(rng, channels, order)
  lp, res = jnp.asarray(log_poles), jnp.asarray(residues)
  u, u64 = _rand(rng, (batch, length, channels), "float64")
  h64 = np_modal_filter(log_poles, residues, length)
  out = filters.modal_chunked_conv(u, lp, res, chunk=chunk)
  assert out.dtype == jnp.float32 and out.shape == u.shape
  _assert_close(out, np_causal_conv(u64, h64), (1e-4, 1e-5))

  cot = rng.standard_normal(u.shape)
  du, d_log, d_res = _jax_vjp(lambda a, b, c: filters.modal_chunked_conv(a, b, c, chunk=chunk),
                              (u, lp, res), cot, (0, 1, 2))
  du_ref, dh_ref = np_causal_conv_vjp(u64, h64, cot)
  d_log_ref, d_res_ref = np_modal_filter_vjp(log_poles, residues, dh_ref)
  _assert_close(du, du_ref, (1e-4, 1e-5), err_msg="du")
  _assert_close(d_log, d_log_ref, (1e-4, 2e-5), err_msg="d log_poles")
  _assert_close(d_res, d_res_ref, (1e-4, 1e-5), err_msg="d residues")


# ---------------------------------------------------------------------------------------------
# hyena
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 9])
def test_project_and_featurize_matches_float64(length):
  """Streams s = featurize(x @ w_in[:, s], w_feat[s]) against numpy float64, for values and for
  the gradients of x, the in-projection [D, 3, D] and the featurizer taps [3, D, K]."""
  rng = _rng("project", length)
  d, taps = 4, 3
  x = rng.standard_normal((2, length, d))
  w_in = rng.standard_normal((d, 3, d))
  w_feat = rng.standard_normal((3, d, taps))
  z = [x @ w_in[:, s] for s in range(3)]
  streams = [np_causal_conv(z[s], w_feat[s]) for s in range(3)]
  out = hyena.project_and_featurize(jnp.asarray(x), jnp.asarray(w_in), jnp.asarray(w_feat))
  for got, want in zip(out, streams):
    _assert_close(got, want, (2e-6, 2e-6))
  cot = [rng.standard_normal(st.shape) for st in streams]
  loss = lambda *a: sum(jnp.sum(o * c) for o, c in zip(hyena.project_and_featurize(*a), cot))
  dx, dw_in, dw_feat = jax.grad(loss, argnums=(0, 1, 2))(
      jnp.asarray(x), jnp.asarray(w_in), jnp.asarray(w_feat))
  dx_ref, dw_in_ref, dw_feat_ref = np.zeros_like(x), np.zeros_like(w_in), np.zeros_like(w_feat)
  for s in range(3):
    dz = np.zeros_like(z[s])  # dz[t] = sum_k w[k] cot[t + k]
    for k in range(taps):
      dz[:, :length - k] += w_feat[s, :, k] * cot[s][:, k:]
      dw_feat_ref[s, :, k] = np.sum(cot[s][:, k:] * z[s][:, :length - k], axis=(0, 1))
    dx_ref += dz @ w_in[:, s].T
    dw_in_ref[:, s] = np.einsum("bld,blc->dc", x, dz)
  for got, want in ((dx, dx_ref), (dw_in, dw_in_ref), (dw_feat, dw_feat_ref)):
    _assert_close(got, want, (2e-5, 2e-5))


def test_featurize_is_depthwise_causal_with_w0_on_current_token():
  rng = _rng("featurize")
  z, z64 = _rand(rng, (2, 9, 6), "float64")
  w, w64 = _rand(rng, (6, 3), "float64")
  _assert_close(hyena.featurize(z, w), np_causal_conv(z64, w64), TOL["float64"])


def _gate_inputs(case, dtype, with_dskip, tag):
  batch, length, width, groups, taps, _ = case
  rng = _rng(tag, case, dtype, with_dskip)
  shape = (batch, length, width)
  (post, post64), (pre, pre64), (v, v64) = (_rand(rng, shape, dtype) for _ in range(3))
  h, h64 = _rand(rng, (groups, taps), dtype, 1 / np.sqrt(taps))
  dskip, dskip64 = _rand(rng, (width,), dtype) if with_dskip else (None, None)
  return rng, (post, pre, v, h, dskip), (post64, pre64, v64, h64, dskip64)


GATE_CASES = [c for c in CONV_CASES if c[4] <= c[5]]
GATE_IDS = ["-".join(map(str, c)) for c in GATE_CASES]


GATE_SKIP_CASES = [(c, True) for c in GATE_CASES] + [(GATE_CASES[i], False) for i in (0, 2, 6)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case,with_dskip", GATE_SKIP_CASES,
                         ids=[f"{'-'.join(map(str, c))}-skip={s}" for c, s in GATE_SKIP_CASES])
def test_gate_conv_gate(case, with_dskip, method):
  _, args, args64 = _gate_inputs(case, "float64", with_dskip, "gcg")
  out = jax.jit(lambda *a: hyena.gate_conv_gate(*a, method=method, chunk=case[5]))(*args)
  assert out.dtype == jnp.float64
  _assert_close(out, np_gate_conv_gate(*args64), TOL["float64"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [GATE_CASES[1], GATE_CASES[-1]], ids=[GATE_IDS[1], GATE_IDS[-1]])
def test_gate_conv_gate_dtypes(case, method, dtype):
  _, args, args64 = _gate_inputs(case, dtype, True, "gcg_dtype")
  out = jax.jit(lambda *a: hyena.gate_conv_gate(*a, method=method, chunk=case[5]))(*args)
  assert out.dtype == DTYPES[dtype]
  _assert_close(out, np_gate_conv_gate(*args64), TOL[dtype])


# The blocked path delegates to pallas_kernels (gradients in tests/test_blocked_conv.py).
GATE_GRAD_CASES = ([(GATE_CASES[i], m, True) for i in (1, 3, 4) for m in ("direct", "fft")]
                   + [(GATE_CASES[6], "fft", True), (GATE_CASES[1], "blocked", True)]
                   + [(GATE_CASES[1], m, False) for m in ("direct", "fft")])


@pytest.mark.parametrize("case,method,with_dskip", GATE_GRAD_CASES)
def test_gate_conv_gate_grads(case, method, with_dskip):
  rng, args, args64 = _gate_inputs(case, "float64", with_dskip, "gcg_grad")
  cot = rng.standard_normal(args[0].shape)
  argnums = (0, 1, 2, 3, 4) if with_dskip else (0, 1, 2, 3)
  grads = _jax_vjp(lambda *a: hyena.gate_conv_gate(*a, method=method, chunk=case[5]), args, cot,
                   argnums)
  expected = np_gate_conv_gate_vjp(*args64, cot)
  for name, grad, ref in zip(("post", "pre", "v", "h", "dskip"), grads, expected):
    _assert_close(grad, ref, GRAD_TOL["float64"], err_msg=f"d{name}")


def _li_inputs(case, dtype, tag):
  batch, length, width, order, _ = case
  rng = _rng(tag, case, dtype)
  shape = (batch, length, width)
  (post, post64), (pre, pre64), (v, v64) = (_rand(rng, shape, dtype) for _ in range(3))
  log_poles, residues = _modal_params(rng, width, order)
  dskip, dskip64 = _rand(rng, (width,), dtype)
  args = (post, pre, v, jnp.asarray(log_poles, jnp.float32), jnp.asarray(residues, jnp.float32),
          dskip)
  args64 = (post64, pre64, v64, np.asarray(args[3], np.float64), np.asarray(args[4], np.float64),
            dskip64)
  return rng, args, args64


def np_li_gate_conv_gate(post, pre, v, log_poles, residues, dskip):
  return np_gate_conv_gate(post, pre, v, np_modal_filter(log_poles, residues, post.shape[1]), dskip)


LI_DTYPE_CASES = ([(c, "float64") for c in MODAL_CASES]
                  + [(MODAL_CASES[i], d) for i in (1, 4) for d in ("float32", "bfloat16")])


@pytest.mark.parametrize("method", ["fft", "chunked", "auto"])
@pytest.mark.parametrize("case,dtype", LI_DTYPE_CASES,
                         ids=[f"{'-'.join(map(str, c))}-{d}" for c, d in LI_DTYPE_CASES])
def test_li_gate_conv_gate(case, dtype, method):
  _, args, args64 = _li_inputs(case, dtype, "li")
  out = jax.jit(lambda *a: hyena.li_gate_conv_gate(*a, method=method))(*args)
  assert out.dtype == DTYPES[dtype]
  tol = TOL[dtype] if dtype == "bfloat16" else (1e-4, 1e-5)
  _assert_close(out, np_li_gate_conv_gate(*args64), tol)


@pytest.mark.parametrize("method", ["fft", "chunked"])
@pytest.mark.parametrize("case", [MODAL_CASES[i] for i in (1, 3, 4)],
                         ids=[MODAL_IDS[i] for i in (1, 3, 4)])
def test_li_gate_conv_gate_grads(case, method):
  rng, args, args64 = _li_inputs(case, "float64", "li_grad")
  cot = rng.standard_normal(args[0].shape)
  grads = _jax_vjp(lambda *a: hyena.li_gate_conv_gate(*a, method=method), args, cot,
                   (0, 1, 2, 3, 4, 5))
  post, pre, v, log_poles, residues, dskip = args64
  h = np_modal_filter(log_poles, residues, post.shape[1])
  dpost, dpre, dv, dh, ddskip = np_gate_conv_gate_vjp(post, pre, v, h, dskip, cot)
  d_log, d_res = np_modal_filter_vjp(log_poles, residues, dh)
  names = ("post", "pre", "v", "log_poles", "residues", "dskip")
  for name, grad, ref in zip(names, grads, (dpost, dpre, dv, d_log, d_res, ddskip)):
    _assert_close(grad, ref, (1e-4, 2e-5), err_msg=f"d{name}")


def test_resolve_li_method():
  assert hyena.resolve_li_method("auto", hyena.LI_CHUNKED_MIN_LEN - 1) == "fft"
  assert hyena.resolve_li_method("auto", hyena.LI_CHUNKED_MIN_LEN) == "chunked"
  with pytest.raises(ValueError, match="choose one of"):
    hyena.resolve_li_method("scan", 10)


def test_modal_filter_gradient_never_holds_all_modes():
  """The backward of the LI filter recomputes the modes chunk by chunk: its temporary memory
  stays far below the [C, N, L] tensor that plain autodiff keeps (34 GiB at D=4096, 131K)."""
  channels, poles, length = 64, 16, 65536
  spec = jax.ShapeDtypeStruct((channels, poles), jnp.float32)
  cot = jax.ShapeDtypeStruct((channels, length), jnp.float32)

  def grads(log_poles, residues, g):
    loss = lambda a, b: jnp.sum(filters.modal_filter(a, b, length) * g)
    return jax.grad(loss, argnums=(0, 1))(log_poles, residues)

  memory = jax.jit(grads).lower(spec, spec, cot).compile().memory_analysis()
  all_modes_bytes = channels * poles * length * 4
  assert memory.temp_size_in_bytes < all_modes_bytes / 4, memory.temp_size_in_bytes


def test_stream_weights_of_the_interleaved_layout_are_refused():
  """A [D, 3D] in-projection or [3D, K] featurizer (Evo 2's interleaved layout) is a one-line
  ValueError that names the converter, not a silently wrong product."""
  x = jnp.zeros((1, 5, 4))
  with pytest.raises(ValueError, match=r"in-projection \(4, 12\) must be \[D, 3, D\].*in_proj_from_vortex"):
    hyena.project_and_featurize(x, jnp.zeros((4, 12)), jnp.zeros((3, 4, 3)))
  with pytest.raises(ValueError, match=r"featurizer taps \(12, 3\) must be \[3, 4, K\].*featurizer_from_vortex"):
    hyena.explicit_mixer(x, jnp.zeros((4, 3, 4)), jnp.zeros((12, 3)), jnp.zeros((2, 7)), None)


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_weight_in_own_dtype_matches_float64(w_dtype):
  """x (bf16) @ w cast to bf16: output in bf16, dx in bf16 and dW in w's dtype, against numpy
  float64 on the bf16-rounded operands (a float32 w's gradient is not rounded to bf16)."""
  rng = _rng("matmul_cast", jnp.dtype(w_dtype).name)
  x = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((16, 40)), w_dtype)
  dz = jnp.asarray(rng.standard_normal((2, 24, 40)), jnp.bfloat16)
  out, pullback = jax.vjp(hyena.matmul_weight_in_own_dtype, x, w)
  dx, dw = pullback(dz)
  assert (out.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.dtype(w_dtype))
  x64, dz64 = np.asarray(x, np.float64), np.asarray(dz, np.float64)
  w64 = np.asarray(w.astype(jnp.bfloat16), np.float64)
  want_dw = np.einsum("bld,ble->de", x64, dz64)
  _assert_close(out, x64 @ w64, (1e-2, 1e-2))
  _assert_close(dx, dz64 @ w64.T, (1e-2, 1e-2))
  _assert_close(dw, want_dw, (1e-6, 1e-5) if w_dtype == jnp.float32 else (1e-2, 1e-2))
