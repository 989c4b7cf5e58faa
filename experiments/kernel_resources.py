"""Registers, shared memory and SM occupancy of the Hyena mixers' Triton kernels, on a CPU.

  pip install triton   # the compiler and its cuobjdump: no GPU needed
  PYTHONPATH=. python experiments/kernel_resources.py [--preset evo2-1b] [--length 8192]
      [--mixers se,mr,li] [--candidate se:num_stages_bwd=2 ...] [--pass-timing] [--out FILE]

Each mixer module's forward + backward (under the model's save_dots remat, as a training step
runs a block) is lowered for CUDA on this machine, with the backend reported as "gpu" while
tracing so that the modules take their Pallas kernels. Pallas's Triton IR of every kernel is
captured as it is emitted, compiled for sm_90 by the `triton` wheel, and the cubin's resource
usage read with the wheel's cuobjdump: registers per thread, stack bytes (register spills),
shared memory. From those and the launch (grid, warps) follow the programs an H100 SM holds at
once, what limits them, and the waves the grid takes. The compiler is the wheel's Triton, not
the one XLA bundles, so the figures are a proxy for the binary the GPU runs, close enough to
compare candidates (BlockSizes) between device sessions.

A candidate `MIXER:FIELD=VALUE[,FIELD=VALUE]` sets fields of that mixer's default BlockSizes
(pallas_kernels.blocked_conv.BlockSizes for se/mr, modal_conv.BlockSizes for li).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report  # noqa: E402
from experiments.tune_mixers import (MIXERS, default_block_sizes,  # noqa: E402
                                     mixers_and_candidates)
from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.model import REMAT_POLICIES  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SmLimits:
  """Per-SM resources of a GPU (defaults: H100 SXM, compute capability 9.0)."""
  sms: int = 132
  registers: int = 65536
  register_unit: int = 256  # registers are allocated per warp in units of this many
  shared_bytes: int = 228 * 1024
  shared_reserved: int = 1024  # per resident block, taken by the runtime
  max_warps: int = 64
  max_blocks: int = 32


H100 = SmLimits()


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One Pallas kernel as lowered: its name, grid, launch settings and Triton IR (text)."""
  name: str
  grid: tuple[int, ...]
  num_warps: int
  num_stages: int
  ttir: str


def occupancy(registers: int, shared_bytes: int, num_warps: int,
              limits: SmLimits = H100) -> tuple[int, str]:
  """(programs resident per SM, what limits them: "registers", "shared", "warps" or
  "blocks", ties joined by "+")."""
  per_warp = math.ceil(registers * 32 / limits.register_unit) * limits.register_unit
  bounds = {
      "registers": limits.registers // (per_warp * num_warps) if registers else math.inf,
      "shared": (limits.shared_bytes // (shared_bytes + limits.shared_reserved)
                 if shared_bytes else math.inf),
      "warps": limits.max_warps // num_warps,
      "blocks": limits.max_blocks,
  }
  blocks = min(bounds.values())
  return int(blocks), "+".join(name for name, bound in bounds.items() if bound == blocks)


def parse_resource_usage(text: str) -> dict[str, int]:
  """Registers, stack and shared bytes from `cuobjdump --dump-resource-usage` output (the
  first function listed)."""
  found = {}
  for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared")):
    match = re.search(rf"\b{key}:(\d+)", text)
    if match is None:
      raise ValueError(f"no {key}: field in the resource usage: {text[:200]!r}")
    found[name] = int(match.group(1))
  return found


