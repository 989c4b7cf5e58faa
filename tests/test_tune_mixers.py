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


def test_compare_alternates_compiled_candidates(monkeypatch, capsys):
  """--candidate mode on a tiny shape in interpret mode: the defaults and each candidate are
  compiled under their own default BlockSizes (checked through the resolved tiles each build
  sees), timed once per round, and the table has one column per round and the ratio; a
  candidate the kernels refuse is a row with its reason."""
  built = []
  real = tune_mixers._module_fns

  def recording_module_fns(variant, config, x, key, remat, compile_now=False):
    built.append((bc.BlockSizes.get_default(), compile_now))
    return real(variant, config, x, key, remat, compile_now=compile_now)

  monkeypatch.setattr(tune_mixers, "_module_fns", recording_module_fns)
  timings = iter([2.0, 1.0, 4.0, 3.0])
  monkeypatch.setattr(tune_mixers, "median_ms", lambda fn, iters, warmup: (fn(), next(timings))[1])
  config = dataclasses.replace(_tiny_config(), d_model=32, se_groups=2)
  x = jnp.ones((1, 32, 32), jnp.bfloat16)
  candidates = [bc.BlockSizes(num_stages_bwd=2), bc.BlockSizes(block_c=64)]
  rows = tune_mixers.compare("se", candidates, config, x, rounds=2, iters=1)
  assert built == [(bc.BlockSizes(), True), (candidates[0], True)]
  assert [label for label, _, _, _ in rows] == ["defaults", "num_stages_bwd=2", "block_c=64"]
  assert rows[0][2] == [2.0, 4.0] and rows[1][2] == [1.0, 3.0]
  assert rows[2][2].startswith("unsupported") and rows[2][3] is None
  assert rows[0][3] > 0 and rows[1][3] > 0  # compile seconds
  lines = tune_mixers.compare_lines("se", rows)
  assert lines[2] == ("| candidate | resolved at this shape | round 1 ms | round 2 ms | "
                      "/ defaults | compile s |")
  assert lines[4].startswith("| defaults |")
  assert lines[4].endswith(f"| 2.000 | 4.000 | 1.000 | {rows[0][3]:.1f} |")
  assert lines[5].endswith(f"| 1.000 | 3.000 | 0.625 | {rows[1][3]:.1f} |")  # median of 0.5, 0.75
  assert "unsupported" in lines[6] and lines[6].endswith("| - | - | - |")
  assert bc.BlockSizes.get_default() == bc.BlockSizes()
  assert "round 2" in capsys.readouterr().out


def test_parse_candidate():
  mixer, candidate = tune_mixers.parse_candidate("li:chunk=4,num_warps=2")
  assert mixer == "li" and candidate == tune_mixers.MIXERS["li"][1](chunk=4, num_warps=2)
  with pytest.raises(ValueError, match="FIELD=VALUE"):
    tune_mixers.parse_candidate("se:chunks=2")
  with pytest.raises(ValueError, match="MIXER:FIELD=VALUE"):
    tune_mixers.parse_candidate("xx:chunk=2")
