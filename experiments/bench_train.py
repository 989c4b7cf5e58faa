"""`sh2 bench train`: tokens/s and MFU of one training step, StripedHyena 2 against all-MHA.

The `evo2-1b`-shaped model (25 layers, D=1920, SE/MR/LI striped with MHA) and the same model
with every mixer replaced by MHA, through the same code path (train/step.py: bf16 compute,
float32 master weights, AdamW, per-block remat: by default the save_dots policy, which keeps
the matmul outputs and recomputes the rest), B=1, on one device; step time after warm-up
over steps dispatched back to back (as `sh2 train` runs them; the median of steps each waited
for is reported too). MFU = model FLOPs per step / step time / peak bf16 rate, with model FLOPs =
6 x (non-embedding params) x tokens + attention 6 x 2 x L^2 x D per MHA layer (causal: half
of 12 L^2 D) + the tied unembedding 6 x L x D x V. Hyena filter FLOPs are not counted (they
are small next to the projections), so Hyena MFU is slightly understated.
Step memory: the device bytes XLA's buffer assignment gives the compiled step (train state,
window, outputs, temporaries; the compiled program's memory analysis, so the same on every
run), per model and as SH2 / all-MHA.

  python -m sh2_jax.cli bench train [--lengths 8192,32768] [--preset evo2-1b] [--models sh2,mha]
      [--set li_method=pallas_fused ...] [--rounds 5]
      [--compare remat_policy=save_dots_features ...]

--compare times a third model, SH2 with the given settings, in the same run (in the alternating
windows with --rounds), and reports its tokens/s over SH2's per round: an A/B of a setting that
shares the device's drift with its baseline, unlike two separate runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import xla_memory
from experiments.cli_args import parse_lengths
from sh2_jax import config as config_lib
from sh2_jax.model import abstract_params, count_params
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train import optim, step as step_lib
from sh2_jax.train.state import create_train_state

logger = logging.getLogger(__name__)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def model_flops_per_step(model: config_lib.ModelConfig, length: int, batch: int) -> float:
  params = count_params(abstract_params(model)) - model.vocab_size * model.d_model
  tokens = batch * length
  attention_layers = sum(kind == "MHA" for kind in model.layers)
  return (6.0 * params * tokens + 6.0 * 2.0 * batch * length * length * model.d_model * attention_layers / 2.0
          + 6.0 * tokens * model.d_model * model.vocab_size)


def build_step(model: config_lib.ModelConfig, length: int, batch: int
               ) -> tuple[Any, Any, list[jax.Array]]:
  """(jitted train step, its initial state, two random [batch, length + 1] token windows)."""
  train_cfg = config_lib.TrainConfig(steps=1000, batch_size=batch, warmup_steps=10)
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig())
  tx = optim.make_optimizer(train_cfg)
  state, shardings = create_train_state(model, tx, mesh, seed=0)
  step = step_lib.make_train_step(model, train_cfg, tx, mesh, shardings)
  rng = np.random.default_rng(0)
  windows = [jnp.asarray(rng.integers(0, 256, (batch, length + 1)), jnp.int32) for _ in range(2)]
  return step, state, windows


def step_memory_bytes(step: Any, state: Any, window: jax.Array) -> int | None:
  """xla_memory.compiled_bytes of a jitted train step (its arguments being the train state and
  the window). Compiles the step; the call after it reuses the executable."""
  return xla_memory.compiled_bytes(step.lower(state, window).compile())


def time_step(model: config_lib.ModelConfig, length: int, batch: int, iters: int
              ) -> tuple[float, float, int | None]:
  """(pipelined, synchronised) ms of a jitted train step (forward, backward, AdamW update),
  and its step_memory_bytes.

  Pipelined: `iters` steps dispatched back to back and one wait at the end, as `sh2 train`
  runs them (it waits only to log), so the host enqueues step i + 1 while step i runs;
  synchronised: the median of `iters` steps each waited for, which adds the host's launch
  latency at the start of every step.
  """
  step, state, windows = build_step(model, length, batch)
  memory = step_memory_bytes(step, state, windows[0])
  state, synced = _warm_up_and_time_synchronised(step, state, windows, iters)
  start = time.perf_counter()
  for i in range(iters):
    state, metrics = step(state, windows[i % 2])
  jax.block_until_ready(metrics)
  pipelined = (time.perf_counter() - start) * 1e3 / iters
  del state
  return pipelined, synced, memory


def _warm_up_and_time_synchronised(step, state, windows, iters: int) -> tuple[Any, float]:
  """Two warm-up steps, then `iters` steps each waited for: (state after them, median ms)."""
  for i in range(2):
    state, metrics = step(state, windows[i % 2])
  jax.block_until_ready(metrics)
  times = []
  for i in range(iters):
    start = time.perf_counter()
    state, metrics = step(state, windows[i % 2])
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) * 1e3)
  return state, statistics.median(times)


def time_steps_interleaved(models: list[config_lib.ModelConfig], length: int, batch: int,
                           iters: int, rounds: int) -> list[tuple[list[float], float, int | None]]:
  """Per model: (pipelined ms of each round, synchronised median ms, step_memory_bytes), with
  the models' timing
  windows alternating: round r times `iters` back-to-back steps of every model in turn, so
  that drift of the device's speed (clocks, temperature) during the run hits all of them
  alike. Every model's step and state stay allocated for the whole run."""
  built = [build_step(model, length, batch) for model in models]
  states, synced, memory = [], [], []
  for step, state, windows in built:
    memory.append(step_memory_bytes(step, state, windows[0]))
    state, synced_ms = _warm_up_and_time_synchronised(step, state, windows, iters)
    states.append(state)
    synced.append(synced_ms)
  pipelined: list[list[float]] = [[] for _ in models]
  for _ in range(rounds):
    for k, (step, _, windows) in enumerate(built):
      state = states[k]
      start = time.perf_counter()
      for i in range(iters):
        state, metrics = step(state, windows[i % 2])
      jax.block_until_ready(metrics)
      pipelined[k].append((time.perf_counter() - start) * 1e3 / iters)
      states[k] = state
  return list(zip(pipelined, synced, memory))


