"""Checks and times the Pallas gate-conv-gate kernels against the plain-JAX reference on GPU.

Usage (repository root, on a GPU machine):
  PYTHONPATH=. python experiments/bench_blocked_conv.py [--quick] [--no-sweep] [--no-xla]
      [--out DIR]        (--dry-run: tiny shapes in interpret mode, to test it on a CPU)

Prints (1) bf16 and float32 correctness of the kernel vs the reference run on float32-upcast
inputs (relative L2 error of the output and of all five gradients), (2) a greedy tuning
sweep of BlockSizes at L = 16K (skipped with --quick/--no-sweep), (3) the table: B=1,
C=4096, group width 16 and 128, K in {7, 128}, L in {4K, 16K, 64K}: median ms of fwd, bwd
(gradients only) and fwd+bwd of the kernel (the sweep's best config, else the defaults) and
of the XLA reference, plus the HBM floor (bytes / 3.0 TB/s; fwd moves 4 B*L*C bf16 arrays,
bwd 7). Results: experiments/results/blocked_conv_h100.md.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import blocked_conv as bc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.compare import norm_rel_diff  # noqa: E402
from experiments.timing import median_ms  # noqa: E402

logger = logging.getLogger("bench_blocked_conv")
HBM_BYTES_PER_S = 3.0e12
CHECK_SHAPES = [(2, 2000, 512, 32, 7), (2, 2000, 512, 4, 128), (1, 4096, 4096, 256, 128)]
CHANNELS = 4096
WITH_XLA = True  # --no-xla: skip the reference timings (NaN in the table)
INTERPRET = False  # --dry-run: tiny shapes in interpret mode, to test this script on a CPU


def _inputs(key, batch, length, channels, groups, taps, dtype):
  ks = jax.random.split(key, 6)
  x = [jax.random.normal(k, (batch, length, channels), jnp.float32).astype(dtype)
       for k in ks[:3]]
  h = jax.random.normal(ks[3], (groups, taps), jnp.float32) / np.sqrt(taps)
  dskip = jax.random.normal(ks[4], (channels,), jnp.float32)
  ct = jax.random.normal(ks[5], (batch, length, channels), jnp.float32).astype(dtype)
  return (*x, h, dskip), ct


def _fns(conv):
  fwd = jax.jit(conv)

  def bwd(args, ct):
    return jax.vjp(conv, *args)[1](ct)

  def fwd_bwd(args, ct):
    out, vjp = jax.vjp(conv, *args)
    return out, vjp(ct)

  return fwd, jax.jit(bwd), jax.jit(fwd_bwd)


def check(key, dtype=jnp.bfloat16, block_sizes=None):
  """Kernel in `dtype` vs reference on float32-upcast inputs: out and all five gradients."""
  rows = []
  for batch, length, channels, groups, taps in CHECK_SHAPES:
    args, ct = _inputs(key, batch, length, channels, groups, taps, dtype)
    args32 = [a.astype(jnp.float32) for a in args]
    kern = lambda *a: bc.gate_conv_gate_pallas(*a, block_sizes=block_sizes,
                                               interpret=INTERPRET)
    ref = lambda *a: bc.gate_conv_gate(*a)
    out_k, vjp_k = jax.vjp(kern, *args)
    out_r, vjp_r = jax.vjp(ref, *args32)
    grads_k = vjp_k(ct)
    grads_r = vjp_r(ct.astype(jnp.float32))
    errs = [norm_rel_diff(out_k, out_r)] + [norm_rel_diff(a, b) for a, b in zip(grads_k, grads_r)]
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in [out_k, *grads_k])
    rows.append(((batch, length, channels, groups, taps), errs, finite))
    logger.info("check %s B,L,C,G,K=%s rel err out %.2e dpost %.2e dpre %.2e dv %.2e dh %.2e "
                "ddskip %.2e finite=%s", jnp.dtype(dtype).name, rows[-1][0], *errs, finite)
  return rows


def _time_variant(args, ct, bs, which):
  conv = lambda *a: bc.gate_conv_gate_pallas(*a, block_sizes=bs, interpret=INTERPRET)
  fwd, bwd, _ = _fns(conv)
  try:
    return median_ms(fwd, *args, warmup=3, iters=20) if which == "fwd" else median_ms(bwd, args, ct, warmup=3, iters=20)
  except Exception as e:  # noqa: BLE001 - report and go on
    logger.info("  %s %s FAILED %s", which, bs, str(e)[:300])
    return float("inf")


def _greedy(args, ct, base, which, axes):
  """Coordinate search: for each field in turn keep the fastest value."""
  best, best_t = base, _time_variant(args, ct, base, which)
  for field, values in axes:
    for value in values:
      if getattr(best, field) == value:
        continue
      cand = dataclasses.replace(best, **{field: value})
      t = _time_variant(args, ct, cand, which)
      logger.info("  %s %s=%s: %.3f ms (best so far %.3f)", which, field, value, t, best_t)
      if t < best_t:
        best, best_t = cand, t
  return best, best_t


def sweep(key, length=16384):
  """Greedy tuning of the forward and backward fields per filter length; returns the best."""
  best_by_taps = {}
  for taps in (128, 7):
    args, ct = _inputs(key, 1, length, CHANNELS, CHANNELS // 16, taps, jnp.bfloat16)
    chunks = (128,) if taps == 128 else (32, 64, 128)
    results = []
    for chunk in chunks:
      base = dataclasses.replace(bc.BlockSizes(), chunk=chunk)
      num_chunks = length // chunk
      segs = tuple(s for s in (1, 2, 4, 8) if num_chunks % s == 0 and num_chunks // s >= 4)
      fwd_bs, fwd_t = _greedy(args, ct, base, "fwd", [
          ("num_segments_fwd", segs), ("num_stages_fwd", (2, 3, 4)), ("num_warps_fwd", (4, 8))])
      bwd_bs, bwd_t = _greedy(args, ct, fwd_bs, "bwd", [
          ("bwd_transpose_by_dot", (False, True)), ("num_segments_bwd", segs[:3]),
          ("num_warps_bwd", (8, 16) if chunk == 128 else (4, 8)),
          ("num_stages_bwd", (2, 3))])
      logger.info("sweep K=%d L=%d chunk=%d: fwd %.3f ms bwd %.3f ms with %s", taps, length,
                  chunk, fwd_t, bwd_t, bwd_bs)
      results.append((fwd_t + bwd_t, bwd_bs))
    best_by_taps[taps] = min(results, key=lambda r: r[0])[1]
  # Wider channel tiles when the group allows (dg = 128).
  args, ct = _inputs(key, 1, length, CHANNELS, CHANNELS // 128, 128, jnp.bfloat16)
  for block_c in (16, 32):
    bs = dataclasses.replace(best_by_taps[128], block_c=block_c)
    logger.info("sweep dg=128 K=128 block_c=%d: fwd %.3f ms bwd %.3f ms", block_c,
                _time_variant(args, ct, bs, "fwd"), _time_variant(args, ct, bs, "bwd"))
  for taps, bs in best_by_taps.items():
    logger.info("best K=%d: %s", taps, bs)
  return best_by_taps


def table(key, lengths, best_by_taps=None):
  rows = []
  for group_width in (16, 128):
    groups = CHANNELS // group_width
    for taps in (7, 128):
      for length in lengths:
        args, ct = _inputs(key, 1, length, CHANNELS, groups, taps, jnp.bfloat16)
        bs = (best_by_taps or {}).get(taps)
        logger.info("block sizes: %s", bc._resolve(bs, (1, length, CHANNELS), (groups, taps),
                                                   jnp.bfloat16))
        kern = _fns(lambda *a, bs=bs: bc.gate_conv_gate_pallas(*a, block_sizes=bs,
                                                                interpret=INTERPRET))
        ref = _fns(lambda *a: bc.gate_conv_gate(*a))
        t = []
        for fwd, bwd, fwd_bwd in ((kern, ref) if WITH_XLA else (kern,)):
          for fn, fn_args in ((fwd, args), (bwd, (args, ct)), (fwd_bwd, (args, ct))):
            try:
              t.append(median_ms(fn, *fn_args, warmup=3, iters=20))
            except Exception as e:  # noqa: BLE001 - report and go on
              logger.info("FAILED G=%d K=%d L=%d: %s", groups, taps, length, str(e)[:500])
              t.append(float("nan"))
        t += [] if WITH_XLA else [float("nan")] * 3
        elems = length * CHANNELS
        floor_f = 4 * elems * 2 / HBM_BYTES_PER_S * 1e3
        floor_fb = 11 * elems * 2 / HBM_BYTES_PER_S * 1e3
        rows.append((groups, CHANNELS // groups, taps, length, *t, floor_f, floor_fb))
        logger.info("G=%d K=%d L=%d pallas fwd %.3f bwd %.3f fwd+bwd %.3f | xla fwd %.3f "
                    "bwd %.3f fwd+bwd %.3f | floor %.3f / %.3f", groups, taps, length, *t,
                    floor_f, floor_fb)
  header = ("| G (dg) | K | L | pallas fwd | pallas bwd | pallas fwd+bwd | XLA fwd | XLA bwd "
            "| XLA fwd+bwd | floor fwd | floor fwd+bwd | bwd/fwd (pallas) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [header]
  for g, dg, k, length, pf, pb, pfb, xf, xb, xfb, ff, ffb in rows:
    lines.append(f"| {g} ({dg}) | {k} | {length // 1024}K | {pf:.3f} | {pb:.3f} | {pfb:.3f} "
                 f"| {xf:.3f} | {xb:.3f} | {xfb:.3f} | {ff:.3f} | {ffb:.3f} | {pb / pf:.2f} |")
  return "\n".join(lines)


def main(argv=None):  # noqa: C901
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="4K and 16K only, no sweep")
  parser.add_argument("--no-sweep", action="store_true")
  parser.add_argument("--out", default=None, help="folder for results.md")
  parser.add_argument("--no-xla", action="store_true", help="skip the reference timings")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes, interpret mode")
  flags = parser.parse_args(argv)
  global CHECK_SHAPES, CHANNELS, INTERPRET, WITH_XLA
  WITH_XLA = not flags.no_xla
  if flags.dry_run:
    CHECK_SHAPES, CHANNELS, INTERPRET = [(2, 200, 64, 4, 7)], 128, True
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
  logger.info("jax %s, devices %s", jax.__version__, jax.devices())
  key = jax.random.key(0)
  for dtype, bs in ((jnp.bfloat16, None), (jnp.float32, None)):
    try:
      check(key, dtype, bs)
    except Exception as e:  # noqa: BLE001 - report and go on
      logger.info("check %s %s FAILED: %s", jnp.dtype(dtype).name, bs, str(e)[:1000])
  best_by_taps = None
  if not (flags.quick or flags.no_sweep):
    best_by_taps = sweep(key, 512 if flags.dry_run else 16384)
  lengths = (4096, 16384) if flags.quick else (4096, 16384, 65536)
  if flags.dry_run:
    lengths = (256,)
  md = table(key, lengths, best_by_taps)
  logger.info("ms, median of 20 after 3 warm-ups, B=1, C=%d, bf16\n%s", CHANNELS, md)
  if flags.out:
    pathlib.Path(flags.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(flags.out) / "table.md").write_text(md + "\n")


if __name__ == "__main__":
  main()
