"""The training loop and run-directory evaluation: progress, metrics, checkpoints, plots.

A run directory holds:
  config.json      the full Config of the run
  metrics.jsonl    one JSON object per record: {"step", "loss", "bpb", ...} or {"step", "eval_bpb", ...};
                   "tokens_per_s" over the steps since the previous record, leaving out the
                   run's first step (it compiles) and evaluations
  checkpoints/     orbax steps (train state + data iterator)
  loss.png         training loss and held-out bits per byte against the Markov baselines
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Iterable

import jax
import numpy as np
import tqdm

from sh2_jax.config import Config
from sh2_jax.data import markov
from sh2_jax.errors import UserError
from sh2_jax.data.pipeline import DataError, build_data
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.parallel.context_sharding import validate_model_length
from sh2_jax.parallel.distributed import batch_rows
from sh2_jax.train import optim, step as step_lib
from sh2_jax.train.checkpoint import Checkpointer
from sh2_jax.train.state import TrainState, create_train_state, state_shardings

logger = logging.getLogger(__name__)

MARKOV_ORDERS = (0, 3)


class RunError(UserError, RuntimeError):
  """A run directory is missing, incomplete or in conflict with the request (one line)."""


def _is_main() -> bool:
  return jax.process_index() == 0


class MetricsWriter:
  """Appends JSON lines to metrics.jsonl (process 0 only)."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict[str, Any]) -> None:
    if not _is_main():
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v)
             for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_config(config: Config, run_dir: str) -> None:
  if _is_main():
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)


def load_config(run_dir: str) -> Config:
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise RunError(f"{run_dir!r} is not a run directory (no config.json): pass the --run-dir of a "
                   "finished or checkpointed `sh2 train`")
  with open(path) as f:
    return Config.from_dict(json.load(f))


