"""Direct fused SE kernels (pallas_kernels/featurized_short_conv.py) in interpret mode vs the
float64 numpy loop of the fused operator: output and gradients of z, featurizer taps, filter
and skip, both column layouts; NaN poisoning of unwritten tiles; lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import featurized_short_conv as fsc
from tests import helpers
from tests.test_pallas_featurized_conv import (_inputs, _interleave, _reference_f64, _rel_err,
                                              check_permuted_against_f64,
                                              check_unwritten_tile_caught)

SMALL = fsc.ShortBlockSizes(block_c=16, chunk_fwd=16, chunk_bwd=16, rows_per_program=32)

CASES = [
    # (batch, length, channels, groups, taps, featurizer taps, dtype, layout, block sizes)
    (1, 300, 32, 1, 7, 3, jnp.float32, "blocked", None),
    (2, 77, 64, 4, 7, 3, jnp.bfloat16, "interleaved", SMALL),
    (1, 50, 32, 2, 16, 4, jnp.float32, "interleaved", SMALL),
    (2, 40, 32, 32, 3, 1, jnp.float32, "blocked", SMALL),
]


@pytest.mark.parametrize("batch,length,channels,groups,taps,feat_taps,dtype,layout,block_sizes", CASES)
def test_matches_float64_reference(batch, length, channels, groups, taps, feat_taps, dtype, layout,
                                   block_sizes):
  """L not a multiple of any tile, several segments (SMALL), 1 to 32 groups, K = 3, 7, 16."""
  args = _inputs(41 + length, batch, length, channels, groups, taps, feat_taps, dtype)
  perm = _interleave(channels) if layout == "interleaved" else np.arange(3 * channels)
  kernel = functools.partial(fsc.featurized_short_conv_pallas, block_sizes=block_sizes,
                             interpret=True, layout=layout)
  check_permuted_against_f64(kernel, args, perm, dtype)


def test_without_dskip():
  z, w_feat, h, dskip, ct = _inputs(6, 1, 50, 32, 2, 7, 3, jnp.float32)
  out, vjp = jax.vjp(lambda a, b, c: fsc.featurized_short_conv_pallas(a, b, c, interpret=True),
                     z, w_feat, h)
  want_out, want_grads = _reference_f64(z, w_feat, h, np.zeros_like(dskip), ct)
  assert _rel_err(out, want_out) < 2e-6
  for got, want in zip(vjp(ct), want_grads[:3]):
    assert _rel_err(got, want) < 2e-6


@pytest.mark.parametrize("which", ["_fwd_kernel", "_bwd_kernel"])
def test_unwritten_tile_is_caught(monkeypatch, which):
  z, w_feat, h, dskip, ct = _inputs(8, 1, 64, 32, 1, 7, 3, jnp.float32)

  def run():
    kernel = functools.partial(fsc.featurized_short_conv_pallas, interpret=True, block_sizes=SMALL)
    out, vjp = jax.vjp(kernel, z, w_feat, h, dskip)
    return out if which == "_fwd_kernel" else vjp(ct)[0]

  check_unwritten_tile_caught(monkeypatch, fsc, which, run)


def test_unsupported_shapes_say_why():
  assert "filter length 17" in fsc.unsupported_reason((1, 64, 96), (96, 3), (2, 17))
  assert "groups must divide" in fsc.unsupported_reason((1, 64, 96), (96, 3), (3, 7))
  assert fsc.unsupported_reason((1, 64, 96), (96, 3), (2, 7)) is None
  with pytest.raises(ValueError, match="filter length 17"):
    fsc.featurized_short_conv_pallas(jnp.zeros((1, 64, 96)), jnp.zeros((96, 3)),
                                     jnp.zeros((2, 17)), interpret=True)


@pytest.mark.parametrize("dtype,layout", [(jnp.bfloat16, "blocked"), (jnp.bfloat16, "interleaved"),
                                          (jnp.float32, "blocked")])
def test_lowers_for_cuda(dtype, layout):
  batch, length, channels, groups = 2, 4000, 512, 32
  z = jax.ShapeDtypeStruct((batch, length, 3 * channels), dtype)
  w_feat = jax.ShapeDtypeStruct((3 * channels, 3), jnp.float32)
  h = jax.ShapeDtypeStruct((groups, 7), jnp.float32)
  dskip = jax.ShapeDtypeStruct((channels,), jnp.float32)
  ct = jax.ShapeDtypeStruct((batch, length, channels), dtype)

  def fwd_bwd(z, w_feat, h, dskip, ct):
    out, vjp = jax.vjp(functools.partial(fsc.featurized_short_conv_pallas, layout=layout),
                       z, w_feat, h, dskip)
    return out, vjp(ct)

  text = jax.jit(fwd_bwd).trace(z, w_feat, h, dskip, ct).lower(lowering_platforms=("cuda",)).as_text()
  assert "featurized_short_conv_fwd" in text and "featurized_short_conv_bwd" in text


def test_module_with_direct_kernel_equals_direct_method(monkeypatch):
  """HyenaSE with ops.hyena.SHORT_FILTER_KERNEL="direct" (interpret mode) == conv_method direct,
  outputs and every gradient; the direct kernel is the one that ran, on z's blocked columns
  (the module's [D, 3, D] in-projection reshaped)."""
  from sh2_jax.config import ModelConfig
  from sh2_jax.layers.hyena import HyenaSE
  from sh2_jax.ops import hyena

  monkeypatch.setattr(hyena, "SHORT_FILTER_KERNEL", "direct")
  calls = []
  real = fsc.featurized_short_conv_pallas
  monkeypatch.setattr(hyena.featurized_short_conv, "featurized_short_conv_pallas",
                      lambda *a, **k: calls.append(k.get("layout", "blocked")) or real(*a, **k))
  config = ModelConfig(d_model=32, num_heads=2, se_groups=4, layout="SE", dtype="float32")
  helpers.assert_module_matches_direct(HyenaSE, config, "pallas", (2, 24, 32), seed=12)
  assert calls == ["blocked"]
