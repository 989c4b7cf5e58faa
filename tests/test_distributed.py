"""Multi-process training through jax.distributed: 2 CPU processes on localhost equal one process.

Each process gets 2 fake CPU devices, so the global mesh has 4 devices spread over 2 processes;
cross-process collectives on CPU go through gloo (jax's CPU default, set explicitly by
`maybe_initialize`). The processes run the real `sh2 train` command line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import pytest

from sh2_jax import config as config_lib
from sh2_jax.parallel import distributed, mesh as mesh_lib
from sh2_jax.train import optim
from sh2_jax.train.checkpoint import Checkpointer
from sh2_jax.train.loop import read_metrics, train
from sh2_jax.train.state import state_shardings
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT_S = 240

OVERRIDES = {
    "model.d_model": 32, "model.num_heads": 2, "model.se_groups": 4, "model.mr_groups": 4,
    "model.mr_filter_len": 16, "model.li_order": 4, "model.train_len": 64, "model.conv_chunk": 32,
    "model.dtype": "float32", "model.layout": "MR LI MHA", "data.seq_len": 64,
    "train.steps": 6, "train.batch_size": 4, "train.warmup_steps": 1, "train.log_every": 1,
    "train.eval_every": 0, "train.eval_batches": 2, "train.checkpoint_every": 2,
    "train.learning_rate": 3e-3,
}


def _config() -> config_lib.Config:
  return config_lib.apply_overrides(config_lib.get_preset("tiny"), OVERRIDES)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _restore(run_dir: str, config: config_lib.Config):
  """The latest checkpoint of `run_dir`, restored onto this process's devices."""
  tx = optim.make_optimizer(config.train)
  abstract, _ = state_shardings(config.model, tx, mesh_lib.make_mesh(config_lib.MeshConfig()))
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
  state = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  return state


def _run_processes(run_dir: str, mesh: str, stop_at: int, meanwhile: Callable[[], Any],
                   extra: tuple[str, ...] = (), count: int = 2,
                   devices_each: int = 2) -> tuple[list[str], Any]:
  """Runs `count` `sh2 train` processes against one coordinator and `meanwhile()` in this
  process while they run; returns their logs and what `meanwhile` returned."""
  port = _free_port()
  sets = [f"--set={k}={v}" for k, v in OVERRIDES.items()]
  command = [sys.executable, "-m", "sh2_jax.cli", "train", "--no-progress", "--run-dir", run_dir,
             "--mesh", mesh, "--stop-at", str(stop_at), *sets, *extra]
  processes = []
  for index in range(count):
    env = helpers.fake_devices_env(devices_each, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                   JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index))
    processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  deadline = time.monotonic() + PROCESS_TIMEOUT_S
  logs = []
  try:
    result = meanwhile()
    for process in processes:
      out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1.0))
      logs.append(out)
  except subprocess.TimeoutExpired:
    pytest.fail(f"multi-process training did not finish within {PROCESS_TIMEOUT_S} s")
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for index, (process, log) in enumerate(zip(processes, logs)):
    assert process.returncode == 0, f"process {index} failed:\n{log[-3000:]}"
  return logs, result


