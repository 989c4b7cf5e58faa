"""A/B on a GPU of the LI kernels' chunk walk: the prefetching loop with its first chunk's loads
before the loop (`prologue_walk`, pallas_kernels/modal_conv.py before commit 6e8482d) against
the rotated loop that modal_conv uses (`modal_conv._walk`).

  PYTHONPATH=. python3 experiments/ab_li_walk.py [--shapes evo2-1b:8192,evo2-7b:32768]
      [--rounds 3] [--walks prologue,rotated,rotated:fwd+bwd_reverse] [--out FILE]
  PYTHONPATH=. python3 experiments/ab_li_walk.py --startup-walk prologue [--out FILE]

Default: for each shape, the HyenaLI module's forward+backward (B = 1, bf16, under the
save_dots remat policy, as a training step runs a block) is compiled with each walk in this
process (compile seconds: the module's fwd and fwd+bwd, Triton kernels included), then timed in
alternating rounds (median of 20 calls each), outputs, gradients and times compared to the
first walk's. --startup-walk WALK: experiments/time_startup.py's train-step compile (evo2-1b, 8K,
cold and from the persistent cache) with that walk; one walk per process (JAX reads the cache
directory once per process).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, time_startup  # noqa: E402
from experiments.bench_ops import Variant, _module_fns  # noqa: E402
from experiments.timing import median_ms  # noqa: E402
from pallas_kernels import modal_conv  # noqa: E402
from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.layers.hyena import HyenaLI  # noqa: E402

ROTATED_WALK = modal_conv._walk


def prologue_walk(refs, chunk: int, segment_chunks: int, reverse: bool, process, init,
                  taps=None, with_raw: bool = False):
  """modal_conv._walk as it was before the rotation (same contract): step s processes chunk s
  and loads chunk s + 1; chunk 0's rows are loaded before the loop."""
  parts = modal_conv._walk_parts(refs, chunk, segment_chunks, reverse, taps)

  def body(step, carry):
    state, loaded = carry
    next_loaded = parts.load(step + 1)
    base = parts.chunk_base(step)
    rows, raw = parts.prepare(loaded, base)
    if with_raw:
      return process(state, base, rows, raw), next_loaded
    return process(state, base, rows), next_loaded

  return jax.lax.fori_loop(0, segment_chunks, body, (init, parts.load(0)))[0]


WALKS: dict[str, Callable[..., Any]] = {"prologue": prologue_walk, "rotated": ROTATED_WALK}
KERNELS = ("states", "fwd", "bwd_forward", "bwd_reverse")  # modal_conv's _{name}_kernel


def mixed_walk(rotated_kernels: frozenset[str]) -> Callable[..., Any]:
  """A walk that is rotated in the kernels named (KERNELS entries), the prologue walk in the
  others (chosen at trace time from the calling kernel's name)."""
  def walk(*args, **kwargs):
    caller = sys._getframe(1).f_code.co_name
    name = caller.removeprefix("_").removesuffix("_kernel")
    if name not in KERNELS:
      raise ValueError(f"_walk called from {caller}: add it to KERNELS")
    return (ROTATED_WALK if name in rotated_kernels else prologue_walk)(*args, **kwargs)
  return walk


def parse_walk(spec: str) -> Callable[..., Any]:
  """"prologue", "rotated", or "rotated:K1+K2" (rotated in kernels K1, K2 only)."""
  if spec in WALKS:
    return WALKS[spec]
  kind, _, names = spec.partition(":")
  kernels = frozenset(names.split("+"))
  if kind != "rotated" or not kernels <= set(KERNELS):
    raise ValueError(f"walk {spec!r}: write prologue, rotated or rotated:K1+K2 with K from "
                     f"{'+'.join(KERNELS)}")
  return mixed_walk(kernels)


def max_relative_gap(got: Any, want: Any) -> float:
  """Largest max|got - want| / max|want| over the leaves of two pytrees."""
  gaps = []
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    gaps.append(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)))
  return max(gaps)


