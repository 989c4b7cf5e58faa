"""Checkpoints restore onto a different mesh shape and training continues identically.

A run trains 3 steps on data=4 (4 fake CPU devices, in a subprocess so the device count can be
set) and checkpoints; copies of it resume to step 6 on tensor=2,context=2 with zigzag (same
subprocess: parameters split Megatron-style, the sequence over the context axis) and on this
process's device. Their steps 4..6, held-out loss (the eval step on the resumed run's mesh)
and final state must equal an uninterrupted 6-step run on one device (trained here while the
subprocess runs). The subprocess also draws fresh parameters into fsdp x tensor shards and
checks them equal to one device's draw (train.state.init_params).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sh2_jax import config as config_lib
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train import optim
from sh2_jax.train.checkpoint import CheckpointError, Checkpointer
from sh2_jax.train.loop import read_metrics, train
from sh2_jax.train.state import state_shardings
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OVERRIDES = {
    "model.d_model": 32, "model.num_heads": 2, "model.se_groups": 4, "model.mr_groups": 4,
    "model.mr_filter_len": 16, "model.li_order": 4, "model.train_len": 64, "model.conv_chunk": 32,
    "model.dtype": "float32", "model.layout": "MR LI MHA", "data.seq_len": 64,
    "train.steps": 6, "train.batch_size": 4, "train.warmup_steps": 2, "train.log_every": 1,
    "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 0,
    "train.learning_rate": 3e-3,
}

FOUR_DEVICE_SCRIPT = r"""
import logging, shutil, sys
sys.path.insert(0, sys.argv[1])
import jax
from sh2_jax import config as config_lib
from sh2_jax.train.loop import train
from tests.test_checkpoint_mesh import config_on
tmp = sys.argv[2]
assert jax.device_count() == 4, jax.devices()
train(config_on(data=4), f"{tmp}/split_tensor_context", progress=False, stop_at=3)
shutil.copytree(f"{tmp}/split_tensor_context", f"{tmp}/split_one_device")
train(config_on(data=1, tensor=2, context=2, zigzag=True), f"{tmp}/split_tensor_context",
      progress=False, resume=True)
# fresh parameters drawn into fsdp x tensor shards equal those drawn on one device
import numpy as np
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train import optim
from sh2_jax.train.state import init_params, state_shardings
config = config_on(data=1, fsdp=2, tensor=2)
_, shardings = state_shardings(config.model, optim.make_optimizer(config.train),
                               mesh_lib.make_mesh(config.mesh), config.mesh)
sharded = init_params(config.model, jax.random.key(9), shardings.params)
plain = init_params(config.model, jax.random.key(9))
placements = jax.tree.leaves(shardings.params)
assert sum(not s.is_fully_replicated for s in placements) >= 10, placements
for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), placements, strict=True):
  assert a.sharding == s and np.array_equal(np.asarray(a), np.asarray(b)), s
print("ok")
"""


def config_on(**mesh: int | bool) -> config_lib.Config:
  overrides = {**OVERRIDES, **{f"mesh.{axis}": size for axis, size in mesh.items()}}
  return config_lib.apply_overrides(config_lib.get_preset("tiny"), overrides)


def _restore_on_this_process(run_dir: str, config: config_lib.Config):
  tx = optim.make_optimizer(config.train)
  abstract, shardings = state_shardings(config.model, tx, mesh_lib.make_mesh(config.mesh))
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == sharding, (leaf.sharding, sharding)
  return state


def _losses(run_dir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
          if "loss" in r}


def _held_out(run_dir: str) -> float:
  """The final held-out loss (nats per token) a run recorded."""
  return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval_loss" in r][-1][
      "eval_loss"]


def test_checkpoint_resumes_on_other_mesh_shapes(tmp_path):
  env = helpers.fake_devices_env(4)
  process = subprocess.Popen([sys.executable, "-c", FOUR_DEVICE_SCRIPT, ROOT, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
  one_device = config_on(data=-1)  # All of this process's devices: one in CI.
  try:
    train(one_device, str(tmp_path / "straight"), progress=False)
    out, err = process.communicate(timeout=300)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 0 and out.strip().endswith("ok"), err[-3000:]

  # Same process count: grain's own per-process iterator file is used, not the shared fallback.
  ckpt = Checkpointer(str(tmp_path / "split_one_device" / "checkpoints"))
  assert ckpt.all_steps() == [3] and os.path.isfile(ckpt._data_file(3, 0, 1))
  ckpt.close()
  train(one_device, str(tmp_path / "split_one_device"), progress=False, resume=True)

  straight = _losses(str(tmp_path / "straight"))
  assert sorted(straight) == [1, 2, 3, 4, 5, 6]
  assert len(set(straight.values())) == 6  # Every step trained on new data with new weights.
  for name in ("split_tensor_context", "split_one_device"):
    losses = _losses(str(tmp_path / name))
    assert sorted(losses) == [1, 2, 3, 4, 5, 6], (name, losses)
    np.testing.assert_allclose([losses[s] for s in (4, 5, 6)], [straight[s] for s in (4, 5, 6)],
                               rtol=2e-5, err_msg=name)
    assert _held_out(str(tmp_path / name)) == pytest.approx(_held_out(str(tmp_path / "straight")),
                                                            rel=2e-5), name

  final = {name: _restore_on_this_process(str(tmp_path / name), one_device)
           for name in ("straight", "split_tensor_context", "split_one_device")}
  for name in ("split_tensor_context", "split_one_device"):
    assert int(final[name].step) == 6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final[name].params),
                            jax.tree.leaves(final["straight"].params), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")
    for a, b in zip(jax.tree.leaves(final[name].opt_state), jax.tree.leaves(final["straight"].opt_state),
                    strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8, err_msg=name)


def test_data_state_from_another_process_count(tmp_path):
  """Iterator files of a 2-process checkpoint: used when they agree, an error when not."""
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  data_dir = tmp_path / "ckpt" / "7" / "data"
  data_dir.mkdir(parents=True)
  for index in range(2):
    (data_dir / f"process_{index}-of-2.json").write_text(json.dumps({"next_index": 7}))
  assert ckpt._shared_data_state(7) == {"next_index": 7}
  (data_dir / "process_1-of-2.json").write_text(json.dumps({"next_index": 6}))
  with pytest.raises(CheckpointError, match="saved different data-iterator states"):
    ckpt._shared_data_state(7)
  with pytest.raises(CheckpointError, match="step 8 .* has no data-iterator state"):
    ckpt._shared_data_state(8)
  ckpt.close()