def variants(preset: str, remat: str = "full", overrides: dict[str, str] | None = None
             ) -> list[tuple[str, config_lib.ModelConfig]]:
  """SH2 and all-MHA configs of a preset; remat: "none" or a model.remat_policy (per block);
  overrides: model settings for both, e.g. {"d_model": "256"} (or "model.d_model")."""
  preset_cfg = config_lib.apply_overrides(
      config_lib.get_preset(preset),
      {k if k.startswith("model.") else f"model.{k}": v for k, v in (overrides or {}).items()})
  base = dataclasses.replace(preset_cfg.model, dtype="bfloat16",
                             remat=remat != "none", remat_policy="full" if remat == "none" else remat)
  all_mha = dataclasses.replace(base, layout=" ".join(["MHA"] * base.num_layers))
  return [(f"{preset} (SH2: {base.layout.count('MHA')} MHA of {base.num_layers})", base),
          (f"{preset} shape, all MHA", all_mha)]


def with_settings(preset: str, model: config_lib.ModelConfig, settings: dict[str, str]
                  ) -> config_lib.ModelConfig:
  """`model` with model settings applied (keys "name" or "model.name"), validated as --set's."""
  config = dataclasses.replace(config_lib.get_preset(preset), model=model)
  return config_lib.apply_overrides(
      config, {k if k.startswith("model.") else f"model.{k}": v for k, v in settings.items()}).model


def _gib(nbytes: int | None) -> str:
  return "—" if nbytes is None else f"{nbytes / 2**30:.2f}"


