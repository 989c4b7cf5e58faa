"""Fused featurizer + gate-conv-gate kernels (pallas_kernels/featurized_conv.py) in interpret
mode vs a float64 numpy loop (output and the gradients of z, featurizer taps, filter and skip),
NaN poisoning of unwritten tiles, and lowering for CUDA on a CPU-only machine.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blocked_conv as bc
from tests import helpers
from pallas_kernels import featurized_conv as fc
from sh2_jax.ops import hyena

TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 1.5e-2}


def _fir(x, w_CK):
  """Causal depthwise FIR in float64 by a loop over taps: y[t] = sum_k w[:, k] x[t - k]."""
  y = np.zeros_like(x)
  for k in range(w_CK.shape[1]):
    y[:, k:] += w_CK[:, k] * x[:, :x.shape[1] - k]
  return y


def _fir_adjoint(g, w_CK):
  dx = np.zeros_like(g)
  for k in range(w_CK.shape[1]):
    dx[:, :g.shape[1] - k] += w_CK[:, k] * g[:, k:]
  return dx


def _reference_f64(z, w_feat, h, dskip, ct):
  """Output and gradients (z, w_feat, h, dskip) of the fused operator, float64 loops."""
  z, w_feat, h, dskip, ct = (np.asarray(x, np.float64) for x in (z, w_feat, h, dskip, ct))
  channels = z.shape[-1] // 3
  groups, num_taps = h.shape
  h_CK = np.repeat(h, channels // groups, axis=0)
  f = _fir(z, w_feat)
  post, pre, v = f[..., :channels], f[..., channels:2 * channels], f[..., 2 * channels:]
  u = pre * v
  y = _fir(u, h_CK) + dskip * u
  out = post * y
  g = ct * post
  du = _fir_adjoint(g, h_CK) + dskip * g
  df = np.concatenate([ct * y, du * v, du * pre], axis=-1)
  length = z.shape[1]
  dw_feat = np.stack([np.einsum("blc,blc->c", df[:, k:], z[:, :length - k])
                      for k in range(w_feat.shape[1])], axis=1)
  dh_CK = np.stack([np.einsum("blc,blc->c", g[:, k:], u[:, :length - k])
                    for k in range(num_taps)], axis=1)
  dh = dh_CK.reshape(groups, channels // groups, num_taps).sum(1)
  return out, (_fir_adjoint(df, w_feat), dw_feat, dh, np.einsum("blc,blc->c", g, u))


def _inputs(seed, batch, length, channels, groups, taps, feat_taps, dtype):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.standard_normal((batch, length, 3 * channels)), dtype)
  ct = jnp.asarray(rng.standard_normal((batch, length, channels)), dtype)
  w_feat = jnp.asarray(rng.standard_normal((3 * channels, feat_taps)) / np.sqrt(feat_taps),
                       jnp.float32)
  h = jnp.asarray(rng.standard_normal((groups, taps)) / np.sqrt(taps), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  return z, w_feat, h, dskip, ct


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.all(np.isfinite(got)), "non-finite values (unwritten, NaN-poisoned tile?)"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check(args, block_sizes, dtype, with_dskip=True, tap_grads="kernel"):
  z, w_feat, h, dskip, ct = args
  kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, block_sizes=block_sizes,
                             interpret=True, tap_grads=tap_grads)
  if with_dskip:
    out, vjp = jax.vjp(kernel, z, w_feat, h, dskip)
  else:
    out, vjp = jax.vjp(lambda a, b, c: kernel(a, b, c, None), z, w_feat, h)
    dskip = jnp.zeros_like(dskip)
  grads = vjp(ct)
  want_out, want_grads = _reference_f64(z, w_feat, h, dskip, ct)
  assert out.dtype == z.dtype
  errs = {"out": _rel_err(out, want_out)}
  errs.update({n: _rel_err(g, w) for n, g, w in zip(["dz", "dw_feat", "dh", "ddskip"], grads,
                                                      want_grads)})
  assert max(errs.values()) < TOLERANCE[dtype], errs


CASES = [
    # (batch, length, channels, groups, taps, featurizer taps, dtype, block sizes)
    (1, 300, 32, 1, 7, 3, jnp.float32, bc.BlockSizes(chunk=64)),
    (2, 200, 64, 4, 7, 3, jnp.bfloat16, None),
    (2, 150, 32, 2, 128, 3, jnp.float32, bc.BlockSizes(chunk=128)),
    (1, 200, 32, 1, 128, 2, jnp.bfloat16, bc.BlockSizes(chunk=128, bwd_transpose_by_dot=False)),
    (1, 256, 64, 2, 16, 4, jnp.float32, bc.BlockSizes(chunk=32, block_c=16, num_segments_fwd=4,
                                                       num_segments_bwd=2)),
    (2, 96, 32, 1, 3, 1, jnp.float32, bc.BlockSizes(chunk=16, num_segments_fwd=3,
                                                     num_segments_bwd=3)),
]


@pytest.mark.parametrize("batch,length,channels,groups,taps,feat_taps,dtype,block_sizes", CASES)
def test_matches_float64_reference(batch, length, channels, groups, taps, feat_taps, dtype,
                                   block_sizes):
  seed = hash((batch, length, channels, groups, taps, feat_taps, str(dtype))) % 2**31
  args = _inputs(seed, batch, length, channels, groups, taps, feat_taps, dtype)
  _check(args, block_sizes, dtype)


@pytest.mark.parametrize("halo_bwd", [None, False])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]])
def test_tap_grads_in_xla_match_float64_reference(case, halo_bwd):
  """tap_grads="xla" (no on-chip tap reduction): bf16, segments, one-tap featurizer, L not a
  multiple of the chunk; the default backward (overlapping chunks at these filter lengths) and
  the one that carries pre/v between chunks (halo_bwd=False)."""
  batch, length, channels, groups, taps, feat_taps, dtype, block_sizes = case
  args = _inputs(17 + length, batch, length, channels, groups, taps, feat_taps, dtype)
  block_sizes = dataclasses.replace(block_sizes or bc.BlockSizes(), halo_bwd=halo_bwd)
  _check(args, block_sizes, dtype, tap_grads="xla")


def test_without_dskip():
  args = _inputs(5, 1, 70, 32, 2, 7, 3, jnp.float32)
  _check(args, bc.BlockSizes(chunk=16), jnp.float32, with_dskip=False)


def test_plain_jax_reference_matches_float64():
  z, w_feat, h, dskip, ct = _inputs(11, 2, 90, 32, 4, 7, 3, jnp.float32)
  out, vjp = jax.vjp(lambda *a: fc.featurized_gate_conv_gate(*a, chunk=16), z, w_feat, h, dskip)
  want_out, want_grads = _reference_f64(z, w_feat, h, dskip, ct)
  assert _rel_err(out, want_out) < 2e-6
  for got, want in zip(vjp(ct), want_grads):
    assert _rel_err(got, want) < 2e-6


@pytest.mark.parametrize("which,tap_grads", [("fwd", "kernel"), ("bwd", "kernel"), ("bwd", "xla")])
def test_unwritten_tile_is_caught(monkeypatch, which, tap_grads):
  name = "_fgcg_fwd_kernel" if which == "fwd" else "_fgcg_bwd_kernel"
  monkeypatch.setattr(fc, name, helpers.skip_one_program(getattr(fc, name), fc, (0, 1, 0)))
  jax.clear_caches()
  try:
    args = _inputs(3, 1, 64, 32, 1, 5, 3, jnp.float32)
    with pytest.raises(AssertionError, match="non-finite"):
      _check(args, bc.BlockSizes(chunk=16, block_c=16, halo_bwd=False), jnp.float32,
             tap_grads=tap_grads)
  finally:
    jax.clear_caches()


OVERLAP = {"halo_fwd": True, "halo_bwd": True}  # both kernels overlap their chunks

HALO_CASES = [
    # (batch, length, channels, groups, taps, featurizer taps, dtype, block sizes): L not a
    # multiple of the chunk or of its stride T - K + 1, B > 1, segments, both transposes
    (1, 300, 32, 1, 7, 3, jnp.float32, bc.BlockSizes(chunk=64, **OVERLAP)),
    (2, 200, 64, 4, 7, 3, jnp.bfloat16, bc.BlockSizes(**OVERLAP)),
    (2, 96, 32, 1, 3, 1, jnp.float32, bc.BlockSizes(chunk=16, num_segments_fwd=3,
                                                     num_segments_bwd=3, **OVERLAP)),
    (1, 256, 64, 2, 16, 4, jnp.float32, bc.BlockSizes(chunk=32, block_c=16, num_segments_fwd=4,
                                                       num_segments_bwd=2, **OVERLAP,
                                                       bwd_transpose_by_dot=True)),
    # segment counts that do not divide the 10 chunks (the overlapping kernels take any count)
    (1, 150, 32, 2, 5, 2, jnp.float32, bc.BlockSizes(chunk=16, num_segments_fwd=4,
                                                      num_segments_bwd=3, **OVERLAP)),
]


@pytest.mark.parametrize("batch,length,channels,groups,taps,feat_taps,dtype,block_sizes",
                         HALO_CASES)
def test_halo_matches_float64_reference(batch, length, channels, groups, taps, feat_taps, dtype,
                                        block_sizes):
  """halo_fwd=True, halo_bwd=True (overlapping chunks, no carry): output and every gradient."""
  args = _inputs(41 + length + taps, batch, length, channels, groups, taps, feat_taps, dtype)
  _check(args, block_sizes, dtype, tap_grads="xla")


def test_halo_without_dskip_and_interleaved():
  """Hyena-SE's form (no skip term) with the Evo 2 column order."""
  args = _inputs(43, 2, 140, 32, 2, 7, 3, jnp.float32)
  kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, interpret=True,
                             block_sizes=bc.BlockSizes(chunk=16, num_segments_bwd=3, **OVERLAP),
                             layout="interleaved")
  check_permuted_against_f64(kernel, args, _interleave(32), jnp.float32, with_dskip=False)


