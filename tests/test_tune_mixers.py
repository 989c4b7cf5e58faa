"""experiments/tune_mixers.py on CPU: the greedy walk and the default it swaps in."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from experiments import tune_mixers
from pallas_kernels import blocked_conv as bc
from sh2_jax import config as config_lib


def _tiny_config() -> config_lib.ModelConfig:
  return dataclasses.replace(config_lib.get_preset("evo2-1b").model, d_model=64, num_heads=2,
                             se_groups=2, mr_groups=2, mr_filter_len=32, remat=True)


def test_walk_keeps_faster_values_and_skips_unsupported(monkeypatch):
  """With a fake timer that rewards block_c=32 and 8 backward warps, the walk ends on both,
  skips tiles that do not divide the 32-wide groups, and times the winner twice."""
  timed = []

  def fake_time(mixer, candidate, config, x, iters):
    timed.append(candidate)
    return 2.0 - 0.5 * (candidate.block_c == 32) - 0.3 * (candidate.num_warps_bwd == 8)

  monkeypatch.setattr(tune_mixers, "time_candidate", fake_time)
  x = jnp.zeros((1, 64, 64), jnp.bfloat16)
  rows, best, best_ms, default_ms = tune_mixers.sweep("se", _tiny_config(), x, budget_s=60.0,
                                                       keep=0.02, iters=1)
  assert best == bc.BlockSizes(block_c=32, num_warps_bwd=8)
  assert (best_ms, default_ms) == (1.2, 2.0)
  unsupported = [label for label, resolved, _ in rows if resolved.startswith("unsupported")]
  assert "block_c=64" in unsupported and "block_c=128" in unsupported
  assert all(c.block_c in (None, 32) for c in timed)
  assert timed.count(best) == 2


def test_time_candidate_swaps_the_default_and_restores_it(monkeypatch):
  """While a candidate is timed, BlockSizes.get_default() returns it; after, even when the
  module fails, the class default is back."""
  seen = []

  def failing_module_fns(variant, config, x, key, remat):
    seen.append((bc.BlockSizes.get_default(), remat))
    raise RuntimeError("compile failed")

  monkeypatch.setattr(tune_mixers, "_module_fns", failing_module_fns)
  candidate = bc.BlockSizes(block_c=32)
  with pytest.raises(RuntimeError, match="compile failed"):
    tune_mixers.time_candidate("mr", candidate, _tiny_config(), jnp.zeros((1, 8, 64)), iters=1)
  assert seen == [(candidate, "save_dots")]
  assert bc.BlockSizes.get_default() == bc.BlockSizes()
