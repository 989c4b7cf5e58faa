"""experiments/ab_li_walk.py: its prologue walk (the LI kernels' loop before the rotation),
mixed with the rotated one, computes what modal_conv's rotated walk computes, bitwise, in
interpret mode (the rotated walk itself is checked against float64 in test_pallas_modal_conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ab_li_walk
from pallas_kernels import modal_conv as mc
from tests import helpers


def _featurized_outputs_and_grads(walk_spec: str, monkeypatch, args, cotangent):
  monkeypatch.setattr(mc, "_walk", ab_li_walk.parse_walk(walk_spec))
  jax.clear_caches()
  block_sizes = mc.BlockSizes(chunk=4, block_c=16, segment_chunks=3)
  kernel = lambda *a: mc.featurized_gate_conv_gate_pallas(*a, block_sizes=block_sizes,  # noqa: E731
                                                          interpret=True)
  out, vjp = jax.vjp(kernel, *args)
  return [np.asarray(x) for x in (out, *vjp(cotangent))]


def test_walks_agree_bitwise(monkeypatch):
  rng = helpers.seeded_rng("ab_li_walk")
  batch, length, channels, order, taps = 1, 37, 16, 4, 3
  stream = lambda: jnp.asarray(rng.standard_normal((batch, length, channels)), jnp.float32)  # noqa: E731
  weights = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)  # noqa: E731
  args = (stream(), stream(), stream(), weights(channels, taps), weights(channels, taps),
          weights(channels, taps), jnp.asarray(-rng.uniform(0.05, 1.0, (channels, order)),
                                               jnp.float32),
          weights(channels, order), weights(channels))
  cotangent = stream()
  want = _featurized_outputs_and_grads("rotated", monkeypatch, args, cotangent)
  assert np.all(np.isfinite(want[0])) and np.abs(want[0]).max() > 0
  # the prologue walk in the states kernel (forward order) and the reverse walk; rotated in
  # the two others
  got = _featurized_outputs_and_grads("rotated:fwd+bwd_forward", monkeypatch, args, cotangent)
  for index, (a, b) in enumerate(zip(got, want, strict=True)):
    np.testing.assert_array_equal(a, b, err_msg=f"output {index}")


def test_walk_specs():
  assert ab_li_walk.parse_walk("prologue") is ab_li_walk.prologue_walk
  assert ab_li_walk.parse_walk("rotated") is mc._walk
  with pytest.raises(ValueError, match="rotated:K1\\+K2"):
    ab_li_walk.parse_walk("rotated:fwd+nonsense")
  with pytest.raises(ValueError, match="add it to KERNELS"):
    ab_li_walk.mixed_walk(frozenset())()  # called from this test, not a kernel