@pytest.mark.parametrize("which", ["_fgcg_fwd_halo_kernel", "_fgcg_bwd_halo_kernel"])
def test_halo_unwritten_tile_is_caught(monkeypatch, which):
  z, w_feat, h, dskip, ct = _inputs(3, 1, 64, 32, 1, 5, 3, jnp.float32)

  def run():
    kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, interpret=True,
                               block_sizes=bc.BlockSizes(chunk=16, block_c=16, **OVERLAP))
    out, vjp = jax.vjp(kernel, z, w_feat, h, dskip)
    return out if which == "_fgcg_fwd_halo_kernel" else vjp(ct)[0]

  check_unwritten_tile_caught(monkeypatch, fc, which, run)


def test_halo_refusals_say_why():
  assert "chunk of at least 2 K = 256" in fc.unsupported_reason(
      (1, 256, 96), (96, 3), (2, 128), bc.BlockSizes(**OVERLAP))
  assert fc.unsupported_reason((1, 256, 96), (96, 3), (2, 7), bc.BlockSizes(**OVERLAP)) is None
  # 4 chunks of 64: three segments only where the kernel overlaps its chunks
  thirds = dict(num_segments_fwd=3, num_segments_bwd=3)
  assert fc.unsupported_reason((1, 256, 96), (96, 3), (2, 7),
                               bc.BlockSizes(**thirds, **OVERLAP)) is None
  assert "num_segments_fwd 3 must divide the number of chunks 4" in fc.unsupported_reason(
      (1, 256, 96), (96, 3), (2, 7), bc.BlockSizes(**thirds, halo_fwd=False))
  with pytest.raises(ValueError, match="num_segments_bwd 3 must divide"):
    fc.featurized_gate_conv_gate_pallas(jnp.zeros((1, 256, 96)), jnp.zeros((96, 3)),
                                        jnp.zeros((2, 7)), interpret=True, tap_grads="kernel",
                                        block_sizes=bc.BlockSizes(num_segments_bwd=3))
  with pytest.raises(ValueError, match="tap_grads='xla'"):
    fc.featurized_gate_conv_gate_pallas(jnp.zeros((1, 64, 96)), jnp.zeros((96, 3)),
                                        jnp.zeros((2, 7)), interpret=True, tap_grads="kernel",
                                        block_sizes=bc.BlockSizes(**OVERLAP))


