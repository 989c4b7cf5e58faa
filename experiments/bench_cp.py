"""`sh2 bench cp`: the longest sequence that trains on 1 device and with context parallelism.

The layer stack is the first `--layers` blocks of the evo2-7b layout (default 4: SE MR LI MHA)
at 7B width (D=4096, 32 heads, 256 filter groups, MR 128 taps), bf16 compute, float32 params
and AdamW, remat per block, B=1. A step is the real train step (sh2_jax.train.step: forward,
backward, AdamW update); this file imports nothing that needs grain.

Setups: 1 device (mesh data=1), and N devices with the sequence over the context axis (mesh
context=N, zigzag), with the SE/MR convolutions p2p or a2a and attention all-gather or ring.

Measurements, in this order (each row is written to the results file as soon as it exists):
1. tokens/s of CP=N at `--length` (default 128K) and of 1 device at length/N and at length;
2. the longest trainable length of each setup: lengths double from a start until a step does
   not fit, then 1.5x the last fit is tried; a length does not fit when the compiled step's
   memory (arguments + outputs - aliased + temporaries, per device, from XLA's memory analysis)
   exceeds the device's limit (`--memory-gb`, default the device's own), or when it runs out
   of memory;
3. p2p vs a2a convolutions, all-gather vs ring attention, and the attention block kernels
   (cuDNN pairs, the default on GPU, vs Pallas or XLA) under CP=N at `--length`.

Scaling efficiency at L = --length over N devices (T = tokens/s, F = model FLOPs of one step,
experiments.bench_train.model_flops_per_step):
- strong (the headline when 1 device fits L: the same problem on N devices):
  E_S = T_cp(L) / (N * T_1(L));
- weak (the headline otherwise, same per-device tokens): E = T_cp(L) / (N * T_1(L / N)). Every
  device holds L/N tokens in both runs; causal attention makes CP's per-device work larger (its
  per-device attention FLOPs are N times those of 1 device at L/N), so E understates it when
  attention matters;
- FLOP-normalised weak: E_F = (F(L) / t_cp(L)) / (N * F(L / N) / t_1(L / N)).

Each measurement runs in its own process on GPU (`--isolate`): a CUDA fault in one step would
otherwise fail every later row.

  PYTHONPATH=. python -m sh2_jax.cli bench cp [--devices 2] [--length 131072] [--layers 4]
  PYTHONPATH=. python -m sh2_jax.cli bench cp --smoke   (tiny width, CPU fake devices)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_train import model_flops_per_step
from experiments import xla_memory
from experiments.timing import child_failure
from sh2_jax import config as config_lib
from sh2_jax.parallel import context_attention as cp_attention, mesh as mesh_lib
from sh2_jax.train import optim, step as step_lib
from sh2_jax.train.state import create_train_state, state_shardings

logger = logging.getLogger(__name__)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2.0 ** 30
_CHILD_MARK = "BENCH_CP_ROW "
EXPLAIN_ROWS = 40
COMPILED_FIT = "fits (compile only)"


@dataclasses.dataclass(frozen=True)
class Setup:
  """How the sequence is spread: `devices` = 1 runs on one device, > 1 over the context axis."""
  devices: int
  conv: str = "p2p"
  attention: str = "allgather"
  zigzag: bool = True
  kernel: str = "auto"  # CP attention blocks: sh2_jax.parallel.context_attention.KERNELS
  context_fsdp: bool = False  # params and AdamW state sharded over the context axis too

  @property
  def name(self) -> str:
    if self.devices == 1:
      return "1 device"
    return (f"CP={self.devices} {self.conv}/{self.attention}" + (" zigzag" if self.zigzag else "")
            + ("" if self.kernel == "auto" else f" ({self.kernel} blocks)")
            + (" context-FSDP" if self.context_fsdp else ""))

  def mesh_config(self) -> config_lib.MeshConfig:
    if self.devices == 1:
      return config_lib.MeshConfig(data=1)
    return config_lib.MeshConfig(data=1, context=self.devices, context_conv=self.conv,
                                 context_attention=self.attention, zigzag=self.zigzag,
                                 context_fsdp=self.context_fsdp)


def model_config(d_model: int, layers: int, dtype: str, mr_taps: int = 128,
                 layout: str | None = None, mlp_slices: int = 1,
                 offload_residuals: bool = False) -> config_lib.ModelConfig:
  """The first `layers` blocks of the evo2-7b stack (or `layout`); a smaller `d_model` scales
  heads (head dim 128, at least 2 heads) and filter groups (16 channels each) with it."""
  base = config_lib.get_preset("evo2-7b").model
  layout = layout or " ".join(base.layout.split()[:layers])
  heads = max(2, d_model // 128) if d_model != base.d_model else base.num_heads
  groups = max(1, d_model // 16)
  return dataclasses.replace(base, d_model=d_model, layout=layout, num_heads=heads,
                             se_groups=groups, mr_groups=groups, mr_filter_len=mr_taps,
                             dtype=dtype, remat=True, mlp_slices=mlp_slices,
                             offload_residuals=offload_residuals)


def _is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _error_row(error: BaseException) -> dict[str, Any]:
  """The table row of a step that raised: OOM, or the error's first line."""
  return {"status": "OOM" if _is_oom(error) else "error: " + str(error).splitlines()[0][:240]}