def _per_round(label: str, ratios: list[float], ranges: list[tuple[float, float]], names: str) -> str:
  return (f"\n{label} per round " + ", ".join(f"{x:.3f}" for x in ratios)
          + f" (median {statistics.median(ratios):.3f}); step-ms windows "
          + ", ".join(f"{lo:.1f}-{hi:.1f}" for lo, hi in ranges) + f" ({names})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="evo2-1b")
  parser.add_argument("--lengths", default="8192,32768")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--remat", default="save_dots", choices=("none",) + config_lib.REMAT_POLICIES,
                      help="rematerialisation of each block, both models (default save_dots: the "
                           "fastest for both on an H100 at 8K and 32K)")
  parser.add_argument("--models", default="sh2,mha", help="which of the pair: sh2, mha or both")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="model setting for both models, e.g. li_method=pallas_fused (repeatable)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="with both models: alternate R timing windows of --iters steps per model "
                           "(both stay in memory) and report the median window and the median of "
                           "the per-round ratios (default 1: one model after the other)")
  parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                      help="also time SH2 with this model setting (repeatable: one variant with "
                           "all of them), e.g. remat_policy=save_dots_features; needs sh2 in --models")
  parser.add_argument("--out", default=None, help="markdown path (default experiments/results/train_<device>.md)")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds {args.rounds}: give 1 or more")
  wanted = {m.strip() for m in args.models.split(",") if m.strip()}
  if not wanted or wanted - {"sh2", "mha"}:
    parser.error(f"--models {args.models!r}: choose sh2, mha or sh2,mha")
  if args.compare and "sh2" not in wanted:
    parser.error(f"--compare needs SH2, its baseline, in --models (got {args.models!r})")
  overrides = config_lib.parse_set_args(args.set)
  compare = config_lib.parse_set_args(args.compare)
  device = jax.devices()[0]
  peak = peak_tflops(device.device_kind)
  rows: list[dict[str, Any]] = []
  round_ratios: dict[int, list[float]] = {}  # SH2 / all-MHA tokens/s per round
  compare_ratios: dict[int, list[float]] = {}  # SH2 with --compare / SH2 tokens/s per round
  for length in parse_lengths(parser, "--lengths", args.lengths):
    pair = variants(args.preset, args.remat, overrides)
    chosen = [(tag, name, model) for (name, model), tag in zip(pair, ("sh2", "mha")) if tag in wanted]
    if compare:
      chosen.append(("compare", ", ".join([pair[0][0]] + args.compare),
                     with_settings(args.preset, pair[0][1], compare)))
    tags = [tag for tag, _, _ in chosen]
    interleaved = args.rounds > 1 and len(chosen) >= 2
    timings: list[Any] = [None] * len(chosen)
    if interleaved:
      try:
        timings = time_steps_interleaved([m for _, _, m in chosen], length, args.batch, args.iters,
                                         args.rounds)
        windows_of = dict(zip(tags, (t[0] for t in timings)))
        if "mha" in windows_of:
          round_ratios[length] = [b / a for a, b in zip(windows_of["sh2"], windows_of["mha"])]
        if "compare" in windows_of:
          compare_ratios[length] = [a / b for a, b in zip(windows_of["sh2"], windows_of["compare"])]
      except Exception as error:  # noqa: BLE001 - OOM/compile failures are reported in the table
        timings = [error] * len(chosen)
    for k, (tag, name, model) in enumerate(chosen):
      row = {"model": ", ".join([name] + args.set), "L": length, "tag": tag}
      try:
        if isinstance(timings[k], Exception):
          raise timings[k]
        if interleaved:
          windows, synced_ms, memory = timings[k]
          ms = statistics.median(windows)
          row["window_range"] = (min(windows), max(windows))
        else:
          ms, synced_ms, memory = time_step(model, length, args.batch, args.iters)
        flops = model_flops_per_step(model, length, args.batch)
        row.update(ms=ms, synced_ms=synced_ms, memory=memory,
                   tokens_per_s=args.batch * length / (ms / 1e3),
                   mfu=None if peak is None else flops / (ms / 1e3) / (peak * 1e12))
      except Exception as error:  # noqa: BLE001 - OOM/compile failures are reported in the table
        message = str(error).splitlines()[0][:100]
        row["error"] = "OOM" if "RESOURCE_EXHAUSTED" in message or "memory" in message.lower() else message
      logger.info("%s", row)
      rows.append(row)
      if not interleaved:
        jax.clear_caches()
    jax.clear_caches()
  lines = ["# Training step: StripedHyena 2 vs all-MHA, same code path", "",
           f"- device: {device.device_kind}, jax {jax.__version__}; peak bf16 {peak} TFLOP/s for MFU",
           f"- date: {datetime.date.today().isoformat()}",
           f"- command: `sh2 bench train {' '.join(argv or [])}`".rstrip(),
           f"- B={args.batch}, bf16 compute, float32 params + AdamW, remat {args.remat}, 2 warm-up "
           f"steps; step ms: {args.iters} steps dispatched back to back, one wait at the end (as "
           f"`sh2 train` runs)" + (f", the median of {args.rounds} such windows alternating "
                                   "between the models" if args.rounds > 1 else "")
           + f"; synchronised: median of {args.iters} steps each waited for; "
           "tokens/s and MFU from the first; step memory: the step's arguments (train state, "
           "window), outputs and temporaries by XLA's buffer assignment", "",
           "| model | L | step ms | synchronised step ms | tokens/s | MFU | step memory GiB |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['model']} | {r['L']} | {r['error']} | | | | |")
    else:
      mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      lines.append(f"| {r['model']} | {r['L']} | {r['ms']:.1f} | {r['synced_ms']:.1f} | "
                   f"{r['tokens_per_s']:.0f} | {mfu} | {_gib(r['memory'])} |")
  lines += ["", "| L | SH2 tokens/s / all-MHA tokens/s | synchronised steps | SH2 / all-MHA step memory "
            "| target |", "|---|---|---|---|---|"]
  for length in sorted({r["L"] for r in rows}):
    pair = [r for tag in ("sh2", "mha") for r in rows
            if r["L"] == length and r["tag"] == tag and "tokens_per_s" in r]
    if len(pair) == 2:
      target = ">= 1.3" if length <= 8192 else ">= 2"
      ratio = (statistics.median(round_ratios[length]) if length in round_ratios
               else pair[0]["tokens_per_s"] / pair[1]["tokens_per_s"])
      memory = ("—" if None in (pair[0]["memory"], pair[1]["memory"])
                else f"{pair[0]['memory'] / pair[1]['memory']:.2f}")
      lines.append(f"| {length} | {ratio:.2f} | "
                   f"{pair[1]['synced_ms'] / pair[0]['synced_ms']:.2f} | {memory} | {target} |")
  def ranges(length: int, tags: tuple[str, ...]) -> list[tuple[float, float]]:
    return [r["window_range"] for tag in tags for r in rows
            if r["L"] == length and r["tag"] == tag and "window_range" in r]

  for length, ratios_L in sorted(round_ratios.items()):
    lines.append(_per_round(f"L={length}: SH2 / all-MHA", ratios_L, ranges(length, ("sh2", "mha")),
                            "SH2, all-MHA"))
  for length in sorted({r["L"] for r in rows if r["tag"] == "compare"}):
    timed = {r["tag"]: r for r in rows if r["L"] == length and "tokens_per_s" in r}
    label = f"L={length}: SH2 with {', '.join(args.compare)} / SH2 tokens/s"
    if length in compare_ratios:
      lines.append(_per_round(label, compare_ratios[length], ranges(length, ("sh2", "compare")),
                              "SH2, SH2 with the settings"))
    elif {"sh2", "compare"} <= timed.keys():
      lines.append(f"\n{label}: "
                   f"{timed['compare']['tokens_per_s'] / timed['sh2']['tokens_per_s']:.3f} (one window each)")
  text = "\n".join(lines) + "\n"
  path = args.out or os.path.join(RESULTS, f"train_{device.device_kind.lower().replace(' ', '_')}.md")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(text)
  return 0