def test_unsupported_shapes_say_why():
  assert "featurizer length 5" in fc.unsupported_reason((1, 64, 96), (96, 5), (1, 7))
  assert "3 C" in fc.unsupported_reason((1, 64, 95), (95, 3), (1, 7))
  assert fc.unsupported_reason((1, 64, 96), (96, 3), (2, 7)) is None
  assert "blocked-kernel (MR) option" in fc.unsupported_reason(
      (1, 64, 96), (96, 3), (2, 7), bc.BlockSizes(bwd_dh_in_kernel=False))
  with pytest.raises(ValueError, match="featurizer length"):
    fc.featurized_gate_conv_gate_pallas(jnp.zeros((1, 64, 96)), jnp.zeros((96, 5)),
                                        jnp.zeros((1, 7)), interpret=True)


def test_z_over_the_window_limit_takes_the_unfused_path(monkeypatch):
  """Over 4 GiB, Pallas indexes in 64 bits and zero-extends the negative row starts of the
  shifted windows: both fused kernels refuse such z and explicit_mixer goes unfused (the limit
  is lowered here so that a small z crosses it); the result still equals the direct path."""
  from pallas_kernels import featurized_short_conv as fsc
  from sh2_jax.ops import hyena

  assert "4 GiB" in fc.unsupported_reason((1, 262144, 12288), (12288, 3), (256, 7))
  assert "4 GiB" in fsc.unsupported_reason((1, 262144, 12288), (12288, 3), (256, 7))
  assert fc.unsupported_reason((1, 131072, 12288), (12288, 3), (256, 7)) is None
  assert fc.unsupported_reason((1, 131072, 12288), (12288, 3), (256, 7), itemsize=4)
  monkeypatch.setattr(fc, "MAX_WINDOWED_BYTES", 1000)
  calls = []
  for module, name in ((hyena.featurized_conv, "featurized_gate_conv_gate_pallas"),
                       (hyena.featurized_short_conv, "featurized_short_conv_pallas")):
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name))
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (1, 40, 32))
  w_in = jax.random.normal(keys[1], (32, 3, 32)) * 0.2
  w_feat = jax.random.normal(keys[2], (3, 32, 3))
  h = jax.random.normal(keys[3], (2, 7))
  with jax.default_matmul_precision("highest"):
    for kernel in ("toeplitz", "direct"):
      monkeypatch.setattr(hyena, "SHORT_FILTER_KERNEL", kernel)
      out = hyena.explicit_mixer(x, w_in, w_feat, h, None, method="pallas")
      assert not calls, calls
      want = hyena.explicit_mixer(x, w_in, w_feat, h, None, method="direct")
      np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def _lower_for_cuda(fn, *shapes):
  return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype,taps,block_sizes,tap_grads,layout", [
    (jnp.bfloat16, 7, None, "kernel", "blocked"),
    (jnp.bfloat16, 7, None, "xla", "blocked"),
    (jnp.bfloat16, 128, None, "kernel", "blocked"),
    (jnp.float32, 128, None, "kernel", "blocked"),
    (jnp.bfloat16, 128, bc.BlockSizes(bwd_transpose_by_dot=False), "xla", "blocked"),
    (jnp.bfloat16, 7, None, "xla", "interleaved"),
    (jnp.float32, 128, None, "kernel", "interleaved"),
    (jnp.bfloat16, 7, bc.BlockSizes(**OVERLAP), "xla", "blocked"),
    (jnp.bfloat16, 7, bc.BlockSizes(**OVERLAP, bwd_transpose_by_dot=True), "xla", "interleaved"),
    (jnp.float32, 7, bc.BlockSizes(**OVERLAP), "xla", "blocked"),
])
def test_lowers_for_cuda(dtype, taps, block_sizes, tap_grads, layout):
  batch, length, channels, groups = 2, 4000, 512, 8
  z = jax.ShapeDtypeStruct((batch, length, 3 * channels), dtype)
  w_feat = jax.ShapeDtypeStruct((3 * channels, 3), jnp.float32)
  h = jax.ShapeDtypeStruct((groups, taps), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  ct = jax.ShapeDtypeStruct((batch, length, channels), dtype)
  kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, block_sizes=block_sizes,
                             tap_grads=tap_grads, layout=layout)

  def fwd_bwd(z, w_feat, h, dskip, ct):
    out, vjp = jax.vjp(kernel, z, w_feat, h, dskip)
    return out, vjp(ct)

  text = _lower_for_cuda(fwd_bwd, z, w_feat, h, dskip, ct)
  assert "featurized_gate_conv_gate_fwd" in text and "featurized_gate_conv_gate_bwd" in text
  assert ("featurizer_bwd" in text) == (tap_grads == "xla")