def _global_batch(local_batch: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
  return jax.make_array_from_process_local_data(sharding, local_batch)


def evaluate(eval_step, params: Any, batches: Iterable[np.ndarray],
             sharding: jax.sharding.NamedSharding) -> dict[str, float]:
  """Held-out loss (nats/token) and bits per byte over the given batches."""
  total, count = 0.0, 0.0
  for batch in batches:
    nll_sum, n = eval_step(params, _global_batch(batch, sharding))
    total, count = total + float(nll_sum), count + float(n)
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_bpb": loss / math.log(2.0), "eval_tokens": count}


def markov_baselines(train_tokens: np.ndarray, eval_tokens: np.ndarray,
                     orders: Iterable[int] = MARKOV_ORDERS) -> dict[str, float]:
  """Held-out bits per byte of order-k Markov models fitted on the training split."""
  return {f"markov{k}_bpb": markov.fit_markov(train_tokens, k).bits_per_byte(eval_tokens)
          for k in orders}


def _evaluated_tokens(data: Any, result: dict[str, float]) -> np.ndarray:
  """The held-out bytes the model was scored on (consecutive windows from the split's start),
  so the Markov baselines are scored on the same stretch."""
  return data.eval_tokens[: int(result["eval_tokens"]) + 1]


def plot_metrics(records: list[dict[str, Any]], path: str,
                 baselines: dict[str, float] | None = None) -> None:
  """Training bits per byte and held-out bits per byte against steps, with baselines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["bpb"]) for r in records if "bpb" in r]
  held = [(r["step"], r["eval_bpb"]) for r in records if "eval_bpb" in r]
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  if train:
    ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
  if held:
    ax.plot(*zip(*held), "o-", label="held-out", color="tab:orange")
  for (name, value), style in zip(sorted((baselines or {}).items()), ("--", ":", "-.")):
    ax.axhline(value, linestyle=style, color="gray", label=f"{name.replace('_bpb', '')} {value:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per byte")
  values = [v for _, v in train + held] + list((baselines or {}).values())
  if values:
    reference = [v for _, v in held] + list((baselines or {}).values()) or values
    ax.set_ylim(min(values) - 0.05, max(reference) + 0.3)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("sh2-jax training")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


@dataclasses.dataclass
class _Setup:
  config: Config
  mesh: Any
  data: Any
  optimizer: Any
  abstract_state: TrainState
  shardings: TrainState


def _setup(config: Config) -> _Setup:
  mesh = mesh_lib.make_mesh(config.mesh)
  validate_model_length(config.model, config.data.seq_len, mesh.shape["context"], config.mesh)
  global_batch = config.train.batch_size
  # The rows of each global batch that this process's devices hold (processes that share rows,
  # e.g. a context or tensor axis across processes, load the same rows).
  rows_index, rows_count = batch_rows(mesh_lib.batch_sharding(mesh), global_batch)
  data = build_data(config.data, global_batch, rows_index, rows_count)
  optimizer = optim.make_optimizer(config.train)
  abstract, shardings = state_shardings(config.model, optimizer, mesh, config.mesh)
  return _Setup(config, mesh, data, optimizer, abstract, shardings)


def train(config: Config, run_dir: str, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> dict[str, Any]:
  """Trains `config` into `run_dir`; with `resume`, continues from its last checkpoint.

  Args:
    stop_at: stop at this step with a checkpoint, leaving the schedule of train.steps intact
      (for time-limited jobs; continue later with resume=True). None = train.steps.

  Returns:
    Summary: final step, last train loss, held-out eval metrics, Markov baselines, paths.
  """
  os.makedirs(run_dir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if resume and latest is None:
    raise RunError(f"--resume: no complete checkpoint in {run_dir!r}; start without --resume")
  if not resume and latest is not None:
    raise RunError(f"{run_dir!r} already holds checkpoints (latest step {latest}): pass --resume "
                   "to continue, or choose another --run-dir")
  if resume:
    saved = load_config(run_dir)
    if saved.model != config.model or saved.data != config.data:
      raise RunError("--resume with a different model or data config than the run's config.json; "
                     "resume with the same --preset/--set values (train.* may change)")
  setup = _setup(config)
  tc = config.train
  logger.info("mesh: %s", mesh_lib.describe(setup.mesh))
  train_iter = setup.data.train_iterator()
  if resume:
    state = ckpt.restore(latest, setup.abstract_state, train_iter)
  else:
    state, _ = create_train_state(config.model, setup.optimizer, setup.mesh, tc.seed, config.mesh,
                                  setup.shardings)
  save_config(config, run_dir)
  metrics_log = MetricsWriter(os.path.join(run_dir, "metrics.jsonl"))
  train_step = step_lib.make_train_step(config.model, tc, setup.optimizer, setup.mesh,
                                        setup.shardings, config.mesh)
  eval_step = step_lib.make_eval_step(config.model, setup.mesh, setup.shardings.params, config.mesh)
  batch_sharding = mesh_lib.batch_sharding(setup.mesh)
  eval_batches = setup.data.eval_batches(tc.batch_size, tc.eval_batches)

  start = int(state.step)
  end = tc.steps if stop_at is None else min(stop_at, tc.steps)
  if end <= start:
    raise RunError(f"nothing to do: the run is at step {start} and would stop at {end}; raise "
                   "train.steps or --stop-at")
  tokens_per_step = tc.batch_size * config.data.seq_len
  bar = tqdm.tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                  disable=not (progress and _is_main()))
  logger.info("training steps %d..%d of %d, %d tokens/step, run dir %s", start, end, tc.steps,
              tokens_per_step, run_dir)
  last: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0
  for step in range(start + 1, end + 1):
    batch = next(train_iter)["tokens"]
    state, metrics = train_step(state, _global_batch(batch, batch_sharding))
    if step == start + 1:  # this call compiled the step: keep it out of the throughput windows
      jax.block_until_ready(metrics)
      logger.info("step %d (compiling the train step): %.1f s", step,
                  time.perf_counter() - window_start)
      window_start = time.perf_counter()
    else:
      window_steps += 1
    bar.update(1)
    if step % max(tc.log_every, 1) == 0 or step == end:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - window_start
      last = {k: float(v) for k, v in metrics.items()}
      if window_steps:  # none when only the compiling step ran since the last record
        last["tokens_per_s"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
      if not math.isfinite(last["loss"]):
        raise FloatingPointError(f"loss is {last['loss']} at step {step}: lower train.learning_rate")
      metrics_log.write({"step": step, **last})
      rate = {"tok_s": f"{last['tokens_per_s']:.0f}"} if window_steps else {}
      bar.set_postfix(loss=f"{last['loss']:.3f}", bpb=f"{last['bpb']:.3f}", **rate)
      window_start, window_steps = time.perf_counter(), 0
    if tc.eval_every and step % tc.eval_every == 0 and step != end:
      result = evaluate(eval_step, state.params, eval_batches, batch_sharding)
      metrics_log.write({"step": step, **result})
      bar.write(f"step {step}: held-out {result['eval_bpb']:.4f} bits/byte")
      window_start = time.perf_counter()
    if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != end:
      ckpt.save(step, state, train_iter)
  bar.close()

  final_step = int(state.step)
  result = evaluate(eval_step, state.params, eval_batches, batch_sharding)
  metrics_log.write({"step": final_step, **result})
  if ckpt.latest_step() != final_step:
    ckpt.save(final_step, state, train_iter)
  ckpt.close()
  baselines = markov_baselines(setup.data.train_tokens, _evaluated_tokens(setup.data, result))
  plot_path = os.path.join(run_dir, "loss.png")
  if _is_main():
    plot_metrics(read_metrics(metrics_log.path), plot_path, baselines)
  summary = {"step": final_step, "train_loss": last.get("loss"), **result, **baselines,
             "run_dir": run_dir, "plot": plot_path}
  logger.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "plot"}))
  return summary


def evaluate_run(run_dir: str, step: int | None = None, max_batches: int = 0,
                 batch_size: int | None = None) -> dict[str, Any]:
  """Held-out loss and bits per byte of a run's checkpoint, with order-0 and order-3 Markov
  baselines fitted on the training split."""
  config = load_config(run_dir)
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), config.train.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.all_steps():
    raise RunError(f"no checkpoint {'at step ' + str(step) + ' ' if step is not None else ''}in "
                   f"{run_dir!r}; available steps: {ckpt.all_steps()}")
  setup = _setup(config)
  state = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  batch_size = batch_size or config.train.batch_size
  eval_step = step_lib.make_eval_step(config.model, setup.mesh, setup.shardings.params, config.mesh)
  batches = setup.data.eval_batches(batch_size, max_batches)
  result = evaluate(eval_step, state.params, tqdm.tqdm(batches, desc="eval", disable=not _is_main()),
                    mesh_lib.batch_sharding(setup.mesh))
  baselines = markov_baselines(setup.data.train_tokens, _evaluated_tokens(setup.data, result))
  return {"step": step, **result, **baselines}


__all__ = ["train", "evaluate_run", "evaluate", "markov_baselines", "plot_metrics", "RunError",
           "DataError", "load_config", "read_metrics"]
