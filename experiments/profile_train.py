"""`sh2 bench profile-train`: where the time of a training step goes, by layer part and kernel kind.

  python -m sh2_jax.cli bench profile-train [--preset evo2-1b] [--lengths 8192] [--remat save_dots]

For the SH2 model of a preset and the same model with every mixer replaced by MHA (the pair of
`sh2 bench train`, same step), runs `--iters` steps under `jax.profiler.trace` and sums the
device time of every kernel, attributed through the optimized HLO to
- a part of the model: each mixer kind (SE, MR, LI, MHA), the MLPs, the norms, the embedding
  and logits, and the rest (loss, gradient clipping, AdamW); from the op's JAX name stack
  (`block_<i>/mixer/...`, the block's kind from the layout);
- a pass: forward, recompute (remat's forward inside the backward), backward, and the loss and
  update outside the model;
- a kind of kernel: GEMM (cuBLAS, cuDNN or Triton GEMM), Pallas kernels, cuDNN attention,
  other fusions (elementwise, norms, reductions, casts), copies and transposes, other.
Also the device idle time just before each part's kernels (gaps in the timeline: launch cost,
synchronisation) and, with `--top N`, the N costliest mixer kernels summed over layers
(`--top-scope all`: the costliest kernels of every part).
Writes a markdown table per model and length (ms per step, per layer, share) to
experiments/results/train_profile_<device>.md. Command buffers are turned off so that every
kernel is one trace event (steps run a little slower than in `sh2 bench train`).
"""

from __future__ import annotations

import os

# One trace event per kernel: XLA's CUDA graphs (command buffers) would hide them in one event.
# Set at import, before `sh2 bench` initialises the backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import logging  # noqa: E402

import jax  # noqa: E402

from experiments import bench_train  # noqa: E402
from experiments.cli_args import parse_lengths  # noqa: E402
from experiments.profile_trace import event_totals, idle_before, kernel_events  # noqa: E402
from sh2_jax import config as config_lib  # noqa: E402