_LAUNCH = re.compile(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


@contextlib.contextmanager
def _captured_triton_modules() -> Iterator[list[tuple[str, tuple[int, ...], str]]]:
  """Within the block, every Pallas kernel lowered for a GPU appends (name, grid, Triton IR
  text) to the yielded list (jax's Pallas Triton lowering, wrapped)."""
  from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415

  captured: list[tuple[str, tuple[int, ...], str]] = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capture(jaxpr, *args, **kwargs):
    result = lower(jaxpr, *args, **kwargs)
    captured.append((jaxpr.debug_info.func_name, tuple(result.grid),
                     result.module.operation.get_asm()))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield captured
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower


@contextlib.contextmanager
def _gpu_backend() -> Iterator[None]:
  """jax.default_backend() answers "gpu" within the block (the ops pick their kernels by it)."""
  original = jax.default_backend
  jax.default_backend = lambda: "gpu"
  try:
    yield
  finally:
    jax.default_backend = original


def lowered_kernels(fn: Callable, *args: Any) -> list[Kernel]:
  """The Pallas kernels of `fn(*args)` (args: arrays or ShapeDtypeStructs) lowered for CUDA,
  in lowering order, with the warps and stages of their launches."""
  with _captured_triton_modules() as captured:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  # A kernel is lowered once however often the module launches it (a rematerialised forward
  # repeats launches before XLA removes the dead ones); launches of one name share settings.
  settings = {name: (int(warps), int(stages)) for name, stages, warps in _LAUNCH.findall(text)}
  missing = sorted({name for name, _, _ in captured} - settings.keys())
  if missing:
    raise RuntimeError(f"no launch settings found for the captured kernels {missing}")
  return [Kernel(name, grid, *settings[name], ttir) for name, grid, ttir in captured]


def mixer_kernels(mixer: str, config: config_lib.ModelConfig, length: int,
                  candidate: Any = None) -> list[Kernel]:
  """The kernels of one Hyena mixer module's forward + backward under the model's save_dots
  remat at [1, length, D], with `candidate` (or the class default) as the default BlockSizes."""
  module_cls, sizes_cls, _ = MIXERS[mixer]
  module = module_cls(config)
  x = jax.ShapeDtypeStruct((1, length, config.d_model), jnp.bfloat16)
  with default_block_sizes(sizes_cls, candidate or sizes_cls()), _gpu_backend():
    params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    apply = jax.checkpoint(lambda p, xx: module.apply({"params": p}, xx),
                           policy=REMAT_POLICIES["save_dots"])

    def forward_backward(p, xx, ct):
      out, pullback = jax.vjp(apply, p, xx)
      return out, pullback(ct)

    return lowered_kernels(forward_backward, params, x, x)


def loop_loads(ttgir: str) -> tuple[int, int, int]:
  """(loads the software pipeliner issues stages ahead, plain loads the kernel carries to the
  next iteration, plain loads used in their own) in the body of a kernel's first `scf.for`
  loop (its chunk loop), from Triton GPU IR text. A prefetched load is a
  `ttg.async_copy_global_to_local`; a plain `tt.load` waits out the memory latency at its
  first use, hidden only when that use is an iteration later (its value in the loop's
  `scf.yield`). Triton pipelines only the loads that feed a matrix product."""
  lines = ttgir.splitlines()
  start = next((i for i, line in enumerate(lines) if "scf.for" in line), None)
  if start is None:
    return 0, 0, 0
  indent = len(lines[start]) - len(lines[start].lstrip())
  prefetched, plain, carried = 0, [], set()
  for line in lines[start + 1:]:
    body = line.lstrip()
    if body.startswith("}") and len(line) - len(body) <= indent:
      break
    prefetched += "ttg.async_copy_global_to_local" in body
    if match := re.match(r"(%[\w#]+) = tt\.load ", body):
      plain.append(match.group(1))
    if body.startswith("scf.yield") and len(line) - len(body) == indent + 2:
      carried = set(re.findall(r"%[\w#]+", body.split(":")[0]))
  ahead = sum(name in carried for name in plain)
  return prefetched, ahead, len(plain) - ahead


_PASS_TIME = re.compile(r"^\s+([0-9.]+) \(\s*[0-9.]+%\)\s+(\S.*?)\s*$", re.MULTILINE)


def slowest_pass(timing_report: str) -> tuple[str, float]:
  """(name, seconds) of the slowest pass in MLIR's execution time reports (MLIR_ENABLE_TIMING
  output; "Total" and "Rest" lines are not passes)."""
  passes = [(float(seconds), name) for seconds, name in _PASS_TIME.findall(timing_report)
            if name not in ("Total", "Rest")]
  if not passes:
    raise ValueError(f"no pass timings in the report: {timing_report[:200]!r}")
  seconds, name = max(passes)
  return name, seconds


@contextlib.contextmanager
def _pass_timing_to(path: str) -> Iterator[None]:
  """Within the block, Triton compiles with MLIR's pass timing on, and this process's file
  descriptor 2 (where the compiler's C++ writes its reports) goes to `path`."""
  previous = os.environ.get("MLIR_ENABLE_TIMING")
  os.environ["MLIR_ENABLE_TIMING"] = "1"
  sys.stderr.flush()
  saved = os.dup(2)
  with open(path, "wb") as target:
    os.dup2(target.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if previous is None:
        del os.environ["MLIR_ENABLE_TIMING"]
      else:
        os.environ["MLIR_ENABLE_TIMING"] = previous


def compile_resources(kernel: Kernel, pass_timing: bool = False) -> dict[str, Any]:
  """Registers, stack and shared bytes of `kernel` compiled for sm_90 by the triton wheel, and
  the compile's milliseconds on this machine ("compile_ms": the wheel's Triton on this CPU, a
  proxy for which kernels dominate a cold compile on the GPU, not its seconds), and
  "loop_loads" (loop_loads of its Triton GPU IR). pass_timing: also "slowest_pass", (name,
  seconds) of the compiler pass that took longest."""
  try:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  except ImportError as error:
    raise SystemExit("kernel_resources needs the Triton compiler: pip install triton") from error
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # no answer from Triton's disk cache: time the compile
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, f"{kernel.name}.ttir")
    with open(source, "w") as f:
      f.write(kernel.ttir)
    timing = os.path.join(tmp, "timing.txt")
    with _pass_timing_to(timing) if pass_timing else contextlib.nullcontext():
      start = time.perf_counter()
      compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": kernel.num_warps,
                                         "num_stages": kernel.num_stages})
      compile_s = time.perf_counter() - start
    if pass_timing:
      with open(timing) as f:
        timing_report = f.read()
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True,
                           text=True, check=True).stdout
  found = parse_resource_usage(usage)
  found["shared"] = max(found["shared"], compiled.metadata.shared)  # dynamic shared memory
  found["compile_ms"] = round(compile_s * 1e3)
  found["loop_loads"] = loop_loads(compiled.asm["ttgir"])
  if pass_timing:
    found["slowest_pass"] = slowest_pass(timing_report)
  return found