def _short_op(op_name: str, keep: int = 90) -> str:
  """A JAX op name without its jit(...) prefixes, cut to its last `keep` characters."""
  name = re.sub(r"^(jit\([^)]*\)/)+", "", op_name)
  return name if len(name) <= keep else "..." + name[-keep:]


def mock_topology(gpus: int) -> None:
  """Makes this process one of `gpus` one-GPU hosts of XLA's mock topology (mock NCCL): a
  program over `gpus` devices compiles on one real GPU, for its memory (running needs real
  peers). Call before jax's backends start."""
  jax.config.update("jax_mock_gpu_topology", f"1x{gpus}x1")
  if jax.default_backend() != "gpu":
    raise config_lib.ConfigError(
        f"--mock-gpus needs a GPU (the backend here is {jax.default_backend()}); on CPU, fake "
        "devices stand in: XLA_FLAGS=--xla_force_host_platform_device_count=N")


def device_memory_limit() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return float(limit) if limit else None


class Bench:
  """Measures train steps, remembers every (setup, length) result, and writes the table."""

  def __init__(self, model: config_lib.ModelConfig, iters: int, memory_limit: float | None,
               deadline: float, out: str, header: list[str],
               isolate: dict[str, Any] | None = None, explain: bool = False,
               compile_only: bool = False, mock_gpus: int = 0):
    """isolate: the model arguments of `model_config`, to run every measurement in its own
    process (`_run_in_subprocess`); None runs them here. explain: list the buffers alive at
    each compiled step's memory peak (from XLA's dump). compile_only: a step that fits is not
    run (status COMPILED_FIT). mock_gpus: the children stand in a mock topology of this many
    one-GPU hosts (`mock_topology`)."""
    self.model = model
    self.explain = explain
    self.compile_only = compile_only
    self.mock_gpus = mock_gpus
    self.isolate = isolate
    self.iters = iters
    self.memory_limit = memory_limit
    self.deadline = deadline
    self.out = out
    self.header = header
    self.results: dict[tuple[Setup, int], dict[str, Any]] = {}
    self.summary: list[str] = []
    self._host_state: Any = None

  def _initial_state(self, mesh: Any, tx: Any, shardings: Any) -> Any:
    """The seed-0 initial state on `mesh`: initialised once, then kept on the host and put
    onto each mesh (the values do not depend on the mesh; this skips an init compile each)."""
    if self._host_state is None:
      state, _ = create_train_state(self.model, tx, mesh, seed=0)
      self._host_state = jax.device_get(state)
      del state
    return jax.device_put(self._host_state, shardings)

  def measure(self, setup: Setup, length: int) -> dict[str, Any]:
    key = (setup, length)
    if key in self.results:
      return self.results[key]
    if time.monotonic() > self.deadline:
      return {"status": "not measured (time budget)"}
    start = time.monotonic()
    if self.isolate is not None:
      row = self._run_in_subprocess(setup, length)
    else:
      try:
        row = self._run(setup, length)
      except Exception as error:  # noqa: BLE001 - OOM and failures are reported in the table
        row = _error_row(error)
      finally:
        gc.collect()
        jax.clear_caches()
    row["seconds"] = time.monotonic() - start
    logger.info("%s L=%d: %s", setup.name, length, row)
    self.results[key] = row
    self.write()
    return row

  def _run_in_subprocess(self, setup: Setup, length: int) -> dict[str, Any]:
    """`_run` in a fresh process: a CUDA fault (illegal address) poisons the process that
    meets it, so without this every later row would fail too."""
    spec = dict(model=self.isolate, setup=dataclasses.asdict(setup), length=length,
                iters=self.iters, memory_limit=self.memory_limit, explain=self.explain,
                compile_only=self.compile_only, mock_gpus=self.mock_gpus)
    result = subprocess.run([sys.executable, "-m", "experiments.bench_cp", "--child",
                             json.dumps(spec)], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [l[len(_CHILD_MARK):] for l in result.stdout.splitlines() if l.startswith(_CHILD_MARK)]
    if rows:
      return json.loads(rows[-1])
    cause = child_failure(result.stderr)
    if cause == "OOM":
      return {"status": "OOM"}
    return {"status": f"error (process exit {result.returncode}): {cause}"}

  def _run(self, setup: Setup, length: int) -> dict[str, Any]:
    kernel = cp_attention.KERNEL
    cp_attention.KERNEL = setup.kernel
    try:
      return self._run_step(setup, length)
    finally:
      cp_attention.KERNEL = kernel

  def _run_step(self, setup: Setup, length: int) -> dict[str, Any]:
    mesh_cfg = setup.mesh_config()
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:setup.devices])
    train_cfg = config_lib.TrainConfig(steps=1000, batch_size=1, warmup_steps=10)
    tx = optim.make_optimizer(train_cfg)
    abstract, shardings = state_shardings(self.model, tx, mesh, mesh_cfg)
    batch = mesh_lib.batch_sharding(mesh)
    step = step_lib.make_train_step(self.model, train_cfg, tx, mesh, shardings, mesh_cfg)
    # Compile on abstract values first: a length that does not fit allocates nothing.
    lowered = step.lower(abstract, jax.ShapeDtypeStruct((1, length + 1), jnp.int32,
                                                        sharding=batch))
    if self.explain:
      compiled, peak = xla_memory.compile_with_dump(lowered)
    else:
      compiled, peak = lowered.compile(), []
    need = xla_memory.compiled_bytes(compiled)
    row: dict[str, Any] = {"need_gib": None if need is None else need / GIB}
    if peak:
      row["peak_buffers"] = peak[:EXPLAIN_ROWS]
    if need is not None and self.memory_limit is not None and need > self.memory_limit:
      row["status"] = f"does not fit ({need / GIB:.3g} > {self.memory_limit / GIB:.3g} GiB)"
      return row
    if self.compile_only:
      row["status"] = COMPILED_FIT
      return row
    tokens = np.random.default_rng(length).integers(0, 256, (1, length + 1))
    window = jax.device_put(jnp.asarray(tokens, jnp.int32), batch)
    state = self._initial_state(mesh, tx, shardings)
    state, metrics = compiled(state, window)
    row["loss"] = float(metrics["loss"])
    times = []
    for _ in range(self.iters):
      begin = time.perf_counter()
      state, metrics = compiled(state, window)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - begin)
    del state, metrics
    ms = 1e3 * statistics.median(times)
    row.update(status="ok", ms=ms, tokens_per_s=length / (ms / 1e3),
               tflops_per_device=model_flops_per_step(self.model, length, 1) / (ms / 1e3)
               / setup.devices / 1e12)
    return row

  def ok(self, setup: Setup, length: int) -> bool:
    return self.measure(setup, length).get("status") in ("ok", COMPILED_FIT)

  def longest(self, setup: Setup, start: int, max_length: int, multiple: int,
              refine: bool = True) -> int | None:
    """Doubles from `start` while steps fit (up to max_length), then tries 1.5x the last fit."""
    length, best, failed = start, None, None
    while length <= max_length:
      if self.ok(setup, length):
        best, length = length, 2 * length
      else:
        failed = length
        break
    if refine and best is not None and failed is not None:
      middle = (3 * best // 2) // multiple * multiple
      if best < middle < failed and self.ok(setup, middle):
        best = middle
    status = self.measure(setup, failed).get("status", "") if failed else "cap"
    if best is None:
      self.summary.append(f"- {setup.name}: nothing from L={start} fits ({status})")
    else:
      stop = (f"next tried length {failed}: {status}" if failed else
              f"every length up to --max-length {max_length} fits")
      self.summary.append(f"- {setup.name}: longest trainable L = {best} ({stop})")
    self.write()
    return best

  def write(self) -> None:
    lines = list(self.header)
    lines += ["## Every step measured", "",
              "| setup | L | status | step ms | tokens/s | model TFLOP/s per device | "
              "compiled memory GiB/device | first-step loss |", "|---|---|---|---|---|---|---|---|"]
    for (setup, length), r in self.results.items():
      fmt = lambda key, spec: "" if r.get(key) is None else format(r[key], spec)
      lines.append(f"| {setup.name} | {length} | {r['status']} | {fmt('ms', '.1f')} | "
                   f"{fmt('tokens_per_s', '.0f')} | {fmt('tflops_per_device', '.3g')} | "
                   f"{fmt('need_gib', '.3g')} | {fmt('loss', '.5f')} |")
    lines += [""] + self.summary + [""]
    for (setup, length), r in self.results.items():
      if r.get("peak_buffers"):
        shown = sum(b["bytes"] for b in r["peak_buffers"])
        lines += [f"### Largest buffers at the memory peak: {setup.name}, L = {length}", "",
                  f"(`--explain`: XLA's live ranges of the compiled step; the {len(r['peak_buffers'])}"
                  f" largest groups, {shown / GIB:.1f} GiB, of values of one shape and JAX op)", "",
                  "| GiB | values | shape | JAX op | one HLO value |", "|---|---|---|---|---|"]
        lines += [f"| {b['bytes'] / GIB:.2f} | {b['count']} | {b['shape']} | "
                  f"{_short_op(b['op'])} | {b['label']} |" for b in r["peak_buffers"]]
        lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
    with open(self.out, "w") as f:
      f.write("\n".join(lines))


def efficiency_lines(bench: Bench, single: Setup, cp: Setup, length: int) -> list[str]:
  n = cp.devices
  r_cp = bench.results.get((cp, length), {})
  r_half = bench.results.get((single, length // n), {})
  r_full = bench.results.get((single, length), {})
  lines = [f"## Scaling efficiency at L = {length}, N = {n} ({cp.name} vs 1 device)", ""]
  if r_cp.get("status") != "ok" or r_half.get("status") != "ok":
    lines.append(f"- not computed: CP at {length}: {r_cp.get('status', 'not run')}; 1 device at "
                 f"{length // n}: {r_half.get('status', 'not run')}")
    return lines
  t_cp, t_half = r_cp["tokens_per_s"], r_half["tokens_per_s"]
  flops_cp = model_flops_per_step(bench.model, length, 1) / (r_cp["ms"] / 1e3)
  flops_half = model_flops_per_step(bench.model, length // n, 1) / (r_half["ms"] / 1e3)
  strong = r_full.get("status") == "ok"
  bold = lambda value, headline: f"**{value:.1f}%** (target >= 85%)" if headline else f"{value:.1f}%"
  if strong:
    lines.append(f"- strong (headline): E_S = T_cp({length}) / ({n} x T_1({length})) = "
                 f"{t_cp:.0f} / ({n} x {r_full['tokens_per_s']:.0f}) = "
                 f"{bold(100 * t_cp / (n * r_full['tokens_per_s']), True)}")
  else:
    lines.append(f"- strong: 1 device at {length}: {r_full.get('status', 'not run')}")
  lines.append(f"- weak: E = T_cp({length}) / ({n} x T_1({length // n})) = "
               f"{t_cp:.0f} / ({n} x {t_half:.0f}) = {bold(100 * t_cp / (n * t_half), not strong)}")
  lines.append(f"- FLOP-normalised weak: E_F = {100 * flops_cp / (n * flops_half):.1f}%")
  loss_cp, loss_full = r_cp.get("loss"), r_full.get("loss")
  if loss_cp is not None and loss_full is not None:
    lines.append(f"- first-step loss at {length}: CP {loss_cp:.5f}, 1 device {loss_full:.5f} "
                 f"(same tokens and initial weights)")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench cp", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=2, help="context-parallel devices N")
  parser.add_argument("--length", type=int, default=131072, help="length of the efficiency and "
                      "strategy comparisons")
  parser.add_argument("--start", type=int, default=None, help="first length of the 1-device "
                      "search (default length / N; CP starts at --length)")
  parser.add_argument("--max-length", type=int, default=1 << 22)
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--layers", type=int, default=4, help="first blocks of the evo2-7b layout")
  parser.add_argument("--layout", default=None, help="mixers instead, e.g. 'LI MHA'")
  parser.add_argument("--mr-taps", type=int, default=128)
  parser.add_argument("--mlp-slices", type=int, default=1, help="model.mlp_slices: the MLP in "
                      "this many rematerialised token slices (less memory at long context)")
  parser.add_argument("--offload-residuals", action="store_true", help="model.offload_residuals: "
                      "each block's float32 input in pinned host memory from forward to backward")
  parser.add_argument("--dtype", default="bfloat16", choices=config_lib.DTYPES)
  parser.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
  parser.add_argument("--memory-gb", type=float, default=None, help="per-device memory limit "
                      "for the fit test (default: the device's own limit, if it reports one)")
  parser.add_argument("--time-budget", type=float, default=330.0, help="seconds; later "
                      "measurements are skipped and say so")
  parser.add_argument("--no-zigzag", action="store_true")
  parser.add_argument("--attention", default="allgather", choices=("allgather", "ring"),
                      help="CP attention of the main setup (ring holds one K/V block, not all)")
  parser.add_argument("--context-fsdp", action="store_true", help="main CP setup: shard params "
                      "and AdamW state over the context axis too (mesh.context_fsdp)")
  parser.add_argument("--compare", default="a2a,ring", help="setups to time against p2p + "
                      "all-gather at --length: a2a (SE/MR all-to-all), ring (ring attention), "
                      "pallas / xla (attention blocks by that kernel), context-fsdp (params and AdamW "
                      "state sharded over the context axis); '' for none")
  parser.add_argument("--no-refine", action="store_true", help="powers of two only in the search")
  parser.add_argument("--explain", action="store_true", help="list the buffers alive at each "
                      "step's memory peak (from XLA's dump of the compiled step)")
  parser.add_argument("--compile-only", action="store_true", help="memory only: compile each "
                      "step and test the fit, run nothing")
  parser.add_argument("--mock-gpus", action="store_true", help="GPU with fewer than --devices "
                      "GPUs: compile CP steps for a mock topology of --devices one-GPU hosts "
                      "(XLA's mock NCCL) and test the fit against this GPU's memory; implies "
                      "--compile-only")
  parser.add_argument("--smoke", action="store_true", help="tiny: D=64, MR 16 taps, float32, "
                      "L=256, max 1024, 1 timed step (CPU fake devices)")
  parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                      help="run each measurement in its own process (auto: on GPU)")
  parser.add_argument("--parts", default="efficiency,search,strategies",
                      help="which measurements: efficiency, search (= search1 + searchN: the "
                      "longest length on 1 device, with CP), strategies")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="markdown path (default "
                      "experiments/results/cp_<device>.md)")
  args = parser.parse_args(argv)
  if args.child:
    return _child_main(json.loads(args.child))
  if args.smoke:
    args.d_model, args.dtype, args.iters, args.mr_taps = 64, "float32", 1, 16
    args.length = 256 if args.length == parser.get_default("length") else args.length
    args.max_length = min(args.max_length, 1024)
  n = args.devices
  if args.mock_gpus:
    mock_topology(n)
    args.compile_only = True
  if len(jax.devices()) < n:
    raise config_lib.ConfigError(f"sh2 bench cp --devices {n}: only {len(jax.devices())} "
                                 f"device(s) present; lower --devices")
  zigzag = not args.no_zigzag
  known = {"a2a": Setup(n, "a2a", "allgather", zigzag), "ring": Setup(n, "p2p", "ring", zigzag),
           "pallas": Setup(n, "p2p", "allgather", zigzag, "pallas"),
           "xla": Setup(n, "p2p", "allgather", zigzag, "xla"),
           "context-fsdp": Setup(n, "p2p", "allgather", zigzag, context_fsdp=True)}
  compare = [c.strip() for c in args.compare.split(",") if c.strip()]
  if any(c not in known for c in compare):
    raise config_lib.ConfigError(f"--compare {args.compare!r}: choose from {sorted(known)}")
  deadline = time.monotonic() + args.time_budget
  model = model_config(args.d_model, args.layers, args.dtype, args.mr_taps, args.layout,
                       args.mlp_slices, args.offload_residuals)
  device = jax.devices()[0]
  limit = args.memory_gb * GIB if args.memory_gb else device_memory_limit()
  name = device.device_kind.lower().replace(" ", "_")
  out = args.out or os.path.join(RESULTS, f"cp_{name}.md")
  header = [
      "# Context parallelism: longest trainable sequence, tokens/s, scaling (`sh2 bench cp`)", "",
      f"- device: {device.device_kind} x {n} ({jax.default_backend()}), jax {jax.__version__}",
      f"- date: {datetime.date.today().isoformat()}",
      f"- command: `sh2 bench cp {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
      f"- model: layout `{model.layout}`, d_model {model.d_model}, {model.num_heads} heads, "
      f"{model.se_groups} groups, MR {model.mr_filter_len} taps, {model.dtype} compute, float32 "
      f"params + AdamW, remat per block"
      f"{f', MLP in {model.mlp_slices} token slices' if model.mlp_slices > 1 else ''}"
      f"{', block inputs offloaded to host memory' if model.offload_residuals else ''}, B=1; "
      f"median of {args.iters} steps after a warm-up step",
      f"- fit test: compiled per-device memory vs "
      f"{'unknown' if limit is None else f'{limit / GIB:.3g} GiB'} (and real OOMs)"
      + ("; compile only, nothing run" if args.compile_only else "")
      + (f"; CP steps compiled for a mock topology of {n} one-GPU hosts (XLA's mock NCCL) on "
         "this one GPU" if args.mock_gpus else ""),
      "- definitions: see the docstring of experiments/bench_cp.py", ""]
  parts = {p.strip() for p in args.parts.split(",") if p.strip()}
  if "search" in parts:
    parts |= {"search1", "searchN"}
  if parts - {"efficiency", "search", "search1", "searchN", "strategies"}:
    raise config_lib.ConfigError(f"--parts {args.parts!r}: choose from efficiency, search, "
                                 "search1, searchN, strategies")
  isolate = args.isolate == "yes" or (args.isolate == "auto" and jax.default_backend() == "gpu")
  model_args = dict(d_model=args.d_model, layers=args.layers, dtype=args.dtype,
                    mr_taps=args.mr_taps, layout=args.layout, mlp_slices=args.mlp_slices,
                    offload_residuals=args.offload_residuals)
  bench = Bench(model, args.iters, limit, deadline, out, header, model_args if isolate else None,
                args.explain, args.compile_only, n if args.mock_gpus else 0)
  single = Setup(1)
  cp = Setup(n, "p2p", args.attention, zigzag, context_fsdp=args.context_fsdp)
  multiple = 2 * n
  # 1. Efficiency points.
  if "efficiency" in parts:
    for setup, length in ((cp, args.length), (single, args.length // n), (single, args.length)):
      bench.measure(setup, length)
    bench.summary += efficiency_lines(bench, single, cp, args.length)
  # 2. Longest trainable sequence.
  if parts & {"search1", "searchN"}:
    bench.summary += ["", "## Longest trainable sequence", ""]
    refine = not args.no_refine
    best_1 = best_n = None
    if "search1" in parts:
      best_1 = bench.longest(single, args.start or args.length // n, args.max_length, multiple,
                             refine)
    if "searchN" in parts:
      best_n = bench.longest(cp, args.length, args.max_length, multiple, refine)
    if best_1 and best_n:
      bench.summary.append(f"- ratio CP={n} / 1 device: {best_n / best_1:.2f} (target {n} within "
                           "10%)")
  # 3. Strategies.
  if compare and "strategies" in parts:
    bench.summary += ["", f"## Strategies under CP={n} at L = {args.length}", "",
                      "| setup | step ms | tokens/s |", "|---|---|---|"]
    for setup in [cp] + [known[c] for c in compare]:
      r = bench.measure(setup, args.length)
      if r.get("status") == "ok":
        bench.summary.append(f"| {setup.name} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} |")
      else:
        bench.summary.append(f"| {setup.name} | {r['status']} | |")
  bench.write()
  with open(out) as f:
    print(f.read())
  return 0


def _child_main(spec: dict[str, Any]) -> int:
  """One measurement (`Bench._run_in_subprocess`'s child): prints its row as JSON."""
  if spec.get("mock_gpus"):
    mock_topology(spec["mock_gpus"])
  model = model_config(**spec["model"])
  bench = Bench(model, spec["iters"], spec["memory_limit"], float("inf"), "", [],
                explain=spec["explain"], compile_only=spec["compile_only"])
  try:
    row = bench._run(Setup(**spec["setup"]), spec["length"])
  except Exception as error:  # noqa: BLE001 - OOM and failures are reported in the table
    row = _error_row(error)
  print(_CHILD_MARK + json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  sys.exit(main())
