"""Start-up cost of a run: fresh parameters, and the train step's compile with and without
the persistent compilation cache (`sh2 --compile-cache`).

  PYTHONPATH=. python experiments/time_startup.py [--presets tiny,evo2-1b,evo2-7b]
      [--layout "SE MHA"] [--step-length 8192] [--step-presets evo2-1b] [--out FILE]

Parameters, for each preset (in this process, one after the other): "one program" lowers and
compiles jax.jit of the model's flax init (unboxed), the way create_train_state drew
parameters before init_params (every parameter's random generator inlined into one program),
and runs it; "init_params" draws the same tree with one small sampler per distinct
(initialiser, shape, dtype), compiled in parallel threads, then run per parameter. Seconds
from the call to the parameters being ready, compilation included; the row also says how many
samplers the call compiled (those of an earlier preset are reused).

Train step, for each of --step-presets (B = 1, --step-length tokens, experiments.bench_train's
step on one device): the AOT compile into an empty persistent cache (this process's cache
directory is a fresh temporary one, every program cached whatever its compile time), then,
after jax.clear_caches(), the same compile again (loaded from the cache); the cold executable
runs one step twice from the same state, the cached one once, and their losses and gradient
norms are compared. --layout
replaces the presets' layouts (a quick run on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import bench_train, report  # noqa: E402
from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.model import StripedHyena2, count_params  # noqa: E402
from sh2_jax.train import state as state_lib  # noqa: E402


def time_one_program(model_config: ModelConfig, seed: int = 0) -> tuple[float, float]:
  """(compile s, total s) of jax.jit(flax init) on the default device."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda rng: nn.meta.unbox(StripedHyena2(model_config).init(rng, tokens)))
  start = time.perf_counter()
  compiled = init.lower(jax.random.key(seed)).compile()
  compiled_at = time.perf_counter()
  jax.block_until_ready(compiled(jax.random.key(seed)))
  return compiled_at - start, time.perf_counter() - start


def time_init_params(model_config: ModelConfig, seed: int = 0) -> tuple[float, int]:
  """(total s, samplers compiled by this call) of state.init_params on the default device."""
  before = len(state_lib._COMPILED)
  start = time.perf_counter()
  jax.block_until_ready(state_lib.init_params(model_config, jax.random.key(seed)))
  return time.perf_counter() - start, len(state_lib._COMPILED) - before


def time_step_compile(model_config: ModelConfig, length: int
                      ) -> tuple[float, float, tuple[float, float], tuple[float, float]]:
  """(cold compile s, compile s loaded from the persistent cache, relative (loss, gradient norm)
  gaps of two runs of the cold executable, the same gaps cold vs cached) of the train step at
  [1, length], each run one step from the same state (a GPU step need not be bitwise
  reproducible: atomics in reductions and attention's backward; evo2-1b's gradient norm moved by
  up to 3.2e-5 between two runs on an H100). AssertionError when the cached executable is off by
  more than CACHED_TOLERANCE and 10x the cold executable's own spread."""
  step, state, windows = bench_train.build_step(model_config, length, batch=1)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates its state)
  runs, seconds = [], []
  for attempt in range(2):
    if attempt:
      jax.clear_caches()
    start = time.perf_counter()
    compiled = step.lower(state, windows[0]).compile()
    seconds.append(time.perf_counter() - start)
    for _ in range(2 - attempt):  # the cold executable twice: the run-to-run baseline
      metrics = jax.device_get(compiled(copy(state), windows[0])[1])
      runs.append(np.array([metrics["loss"], metrics["grad_norm"]], np.float64))
  cold_gap, cached_gap = (tuple(np.abs(run - runs[0]) / np.abs(runs[0])) for run in runs[1:])
  allowed = [max(CACHED_TOLERANCE, 10 * cold) for cold in cold_gap]
  if not all(cached <= bound for cached, bound in zip(cached_gap, allowed)):
    raise AssertionError(f"the train step loaded from the compilation cache gave (loss, gradient "
                         f"norm) {runs[2]} against {runs[0]} (cold; {runs[1]} on its second run)")
  return seconds[0], seconds[1], cold_gap, cached_gap


