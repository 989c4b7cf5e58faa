"""Pallas Hyena-LI modal kernels (pallas_kernels/modal_conv.py) in interpret mode vs a float64
numpy reference (output and all six gradients), poisoning, the plain-JAX reference, the
`li_method="pallas"` dispatch in ops.hyena, and lowering for CUDA on a CPU-only machine.

Interpret mode fills every output buffer with NaN before the kernel runs, so an unwritten
tile shows as NaN; test_unwritten_tile_is_caught proves the comparisons catch it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import modal_conv as mc
from tests import helpers
from sh2_jax.config import ModelConfig
from sh2_jax.ops import hyena

# Relative L2 error ||kernel - reference|| / ||reference||, per I/O dtype.
TOLERANCE = {jnp.float32: 5e-6, jnp.bfloat16: 1e-2}
NAMES = ("out", "dpost", "dpre", "dv", "dlog_poles", "dresidues", "ddskip")


def _reference_f64(post, pre, v, log_poles, residues, dskip, ct):
  """Output and all gradients in float64 from the explicit filter (a direct convolution):
  y[t] = sum_(j<=t) h[t - j] u[j], h[c, k] = sum_n R[c, n] exp(log_pole[c, n] k)."""
  post, pre, v, lp, r, dskip, ct = (np.asarray(x, np.float64)
                                    for x in (post, pre, v, log_poles, residues, dskip, ct))
  batch, length, channels = v.shape
  lag = np.arange(length)[:, None] - np.arange(length)[None, :]  # t - j
  causal = lag >= 0
  lagc = np.where(causal, lag, 0).astype(np.float64)
  u = pre * v
  g = ct * post
  y = dskip * u
  du = dskip * g
  dlp = np.zeros_like(lp)
  dr = np.zeros_like(r)
  for c in range(channels):
    modes_NTJ = np.where(causal, np.exp(lp[c][:, None, None] * lagc), 0.0)
    toeplitz_TJ = np.einsum("n,ntj->tj", r[c], modes_NTJ)
    y[:, :, c] += np.einsum("tj,bj->bt", toeplitz_TJ, u[:, :, c])
    du[:, :, c] += np.einsum("tj,bt->bj", toeplitz_TJ, g[:, :, c])
    dr[c] = np.einsum("ntj,bt,bj->n", modes_NTJ, g[:, :, c], u[:, :, c])
    dlp[c] = r[c] * np.einsum("ntj,tj,bt,bj->n", modes_NTJ, lagc, g[:, :, c], u[:, :, c])
  grads = (ct * y, du * v, du * pre, dlp, dr, np.einsum("blc,blc->c", g, u))
  return post * y, grads


def _inputs(seed, batch, length, channels, order, dtype):
  """Gates ~ N(0, 1); log poles from -0.001 (slow) to -6 (fast: p^16 ~ e^-96, which would
  overflow any p^-t scaling); residues ~ 0.3 N(0, 1)."""
  rng = np.random.default_rng(seed)
  gates = [rng.standard_normal((batch, length, channels)).astype(np.float32) for _ in range(4)]
  post, pre, v, ct = (jnp.asarray(x, dtype) for x in gates)
  log_poles = jnp.asarray(-np.exp(rng.uniform(np.log(1e-3), np.log(6.0), (channels, order))),
                          jnp.float32)
  residues = jnp.asarray(0.3 * rng.standard_normal((channels, order)), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  return (post, pre, v, log_poles, residues, dskip), ct


def _rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got)), "non-finite values (unwritten, NaN-poisoned tile?)"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check(op, args, ct, tol):
  out, vjp = jax.vjp(op, *args)
  got = (out, *vjp(ct))
  want_out, want_grads = _reference_f64(*args, ct)
  assert out.dtype == args[2].dtype
  errs = {n: _rel_err(g, w) for n, g, w in zip(NAMES, got, (want_out, *want_grads))}
  assert max(errs.values()) < tol, errs


CASES = [
    # (batch, length, channels, order, dtype, block sizes): L not a multiple of the chunk or
    # of the segment; B > 1; several segments chained (forward states, reverse adjoints);
    # an order that is not a power of two (padded modes).
    (2, 150, 32, 16, jnp.float32, mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4)),
    (1, 203, 64, 5, jnp.float32, mc.BlockSizes(chunk=4, block_c=32, segment_chunks=16)),
    (2, 100, 32, 16, jnp.bfloat16, mc.BlockSizes(chunk=8, block_c=32, segment_chunks=3)),
]  # default block sizes: test_hyena_pallas_method_equals_fft


@pytest.mark.parametrize("batch,length,channels,order,dtype,block_sizes", CASES)
def test_matches_float64_reference(batch, length, channels, order, dtype, block_sizes):
  args, ct = _inputs(hash((batch, length, channels, order, str(dtype))) % 2**31, batch, length,
                     channels, order, dtype)
  kernel = functools.partial(mc.gate_conv_gate_pallas, block_sizes=block_sizes, interpret=True)
  _check(kernel, args, ct, TOLERANCE[dtype])


def test_reference_and_no_dskip():
  """The plain-JAX chunked reference (autodiff) matches too; dskip=None means no skip."""
  args, ct = _inputs(11, 2, 90, 16, 16, jnp.float32)
  _check(functools.partial(mc.gate_conv_gate, chunk=32), args, ct, TOLERANCE[jnp.float32])
  post, pre, v, lp, r, _ = args
  got = mc.gate_conv_gate_pallas(post, pre, v, lp, r, None,
                                 block_sizes=mc.BlockSizes(chunk=8, segment_chunks=4),
                                 interpret=True)
  want, _ = _reference_f64(post, pre, v, lp, r, jnp.zeros(16), ct)
  assert _rel_err(got, want) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("name", ["_fwd_kernel", "_bwd_reverse_kernel"])
def test_unwritten_tile_is_caught(monkeypatch, name):
  """A kernel that leaves one program's rows unwritten must fail the reference comparison."""
  monkeypatch.setattr(mc, name, helpers.skip_one_program(getattr(mc, name), mc, (0, 1, 1)))
  jax.clear_caches()  # no trace of the intact kernel may be reused, and none of this kept
  try:
    args, ct = _inputs(3, 1, 64, 32, 4, jnp.float32)
    kernel = functools.partial(mc.gate_conv_gate_pallas, interpret=True,
                               block_sizes=mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4))
    with pytest.raises(AssertionError, match="non-finite"):
      _check(kernel, args, ct, TOLERANCE[jnp.float32])
  finally:
    jax.clear_caches()