def test_halo_without_dskip_lowers_for_cuda():
  """Hyena-SE's halo kernels (no dskip: no skip term, no ddskip accumulator) with the output
  projection, as the module runs them."""
  batch, length, channels = 1, 4096, 256
  z = jax.ShapeDtypeStruct((batch, length, 3 * channels), jnp.bfloat16)
  w_feat = jax.ShapeDtypeStruct((3 * channels, 3), jnp.float32)
  h = jax.ShapeDtypeStruct((16, 7), jnp.float32)
  w_out = jax.ShapeDtypeStruct((channels, channels), jnp.bfloat16)
  kernel = functools.partial(fc.featurized_gate_conv_gate_proj_pallas,
                             block_sizes=bc.BlockSizes(**OVERLAP), layout="interleaved")

  def fwd_bwd(z, w_feat, h, w_out):
    out, vjp = jax.vjp(lambda a, b, c, d: kernel(a, b, c, None, d), z, w_feat, h, w_out)
    return out, vjp(out)

  text = _lower_for_cuda(fwd_bwd, z, w_feat, h, w_out)
  assert "featurized_gate_conv_gate_fwd" in text and "featurized_gate_conv_gate_bwd" in text


@pytest.mark.parametrize("batch,padded_len,width,taps,chunk,launch", [
    (1, 256, 192, 3, 32, {}), (2, 96, 48, 4, 16, {}), (1, 64, 64, 1, 32, {}),
    (1, 1024, 128, 2, 32, {}),
    (1, 512, 96, 3, 16, {"block_c": 128, "max_programs": 64, "num_warps": 2})])