CACHED_TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " ...")
  parser.add_argument("--presets", default="tiny,evo2-1b,evo2-7b")
  parser.add_argument("--layout", help="replace each preset's layout (e.g. 'SE MHA')")
  parser.add_argument("--step-presets", default="evo2-1b",
                      help="presets whose train step is compiled cold and from the cache ('' none)")
  parser.add_argument("--step-length", type=int, default=8192)
  parser.add_argument("--out", help="markdown file (default: print only)")
  args = parser.parse_args(argv)
  presets = [name for name in args.presets.split(",") if name]
  step_presets = [name for name in args.step_presets.split(",") if name]
  for name in presets + step_presets:
    if name not in config_lib.PRESETS:
      parser.error(f"--presets / --step-presets {name}: choose from "
                   f"{','.join(sorted(config_lib.PRESETS))}")
  saved = {name: getattr(jax.config, name) for name in CACHE_SETTINGS}
  with tempfile.TemporaryDirectory(prefix="sh2-startup-cache-") as cache_dir:
    # before this process's first compile (JAX reads the directory once; in a process that
    # compiled already, e.g. a test's, the cache it has stays in use)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
      rows, step_rows = _measure(presets, step_presets, args.layout, args.step_length)
    finally:
      for name, value in saved.items():
        jax.config.update(name, value)
  _report(rows, step_rows, args.step_length, argv, args.out)


CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def _measure(presets: list[str], step_presets: list[str], layout: str | None, step_length: int
             ) -> tuple[list[tuple], list[tuple]]:
  jax.block_until_ready(jnp.zeros(()) + 1)  # the backend's start-up, outside the first row
  rows = []
  for name in presets:
    model = config_lib.get_preset(name).model
    if layout:
      model = dataclasses.replace(model, layout=layout)
    count = count_params(state_lib.abstract_params(model))
    compile_s, one_program_s = time_one_program(model)
    init_params_s, compiled = time_init_params(model)
    rows.append((name, count, compile_s, one_program_s, init_params_s, compiled))
    print(f"{name}: one program {one_program_s:.2f} s (compile {compile_s:.2f}), init_params "
          f"{init_params_s:.2f} s ({compiled} samplers compiled)", flush=True)
  step_rows = []
  for name in step_presets:
    model = config_lib.get_preset(name).model
    if layout:
      model = dataclasses.replace(model, layout=layout)
    cold_s, cached_s, cold_gap, cached_gap = time_step_compile(model, step_length)
    step_rows.append((name, cold_s, cached_s, cold_gap, cached_gap))
    print(f"{name}: train step at L={step_length} compiles in {cold_s:.2f} s, "
          f"{cached_s:.2f} s from the cache", flush=True)
  return rows, step_rows


def _report(rows: list[tuple], step_rows: list[tuple], step_length: int,
            argv: list[str] | None, out: str | None) -> None:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["# Start-up: fresh parameters, and the train step's compile", "",
           f"- device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
           f"{jax.__version__}, {os.cpu_count()} CPU cores, {stamp}",
           "- command: `PYTHONPATH=. python3 experiments/time_startup.py "
           + shlex.join(argv if argv is not None else sys.argv[1:]) + "`",
           "- seconds from the call to the parameters being ready, compilation included"]
  if rows:
    lines += ["", "| preset | parameters | one program: compile s | one program: total s | "
              "init_params: total s | samplers it compiled | one program / init_params |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {count / 1e6:.1f} M | {compile_s:.2f} | {one:.2f} | {new:.2f} | "
              f"{compiled} | {one / new:.1f}x |"
              for name, count, compile_s, one, new, compiled in rows]
  if step_rows:
    lines += ["", f"Train step (B = 1, L = {step_length}, one device), compiled into an "
              "empty persistent cache, then again from it; the loss and gradient norm of one "
              "step from the same state, relative gaps to the cold executable's first run:", "",
              "| preset | compile s, cold | compile s, from the cache | cold / cached | "
              "loss, grad norm gaps: cold run twice | the same: cached |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {cold:.2f} | {cached:.2f} | {cold / cached:.1f}x | "
              f"{cold_gap[0]:.1e}, {cold_gap[1]:.1e} | {cached_gap[0]:.1e}, {cached_gap[1]:.1e} |"
              for name, cold, cached, cold_gap, cached_gap in step_rows]
  report.emit(lines, out)


if __name__ == "__main__":
  main()
