"""Launch sweep of the featurizer-backward kernel (featurized_conv.featurizer_backward_pallas).

  PYTHONPATH=. python experiments/tune_featurizer_bwd.py [--lengths 4096,8192] [--width 12288]
      [--candidate chunk=16,block_c=128 ...] [--iters 20] [--out FILE]
      (--dry-run: tiny shapes in interpret mode, to test the script on a CPU)

The SE backward's second kernel reads df and z [1, L, X] (X = 3C, bf16) once and writes dz and
the featurizer-tap gradient; on an H100 at L = 4K, X = 12288 it moves its 0.30 GB at ~2.1 TB/s.
This script times it alone for its defaults (the FEAT_BWD_* constants) and for launch
candidates (the grid below, or those named): device ms per call from a profiler trace, the
GB/s that gives for its compulsory traffic, and each candidate's outputs checked against the
defaults' (AssertionError past TOLERANCE).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report  # noqa: E402
from experiments.cli_args import parse_lengths  # noqa: E402
from experiments.probe_tile_bandwidth import checked_gap, kernel_ms  # noqa: E402
from pallas_kernels import featurized_conv as fc  # noqa: E402

FIELDS = ("chunk", "block_c", "max_programs", "num_warps", "num_stages")
GRID = ({"block_c": 32}, {"block_c": 128}, {"chunk": 16}, {"chunk": 64}, {"num_warps": 2},
        {"num_warps": 8}, {"num_stages": 2}, {"num_stages": 4}, {"max_programs": 768},
        {"max_programs": 3072}, {"block_c": 128, "max_programs": 3072})
TOLERANCE = 1e-4  # a candidate's dz and tap gradient vs the defaults' (float32 sums reordered)


def parse_candidate(text: str) -> dict[str, int]:
  """"chunk=16,block_c=128" -> {"chunk": 16, "block_c": 128}; ValueError names the fields."""
  values = {}
  for item in text.split(","):
    key, sep, value = item.partition("=")
    if not sep or key not in FIELDS or not value.isdigit():
      raise ValueError(f"candidate {text!r}: {item!r} must be FIELD=INTEGER with FIELD one of "
                       f"{', '.join(FIELDS)}")
    values[key] = int(value)
  return values


def label(candidate: dict[str, int]) -> str:
  return ", ".join(f"{k}={v}" for k, v in candidate.items()) or "defaults"


def inputs(length: int, width: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(df, z, w) at [1, L, X], random; L is padded to a multiple of the largest chunk (64)."""
  keys = jax.random.split(jax.random.key(0), 3)
  padded = -(-length // 64) * 64
  df = jax.random.normal(keys[0], (1, padded, width), jnp.float32).astype(dtype)
  z = jax.random.normal(keys[1], (1, padded, width), jnp.float32).astype(dtype)
  w = jax.random.uniform(keys[2], (width, 3), jnp.float32, -1.0, 1.0)
  return df, z, w


def sweep(length: int, width: int, candidates: list[dict[str, int]], dtype: jnp.dtype,
          iters: int, interpret: bool = False) -> list[tuple[str, float, float, float]]:
  """Rows (label, device ms, GB/s, relative gap to the defaults) for the defaults, then each
  candidate."""
  df, z, w = inputs(length, width, dtype)
  traffic_gb = 3 * df.size * df.dtype.itemsize / 1e9
  want = fc.featurizer_backward_pallas(df, z, w, interpret=interpret)
  rows = []
  for candidate in [{}, *candidates]:
    fn = jax.jit(functools.partial(fc.featurizer_backward_pallas, interpret=interpret,
                                   **candidate))
    gap = checked_gap(fn(df, z, w), want, TOLERANCE,
                      f"featurizer backward with {label(candidate)}")
    ms = sum(kernel_ms(lambda args: fn(*args), (df, z, w), iters))
    rows.append((label(candidate), ms, traffic_gb / ms * 1e3 if ms else 0.0, gap))
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192", help="token counts: 4096, 8K")
  parser.add_argument("--width", type=int, default=12288, help="X = 3C columns of df and z")
  parser.add_argument("--candidate", action="append", default=[], metavar="FIELD=V[,FIELD=V]",
                      help=f"launch to time ({', '.join(FIELDS)}); default: a built-in grid")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", help="markdown file (default: print only)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes, interpret mode (CPU)")
  args = parser.parse_args(argv)
  try:
    candidates = [parse_candidate(c) for c in args.candidate] or list(GRID)
  except ValueError as error:
    parser.error(str(error))
  if args.dry_run:
    lengths, width, dtype, iters = [256], 192, jnp.float32, 1
  else:
    lengths = parse_lengths(parser, "--lengths", args.lengths)
    width, dtype, iters = args.width, jnp.bfloat16, args.iters
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["# Featurizer-backward kernel launches (featurized_conv.featurizer_backward_pallas)",
           "", f"- device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {stamp}",
           "- command: `PYTHONPATH=. python3 experiments/tune_featurizer_bwd.py "
           + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
           f"- df, z [1, L, {width}] {jnp.dtype(dtype).name}, 3 taps; defaults: chunk "
           f"{fc.FEAT_BWD_CHUNK}, block_c {fc.FEAT_BWD_BLOCK_C}, max_programs "
           f"{fc.FEAT_BWD_MAX_PROGRAMS}, num_warps {fc.FEAT_BWD_NUM_WARPS}, num_stages "
           f"{fc.FEAT_BWD_NUM_STAGES}; GB/s = (df + z read, dz written) / device time; each "
           "candidate's outputs checked against the defaults'"]
  for length in lengths:
    lines += ["", f"L = {length}:", "", "| launch | device ms | GB/s | gap to defaults |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.3f} | {gbs:.0f} | {gap:.1e} |" for name, ms, gbs, gap in
              sweep(length, width, candidates, dtype, iters, interpret=args.dry_run)]
  report.emit(lines, args.out)


if __name__ == "__main__":
  main()