def test_hyena_pallas_method_equals_fft():
  """ops.hyena: li_method "pallas" (interpret mode on CPU) == "fft", values and gradients;
  "auto" stays on the XLA paths off GPU; the config accepts "pallas"."""
  args, ct = _inputs(5, 1, 120, 32, 16, jnp.float32)  # defaults: one segment, padded
  pallas = lambda *a: hyena.li_gate_conv_gate(*a, method="pallas")  # noqa: E731
  fft = lambda *a: hyena.li_gate_conv_gate(*a, method="fft")  # noqa: E731
  out_p, vjp_p = jax.vjp(pallas, *args)
  out_f, vjp_f = jax.vjp(fft, *args)
  for got, want in zip((out_p, *vjp_p(ct)), (out_f, *vjp_f(ct))):
    assert _rel_err(got, want) < TOLERANCE[jnp.float32]
  u = args[1] * args[2]
  assert _rel_err(hyena.li_long_conv(u, args[3], args[4], "pallas"),
                  hyena.li_long_conv(u, args[3], args[4], "fft")) < TOLERANCE[jnp.float32]
  assert hyena.resolve_li_method("pallas", 10) == "pallas"
  assert hyena.resolve_li_method("auto", 1000, (1, 1000, 4096), 16) == "fft"  # CPU
  assert ModelConfig(li_method="pallas").li_method == "pallas"


def test_unsupported_shapes_and_auto_fallback():
  assert "divid" in mc.unsupported_reason((1, 10, 48), (48, 16), mc.BlockSizes(block_c=32))
  assert "order" in mc.unsupported_reason((1, 10, 32), (32, 100))
  assert "power of two" in mc.unsupported_reason((1, 10, 32), (32, 16), mc.BlockSizes(chunk=12))
  assert mc.unsupported_reason((1, 10, 48), (48, 16)) is None  # block_c halves to 16
  args, _ = _inputs(6, 1, 40, 32, 16, jnp.float32)
  with pytest.raises(ValueError, match="power of two"):
    mc.gate_conv_gate_pallas(*args, block_sizes=mc.BlockSizes(chunk=12), interpret=True)
  assert jax.default_backend() != "gpu"
  np.testing.assert_array_equal(mc.gate_conv_gate_auto(*args), mc.gate_conv_gate(*args))