def compare_walks(preset: str, length: int, rounds: int, walks: list[str]) -> list[tuple]:
  """Rows (walk, compile s, ms per round, median ratio to the first walk, gap to its outputs)
  of one shape."""
  config = dataclasses.replace(config_lib.get_preset(preset).model, dtype="bfloat16", remat=True)
  x_BLD = jax.random.normal(jax.random.key(1), (1, length, config.d_model), jnp.bfloat16)
  compiled = {}
  try:
    for name in walks:
      modal_conv._walk = parse_walk(name)
      jax.clear_caches()
      start = time.perf_counter()
      _, fwd_bwd = _module_fns(Variant("li", HyenaLI, {}), config, x_BLD, jax.random.key(0),
                               remat="save_dots", compile_now=True)
      compiled[name] = (fwd_bwd, time.perf_counter() - start)
  finally:
    modal_conv._walk = ROTATED_WALK
  want = compiled[walks[0]][0]()
  times: dict[str, list[float]] = {name: [] for name in compiled}
  for r in range(rounds):
    for name, (fwd_bwd, _) in compiled.items():
      times[name].append(median_ms(fwd_bwd, iters=20, warmup=3 if r == 0 else 1))
  return [(name, compile_s, times[name],
           statistics.median(a / b for a, b in zip(times[name], times[walks[0]])),
           max_relative_gap(fwd_bwd(), want))
          for name, (fwd_bwd, compile_s) in compiled.items()]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="evo2-1b:8192,evo2-7b:32768",
                      help="comma-separated PRESET:LENGTH")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--walks", default="prologue,rotated",
                      help="comma-separated: prologue, rotated, rotated:K1+K2 (K from "
                           f"{'+'.join(KERNELS)}); ratios and gaps are to the first")
  parser.add_argument("--startup-walk", choices=sorted(WALKS),
                      help="instead: time_startup's train-step compile with this walk")
  parser.add_argument("--out", help="markdown file (default: print only)")
  args = parser.parse_args(argv)
  if args.startup_walk:
    modal_conv._walk = WALKS[args.startup_walk]
    time_startup.main(["--presets", "", "--step-presets", "evo2-1b"]
                      + (["--out", args.out] if args.out else []))
    return
  walks = args.walks.split(",")
  for spec in walks:
    try:
      parse_walk(spec)
    except ValueError as e:
      parser.error(f"--walks: {e}")
  shapes = []
  for item in args.shapes.split(","):
    preset, _, length = item.partition(":")
    if preset not in config_lib.PRESETS or not length.isdigit():
      parser.error(f"--shapes {item!r}: write PRESET:LENGTH, PRESET one of "
                   f"{','.join(sorted(config_lib.PRESETS))}")
    shapes.append((preset, int(length)))
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["# LI's chunk walk: prologue against rotated loop", "",
           f"- device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {stamp}",
           "- command: `PYTHONPATH=. python3 experiments/ab_li_walk.py "
           + shlex.join(argv if argv is not None else sys.argv[1:]) + "`",
           "- HyenaLI module fwd+bwd under save_dots remat, B = 1, bf16; ms per round (median of "
           "20 calls), rounds alternating", "",
           "| shape | walk | compile s | " + " | ".join(f"round {r + 1} ms"
                                                       for r in range(args.rounds))
           + f" | / {walks[0]} | max rel gap to {walks[0]} |",
           "|---|---|---|" + "---|" * args.rounds + "---|---|"]
  for preset, length in shapes:
    for name, compile_s, times, ratio, gap in compare_walks(preset, length, args.rounds, walks):
      lines.append(f"| {preset} L={length} | {name} | {compile_s:.1f} | "
                   + " | ".join(f"{t:.3f}" for t in times) + f" | {ratio:.3f} | {gap:.1e} |")
      print(lines[-1], flush=True)
  report.emit(lines, args.out)


if __name__ == "__main__":
  main()
