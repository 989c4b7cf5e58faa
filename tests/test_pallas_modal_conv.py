"""Pallas Hyena-LI modal kernels (pallas_kernels/modal_conv.py) in interpret mode vs a float64
numpy reference (output and all six gradients), poisoning, the plain-JAX reference, the
`li_method="pallas"` dispatch in ops.hyena, and lowering for CUDA on a CPU-only machine.

Interpret mode fills every output buffer with NaN before the kernel runs, so an unwritten
tile shows as NaN; test_unwritten_tile_is_caught proves the comparisons catch it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    # an order that is not a power of two (padded modes); the backward's forward walk in
    # chunks of 4 (the default under chunk 8), 2 and 8 rows.
    (2, 150, 32, 16, jnp.float32, mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4)),
    (1, 203, 64, 5, jnp.float32, mc.BlockSizes(chunk=4, block_c=32, segment_chunks=16,
                                               chunk_bwd_forward=2)),
    (2, 100, 32, 16, jnp.bfloat16, mc.BlockSizes(chunk=8, block_c=32, segment_chunks=3,
                                                 chunk_bwd_forward=8)),
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


@pytest.mark.parametrize("name,program", [("_fwd_kernel", (0, 1, 1)),
                                          ("_bwd_reverse_kernel", (0, 1, 1)),
                                          ("_chain_forward_kernel", (0, 1)),
                                          ("_chain_reverse_kernel", (0, 0))])
def test_unwritten_tile_is_caught(monkeypatch, name, program):
  """A kernel that leaves one program's rows unwritten must fail the reference comparison."""
  monkeypatch.setattr(mc, name, helpers.skip_one_program(getattr(mc, name), mc, program))
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
  for walk_chunk in (3, 16):  # not a power of two; does not divide the segment's 24 rows
    reason = mc.unsupported_reason((1, 100, 32), (32, 16), mc.BlockSizes(
        chunk=8, segment_chunks=3, chunk_bwd_forward=walk_chunk))
    assert f"chunk_bwd_forward {walk_chunk} must be a power of two dividing" in reason
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
  """The Triton lowering (power-of-two shapes etc.) runs for all six kernels on a CPU (the
  second case's 75 segments take the chain kernels' fori_loop walk)."""
  batch, length, channels, order = 2, 3000, 256, 16
  x = jax.ShapeDtypeStruct((batch, length, channels), dtype)
  poles = jax.ShapeDtypeStruct((channels, order), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  kernel = functools.partial(mc.gate_conv_gate_pallas, block_sizes=block_sizes)
  fwd_text = _lower_for_cuda(kernel, x, x, x, poles, poles, dskip)
  assert fwd_text.count("__gpu$xla.gpu.triton") == 3
  for name in ("modal_conv_states", "modal_conv_chain", "modal_conv_fwd"):
    assert name in fwd_text

  def fwd_bwd(post, pre, v, lp, r, dskip, ct):
    out, vjp = jax.vjp(kernel, post, pre, v, lp, r, dskip)
    return out, vjp(ct)

  text = _lower_for_cuda(fwd_bwd, x, x, x, poles, poles, dskip, x)
  for name in ("modal_conv_states", "modal_conv_chain", "modal_conv_fwd", "modal_conv_bwd_forward",
               "modal_conv_chain_reverse", "modal_conv_bwd_reverse"):
    assert name in text


@pytest.mark.parametrize("segments", [1, 2, 37])
def test_segment_chains_match_sequential_float64(monkeypatch, segments):
  """The chain kernels (interpret mode; 37 segments: the fori_loop walk, fewer: unrolled) equal
  the segment recurrences run one step at a time in float64:
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
  monkeypatch.setattr(mc, "MAX_UNROLLED_SEGMENTS", 32)
  p_seg_NC = (f32(p_seg), f32(seg_len * p_seg))
  got_s, got_z = mc._chain_forward(f32(s_hat), f32(z_hat), p_seg_NC, block_c=4, interpret=True)
  got_s_only, none = mc._chain_forward(f32(s_hat), None, p_seg_NC, block_c=4, interpret=True)
  got_c = mc._chain_reverse(f32(a_hat), f32(p_seg), block_c=4, interpret=True)
  assert none is None
  for got, want in ((got_s, s0), (got_z, z0), (got_s_only, s0), (got_c, c)):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def _featurize_f64(z, w):
  """f[t] = sum_j w[:, j] z[t - j] (causal; float64)."""
  f = np.zeros_like(z)
  for j in range(w.shape[1]):
    f[:, j:] += w[:, j] * z[:, :z.shape[1] - j]
  return f


def _featurized_case(seed, batch, length, channels, order, num_taps, dtype):
  (post, pre, v, lp, r, dskip), ct = _inputs(seed, batch, length, channels, order, dtype)
  rng = np.random.default_rng(seed + 1)
  taps = [jnp.asarray(rng.uniform(-1, 1, (channels, num_taps)), jnp.float32) for _ in range(3)]
  return (post, pre, v, *taps, lp, r, dskip), ct


def _check_featurized(op, args, ct, tol):
  """Output and all nine gradients of op(z_post, z_pre, z_v, w_post, w_pre, w_v, lp, r, dskip)
  against featurized_reference_f64."""
  out, vjp = jax.vjp(op, *args)
  got = (out, *vjp(ct))
  names = ("out", "dz_post", "dz_pre", "dz_v", "dw_post", "dw_pre", "dw_v", "dlog_poles",
           "dresidues", "ddskip")
  want_out, want_grads = featurized_reference_f64(args, ct)
  errs = {n: _rel_err(g, wv) for n, g, wv in zip(names, got, (want_out, *want_grads))}
  assert max(errs.values()) < tol, errs


def featurized_reference_f64(args, ct):
  """(out, nine gradients) of the featurized LI operator in float64: features by a direct loop,
  _reference_f64 on them, then the featurizer's transpose dz[t] = sum_j w_j df[t + j] and tap
  gradients dw_j = sum_t df[t] z[t - j]."""
  z = [np.asarray(a, np.float64) for a in args[:3]]
  w = [np.asarray(a, np.float64) for a in args[3:6]]
  feats = [_featurize_f64(zs, ws) for zs, ws in zip(z, w)]
  want_out, (*dfeat, dlp, dr, ddskip) = _reference_f64(*feats, *args[6:], ct)
  length = z[0].shape[1]
  dz, dw = [], []
  for df, zs, ws in zip(dfeat, z, w):
    dz_s = np.zeros_like(df)
    dw_s = np.zeros_like(ws)
    for j in range(ws.shape[1]):
      dz_s[:, :length - j] += ws[:, j] * df[:, j:]
      dw_s[:, j] = np.sum(df[:, j:] * zs[:, :length - j], axis=(0, 1))
    dz.append(dz_s)
    dw.append(dw_s)
  return want_out, (*dz, *dw, dlp, dr, ddskip)


FEATURIZED_CASES = [
    # (batch, length, channels, order, featurizer taps, dtype, block sizes): several segments
    # (the taps reach across chunk and segment starts), L not a multiple of anything, B > 1,
    # more taps than the chunk has rows.
    (2, 150, 32, 16, 3, jnp.float32, mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4)),
    (1, 203, 64, 5, 6, jnp.float32, mc.BlockSizes(chunk=4, block_c=32, segment_chunks=16,
                                                  chunk_bwd_forward=1)),
    (2, 100, 32, 16, 2, jnp.bfloat16, mc.BlockSizes(chunk=8, block_c=32, segment_chunks=3)),
    # segments shorter than the featurizer's reach (4 rows, 6 taps): the backward's transpose
    # and shifted adjoint window span several segments
    (1, 37, 16, 4, 6, jnp.float32, mc.BlockSizes(chunk=4, block_c=16, segment_chunks=1)),
]


@pytest.mark.parametrize("batch,length,channels,order,num_taps,dtype,block_sizes", FEATURIZED_CASES)
def test_featurized_matches_float64_reference(batch, length, channels, order, num_taps, dtype,
                                              block_sizes):
  args, ct = _featurized_case(length + num_taps, batch, length, channels, order, num_taps, dtype)
  kernel = functools.partial(mc.featurized_gate_conv_gate_pallas, block_sizes=block_sizes,
                             interpret=True)
  _check_featurized(kernel, args, ct, 2e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize("name,program", [("_states_kernel", (0, 1, 0)),  # the last segment's
                                          ("_bwd_forward_kernel", (0, 1, 1)),  # state is unused
                                          ("_bwd_reverse_kernel", (0, 0, 1))])
def test_featurized_unwritten_tile_is_caught(monkeypatch, name, program):
  monkeypatch.setattr(mc, name, helpers.skip_one_program(getattr(mc, name), mc, program))
  jax.clear_caches()
  try:
    args, ct = _featurized_case(4, 1, 64, 32, 4, 3, jnp.float32)
    kernel = functools.partial(mc.featurized_gate_conv_gate_pallas, interpret=True,
                               block_sizes=mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4))
    with pytest.raises(AssertionError):
      _check_featurized(kernel, args, ct, 2e-5)
  finally:
    jax.clear_caches()


def test_featurized_unsupported_shapes_say_why():
  assert mc.featurized_unsupported_reason((1, 10, 32), (32, 3), (32, 16)) is None
  assert "[C, J]" in mc.featurized_unsupported_reason((1, 10, 32), (16, 3), (32, 16))
  assert "taps" in mc.featurized_unsupported_reason((1, 10, 32), (32, 9), (32, 16))
  assert mc.featurized_unsupported_reason((1, 10, 24), (24, 3), (24, 16),
                                          mc.BlockSizes(block_c=8)) is None
  assert "power of two" in mc.featurized_unsupported_reason((1, 10, 24), (24, 3), (24, 16),
                                                            mc.BlockSizes(block_c=6))
  args, _ = _featurized_case(1, 1, 20, 32, 4, 3, jnp.float32)
  with pytest.raises(ValueError, match="taps"):
    mc.featurized_gate_conv_gate_pallas(*args[:3], *(w[:, :1].repeat(9, 1) for w in args[3:6]),
                                        *args[6:], interpret=True)


def test_featurized_lowers_for_cuda():
  batch, length, channels, order = 1, 3000, 256, 16
  x = jax.ShapeDtypeStruct((batch, length, channels), jnp.bfloat16)
  taps = jax.ShapeDtypeStruct((channels, 3), jnp.float32)
  poles = jax.ShapeDtypeStruct((channels, order), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)

  def fwd_bwd(zp, zq, zv, wp, wq, wv, lp, r, ds, ct):
    out, vjp = jax.vjp(mc.featurized_gate_conv_gate_pallas, zp, zq, zv, wp, wq, wv, lp, r, ds)
    return out, vjp(ct)

  text = _lower_for_cuda(fwd_bwd, x, x, x, taps, taps, taps, poles, poles, dskip, x)
  for name in ("modal_conv_states", "modal_conv_chain", "modal_conv_fwd", "modal_conv_bwd_forward",
               "modal_conv_chain_reverse", "modal_conv_bwd_reverse"):
    assert name in text
  assert "featurizer_bwd" not in text  # the featurizer's backward is in the walks


def test_module_with_fused_featurizer_equals_fft(monkeypatch):
  """HyenaLI with li_method "pallas_fused" (the featurized kernels, interpret mode) equals the
  XLA FFT path, output and every parameter's and the input's gradient."""
  from sh2_jax.layers.hyena import HyenaLI  # noqa: PLC0415

  calls = []
  for name in ("featurized_gate_conv_gate_pallas", "featurized_gate_conv_gate_proj_pallas"):
    monkeypatch.setattr(mc, name, lambda *a, real=getattr(mc, name), **k:
                        calls.append(a[0].shape) or real(*a, **k))

  config = ModelConfig(d_model=32, num_heads=2, layout="LI", dtype="float32", li_method="fft")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 70, 32), jnp.float32)
  params = HyenaLI(config).init(jax.random.PRNGKey(1), x)
  ct = jax.random.normal(jax.random.PRNGKey(2), (2, 70, 32), jnp.float32)

  def run(method):
    module = HyenaLI(dataclasses.replace(config, li_method=method))
    out, vjp = jax.vjp(lambda p, xx: module.apply(p, xx), params, x)
    return out, vjp(ct)

  (out_f, grads_f), (out_p, grads_p) = run("fft"), run("pallas_fused")
  assert _rel_err(out_p, out_f) < TOLERANCE[jnp.float32]
  leaves_f, leaves_p = jax.tree.leaves(grads_f), jax.tree.leaves(grads_p)
  assert len(leaves_f) == len(leaves_p) == 9  # 8 parameters and x
  for got, want in zip(leaves_p, leaves_f):
    assert _rel_err(got, want) < 5e-5
  assert calls == [(2, 70, 32)]  # the fused kernels ran (once: the fft run does not call them)
  assert hyena.resolve_li_method("pallas_fused", 100) == "pallas"


def test_li_mixer_auto_fuses_the_featurizer_on_gpu(monkeypatch):
  """li_mixer "auto" takes the featurized kernels when the backend is a GPU (the kernel runs in
  interpret mode here) and equals the fft method; on CPU "auto" never calls them."""
  rng = np.random.default_rng(11)
  width, length = 32, 50
  x = jnp.asarray(rng.standard_normal((1, length, width)), jnp.float32)
  w_in = jnp.asarray(rng.standard_normal((width, 3, width)) / np.sqrt(width), jnp.float32)
  w_feat = jnp.asarray(rng.standard_normal((3, width, 3)) / np.sqrt(3), jnp.float32)
  log_poles = jnp.log(jnp.asarray(rng.uniform(0.5, 0.95, (width, 4)), jnp.float32))
  residues = jnp.asarray(rng.standard_normal((width, 4)) * 0.2, jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(width), jnp.float32)
  args = (x, w_in, w_feat, log_poles, residues, dskip)
  want = hyena.li_mixer(*args, method="fft")

  calls = []
  fused = mc.featurized_gate_conv_gate_pallas
  monkeypatch.setattr(mc, "featurized_gate_conv_gate_pallas",
                      lambda *a, **k: calls.append(a[0].shape) or fused(*a, **{**k, "interpret": True}))
  hyena.li_mixer(*args, method="auto")
  assert calls == []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  got = hyena.li_mixer(*args, method="auto")
  assert calls == [(1, length, width)]
  assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("in_op", [False, True])
def test_remat_policy_save_dots_keeps_the_segment_states(in_op):
  """Under jax.checkpoint with the model's "save_dots" policy, the featurized LI kernels'
  forward (with the output projection in the op or after it) saves its two segment-start state
  arrays (s, z: float32 [B, S, N, C], named SEGMENT_STATES) for the backward, which then needs
  no state pass (and the in-projection's three [D, D] weight slices, named WEIGHT_VIEWS);
  plain dots_saveable saves none of these. (The gradients through the saved states are
  checked against float64 by the reference tests above, which run the same custom_vjp rules.)"""
  import contextlib  # noqa: PLC0415
  import io  # noqa: PLC0415

  from sh2_jax import model as model_lib  # noqa: PLC0415
  from sh2_jax.layers.hyena import HyenaLI  # noqa: PLC0415

  config = ModelConfig(d_model=32, num_heads=2, layout="LI", dtype="float32",
                       li_method="pallas_fused", remat=in_op, out_proj_in_kernel_bwd=True)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 70, 32), jnp.float32)
  params = HyenaLI(config).init(jax.random.PRNGKey(4), x)
  module = HyenaLI(config)
  loss = lambda p, xx: jnp.sum(jnp.sin(module.apply(p, xx)))  # noqa: E731
  saved = []
  for policy in (jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                 model_lib.REMAT_POLICIES["save_dots"]):
    fn = jax.checkpoint(loss, policy=policy)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(fn, params, x)
    saved.append(printed.getvalue().splitlines())
  extra = [line for line in saved[1] if line not in saved[0]]
  views = [line for line in extra if "'hyena_weight_views'" in line]
  states = [line for line in extra if line not in views]
  dropped = [line for line in saved[0] if line not in saved[1]]
  assert len(views) == 3 and len(states) == 2, extra
  # the slices stand in for the whole in-projection weight, which is no longer a residual
  assert [line.split(" from ")[1] for line in dropped] == ["the argument p['params']['in_proj'].value"]
  kernel = "featurized_gate_conv_gate_proj_pallas" if in_op else "featurized_gate_conv_gate_pallas"
  assert all(line.startswith("f32[2,2,16,32]") and f"'{kernel}'" in line for line in states), extra
  assert all(line.startswith("f32[32,32]") for line in views), views