logger = logging.getLogger(__name__)
KINDS = ("GEMM", "Pallas kernels", "cuDNN attention", "other fusions", "copies", "other")
PASSES = ("forward", "recompute", "backward", "loss and update")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(")


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of an optimized HLO module: what kind of kernel it is and whose it is."""
  kind: str  # one of KINDS
  op_name: str  # JAX name stack from the metadata ("" if none)
  shape: str = ""  # the result's type, e.g. "bf16[1,8192,1920]{2,1,0}"


def kernel_kind(opcode: str, rest: str) -> str:
  """KINDS entry of an HLO instruction from its opcode and the text after it."""
  target = re.search(r'custom_call_target="([^"]+)"', rest)
  target_name = target.group(1).lower() if target else ""
  if opcode == "custom-call":
    if "triton" in target_name:
      return "Pallas kernels"
    if "cudnn" in target_name and ("fmha" in target_name or "sdpa" in target_name or "flash" in target_name):
      return "cuDNN attention"
    if "gemm" in target_name or "matmul" in target_name or "cublas" in target_name or "cudnn" in target_name:
      return "GEMM"
    return "other"
  if opcode == "fusion":
    if re.search(r"__triton_gemm|__cudnn\$fusion|__cublas|\"gemm", rest):
      return "GEMM"
    if "kind=kCustom" in rest and "__triton" in rest:
      return "GEMM"
    return "other fusions"
  if opcode in ("dot", "convolution"):
    return "GEMM"
  if opcode in ("copy", "transpose", "copy-start", "copy-done", "dynamic-update-slice", "bitcast"):
    return "copies"
  return "other"


def parse_hlo(hlo_text: str) -> dict[str, HloOp]:
  """{instruction name: HloOp} for every instruction of an optimized HLO module's text."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rhs = match.groups()
    opcode = _OPCODE.search(rhs)
    if not opcode:
      continue
    op_name = re.search(r'op_name="([^"]*)"', rhs)
    ops[name] = HloOp(kernel_kind(opcode.group(1), rhs[opcode.end():]), op_name.group(1) if op_name else "",
                      rhs[:opcode.start()].strip())
  return ops


def model_part(op_name: str, layers: tuple[str, ...]) -> str:
  """Which part of the model a JAX name stack belongs to: '<kind> mixer', 'MLP', 'norms',
  'embedding, final norm, logits' or 'loss, clipping, AdamW'."""
  block = re.search(r"block_(\d+)/(mixer|mlp|pre_norm|post_norm)\b", op_name)
  if block:
    part = block.group(2)
    if part == "mixer":
      return f"{layers[int(block.group(1))]} mixer"
    return "MLP" if part == "mlp" else "norms"
  if "StripedHyena2" in op_name:
    return "embedding, final norm, logits"
  return "loss, clipping, AdamW"


def model_pass(op_name: str) -> str:
  """'forward', 'recompute' (remat's forward replayed in the backward), 'backward', or 'loss and
  update' (outside the model: the loss, gradient clipping, AdamW)."""
  if "transpose(" not in op_name:
    return "forward" if "StripedHyena2" in op_name else "loss and update"
  return "recompute" if "rematted_computation" in op_name else "backward"


def _key(op: HloOp | None, layers: tuple[str, ...]) -> tuple[str, str, str]:
  if op is None:
    return ("unattributed", "loss and update", "other")
  return (model_part(op.op_name, layers), model_pass(op.op_name), op.kind)


def attribute(totals_ns: dict[str, float], ops: dict[str, HloOp], layers: tuple[str, ...],
              steps: int) -> dict[tuple[str, str, str], float]:
  """{(part, pass, kind): ms per step} from per-instruction device ns over `steps` steps.
  Kernels the HLO does not name (e.g. memsets) go to ('unattributed', 'loss and update', 'other')."""
  out: dict[tuple[str, str, str], float] = collections.defaultdict(float)
  for name, ns in totals_ns.items():
    out[_key(ops.get(name), layers)] += ns / steps / 1e6
  return dict(out)


def idle_by_part(idle_ns: dict[str, float], ops: dict[str, HloOp], layers: tuple[str, ...],
                 steps: int) -> dict[str, float]:
  """{part: ms per step of idle time before that part's kernels}."""
  out: dict[str, float] = collections.defaultdict(float)
  for name, ns in idle_ns.items():
    out[_key(ops.get(name), layers)[0]] += ns / steps / 1e6
  return dict(out)


def top_kernels(totals_ns: dict[str, float], ops: dict[str, HloOp], layers: tuple[str, ...],
                steps: int, parts: set[str], count: int) -> list[str]:
  """Markdown table of the `count` costliest kernels of `parts`, each summed over the layers
  (the same JAX op in every block of a kind is one row), ms per step."""
  rows: dict[tuple[str, str, str, str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name, ns in totals_ns.items():
    op = ops.get(name)
    part, model_pass_, kind = _key(op, layers)
    if part not in parts:
      continue
    where = re.sub(r"^.*?block_\d+/(mixer|mlp|pre_norm|post_norm)/", "", op.op_name)
    where = re.sub(r"block_\d+", "block_*", where)
    shape = re.sub(r"\{[\d,]*\}", "", op.shape)[:60]
    row = rows[(part, model_pass_, kind, where[-90:], shape)]
    row[0] += ns / steps / 1e6
    row[1] += 1
  lines = ["| part | pass | kind | ms/step | kernels | JAX op (after the block's part) | result |",
           "|---|---|---|---|---|---|---|"]
  for (part, model_pass_, kind, where, shape), (ms, kernels) in sorted(rows.items(), key=lambda r: -r[1][0])[:count]:
    lines.append(f"| {part} | {model_pass_} | {kind} | {ms:.2f} | {kernels} | `{where}` | `{shape}` |")
  return lines + [""]


@dataclasses.dataclass
class StepProfile:
  """One train step's profile: wall ms per step, {(part, pass, kind): device ms per step},
  {part: idle ms per step before its kernels}, and the per-kernel totals to rank."""
  wall_ms: float
  times: dict[tuple[str, str, str], float]
  idle: dict[str, float]
  totals_ns: dict[str, float]
  ops: dict[str, HloOp]
  steps: int


def profile_step(model: config_lib.ModelConfig, length: int, batch: int, iters: int) -> StepProfile:
  """Profile of `iters` train steps of `model` after 2 warm-ups (median-free: wall is the mean)."""
  step, state, windows = bench_train.build_step(model, length, batch)
  step = step.lower(state, windows[0]).compile()  # the program that runs is the one parsed
  ops = parse_hlo(step.as_text())
  for i in range(2):
    state, metrics = step(state, windows[i % 2])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(iters):
    state, metrics = step(state, windows[i % 2])
  jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - start) * 1e3 / iters
  with tempfile.TemporaryDirectory(prefix="sh2_train_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir):
      for i in range(iters):
        state, metrics = step(state, windows[i % 2])
      jax.block_until_ready(metrics)
    events, _ = kernel_events(trace_dir)
  del state
  totals = event_totals(events)
  layers = tuple(model.layers)
  return StepProfile(wall_ms, attribute(totals, ops, layers, iters),
                     idle_by_part(idle_before(events), ops, layers, iters), totals, ops, iters)


def _part_order(parts: set[str]) -> list[str]:
  mixers = sorted(p for p in parts if p.endswith("mixer"))
  rest = ["MLP", "norms", "embedding, final norm, logits", "loss, clipping, AdamW", "unattributed"]
  return mixers + [p for p in rest if p in parts]


def markdown_table(name: str, model: config_lib.ModelConfig, length: int, wall_ms: float,
                   times: dict[tuple[str, str, str], float],
                   idle: dict[str, float] | None = None) -> list[str]:
  """Lines of one model's table: per part, ms per step by pass and by kernel kind, and the
  device idle time just before the part's kernels (`idle`, {part: ms per step})."""
  busy = sum(times.values())
  idle = idle or {}
  counts = collections.Counter(model.layers)
  lines = [f"### {name}, L={length}: {wall_ms:.1f} ms per step (wall), device busy {busy:.1f} ms, "
           f"idle between kernels {sum(idle.values()):.1f} ms", "",
           "| part | layers | ms/step | ms/layer | share | " + " | ".join(PASSES) + " | "
           + " | ".join(KINDS) + " | idle before |", "|---|" + "---|" * (5 + len(PASSES) + len(KINDS))]
  parts = {p for p, _, _ in times} | set(idle)
  for part in _part_order(parts):
    total = sum(v for (p, _, _), v in times.items() if p == part)
    kind = part.removesuffix(" mixer")
    layers = counts[kind] if part.endswith("mixer") else (model.num_layers if part in ("MLP", "norms") else 0)
    per_layer = f"{total / layers:.2f}" if layers else ""
    by_pass = [sum(v for (p, q, _), v in times.items() if p == part and q == x) for x in PASSES]
    by_kind = [sum(v for (p, _, k), v in times.items() if p == part and k == x) for x in KINDS]
    lines.append(f"| {part} | {layers or ''} | {total:.2f} | {per_layer} | {total / busy:.1%} | "
                 + " | ".join(f"{v:.2f}" for v in by_pass) + " | " + " | ".join(f"{v:.2f}" for v in by_kind)
                 + f" | {idle.get(part, 0.0):.2f} |")
  by_kind = [sum(v for (_, _, k), v in times.items() if k == x) for x in KINDS]
  by_pass = [sum(v for (_, q, _), v in times.items() if q == x) for x in PASSES]
  lines.append(f"| **all** | {model.num_layers} | {busy:.2f} | | 100% | " + " | ".join(f"{v:.2f}" for v in by_pass)
               + " | " + " | ".join(f"{v:.2f}" for v in by_kind) + f" | {sum(idle.values()):.2f} |")
  return lines + [""]


def pair_summary(sh2: tuple[float, dict[tuple[str, str, str], float]],
                 mha: tuple[float, dict[tuple[str, str, str], float]]) -> list[str]:
  """Lines comparing the SH2 and all-MHA steps (each (wall ms, times)): the tokens/s ratio, the
  Hyena mixers' time beyond their GEMMs, and the ratio the step would have without it."""
  def total(times, parts=None, kinds=None):
    return sum(v for (p, _, k), v in times.items()
               if (parts is None or p in parts) and (kinds is None or k in kinds))
  (sh2_wall, sh2_t), (mha_wall, mha_t) = sh2, mha
  hyena = {p for p, _, _ in sh2_t if p.endswith("mixer") and p != "MHA mixer"}
  common = {"MLP", "norms", "embedding, final norm, logits", "loss, clipping, AdamW"}
  sh2_busy, mha_busy = total(sh2_t), total(mha_t)
  hyena_all, hyena_gemm = total(sh2_t, hyena), total(sh2_t, hyena, {"GEMM"})
  beyond = hyena_all - hyena_gemm
  return [
      f"- SH2 / all-MHA tokens/s: {mha_wall / sh2_wall:.3f} by wall time, {mha_busy / sh2_busy:.3f} by "
      "device busy time",
      f"- Hyena mixers: {hyena_all:.1f} ms per step, of which GEMMs {hyena_gemm:.1f} and the rest "
      f"(Pallas kernels, fusions, copies) {beyond:.1f}; MHA mixers: {total(sh2_t, {'MHA mixer'}):.1f} ms "
      f"in SH2, {total(mha_t, {'MHA mixer'}):.1f} in the all-MHA model "
      f"(cuDNN attention {total(mha_t, {'MHA mixer'}, {'cuDNN attention'}):.1f})",
      f"- parts common to both (MLP, norms, logits, loss and update): {total(sh2_t, common):.1f} ms in "
      f"SH2, {total(mha_t, common):.1f} in the all-MHA model",
      f"- if the Hyena mixers cost only their GEMMs, SH2 / all-MHA would be "
      f"{mha_busy / (sh2_busy - beyond):.3f} (device busy time)", ""]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench profile-train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="evo2-1b")
  parser.add_argument("--lengths", default="8192")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--remat", default="save_dots", choices=("none",) + config_lib.REMAT_POLICIES)
  parser.add_argument("--models", default="sh2,mha", help="which of the pair: sh2, mha or both")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="model setting for both models, e.g. d_model=256 (repeatable)")
  parser.add_argument("--top", type=int, default=0,
                      help="also list the N costliest kernels of the mixers (summed over layers)")
  parser.add_argument("--top-scope", default="mixers", choices=("mixers", "all"),
                      help="which parts --top ranks: the mixers, or every part (MLP, norms, "
                           "loss and update too)")
  parser.add_argument("--out", default=None,
                      help="markdown path (default experiments/results/train_profile_<device>.md)")
  args = parser.parse_args(argv)
  wanted = {m.strip() for m in args.models.split(",") if m.strip()}
  if not wanted or wanted - {"sh2", "mha"}:
    parser.error(f"--models {args.models!r}: choose sh2, mha or sh2,mha")
  overrides = config_lib.parse_set_args(args.set)
  device = jax.devices()[0]
  lines = ["# Where a training step's time goes (`sh2 bench profile-train`)", "",
           f"- device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
           f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
           f"- command: `sh2 bench profile-train {' '.join(argv or [])}`".rstrip(),
           f"- B={args.batch}, remat {args.remat}, {args.iters} profiled steps after 2 warm-ups; ms per "
           "step of device time summed per kernel (command buffers off)", ""]
  pair = bench_train.variants(args.preset, args.remat, overrides)
  for length in parse_lengths(parser, "--lengths", args.lengths):
    profiles = {}
    for (name, model), tag in zip(pair, ("sh2", "mha")):
      if tag not in wanted:
        continue
      prof = profile_step(model, length, args.batch, args.iters)
      profiles[tag] = (prof.wall_ms, prof.times)
      table = markdown_table(name, model, length, prof.wall_ms, prof.times, prof.idle)
      if args.top:
        ranked = {p for p, _, _ in prof.times if args.top_scope == "all" or p.endswith("mixer")}
        scope = "" if args.top_scope == "all" else " mixer"
        table += [f"Costliest {args.top}{scope} kernels, {name}, L={length}:", ""] + top_kernels(
            prof.totals_ns, prof.ops, tuple(model.layers), prof.steps, ranked, args.top)
      print("\n".join(table), flush=True)
      lines += table
      jax.clear_caches()
    if len(profiles) == 2:
      summary = [f"### SH2 against all-MHA, L={length}", ""] + pair_summary(profiles["sh2"], profiles["mha"])
      print("\n".join(summary), flush=True)
      lines += summary
  text = "\n".join(lines)
  path = args.out or os.path.join(bench_train.RESULTS,
                                  f"train_profile_{device.device_kind.lower().replace(' ', '_')}.md")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  logger.info("wrote %s", path)
  return 0
