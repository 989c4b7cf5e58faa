"""Training: learning on the default genome, exact resume, gradient accumulation, optimizer."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sh2_jax import config as config_lib
from sh2_jax.layers import params as P
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train import optim, step as step_lib
from sh2_jax.train.checkpoint import Checkpointer
from sh2_jax.train.loop import RunError, evaluate_run, read_metrics, train
from sh2_jax.train.state import create_train_state, state_shardings
from tests import helpers


def small_config(**train_overrides) -> config_lib.Config:
  """A model small enough to train a few steps in seconds on 2 CPU cores."""
  base = config_lib.get_preset("tiny")
  model = dataclasses.replace(base.model, d_model=32, num_heads=2, se_groups=4, mr_groups=4,
                              mr_filter_len=16, li_order=4, train_len=64, conv_chunk=32)
  data = dataclasses.replace(base.data, seq_len=64)
  settings = dict(steps=6, batch_size=4, warmup_steps=2, log_every=1, eval_every=0,
                  eval_batches=2, checkpoint_every=0)
  train_cfg = dataclasses.replace(base.train, **{**settings, **train_overrides})
  return dataclasses.replace(base, model=model, data=data, train=train_cfg)


def restore_params(run_dir: str, config: config_lib.Config, step: int | None = None):
  tx = optim.make_optimizer(config.train)
  abstract, _ = state_shardings(config.model, tx, mesh_lib.make_mesh(config.mesh))
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = ckpt.restore(ckpt.latest_step() if step is None else step, abstract)
  ckpt.close()
  return state


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tiny_model_beats_order0_markov_on_held_out_genome(tmp_path):
  """The CI-sized run of the `tiny` preset on the bundled genome (`sh2 train`, in a process that
  compiles with XLA's default optimisation: 60 steps run longer than they compile) learns more
  than byte frequencies: held-out bits per byte below the order-0 Markov baseline."""
  run_dir = tmp_path / "run"
  sets = {"train.steps": 60, "train.eval_every": 0, "train.checkpoint_every": 0,
          "train.eval_batches": 4, "train.warmup_steps": 15}
  command = [sys.executable, "-m", "sh2_jax.cli", "train", "--preset", "tiny", "--no-progress",
             "--run-dir", str(run_dir), *(f"--set={k}={v}" for k, v in sets.items())]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=helpers.optimizing_env(), cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  bits = {line.split()[0]: float(line.split("bits/byte")[0].split()[-1])
          for line in result.stdout.splitlines() if "bits/byte" in line}
  assert bits["model"] < bits["order-0"] < 2.05, result.stdout
  records = read_metrics(str(run_dir / "metrics.jsonl"))
  assert [r["step"] for r in records if "loss" in r][-1] == 60
  assert records[-1]["eval_bpb"] == pytest.approx(bits["model"], abs=1e-4)
  assert os.path.getsize(run_dir / "loss.png") > 10_000


def test_resume_gives_identical_parameters(tmp_path):
  config = small_config()
  straight = train(config, str(tmp_path / "a"), progress=False)
  first = train(config, str(tmp_path / "b"), progress=False, stop_at=3)
  assert first["step"] == 3
  resumed = train(config, str(tmp_path / "b"), resume=True, progress=False)
  assert straight["step"] == resumed["step"] == 6
  state_a, state_b = restore_params(str(tmp_path / "a"), config), restore_params(str(tmp_path / "b"), config)
  assert int(state_a.step) == int(state_b.step) == 6
  assert_trees_equal(state_a.params, state_b.params)
  assert_trees_equal(state_a.opt_state, state_b.opt_state)
  assert_trees_equal(state_a.rng, state_b.rng)
  # The split run did not replay or skip batches: its per-step losses equal the straight run's.
  losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(str(d / "metrics.jsonl")) if "loss" in r}
  assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path):
  """SIGKILL a `sh2 train` between checkpoints; `--resume` finishes with the parameters of
  an uninterrupted run."""
  config = small_config(steps=24, checkpoint_every=4, keep_checkpoints=2)
  sets = [f"--set=train.{k}={v}" for k, v in dataclasses.asdict(config.train).items()]
  sets += [f"--set=model.{k}={v}" for k, v in dataclasses.asdict(config.model).items() if v is not None]
  sets += [f"--set=data.{k}={v}" for k, v in dataclasses.asdict(config.data).items() if v is not None]
  run_dir = tmp_path / "killed"
  command = [sys.executable, "-m", "sh2_jax.cli", "train", "--no-progress", "--run-dir", str(run_dir), *sets]
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = run_dir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
    if steps and max(steps) >= 8:
      break
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed; make it longer"
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  straight = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every=24))
  train(straight, str(tmp_path / "straight"), progress=False)  # one checkpoint: the last step's
  assert_trees_equal(restore_params(str(run_dir), config).params,
                     restore_params(str(tmp_path / "straight"), config).params)


def test_throughput_leaves_out_the_compiling_first_step(tmp_path, monkeypatch, caplog):
  """tokens/s in metrics.jsonl: the first step's call (the compile, here made 2 s longer) is
  logged apart and counted in no window; a record after only that step carries no rate."""
  real_make = step_lib.make_train_step
  calls = []

  def make_slow_first_call(*args, **kwargs):
    step = real_make(*args, **kwargs)

    def timed(*step_args):
      calls.append(len(calls))
      if len(calls) == 1:
        time.sleep(2.0)
      return step(*step_args)
    return timed

  monkeypatch.setattr(step_lib, "make_train_step", make_slow_first_call)
  config = small_config(steps=3)  # log_every=1
  with caplog.at_level("INFO", logger="sh2_jax.train.loop"):
    train(config, str(tmp_path / "r"), progress=False)
  assert calls == [0, 1, 2]
  records = [r for r in read_metrics(str(tmp_path / "r" / "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert "tokens_per_s" not in records[0]
  tokens_per_step = config.train.batch_size * config.data.seq_len
  # one step per window: 256 tokens in well under the 2 s the first call slept
  assert all(r["tokens_per_s"] > tokens_per_step / 1.0 for r in records[1:]), records
  first = [m for m in caplog.messages if m.startswith("step 1 (compiling the train step)")]
  assert len(first) == 1 and float(first[0].split(": ")[1].split(" s")[0]) >= 2.0


def test_existing_checkpoints_need_resume(tmp_path):
  config = small_config(steps=2)
  train(config, str(tmp_path / "r"), progress=False)
  with pytest.raises(RunError, match="already holds checkpoints .*--resume"):
    train(config, str(tmp_path / "r"), progress=False)
  with pytest.raises(RunError, match="no complete checkpoint"):
    train(config, str(tmp_path / "empty"), resume=True, progress=False)


def test_gradient_accumulation_matches_full_batch():
  config = small_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = optim.make_optimizer(config.train)
  rng = np.random.default_rng(0)
  window = jnp.asarray(rng.integers(0, 256, (4, config.data.seq_len + 1)), jnp.int32)
  model_cfg = dataclasses.replace(config.model, dtype="float32")
  results = []
  for accum in (1, 2, 4):
    train_cfg = dataclasses.replace(config.train, grad_accum=accum)
    state, shardings = create_train_state(model_cfg, tx, mesh, seed=1)
    step = step_lib.make_train_step(model_cfg, train_cfg, tx, mesh, shardings)
    state, metrics = step(state, window)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  for params, loss in results[1:]:
    assert loss == pytest.approx(results[0][1], rel=1e-5)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0])):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_optimizer_schedule_clip_and_decay_mask():
  cfg = config_lib.TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
  schedule = optim.learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(100)) == pytest.approx(1e-4)
  expected_mid = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * 45 / 90))
  assert float(schedule(55)) == pytest.approx(expected_mid, rel=1e-5)
  params = {"block_0": {"mixer": {"in_proj": jnp.ones((4, 12)), "filter": jnp.ones((2, 7)),
                                  "out_bias": jnp.ones(4), "dskip": jnp.ones(4)},
                        "mlp": {"w1": jnp.ones((4, 8))}, "pre_norm": {"scale": jnp.ones(4)}},
            "embedding": jnp.ones((512, 4))}
  mask = optim.decay_mask(params)
  assert mask["block_0"]["mixer"] == {"in_proj": True, "filter": False, "out_bias": False, "dskip": False}
  assert mask["embedding"] and mask["block_0"]["mlp"]["w1"] and not mask["block_0"]["pre_norm"]["scale"]
  # Weight decay: with zero gradients only decayed leaves move, by lr * wd * value.
  tx = optim.make_optimizer(dataclasses.replace(cfg, warmup_steps=0))
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  lr0 = float(optim.learning_rate_schedule(dataclasses.replace(cfg, warmup_steps=0))(0))
  np.testing.assert_allclose(updates["block_0"]["mixer"]["in_proj"], -lr0 * 0.1, rtol=1e-5)
  np.testing.assert_array_equal(updates["block_0"]["mixer"]["filter"], 0.0)
  # Clipping: a huge gradient is scaled to global norm 1 before Adam (so the first update is
  # the same as for the unit-norm gradient).
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  unit = jax.tree.map(lambda g: g / optax.tree.norm(grads), grads)
  big, _ = tx.update(grads, tx.init(params), params)
  small, _ = tx.update(unit, tx.init(params), params)
  for x, y in zip(jax.tree.leaves(big), jax.tree.leaves(small)):
    np.testing.assert_allclose(x, y, rtol=1e-5)


def test_eval_run_reports_model_and_markov_baselines(tmp_path):
  config = small_config(steps=3)
  train(config, str(tmp_path / "r"), progress=False)
  result = evaluate_run(str(tmp_path / "r"), max_batches=2)
  assert result["step"] == 3
  assert result["eval_tokens"] == 2 * 4 * config.data.seq_len
  assert result["markov3_bpb"] < result["markov0_bpb"] < 2.1
  with open(tmp_path / "r" / "config.json") as f:
    assert config_lib.Config.from_dict(json.load(f)) == config
  with pytest.raises(RunError, match="not a run directory"):
    evaluate_run(str(tmp_path / "nothing"))


def test_remat_gives_identical_loss_and_gradients():
  """No remat, full remat, remat saving the projections' outputs (and the featurized streams),
  and full remat with the block inputs offloaded to host memory: the same loss and gradients;
  the policy is honoured (full remat recomputes the block's matrix products in the backward,
  save_dots almost none and keeps the in-projection's weight slices; save_dots_features also
  keeps each Hyena block's three featurized streams; the offloaded residuals are the block
  inputs and the final norm's, in host memory)."""
  config = small_config()
  model_cfg = dataclasses.replace(config.model, dtype="float32")
  rng = np.random.default_rng(1)
  window = jnp.asarray(rng.integers(0, 256, (2, 33)), jnp.int32)
  results, dots, featurized, weight_views = [], [], [], []
  for remat, policy, offload in ((False, "full", False), (True, "full", False),
                                 (True, "save_dots", False), (True, "full", True),
                                 (True, "save_dots_features", False)):
    cfg = dataclasses.replace(model_cfg, remat=remat, remat_policy=policy,
                              offload_residuals=offload)
    model = step_lib.StripedHyena2(cfg)
    params = jax.tree.map(lambda x: x, __import__("flax").linen.meta.unbox(
        model.init(jax.random.key(0), window[:, :-1])["params"]))
    loss = lambda p: jnp.mean(step_lib.next_token_nll(model, p, window))
    results.append(jax.jit(jax.value_and_grad(loss))(params))
    dots.append(str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(loss, params)
    on_host = [line.split()[0] for line in printed.getvalue().splitlines() if "<host>" in line]
    featurized.append(printed.getvalue().count("'hyena_featurized'"))
    weight_views.append(printed.getvalue().count("'hyena_weight_views'"))
    expected = cfg.num_layers + 1 if offload else 0
    assert on_host == [f"f32<host>[2,32,{cfg.d_model}]"] * expected, (offload, on_host)
  for other in results[1:]:
    assert float(results[0][0]) == pytest.approx(float(other[0]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(other[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  no_remat, full, save_dots, offloaded, save_features = dots
  assert full > save_dots >= no_remat, dots
  assert save_features == save_dots, dots
  hyena_blocks = sum(kind != "MHA" for kind in model_cfg.layout.split())
  # (post, pre, v) per Hyena block, saved without remat and by save_dots_features only
  assert featurized == [3 * hyena_blocks, 0, 0, 0, 3 * hyena_blocks], featurized
  # the in-projection's three stream slices per Hyena block (XLA path on CPU): kept by both
  # save_dots policies (and, unnamed, by no remat), rebuilt by full remat
  assert weight_views == [3 * hyena_blocks, 0, 3 * hyena_blocks, 0, 3 * hyena_blocks], weight_views
  assert full - save_dots > 2 * (save_dots - no_remat), dots
  assert offloaded == full, dots


def _weight_casts(jaxpr, shapes: set) -> int:
  """float32 -> bfloat16 converts of arrays with one of `shapes`, nested jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16
        and eqn.invars[0].aval.dtype == jnp.float32 and eqn.invars[0].aval.shape in shapes):
      count += 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _weight_casts(inner, shapes)
  return count


def test_cast_weights_once_gives_the_same_step_with_half_the_casts():
  """A bf16 step under save_dots remat with the matrix weights cast before the model gives
  bitwise the same parameters and metrics as casting them inside each block, and its program
  casts each compute weight once (inside the blocks: twice, the forward and its recompute,
  except the Hyena in-projections, whose views save_dots keeps)."""
  config = small_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  tx = optim.make_optimizer(config.train)
  rng = np.random.default_rng()
  window = jnp.asarray(rng.integers(0, 256, (4, config.data.seq_len + 1)), jnp.int32)
  seed = int(rng.integers(1 << 16))
  results, casts = [], []
  for once in (True, False):
    model_cfg = dataclasses.replace(config.model, dtype="bfloat16", remat=True,
                                    remat_policy="save_dots", cast_weights_once=once)
    state, shardings = create_train_state(model_cfg, tx, mesh, seed=seed)
    weights = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
               if {k.key for k in path if isinstance(k, jax.tree_util.DictKey)} & P.COMPUTE_WEIGHTS]
    step = step_lib.make_train_step(model_cfg, config.train, tx, mesh, shardings)
    casts.append((len(weights), _weight_casts(jax.make_jaxpr(step)(state, window).jaxpr,
                                              {w.shape for w in weights})))
    new_state, metrics = step(state, window)
    results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  assert_trees_equal(results[0][0], results[1][0])
  assert_trees_equal(results[0][1], results[1][1])
  (weights, once), (_, inside) = casts
  hyena_blocks = sum(kind != "MHA" for kind in config.model.layout.split())
  assert weights >= 8 and once == weights and inside == 2 * weights - hyena_blocks, casts


def test_restore_refuses_a_state_of_another_layout_in_one_line(tmp_path):
  """Checkpointer.restore of a state whose in_proj is [D, 3D] (before [D, 3, D]) raises a
  one-line CheckpointError naming the parameter and both shapes, before Orbax reads arrays."""
  from sh2_jax.train.checkpoint import CheckpointError

  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(2, {"params": {"block_0": {"mixer": {"in_proj": np.zeros((4, 12), np.float32)}}}})
  ckpt.close()
  abstract = {"params": {"block_0": {"mixer": {"in_proj": jax.ShapeDtypeStruct((4, 3, 4), jnp.float32)}}}}
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))  # as a resumed run: a fresh manager
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(2, abstract)
  ckpt.close()
  assert "\n" not in str(info.value)
  assert "params.block_0.mixer.in_proj is (4, 12) in the checkpoint but (4, 3, 4)" in str(info.value)
