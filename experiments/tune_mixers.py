"""Block-size sweep of the Hyena mixers at a model preset's shape, as a training step runs them.

  PYTHONPATH=. python experiments/tune_mixers.py [--preset evo2-1b] [--length 8192]
      [--mixers se,mr,li] [--budget 60] [--out FILE]
      [--candidate li:chunk=4 --candidate se:num_stages_bwd=2 ... [--rounds 3]]
      (--dry-run: a tiny shape in interpret mode, to test the script on a CPU)

The kernels' BlockSizes heuristics were tuned at D = 4096 (bench_blocked_conv.py,
bench_modal_conv.py); a preset of another width (evo2-1b: D = 1920, 15 filter groups of 128
channels) allows other tiles. For each mixer this times the whole module (projections
included) forward + backward inside jax.checkpoint with the save-the-products policy and
`model.remat` on, i.e. the kernels a rematerialised training step runs, while the kernels'
default BlockSizes (`BlockSizes.get_default`, which every None field resolves from) is each
candidate in turn: a greedy walk over one axis at a time from the current defaults, keeping
a value only if it is faster by more than --keep (relative), until --budget seconds per
mixer. Prints a markdown table per mixer (resolved tiles, ms) and the best candidate.

With --candidate, no walk: the named candidates and their mixer's defaults are compiled
first (the table gives each one's compile seconds), then timed in --rounds alternating rounds
(an A/B whose sides share the drift).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import statistics
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report  # noqa: E402
from experiments.bench_ops import Variant, _module_fns  # noqa: E402
from experiments.timing import median_ms  # noqa: E402
from pallas_kernels import blocked_conv as bc  # noqa: E402
from pallas_kernels import featurized_conv as fc  # noqa: E402
from pallas_kernels import modal_conv as mc  # noqa: E402
from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE  # noqa: E402

# Axes of the greedy walk per mixer: (BlockSizes field, values). None = the heuristic.
BLOCKED_AXES = [("block_c", (None, 32, 64, 128)), ("num_segments_fwd", (None, 2, 4, 8, 16, 32)),
                ("num_segments_bwd", (None, 1, 2, 4, 8, 16)), ("num_warps_fwd", (None, 8)),
                ("num_warps_bwd", (None, 4, 8)), ("num_stages_fwd", (None, 2, 3)),
                ("num_stages_bwd", (None, 1, 2, 3))]
MODAL_AXES = [("block_c", (None, 16, 64, 128)), ("num_warps", (None, 2, 4)),
              ("chunk", (None, 16, 4)), ("segment_chunks", (None, 16, 32, 64)),
              ("num_stages", (None, 2, 4))]
MIXERS = {"se": (HyenaSE, bc.BlockSizes, BLOCKED_AXES), "mr": (HyenaMR, bc.BlockSizes, BLOCKED_AXES),
          "li": (HyenaLI, mc.BlockSizes, MODAL_AXES)}


def _resolved(mixer: str, candidate: Any, config: config_lib.ModelConfig, length: int) -> str:
  """The tiles the kernels resolve for this candidate at the mixer's shape (a short string),
  or why the kernels refuse it."""
  width = config.d_model
  if mixer == "li":
    reason = mc.featurized_unsupported_reason((1, length, width), (width, config.featurizer_len),
                                              (width, config.li_order), candidate)
    if reason:
      return f"unsupported: {reason}"
    resolved = mc._resolve(candidate, (1, length, width))
  else:
    groups = config.se_groups if mixer == "se" else config.mr_groups
    taps = config.se_filter_len if mixer == "se" else config.mr_filter_len
    reason = bc.unsupported_reason((1, length, width), (groups, taps), candidate)
    if mixer == "se" and not reason:  # the fused featurizer kernel, which the module runs
      reason = fc.unsupported_reason((1, length, 3 * width), (3 * width, config.featurizer_len),
                                     (groups, taps), candidate)
    if reason:
      return f"unsupported: {reason}"
    resolve = fc._resolve if mixer == "se" else bc._resolve
    resolved = resolve(candidate, (1, length, width), (groups, taps), jnp.bfloat16)
  return ", ".join(f"{f.name}={getattr(resolved, f.name)}" for f in dataclasses.fields(resolved))


@contextlib.contextmanager
def default_block_sizes(sizes_cls: type, candidate: Any) -> Iterator[None]:
  """Within the block, `sizes_cls.get_default()` (which every None field resolves from) is
  `candidate`; the kernels' jit caches are cleared on the way in, as they hold traces made
  with the previous default."""
  original = sizes_cls.__dict__["get_default"]
  sizes_cls.get_default = classmethod(lambda cls: candidate)
  jax.clear_caches()
  try:
    yield
  finally:
    sizes_cls.get_default = original


def parse_candidate(text: str) -> tuple[str, Any]:
  """"se:num_stages_bwd=2,num_warps_bwd=8" -> ("se", that mixer's BlockSizes)."""
  mixer, sep, fields = text.partition(":")
  if not sep or mixer not in MIXERS:
    raise ValueError(f"candidate {text!r} must look like MIXER:FIELD=VALUE with MIXER one of "
                     f"{sorted(MIXERS)}")
  sizes_cls = MIXERS[mixer][1]
  names = {f.name for f in dataclasses.fields(sizes_cls)}
  values = {}
  for item in fields.split(","):
    key, sep, value = item.partition("=")
    if not sep or key not in names:
      raise ValueError(f"candidate {text!r}: {item!r} must be FIELD=VALUE with FIELD one of "
                       f"{sorted(names)}")
    values[key] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
  return mixer, sizes_cls(**values)


def mixers_and_candidates(parser: argparse.ArgumentParser, mixers_arg: str,
                          candidate_args: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
  """--mixers (comma-separated) and the --candidate values, validated: a bad one exits through
  parser.error with the choices."""
  mixers = mixers_arg.split(",")
  unknown = sorted(set(mixers) - set(MIXERS))
  if unknown:
    parser.error(f"--mixers {','.join(unknown)}: choose from {','.join(MIXERS)}")
  try:
    return mixers, [parse_candidate(c) for c in candidate_args]
  except ValueError as error:
    parser.error(str(error))
    raise  # parser.error exits


def candidate_label(candidate: Any) -> str:
  """The fields a candidate sets, "block_c=32, num_warps=2", or "defaults"."""
  return ", ".join(f"{f.name}={getattr(candidate, f.name)}" for f in dataclasses.fields(candidate)
                   if getattr(candidate, f.name) is not None) or "defaults"


def time_candidate(mixer: str, candidate: Any, config: config_lib.ModelConfig, x_BLD: jax.Array,
                   iters: int) -> float:
  """fwd+bwd ms of the mixer module under save_dots remat with `candidate` as the default."""
  module, sizes_cls, _ = MIXERS[mixer]
  with default_block_sizes(sizes_cls, candidate):
    _, fwdbwd = _module_fns(Variant(mixer, module, {}), config, x_BLD, jax.random.key(0),
                            remat="save_dots")
    return median_ms(fwdbwd, iters=iters, warmup=3)


CompareRow = tuple[str, str, list[float] | str, float | None]


def compare(mixer: str, candidates: list[Any], config: config_lib.ModelConfig, x_BLD: jax.Array,
            rounds: int, iters: int) -> list[CompareRow]:
  """The defaults and each candidate, compiled ahead of time, then timed in `rounds`
  alternating rounds (median of `iters` runs each), so that the device's drift hits them alike.

  Returns rows (label, resolved tiles, ms per round, seconds the module's forward and
  backward took to compile), the defaults first; a candidate the kernels refuse or that fails
  to compile has its reason instead of times (and None seconds). The compile seconds include
  the candidate's kernels through Triton, which this process has not compiled before unless
  an earlier row resolved to the same tiles.
  """
  module, sizes_cls, _ = MIXERS[mixer]
  rows: list[CompareRow] = []
  thunks = []
  for candidate in [sizes_cls(), *candidates]:
    label = candidate_label(candidate)
    resolved = _resolved(mixer, candidate, config, x_BLD.shape[1])
    if resolved.startswith("unsupported"):
      rows.append((label, resolved, resolved, None))
      continue
    start = time.perf_counter()
    try:
      with default_block_sizes(sizes_cls, candidate):
        _, fwdbwd = _module_fns(Variant(mixer, module, {}), config, x_BLD, jax.random.key(0),
                                remat="save_dots", compile_now=True)
    except Exception as error:  # noqa: BLE001 - a candidate that does not compile is a row
      rows.append((label, resolved, str(error).splitlines()[0][:100], None))
      continue
    rows.append((label, resolved, [], time.perf_counter() - start))
    thunks.append((len(rows) - 1, fwdbwd))
  for round_index in range(rounds):
    for row_index, fwdbwd in thunks:
      ms = median_ms(fwdbwd, iters=iters, warmup=3 if round_index == 0 else 1)
      rows[row_index][2].append(ms)
      print(f"{mixer} | round {round_index + 1} | {rows[row_index][0]} | {ms:.3f}", flush=True)
  return rows


def compare_lines(mixer: str, rows: list[CompareRow]) -> list[str]:
  """A markdown table of compare()'s rows: ms per round, the median per-round ratio to the
  defaults (the first row) and the compile seconds."""
  rounds = max((len(t) for _, _, t, _ in rows if isinstance(t, list)), default=0)
  base = rows[0][2] if isinstance(rows[0][2], list) else None
  lines = [f"## {mixer.upper()}", "",
           "| candidate | resolved at this shape | " + " | ".join(
               f"round {r + 1} ms" for r in range(rounds)) + " | / defaults | compile s |",
           "|---|---|" + "---|" * rounds + "---|---|"]
  for label, resolved, times, compile_s in rows:
    if isinstance(times, str):
      lines.append(f"| {label} | {resolved} | " + " | ".join([times] + ["-"] * (rounds + 1))
                   + " |")
      continue
    ratio = "-" if base is None else f"{statistics.median(t / b for t, b in zip(times, base)):.3f}"
    lines.append(f"| {label} | {resolved} | " + " | ".join(f"{t:.3f}" for t in times)
                 + f" | {ratio} | {compile_s:.1f} |")
  return lines


def sweep(mixer: str, config: config_lib.ModelConfig, x_BLD: jax.Array, budget_s: float,
          keep: float, iters: int) -> tuple[list[tuple[str, str, str]], Any, float, float]:
  """Greedy walk; returns (table rows (candidate, resolved, ms), best, best ms, default ms)."""
  _, sizes_cls, axes = MIXERS[mixer]
  start = time.perf_counter()
  rows = []

  def measure(candidate) -> float:
    resolved = _resolved(mixer, candidate, config, x_BLD.shape[1])
    label = candidate_label(candidate)
    if resolved.startswith("unsupported"):
      rows.append((label, resolved, "-"))
      return float("inf")
    try:
      ms = time_candidate(mixer, candidate, config, x_BLD, iters)
    except Exception as error:  # noqa: BLE001 - a candidate that does not compile is a row
      rows.append((label, resolved, str(error).splitlines()[0][:100]))
      return float("inf")
    rows.append((label, resolved, f"{ms:.3f}"))
    print(f"{mixer} | {label} | {resolved} | {ms:.3f}", flush=True)
    return ms

  best = sizes_cls()
  default_ms = best_ms = measure(best)
  for name, values in axes:
    for value in values:
      if time.perf_counter() - start > budget_s:
        return rows, best, best_ms, default_ms
      if getattr(best, name) == value:
        continue
      candidate = dataclasses.replace(best, **{name: value})
      ms = measure(candidate)
      if ms < best_ms * (1 - keep):
        best, best_ms = candidate, ms
  if best != sizes_cls():  # the winner again, against drift over the walk
    best_ms = measure(best)
    default_ms = min(default_ms, measure(sizes_cls()))
  return rows, best, best_ms, default_ms


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="evo2-1b")
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--mixers", default="se,mr,li")
  parser.add_argument("--budget", type=float, default=60.0, help="seconds per mixer")
  parser.add_argument("--keep", type=float, default=0.02,
                      help="relative gain a value needs to replace the current best")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=None, help="markdown file (default: print only)")
  parser.add_argument("--candidate", action="append", default=[],
                      metavar="MIXER:FIELD=VALUE[,FIELD=VALUE]",
                      help="instead of the walk, time these candidates (repeatable) against their "
                           "mixer's defaults in --rounds alternating rounds")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of a --candidate comparison")
  parser.add_argument("--dry-run", action="store_true", help="tiny shape, interpret mode (CPU)")
  args = parser.parse_args(argv)
  mixers, candidates = mixers_and_candidates(parser, args.mixers, args.candidate)
  if args.rounds < 1:
    parser.error(f"--rounds {args.rounds}: must be at least 1")
  config = dataclasses.replace(config_lib.get_preset(args.preset).model, dtype="bfloat16",
                               remat=True)
  length = args.length
  if args.dry_run:
    config = dataclasses.replace(config, d_model=64, num_heads=2, se_groups=2, mr_groups=2,
                                 mr_filter_len=32)
    length = 64
  x = jax.random.normal(jax.random.key(1), (1, length, config.d_model), jnp.bfloat16)
  device = jax.devices()[0].device_kind
  lines = [f"# Hyena mixer block-size sweep ({args.preset}, L={length})", "",
           f"- device: {device}, jax {jax.__version__}, "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           f"- command: `PYTHONPATH=. python3 experiments/tune_mixers.py {' '.join(argv or sys.argv[1:])}`",
           f"- B=1, D={config.d_model}, bf16; module fwd+bwd (projections included) under "
           "save_dots remat, median of {} runs; ".format(args.iters)
           + ("candidates against the defaults in {} alternating rounds".format(args.rounds)
              if candidates else "greedy walk, keep > {:.0%}".format(args.keep))]
  if candidates:
    for mixer in dict.fromkeys(m for m, _ in candidates):
      rows = compare(mixer, [c for m, c in candidates if m == mixer], config, x, args.rounds,
                     args.iters)
      lines += ["", *compare_lines(mixer, rows)]
    report.emit(lines, args.out)
    return 0
  for mixer in mixers:
    rows, best, best_ms, default_ms = sweep(mixer, config, x, args.budget, args.keep, args.iters)
    lines += ["", f"## {mixer.upper()}: defaults {default_ms:.3f} ms, best {best_ms:.3f} ms "
              f"({best_ms / default_ms:.3f}x): {best}", "",
              "| candidate | resolved at this shape | fwd+bwd ms |", "|---|---|---|",
              *[f"| {a} | {b} | {c} |" for a, b, c in rows]]
  report.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
