"""Per-kernel GPU time of the mixer operators, from a JAX profiler trace.

  PYTHONPATH=. python experiments/profile_trace.py [--ops floor,se,se_unfused,mr] \
      [--lengths 4096,32768] [--iters 5] [--top 25] [--out DIR] [--command-buffers]

For each operator (the Linen modules of `sh2 bench ops`, B=1, D=4096, bf16 compute, float32
params) and length, runs forward+backward `iters` times under `jax.profiler.trace`, then sums
the device time of every kernel the trace recorded, grouped by its HLO op (fusion, custom call,
GEMM), per iteration. Prints one table per (operator, L): the top kernels with ms/iteration,
share of device time, the device idle time just before it and the HLO op's first
instruction, and the wall time per call synchronised and queued (all calls, one sync); writes
the optimized HLO of each program (gzip) to --out for reading the fusions.

Operators: floor (the projections' products alone), se / mr (conv_method auto: the GPU
default), se_bf16 (bf16 params, like the floor's weights), se_unfused / mr_unfused (XLA
featurizer + gate kernel), se_fused / mr_fused (featurizer inside the kernel), se_direct
(featurized_short_conv: the FIR on CUDA cores), li (Pallas modal kernel), mha (cuDNN).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

# One trace event per kernel: XLA's CUDA graphs (command buffers) would hide them in one event.
# --command-buffers keeps XLA's default (for the wall times a benchmark sees).
if "--command-buffers" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.bench_ops import projection_inputs, projection_products  # noqa: E402
from experiments.timing import random_cotangent  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.layers.attention import MHA  # noqa: E402
from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE  # noqa: E402
from sh2_jax.ops import hyena  # noqa: E402

OPERATORS: dict[str, tuple[type[nn.Module] | None, dict[str, Any]]] = {
    "floor": (None, {}),
    "se": (HyenaSE, {"conv_method": "auto"}),
    "se_bf16": (HyenaSE, {"conv_method": "auto", "param_dtype": "bfloat16"}),  # like the floor
    "se_unfused": (HyenaSE, {"conv_method": "pallas_unfused"}),
    "se_fused": (HyenaSE, {"conv_method": "pallas_fused"}),
    "se_direct": (HyenaSE, {"conv_method": "pallas_fused"}),  # featurized_short_conv
    "mr": (HyenaMR, {"conv_method": "auto"}),
    "mr_unfused": (HyenaMR, {"conv_method": "pallas_unfused"}),
    "mr_fused": (HyenaMR, {"conv_method": "pallas_fused"}),
    "li": (HyenaLI, {"li_method": "pallas"}),
    "mha": (MHA, {}),
}
_NOT_KERNELS = ("XLA Modules", "XLA Ops", "Steps", "Framework", "Source", "TraceMe")


def fwd_bwd_fn(name: str, config: ModelConfig, x_BLD: jax.Array,
               key: jax.Array) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """(jitted fwd+bwd function, its arguments) for one operator."""
  module_cls, overrides = OPERATORS[name]
  if module_cls is None:
    return jax.jit(projection_products), projection_inputs(x_BLD, key)
  module = module_cls(dataclasses.replace(config, **overrides))
  params = nn.meta.unbox(jax.jit(module.init)(key, x_BLD[:, :128])["params"])

  def fwd_bwd(p, x, ct):  # the output too: unreturned, its projection would be dead code
    out, pullback = jax.vjp(lambda p, x: module.apply({"params": p}, x), p, x)
    return out, pullback(ct)

  return jax.jit(fwd_bwd), (params, x_BLD, random_cotangent(x_BLD, key))


def kernel_events(trace_dir: str) -> tuple[list[tuple[int, int, str]], list[str]]:
  """[(start ns, duration ns, HLO op or kernel name)] of every kernel on the GPU planes of a
  trace (off GPU: the host events that carry an hlo_op), and the names of the lines seen."""
  from jax.profiler import ProfileData  # noqa: PLC0415 - only where a trace exists

  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  planes = [plane for path in paths for plane in ProfileData.from_file(path).planes]
  gpu = [plane for plane in planes if plane.name.startswith("/device:GPU")]
  events, lines_seen = [], []
  for plane in gpu or planes:
    for line in plane.lines:
      lines_seen.append(f"{plane.name}:{line.name}")
      if any(word in line.name for word in _NOT_KERNELS):
        continue
      for event in line.events:
        stats = {name: value for name, value in event.stats}
        if gpu or "hlo_op" in stats:
          events.append((int(event.start_ns), int(event.duration_ns), str(stats.get("hlo_op", event.name))))
  return events, lines_seen


def kernel_times(trace_dir: str) -> tuple[dict[str, float], list[str]]:
  """{HLO op or kernel name: total device ns} over a trace's kernels (see kernel_events), and
  the names of the lines seen."""
  events, lines_seen = kernel_events(trace_dir)
  return event_totals(events), lines_seen


def event_totals(events: list[tuple[int, int, str]]) -> dict[str, float]:
  """{name: summed duration ns} of (start ns, duration ns, name) events."""
  totals: dict[str, float] = collections.defaultdict(float)
  for _, duration, name in events:
    totals[name] += duration
  return dict(totals)


def idle_before(events: list[tuple[int, int, str]]) -> dict[str, float]:
  """{kernel name: ns} of device idle time just before each kernel started, summed.

  Events are (start ns, duration ns, name) on one device's timeline (any number of streams):
  a kernel's gap is how long after the last running kernel ended it started, 0 if it overlaps.
  Long gaps before a kind of kernel point at host-side launch cost or a synchronisation.
  """
  out: dict[str, float] = collections.defaultdict(float)
  busy_until = None
  for start, duration, name in sorted(events):
    if busy_until is not None and start > busy_until:
      out[name] += start - busy_until
    busy_until = start + duration if busy_until is None else max(busy_until, start + duration)
  return dict(out)


def first_instruction(hlo_text: str, op_name: str) -> str:
  """The root instruction kind of a fusion / the op itself, from optimized HLO text."""
  match = re.search(rf"\b{re.escape(op_name)} = \S+ (\w[\w-]*)\(", hlo_text)
  if not match:
    return ""
  kind = match.group(1)
  if kind == "fusion":
    kind_attr = re.search(rf"\b{re.escape(op_name)} = .*kind=(\w+)", hlo_text)
    return f"fusion {kind_attr.group(1) if kind_attr else ''}".strip()
  if kind == "custom-call":
    target = re.search(rf"\b{re.escape(op_name)} = .*custom_call_target=\"([^\"]+)\"", hlo_text)
    return f"custom-call {target.group(1) if target else ''}"
  return kind


def profile(name: str, length: int, config: ModelConfig, iters: int, top: int,
            out_dir: str | None) -> None:
  key = jax.random.key(0)
  x = jax.random.normal(jax.random.fold_in(key, length), (1, length, config.d_model), jnp.bfloat16)
  fn, args = fwd_bwd_fn(name, config, x, key)
  short_kernel = hyena.SHORT_FILTER_KERNEL
  hyena.SHORT_FILTER_KERNEL = "direct" if name.startswith("se_direct") else short_kernel
  try:
    compiled = fn.lower(*args).compile()
  finally:
    hyena.SHORT_FILTER_KERNEL = short_kernel
  fn = compiled
  hlo = compiled.as_text()
  if out_dir:
    with gzip.open(os.path.join(out_dir, f"hlo_{name}_{length}.txt.gz"), "wt") as f:
      f.write(hlo)
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn(*args))
  wall_ms = (time.perf_counter() - start) * 1e3 / iters
  start = time.perf_counter()
  jax.block_until_ready([fn(*args) for _ in range(iters)])
  queued_ms = (time.perf_counter() - start) * 1e3 / iters
  with tempfile.TemporaryDirectory(prefix="sh2_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        jax.block_until_ready(fn(*args))
    events, lines_seen = kernel_events(trace_dir)
  totals = event_totals(events)
  print(f"\n### {name}, L={length}: wall {wall_ms:.3f} ms/iter synchronised, {queued_ms:.3f} "
        f"queued ({iters} calls, one sync)")
  if not totals:
    print(f"no GPU kernel events; trace lines: {lines_seen[:20]}")
    return
  device_ms = sum(totals.values()) / iters / 1e6
  idle = idle_before(events)
  print(f"device busy {device_ms:.3f} ms/iter, {len(totals)} distinct ops, "
        f"{len(events) / iters:.0f} kernels/iter; device idle {sum(idle.values()) / iters / 1e6:.3f} "
        f"ms/iter between kernels (the calls' boundaries included)\n")
  print("| op | ms/iter | share | idle before, ms/iter | HLO |\n|---|---|---|---|---|")
  for op, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
    ms = ns / iters / 1e6
    print(f"| {op[:60]} | {ms:.3f} | {ms / device_ms:.1%} | {idle.get(op, 0) / iters / 1e6:.3f} "
          f"| {first_instruction(hlo, op)} |")
  print("\nidle before (largest):", ", ".join(
      f"{op[:40]} {ns / iters / 1e6:.3f}" for op, ns in sorted(idle.items(), key=lambda kv: -kv[1])[:8]))
  sys.stdout.flush()
  jax.clear_caches()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--ops", default="floor,se,se_unfused,mr")
  parser.add_argument("--lengths", default="4096,32768")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=None, help="directory for the optimized HLO (gzip)")
  parser.add_argument("--command-buffers", action="store_true",
                      help="keep XLA's CUDA graphs (command buffers): wall times as `sh2 bench "
                      "ops` sees them")
  args = parser.parse_args()
  unknown = [op for op in args.ops.split(",") if op not in OPERATORS]
  if unknown:
    parser.error(f"unknown --ops {unknown}: choose from {sorted(OPERATORS)}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  config = ModelConfig(d_model=args.d_model, num_heads=32, se_groups=args.groups,
                       mr_groups=args.groups, layout="SE MR LI MHA", dtype="bfloat16",
                       param_dtype="float32", mr_filter_len=128, train_len=8192)
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for length in [int(v) for v in args.lengths.split(",")]:
    for name in args.ops.split(","):
      profile(name, length, config, args.iters, args.top, args.out)


if __name__ == "__main__":
  main()