def test_featurizer_backward_kernel_matches_float64(batch, padded_len, width, taps, chunk,
                                                    launch):
  """dz[t] = sum_j w_j df[t + j] and dw_j = sum_t df[t] z[t - j] against a numpy float64 loop;
  outputs NaN-poisoned first (an unwritten tile is caught); 1024 rows take several segments, as
  does the explicit launch (block_c 128 halved to 32 for 96 columns, 4 segments)."""
  rng = np.random.default_rng(padded_len + width + taps)
  length = padded_len - 5
  df = rng.standard_normal((batch, padded_len, width))
  df[:, length:] = 0.0  # rows past the sequence, as the gate kernel leaves them
  z = rng.standard_normal((batch, padded_len, width))
  w = rng.standard_normal((width, taps))
  want_dz = np.zeros_like(df)
  want_dw = np.zeros((width, taps))
  for t in range(padded_len):
    for j in range(taps):
      if t + j < padded_len:
        want_dz[:, t] += w[:, j] * df[:, t + j]
      if t - j >= 0:
        want_dw[:, j] += np.sum(df[:, t] * z[:, t - j], axis=0)
  dz, dw = fc.featurizer_backward_pallas(jnp.asarray(df, jnp.float32), jnp.asarray(z, jnp.float32),
                                         jnp.asarray(w, jnp.float32), chunk=chunk, interpret=True,
                                         **launch)
  assert _rel_err(dz, want_dz) < 1e-6 and _rel_err(dw, want_dw) < 1e-5


def test_featurizer_backward_refuses_a_bad_block_c():
  with pytest.raises(ValueError, match="block_c 24 must be a power of two >= 16"):
    fc.featurizer_backward_pallas(jnp.zeros((1, 64, 48)), jnp.zeros((1, 64, 48)),
                                  jnp.ones((48, 3)), block_c=24, interpret=True)


def test_featurizer_backward_unwritten_tile_is_caught(monkeypatch):
  monkeypatch.setattr(fc, "_featurizer_bwd_kernel",
                      helpers.skip_one_program(fc._featurizer_bwd_kernel, fc, (0, 1, 0)))
  jax.clear_caches()
  try:
    rng = np.random.default_rng(4)
    df, z = (jnp.asarray(rng.standard_normal((1, 64, 128)), jnp.float32) for _ in range(2))
    dz, _ = fc.featurizer_backward_pallas(df, z, jnp.ones((128, 3)), interpret=True)
    assert not np.all(np.isfinite(np.asarray(dz)))
  finally:
    jax.clear_caches()