def test_block_sizes_heuristic():
  resolved = mc._resolve(None, (1, 8192, 4096))
  assert None not in [getattr(resolved, f) for f in resolved.__dataclass_fields__]
  programs = 4096 // resolved.block_c * -(-8192 // (resolved.chunk * resolved.segment_chunks))
  assert programs >= mc.TARGET_PROGRAMS and resolved.segment_chunks >= mc.MIN_SEGMENT_CHUNKS
  short = mc._resolve(None, (1, 20, 4096))
  assert short.segment_chunks == -(-20 // short.chunk)  # one segment, no chunk beyond L


def _lower_for_cuda(fn, *shapes):
  return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype,block_sizes", [
    (jnp.bfloat16, None),
    (jnp.float32, mc.BlockSizes(chunk=8, block_c=64, segment_chunks=5, num_warps=2)),
])
def test_lowers_for_cuda(dtype, block_sizes):
  """The Triton lowering (power-of-two shapes etc.) runs for all four kernels on a CPU."""
  batch, length, channels, order = 2, 3000, 256, 16
  x = jax.ShapeDtypeStruct((batch, length, channels), dtype)
  poles = jax.ShapeDtypeStruct((channels, order), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  kernel = functools.partial(mc.gate_conv_gate_pallas, block_sizes=block_sizes)
  fwd_text = _lower_for_cuda(kernel, x, x, x, poles, poles, dskip)
  assert fwd_text.count("__gpu$xla.gpu.triton") == 2
  assert "modal_conv_states" in fwd_text and "modal_conv_fwd" in fwd_text

  def fwd_bwd(post, pre, v, lp, r, dskip, ct):
    out, vjp = jax.vjp(kernel, post, pre, v, lp, r, dskip)
    return out, vjp(ct)

  text = _lower_for_cuda(fwd_bwd, x, x, x, poles, poles, dskip, x)
  for name in ("modal_conv_states", "modal_conv_fwd", "modal_conv_bwd_forward",
               "modal_conv_bwd_reverse"):
    assert name in text


@pytest.mark.parametrize("segments", [1, 2, 37])
def test_segment_chains_match_sequential_float64(segments):
  """The associative-scan chains equal the segment recurrences run one step at a time:
  s0_(k+1) = P s0_k + s_hat_k, z0_(k+1) = P z0_k + Ls P s0_k + z_hat_k (zero start) and
  c_k = a_hat_(k+1) + P c_(k+1) (c_last = 0)."""
  rng = np.random.default_rng(segments)
  batch, order, channels, seg_len = 2, 4, 8, 16
  p_seg = rng.uniform(0.2, 1.0, (order, channels))
  s_hat, z_hat, a_hat = (rng.standard_normal((batch, segments, order, channels)) for _ in range(3))
  s0, z0 = np.zeros_like(s_hat), np.zeros_like(z_hat)
  for k in range(segments - 1):
    s0[:, k + 1] = p_seg * s0[:, k] + s_hat[:, k]
    z0[:, k + 1] = p_seg * z0[:, k] + seg_len * p_seg * s0[:, k] + z_hat[:, k]
  c = np.zeros_like(a_hat)
  for k in range(segments - 2, -1, -1):
    c[:, k] = a_hat[:, k + 1] + p_seg * c[:, k + 1]
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  got_s, got_z = mc._chain_forward(f32(s_hat), f32(z_hat), (f32(p_seg), f32(seg_len * p_seg)))
  got_s_only, none = mc._chain_forward(f32(s_hat), None, (f32(p_seg), f32(seg_len * p_seg)))
  got_c = mc._chain_reverse(f32(a_hat), f32(p_seg))
  assert none is None
  for got, want in ((got_s, s0), (got_z, z0), (got_s_only, s0), (got_c, c)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
