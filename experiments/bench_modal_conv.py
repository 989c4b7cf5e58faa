"""Checks and times the Pallas Hyena-LI modal kernel against the XLA FFT path on GPU.

Usage (repository root, on a GPU machine):
  PYTHONPATH=. python experiments/bench_modal_conv.py [--no-sweep] [--no-operator]
      [--lengths 8192,32768,131072] [--out DIR]
      (--dry-run: tiny shapes in interpret mode, to test the script on a CPU)

Prints (1) correctness of the kernel vs `hyena.li_gate_conv_gate(method="fft")`: float32 I/O
on a small shape and bf16 I/O at B=1, L=8K, C=4096 against the FFT path on float32-upcast
inputs (relative L2 error of the output and of all six gradients), after (2) a greedy sweep
of the kernel module's defaults at L=8K (fwd+bwd time; the best stay in place), (3) the
table: B=1, C=4096, N=16, bf16 I/O, median ms of fwd and fwd+bwd (gradients of all inputs) of the kernel (the sweep's best defaults) and of the
FFT path (gates + FFT conv, no projections), and (4) the whole HyenaLI operator (projections
included) with li_method pallas vs fft at 8K and 32K. Results:
experiments/results/modal_conv_<device>.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from pallas_kernels import modal_conv as mc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.compare import norm_rel_diff  # noqa: E402
from experiments.timing import median_ms  # noqa: E402
from sh2_jax.ops import hyena  # noqa: E402

logger = logging.getLogger("bench_modal_conv")
CHANNELS = 4096
ORDER = 16
INTERPRET = False
START = time.perf_counter()


def _inputs(key, batch, length, channels, dtype, order=ORDER):
  """Gates, value, cotangent ~ N(0, 1); poles as initialised (SPEC.md section 2) plus a few
  fast ones; residues 0.1 N(0, 1) / 4; dskip N(0, 1)."""
  ks = jax.random.split(key, 8)
  x = [jax.random.normal(k, (batch, length, channels), jnp.float32).astype(dtype)
       for k in ks[:3]]
  gamma = jnp.log(jax.random.uniform(ks[3], (channels, order), jnp.float32, 0.01, 0.1))
  p = -1.0 + 0.5 * jax.random.normal(ks[4], (channels, order), jnp.float32)
  log_poles = -jnp.exp(p + gamma)
  log_poles = log_poles.at[::7, 0].set(-3.0)  # some fast modes
  residues = 0.1 * jax.random.normal(ks[5], (channels, order), jnp.float32) / 4
  dskip = jax.random.normal(ks[6], (channels,), jnp.float32)
  ct = jax.random.normal(ks[7], (batch, length, channels), jnp.float32).astype(dtype)
  return (*x, log_poles, residues, dskip), ct


def _fft(*args):
  return hyena.li_gate_conv_gate(*args, method="fft")


def _kernel(block_sizes):
  return lambda *a: mc.gate_conv_gate_pallas(*a, block_sizes=block_sizes, interpret=INTERPRET)


def _fns(op):
  fwd = jax.jit(op)

  def fwd_bwd(args, ct):
    out, vjp = jax.vjp(op, *args)
    return out, vjp(ct)

  return fwd, jax.jit(fwd_bwd)


NAMES = ("out", "dpost", "dpre", "dv", "dlog_poles", "dresidues", "ddskip")


def check(key, shapes):
  """Kernel vs the FFT path (float32-upcast inputs): out and all six gradients."""
  rows = []
  for batch, length, channels, dtype in shapes:
    args, ct = _inputs(key, batch, length, channels, dtype)
    args32 = [a.astype(jnp.float32) for a in args]
    out_k, vjp_k = jax.vjp(_kernel(None), *args)
    out_r, vjp_r = jax.vjp(_fft, *args32)
    got = [out_k, *vjp_k(ct)]
    want = [out_r, *vjp_r(ct.astype(jnp.float32))]
    errs = [norm_rel_diff(a, b) for a, b in zip(got, want)]
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
    shape = (batch, length, channels, jnp.dtype(dtype).name)
    rows.append((shape, errs, finite))
    logger.info("check B,L,C,dtype=%s %s finite=%s", shape,
                " ".join(f"{n} {e:.2e}" for n, e in zip(NAMES, errs)), finite)
  return rows


def _time(op, args, ct, which, iters=10):
  fwd, fwd_bwd = _fns(op)
  try:
    if which == "fwd":
      return median_ms(fwd, *args, warmup=2, iters=iters, max_seconds=3.0)
    return median_ms(fwd_bwd, args, ct, warmup=2, iters=iters, max_seconds=3.0)
  except Exception as e:  # noqa: BLE001 - an OOM or a compile failure is a table entry
    logger.info("  %s FAILED %s", which, str(e).splitlines()[0][:300])
    return float("nan")


# Module defaults of pallas_kernels.modal_conv that the sweep varies (None BlockSizes fields
# are resolved from them, so the table and the whole-operator rows use the sweep's best).
SWEEP_AXES = [("TARGET_PROGRAMS", (4096, 8192, 1024)), ("DEFAULT_CHUNK", (8, 32)),
              ("DEFAULT_NUM_STAGES", (1, 3)), ("DEFAULT_BLOCK_C", (64,))]


def _set_defaults(values):
  for name, value in values.items():
    setattr(mc, name, value)
  jax.clear_caches()


def sweep(key, length, budget_s):
  """Greedy coordinate search over the module defaults on fwd+bwd time at `length`; leaves
  the best in place and returns (best values, log lines)."""
  args, ct = _inputs(key, 1, length, CHANNELS, jnp.bfloat16)
  best = {name: getattr(mc, name) for name, _ in SWEEP_AXES}

  def measure(values):
    _set_defaults(values)
    return _time(_kernel(None), args, ct, "fwdbwd"), mc._resolve(None, (1, length, CHANNELS))

  best_t, resolved = measure(best)
  lines = [f"| {best} | {resolved} | {best_t:.3f} |"]
  logger.info("sweep base %s (%s): %.3f ms", best, resolved, best_t)
  for name, values in SWEEP_AXES:
    for value in values:
      if time.perf_counter() - START > budget_s:
        logger.info("sweep: time budget reached")
        _set_defaults(best)
        return best, lines
      if best[name] == value:
        continue
      cand = dict(best, **{name: value})
      t, resolved = measure(cand)
      lines.append(f"| {cand} | {resolved} | {t:.3f} |")
      logger.info("sweep %s=%s (%s): %.3f ms (best so far %.3f)", name, value, resolved, t,
                  best_t)
      if t < best_t:
        best, best_t = cand, t
  _set_defaults(best)
  return best, lines


def table(key, lengths, with_fft=True):
  """Kernel (module defaults) and FFT path at each length."""
  rows = []
  for length in lengths:
    args, ct = _inputs(jax.random.fold_in(key, length), 1, length, CHANNELS, jnp.bfloat16)
    row = {"L": length, "fft_fwd": float("nan"), "fft_fwdbwd": float("nan"),
           "block_sizes": mc._resolve(None, (1, length, CHANNELS))}
    ops = [("kernel", _kernel(None))] + ([("fft", _fft)] if with_fft else [])
    for name, op in ops:
      for which in ("fwd", "fwdbwd"):
        row[f"{name}_{which}"] = _time(op, args, ct, which)
        jax.clear_caches()
    rows.append(row)
    logger.info("table %s", row)
  return rows


def operator(lengths, methods=("pallas", "fft")):
  """The whole HyenaLI module (projections included), li_method pallas vs fft."""
  from experiments import bench_ops  # flax; imported here so the kernel part runs without it
  from sh2_jax.config import ModelConfig
  from sh2_jax.layers.hyena import HyenaLI
  groups = min(256, CHANNELS // 16)
  config = ModelConfig(d_model=CHANNELS, num_heads=32, se_groups=groups, mr_groups=groups,
                       layout="SE MR LI MHA", dtype="bfloat16", param_dtype="float32",
                       mr_filter_len=128, train_len=8192)
  rows = []
  key = jax.random.key(0)
  for length in lengths:
    x = jax.random.normal(jax.random.fold_in(key, length), (1, length, CHANNELS), jnp.bfloat16)
    for method in methods:
      variant = bench_ops.Variant(f"LI ({method})", HyenaLI, {"li_method": method})
      fwd, fwdbwd = bench_ops._module_fns(variant, config, x, key)
      row = {"op": variant.name, "L": length, "fwd_ms": median_ms(fwd, max_seconds=3.0),
             "fwdbwd_ms": median_ms(fwdbwd, max_seconds=3.0)}
      rows.append(row)
      logger.info("operator %s", row)
      jax.clear_caches()
  return rows


def _write(out_dir, device, checks, sweep_lines, best, rows, op_rows, command):
  def fmt(x):
    return "n/a" if x != x else f"{x:.3f}"

  lines = [f"# Hyena-LI modal kernel vs XLA FFT path: {device}", "",
           f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}. Command: `{command}`", "",
           "## Correctness vs the FFT path (relative L2 error; bf16 rows vs the FFT path on "
           "float32-upcast inputs)", "",
           "| B, L, C, dtype | " + " | ".join(NAMES) + " | finite |",
           "|---" * (len(NAMES) + 2) + "|"]
  for shape, errs, finite in checks:
    lines.append(f"| {shape} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {finite} |")
  if sweep_lines:
    lines += ["", "## Sweep of the module defaults (B=1, L=8K, C=4096, bf16, fwd+bwd ms)", "",
              "| defaults | resolved BlockSizes at 8K | ms |", "|---|---|---|", *sweep_lines, "",
              f"Best: `{best}`"]
  lines += ["", "## Operator core (gates + long conv, no projections; B=1, C=4096, N=16, bf16 "
            "I/O; ms)", "",
            "| L | kernel fwd | kernel fwd+bwd | FFT fwd | FFT fwd+bwd | speed-up fwd+bwd | "
            "kernel BlockSizes |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['L']} | {fmt(r['kernel_fwd'])} | {fmt(r['kernel_fwdbwd'])} | "
                 f"{fmt(r['fft_fwd'])} | {fmt(r['fft_fwdbwd'])} | "
                 f"{fmt(r['fft_fwdbwd'] / r['kernel_fwdbwd'])} | {r['block_sizes']} |")
  if op_rows:
    lines += ["", "## Whole HyenaLI operator (projections included; ms)", "",
              "| op | L | fwd | fwd+bwd |", "|---|---|---|---|"]
    for r in op_rows:
      lines.append(f"| {r['op']} | {r['L']} | {fmt(r['fwd_ms'])} | {fmt(r['fwdbwd_ms'])} |")
  text = "\n".join(lines) + "\n"
  if out_dir:
    name = device.lower().replace(" ", "_")
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out_dir) / f"modal_conv_{name}.md").write_text(text)
  return text


def main():
  global INTERPRET, CHANNELS
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="8192,32768,131072")
  parser.add_argument("--no-sweep", action="store_true")
  parser.add_argument("--no-operator", action="store_true")
  parser.add_argument("--no-fft", action="store_true", help="table: kernel rows only")
  parser.add_argument("--operator-methods", default="pallas,fft")
  parser.add_argument("--sweep-budget", type=float, default=120.0, help="seconds since start")
  parser.add_argument("--operator-deadline", type=float, default=170.0,
                      help="seconds since start after which the operator rows are skipped")
  parser.add_argument("--out", default=None)
  parser.add_argument("--dry-run", action="store_true")
  opts = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  key = jax.random.key(0)
  lengths = [int(x) for x in opts.lengths.split(",")]
  checks_shapes = [(2, 3000, 512, jnp.float32), (1, 8192, CHANNELS, jnp.bfloat16)]
  if opts.dry_run:
    INTERPRET, CHANNELS = True, 64
    checks_shapes = [(2, 100, 64, jnp.float32)]
    lengths = [256]
  device = jax.devices()[0].device_kind
  command = " ".join(sys.argv)
  best, sweep_lines = None, []
  if not opts.no_sweep:
    best, sweep_lines = sweep(key, lengths[0] if opts.dry_run else 8192, opts.sweep_budget)
  checks = check(key, checks_shapes)  # with the sweep's best defaults
  _write(opts.out, device, checks, sweep_lines, best, [], [], command)
  rows = table(key, lengths, not opts.no_fft)
  _write(opts.out, device, checks, sweep_lines, best, rows, [], command)
  op_rows = []
  if not (opts.no_operator or opts.dry_run):
    for length in (8192, 32768):
      if time.perf_counter() - START > opts.operator_deadline:
        logger.info("operator: skipped from L=%d on (time)", length)
        break
      op_rows += operator([length], opts.operator_methods.split(","))
      _write(opts.out, device, checks, sweep_lines, best, rows, op_rows, command)
  print(_write(opts.out, device, checks, sweep_lines, best, rows, op_rows, command))


if __name__ == "__main__":
  main()