def table_rows(mixer: str, label: str, kernels: list[Kernel],
               resources: Callable[[Kernel], dict[str, Any]] = compile_resources,
               limits: SmLimits = H100) -> list[str]:
  """Markdown rows: mixer, candidate, kernel, programs, warps, stages, registers, spill stack
  bytes, shared KiB, programs per SM (limiter), waves, compile seconds ("-" when `resources`
  does not time it), then the chunk loop's prefetched / ahead / waiting loads and the slowest
  pass with its share of the compile where `resources` reports them."""
  rows = []
  for kernel in kernels:
    found = resources(kernel)
    programs = math.prod(kernel.grid)
    per_sm, limiter = occupancy(found["registers"], found["shared"], kernel.num_warps, limits)
    waves = programs / (per_sm * limits.sms)
    rows.append(f"| {mixer} | {label} | {kernel.name} | {programs} | {kernel.num_warps} | "
                f"{kernel.num_stages} | {found['registers']} | {found['stack']} | "
                f"{found['shared'] / 1024:.1f} | {per_sm} ({limiter}) | {waves:.2f} | "
                + (f"{found['compile_ms'] / 1e3:.1f} |" if "compile_ms" in found else "- |"))
    if "loop_loads" in found:
      rows[-1] += " {} / {} / {} |".format(*found["loop_loads"])
    if "slowest_pass" in found:
      name, seconds = found["slowest_pass"]
      rows[-1] += f" {name} ({seconds / max(found['compile_ms'] / 1e3, 1e-9):.0%}) |"
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="evo2-1b")
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--mixers", default="se,mr,li")
  parser.add_argument("--candidate", action="append", default=[],
                      metavar="MIXER:FIELD=VALUE[,FIELD=VALUE]",
                      help="also compile that mixer with these default BlockSizes fields "
                           "(repeatable)")
  parser.add_argument("--pass-timing", action="store_true",
                      help="a column with each kernel's slowest compiler pass and its share of "
                           "the compile (MLIR's pass timing)")
  parser.add_argument("--out", default=None, help="markdown file (default: print only)")
  args = parser.parse_args(argv)
  mixers, candidates = mixers_and_candidates(parser, args.mixers, args.candidate)
  config = dataclasses.replace(config_lib.get_preset(args.preset).model, dtype="bfloat16",
                               remat=True)
  lines = [f"# Triton kernel resources of the Hyena mixers ({args.preset}, L={args.length})", "",
           f"- jax {jax.__version__}, triton wheel {_triton_version()}, compiled for sm_90 on a "
           "CPU; "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           "- command: `" + " ".join(["PYTHONPATH=. python3 experiments/kernel_resources.py",
                                       *(argv if argv is not None else sys.argv[1:])]) + "`",
           f"- B=1, D={config.d_model}, bf16, forward + backward under save_dots remat; programs "
           f"per SM from an H100's {H100.registers} registers, {H100.shared_bytes // 1024} KiB "
           f"shared memory and {H100.max_warps} warps; waves = programs / (per SM x {H100.sms})",
           "- compile s: the wheel's Triton compile of the kernel on this CPU (relative sizes "
           "only; the GPU machine compiles with XLA's Triton on faster cores)",
           "- chunk-loop loads: in the kernel's loop, the loads Triton's pipeliner issues stages "
           "ahead (async copies), the plain loads the kernel itself issues an iteration ahead, "
           "and the plain loads used in their own iteration, which wait out the memory latency "
           "(`loop_loads`)",
           "", "| mixer | candidate | kernel | programs | warps | stages | registers | spill stack "
           "B | shared KiB | programs/SM (limit) | waves | compile s | chunk-loop loads "
           "(prefetched / ahead / waiting) |" + (" slowest pass (share) |" if args.pass_timing else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
           + ("---|" if args.pass_timing else "")]
  resources = functools.partial(compile_resources, pass_timing=args.pass_timing)
  runs = [(mixer, None) for mixer in mixers] + candidates
  for mixer, candidate in runs:
    label = "defaults" if candidate is None else ", ".join(
        f"{f.name}={getattr(candidate, f.name)}" for f in dataclasses.fields(candidate)
        if getattr(candidate, f.name) is not None)
    rows = table_rows(mixer, label, mixer_kernels(mixer, config, args.length, candidate),
                      resources)
    print("\n".join(rows), flush=True)
    lines += rows
  report.emit(lines, args.out)
  return 0


def _triton_version() -> str:
  try:
    import triton  # noqa: PLC0415
  except ImportError:
    return "(not installed)"
  return triton.__version__


if __name__ == "__main__":
  sys.exit(main())