def test_module_layout_reshaped_feeds_the_kernel():
  """x @ w_in.reshape(D, 3D) (the module's [D, 3, D] in-projection: z's columns in blocks
  [post | pre | v]) through the fused kernel == project_and_featurize + gate-conv-gate
  (float32), outputs and every gradient."""
  from sh2_jax.ops import hyena

  rng = np.random.default_rng(21)
  batch, length, width, groups = 2, 80, 32, 2
  x = jnp.asarray(rng.standard_normal((batch, length, width)), jnp.float32)
  w_in = jnp.asarray(rng.standard_normal((width, 3, width)) / np.sqrt(width), jnp.float32)
  w_feat = jnp.asarray(rng.standard_normal((3, width, 3)), jnp.float32)
  h = jnp.asarray(rng.standard_normal((groups, 7)), jnp.float32)
  dskip = jnp.asarray(rng.standard_normal(width), jnp.float32)

  def fused(x, w_in, w_feat, h, dskip):
    z = x @ w_in.reshape(width, 3 * width)
    return fc.featurized_gate_conv_gate_pallas(z, w_feat.reshape(3 * width, 3), h, dskip,
                                               block_sizes=bc.BlockSizes(chunk=16),
                                               interpret=True)

  def unfused(x, w_in, w_feat, h, dskip):
    post, pre, v = hyena.project_and_featurize(x, w_in, w_feat)
    return hyena.gate_conv_gate(post, pre, v, h, dskip, method="direct")

  ct = jnp.asarray(rng.standard_normal((batch, length, width)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    got, got_vjp = jax.vjp(fused, x, w_in, w_feat, h, dskip)
    want, want_vjp = jax.vjp(unfused, x, w_in, w_feat, h, dskip)
    assert _rel_err(got, want) < 1e-5
    for g, w in zip(got_vjp(ct), want_vjp(ct)):
      assert _rel_err(g, w) < 1e-5


@pytest.mark.parametrize("mixer", ["SE", "MR"])
def test_module_with_pallas_fused_equals_direct(mixer):
  """HyenaSE/MR with conv_method="pallas_fused" (interpret mode here) == the direct method."""
  from sh2_jax.config import ModelConfig
  from sh2_jax.layers.hyena import HyenaMR, HyenaSE

  config = ModelConfig(d_model=32, num_heads=2, se_groups=2, mr_groups=2, mr_filter_len=16,
                       layout=mixer, dtype="float32", conv_chunk=16, train_len=64)
  helpers.assert_module_matches_direct(HyenaSE if mixer == "SE" else HyenaMR, config,
                                       "pallas_fused", (2, 40, 32), seed=4)


@pytest.mark.parametrize("mixer,method,fused", [
    ("SE", "pallas", True), ("SE", "pallas_unfused", False), ("MR", "pallas", False),
    ("MR", "pallas_fused", True), ("SE", "direct", False)])
def test_module_dispatch_and_result(monkeypatch, mixer, method, fused):
  """conv_method picks the fused kernel for SE's short filter under "pallas", never under
  "pallas_unfused", for MR's 128-tap filter only when forced; every choice == direct."""
  import dataclasses

  import flax.linen as nn

  from sh2_jax.config import ModelConfig
  from sh2_jax.layers.hyena import HyenaMR, HyenaSE
  from sh2_jax.ops import hyena

  calls = []
  for name in ("featurized_gate_conv_gate_pallas", "featurized_gate_conv_gate_proj_pallas"):
    monkeypatch.setattr(hyena.featurized_conv, name,
                        lambda *a, real=getattr(fc, name), **k: calls.append(1) or real(*a, **k))
  assert hyena.fuses_featurizer(method, 7 if mixer == "SE" else 128) == fused
  config = ModelConfig(d_model=32, num_heads=2, se_groups=2, mr_groups=2, layout=mixer,
                       dtype="float32", train_len=64)
  module_cls = HyenaSE if mixer == "SE" else HyenaMR
  x = jax.random.normal(jax.random.key(7), (1, 150, 32))
  params = nn.meta.unbox(module_cls(config).init(jax.random.key(8), x)["params"])
  outs = []
  for conv_method in (method, "direct"):
    module = module_cls(dataclasses.replace(config, conv_method=conv_method))
    with jax.default_matmul_precision("highest"):
      outs.append(module.apply({"params": params}, x))
  assert bool(calls) == fused
  assert _rel_err(outs[0], outs[1]) < 1e-5


def _interleave(channels: int) -> np.ndarray:
  """Column permutation blocked [post | pre | v] -> interleaved triples (3i + s <- s C + i)."""
  return np.arange(3 * channels).reshape(3, channels).T.reshape(-1)


def check_permuted_against_f64(kernel, args, perm: np.ndarray, dtype,
                               with_dskip: bool = True) -> None:
  """kernel(z[..., perm], w_feat[perm], h, dskip) and its gradients == the float64 reference
  of the blocked-layout operator, with z's and the taps' gradients permuted the same way.
  with_dskip=False: dskip None (Hyena-SE), the reference's skip weights zero."""
  z, w_feat, h, dskip, ct = args
  if with_dskip:
    out, vjp = jax.vjp(kernel, z[..., perm], w_feat[perm], h, dskip)
    dz, dw, dh, ddskip = vjp(ct)
  else:
    out, vjp = jax.vjp(lambda a, b, c: kernel(a, b, c, None), z[..., perm], w_feat[perm], h)
    (dz, dw, dh), dskip = vjp(ct), np.zeros(dskip.shape)
  want_out, (want_dz, want_dw, want_dh, want_ddskip) = _reference_f64(z, w_feat, h, dskip, ct)
  assert out.dtype == z.dtype
  errs = {"out": _rel_err(out, want_out), "dz": _rel_err(dz, np.asarray(want_dz)[..., perm]),
          "dw": _rel_err(dw, np.asarray(want_dw)[perm]), "dh": _rel_err(dh, want_dh)}
  if with_dskip:
    errs["ddskip"] = _rel_err(ddskip, want_ddskip)
  assert max(errs.values()) < TOLERANCE[dtype], errs


def check_unwritten_tile_caught(monkeypatch, module, kernel_name: str, run) -> None:
  """With program (0, 1, 0) of `module.kernel_name` writing nothing, run() (interpret mode,
  NaN-filled outputs) returns non-finite values."""
  monkeypatch.setattr(module, kernel_name,
                      helpers.skip_one_program(getattr(module, kernel_name), module, (0, 1, 0)))
  jax.clear_caches()
  try:
    assert not np.all(np.isfinite(np.asarray(run())))
  finally:
    jax.clear_caches()


@pytest.mark.parametrize("case,tap_grads", [(CASES[1], "xla"), (CASES[4], "xla"),
                                            (CASES[0], "kernel")])
def test_interleaved_layout_matches_float64_reference(case, tap_grads):
  """layout="interleaved" (strided stream columns in every kernel) on the interleaved copy of
  the inputs == the float64 reference, its gradients interleaved the same way."""
  batch, length, channels, groups, taps, feat_taps, dtype, block_sizes = case
  args = _inputs(29 + length, batch, length, channels, groups, taps, feat_taps, dtype)
  kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, block_sizes=block_sizes,
                             interpret=True, tap_grads=tap_grads, layout="interleaved")
  check_permuted_against_f64(kernel, args, _interleave(channels), dtype)


@pytest.mark.parametrize("which", ["_fgcg_fwd_kernel", "_fgcg_bwd_kernel"])
def test_interleaved_unwritten_tile_is_caught(monkeypatch, which):
  z, w_feat, h, dskip, ct = _inputs(3, 1, 64, 32, 1, 5, 3, jnp.float32)

  def run():
    kernel = functools.partial(fc.featurized_gate_conv_gate_pallas, interpret=True,
                               block_sizes=bc.BlockSizes(chunk=16, block_c=16, halo_bwd=False),
                               layout="interleaved")
    out, vjp = jax.vjp(kernel, z, w_feat, h, dskip)
    return out if which == "_fgcg_fwd_kernel" else vjp(ct)[0]

  check_unwritten_tile_caught(monkeypatch, fc, which, run)


@pytest.mark.parametrize("batch,length,channels,taps,dtype", [
    (2, 70, 32, 3, jnp.float32), (1, 64, 48, 3, jnp.float32), (1, 45, 16, 5, jnp.bfloat16)])
def test_featurize_with_pallas_backward_matches_float64(batch, length, channels, taps, dtype):
  """ops.hyena's GPU featurizer (direct forward, Pallas backward; L not a multiple of the
  kernel's 32-row chunk is padded): output and both gradients against a numpy float64 loop."""
  rng = np.random.default_rng(length + channels)
  z = rng.standard_normal((batch, length, channels))
  w = rng.standard_normal((channels, taps))
  ct = rng.standard_normal((batch, length, channels))
  want_f = np.zeros_like(z)
  for j in range(taps):
    want_f[:, j:] += w[:, j] * z[:, :length - j]
  # d/dz <ct, f> and d/dw <ct, f> by the same loop transposed.
  want_dz, want_dw = np.zeros_like(z), np.zeros_like(w)
  for j in range(taps):
    want_dz[:, :length - j] += w[:, j] * ct[:, j:]
    want_dw[:, j] = np.sum(ct[:, j:] * z[:, :length - j], axis=(0, 1))
  z_j, w_j, ct_j = (jnp.asarray(x, dtype) for x in (z, w, ct))
  f, vjp = jax.vjp(lambda zz, ww: hyena.featurize_with_pallas_backward(zz, ww, True), z_j, w_j)
  dz, dw = vjp(ct_j)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert f.dtype == dtype and dz.dtype == dtype and dw.dtype == dtype
  assert _rel_err(f, want_f) < tol and _rel_err(dz, want_dz) < tol and _rel_err(dw, want_dw) < tol


def test_featurizer_backward_reason():
  assert hyena.featurizer_backward_reason((1, 100, 1920), (1920, 3)) is None
  assert "multiple of 16" in hyena.featurizer_backward_reason((1, 100, 24), (24, 3))
  assert "one filter per channel" in hyena.featurizer_backward_reason((1, 100, 32), (4, 3))
  assert "taps" in hyena.featurizer_backward_reason((1, 100, 32), (32, 40))


def test_resolve_pipelining_depths():
  """The fused kernels' own stage defaults: 3 forward and 4 overlapping-backward stages for
  16-bit I/O at T < 128 (the shifted-window loads), the blocked kernel's otherwise (the carrying
  backward, float32); 1 backward stage at T >= 128; an explicit value always wins."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  se = fc._resolve(None, (1, 8192, 1920), (15, 7), bf16)
  assert (se.chunk, se.num_stages_fwd, se.num_stages_bwd) == (64, fc.FUSED_FWD_STAGES,
                                                              fc.FUSED_HALO_BWD_STAGES) == (64, 3, 4)
  carrying = fc._resolve(bc.BlockSizes(halo_bwd=False), (1, 8192, 1920), (15, 7), bf16)
  assert carrying.num_stages_bwd == 3
  se32 = fc._resolve(None, (1, 8192, 1920), (15, 7), f32)
  assert (se32.num_stages_fwd, se32.num_stages_bwd) == (2, 2)
  long = fc._resolve(None, (1, 8192, 1920), (15, 128), bf16)
  assert (long.chunk, long.num_stages_fwd, long.num_stages_bwd) == (
      128, 4, fc.FUSED_BWD_STAGES_LONG_CHUNK)
  asked = fc._resolve(bc.BlockSizes(num_stages_fwd=4, num_stages_bwd=2), (1, 8192, 1920),
                      (15, 128), bf16)
  assert (asked.num_stages_fwd, asked.num_stages_bwd) == (4, 2)


def test_resolve_honours_a_patched_default(monkeypatch):
  """Depths set in BlockSizes.get_default() (how tune_mixers and kernel_resources time a
  candidate through the modules) win over the fused kernels' own defaults, as block_sizes do."""
  monkeypatch.setattr(bc.BlockSizes, "get_default",
                      classmethod(lambda cls: bc.BlockSizes(num_stages_fwd=4, num_stages_bwd=2)))
  short = fc._resolve(None, (1, 8192, 1920), (15, 7), jnp.bfloat16)
  long = fc._resolve(None, (1, 8192, 1920), (15, 128), jnp.bfloat16)
  assert (short.num_stages_fwd, long.num_stages_bwd) == (4, 2)