def test_two_processes_train_like_one(tmp_path):
  """`sh2 train` on 2 processes x 2 CPU devices (mesh data=2, fsdp=2: parameters and optimizer
  state sharded across the processes, each process loading its rows of every global batch) for
  4 of 6 steps, then resumed in this one process from the checkpoint both processes wrote to
  one directory, gives the losses, held-out loss and parameters of a one-process 6-step run on
  the same global batches; so do 2 steps with the sequence split over 2 processes
  (context=2)."""
  config = _config()
  multi_dir = str(tmp_path / "multi")
  single_run = lambda: train(config, str(tmp_path / "single"), progress=False)
  logs, single = _run_processes(multi_dir, "data=2,fsdp=2", stop_at=4, meanwhile=single_run)
  for index, log in enumerate(logs):
    assert f"distributed: process {index} of 2" in log, log[-2000:]
    assert "mesh: data=2, fsdp=2, tensor=1, context=1 over 4 cpu device(s)" in log, log[-2000:]
  ckpt = Checkpointer(os.path.join(multi_dir, "checkpoints"))
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  assert sorted(os.listdir(os.path.join(multi_dir, "checkpoints", "4", "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  # The sequence over a context axis that spans both processes (p2p halos, LI all-to-all and
  # ring attention between processes); both load the same batch rows.
  context_dir = str(tmp_path / "context")
  logs, _ = _run_processes(context_dir, "data=1,context=2", stop_at=2, meanwhile=lambda: None,
                           extra=("--set=mesh.context_attention=ring",), devices_each=1)
  assert "mesh: data=1, fsdp=1, tensor=1, context=2 over 2 cpu device(s)" in logs[0], logs[0][-2000:]
  context_losses = [r["loss"] for r in read_metrics(os.path.join(context_dir, "metrics.jsonl"))
                    if "loss" in r]
  single_losses = [r["loss"] for r in read_metrics(os.path.join(single["run_dir"], "metrics.jsonl"))
                   if "loss" in r]
  np.testing.assert_allclose(context_losses, single_losses[:2], rtol=2e-5)

  resumed = train(config, multi_dir, resume=True, progress=False)  # 2 processes -> 1.
  assert resumed["step"] == single["step"] == 6
  np.testing.assert_allclose(resumed["eval_loss"], single["eval_loss"], rtol=2e-5)

  records = {d: read_metrics(os.path.join(d, "metrics.jsonl")) for d in (multi_dir, single["run_dir"])}
  for key in ("loss", "grad_norm"):
    multi = {r["step"]: r[key] for r in records[multi_dir] if key in r}
    one = {r["step"]: r[key] for r in records[single["run_dir"]] if key in r}
    assert sorted(multi) == sorted(one) == [1, 2, 3, 4, 5, 6], (multi, one)
    np.testing.assert_allclose([multi[s] for s in one], list(one.values()), rtol=2e-5, err_msg=key)
    assert len(set(one.values())) == 6  # Every step saw new data or new weights.

  multi_state, single_state = _restore(multi_dir, config), _restore(single["run_dir"], config)
  assert int(multi_state.step) == 6
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(multi_state.params),
                          jax.tree.leaves(single_state.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_maybe_initialize_reads_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SH2_DISTRIBUTED",
               "JAX_NUM_PROCESSES", "NUM_PROCESSES", "JAX_PROCESS_ID", "PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.maybe_initialize() is False and calls == []

  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("PROCESS_ID", "3")
  assert distributed.maybe_initialize() is True
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}

  monkeypatch.setenv("PROCESS_ID", "4")
  with pytest.raises(distributed.DistributedError, match=r"process id 4 is outside \[0, 4\)"):
    distributed.maybe_initialize()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(distributed.DistributedError, match="JAX_NUM_PROCESSES='four' is not an integer"):
    distributed.maybe_initialize()

  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SH2_DISTRIBUTED", "1")  # Cluster auto-detection: no arguments.
  assert distributed.maybe_initialize() is True and calls[-1] == {}
  assert len(calls) == 2


class _FakeDevice:
  def __init__(self, process_index: int):
    self.process_index = process_index


class _FakeSharding:
  """Row slices of a [B, 1] batch per (fake) device: `layout[d] = (process, first, stop)`."""

  def __init__(self, layout: list[tuple[int, int, int]]):
    self.layout = layout
    self.num_devices = len(layout)

  def devices_indices_map(self, shape):
    return {_FakeDevice(p): (slice(a, b), slice(None)) for p, a, b in self.layout}


@pytest.mark.parametrize("layout, expected", [
    # data=2 across 2 processes (2 devices each: context or tensor inside a process).
    ([(0, 0, 2), (0, 0, 2), (1, 2, 4), (1, 2, 4)], [(0, 2), (1, 2)]),
    # context (or tensor) across processes: both hold every row and load the same data.
    ([(0, 0, 4), (0, 0, 4), (1, 0, 4), (1, 0, 4)], [(0, 1), (0, 1)]),
    # data=4 over 2 processes: two shards each.
    ([(0, 0, 1), (0, 1, 2), (1, 2, 3), (1, 3, 4)], [(0, 2), (1, 2)]),
])
def test_batch_rows_follow_the_mesh(monkeypatch, layout, expected):
  for process in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    assert distributed.batch_rows(_FakeSharding(layout), 4) == expected[process]


def test_batch_rows_errors():
  interleaved = _FakeSharding([(0, 0, 1), (1, 1, 2), (0, 2, 3), (1, 3, 4)])
  with pytest.raises(distributed.DistributedError, match="non-contiguous batch rows"):
    distributed.batch_rows(interleaved, 4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  assert distributed.batch_rows(sharding, 3) == (0, 1)
