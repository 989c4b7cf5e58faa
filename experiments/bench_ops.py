"""`sh2 bench ops`: forward and forward+backward time of the full mixer operators.

Every operator is the whole Linen module (in-projection, featurizer, inner filter, gates,
out-projection) at width D (default 4096), batch 1, bf16 compute: Hyena-SE, -MR, -LI in each
of their methods, MHA through jax.nn.dot_product_attention (cuDNN on GPU), and the GEMM floor
(the two Hyena projections' matrix products alone). Times are medians of repeated, synchronised
runs after warm-up; the results table (markdown) goes to experiments/results/ops_<device>.md.

Forward+backward returns the output with the gradients (a random cotangent); `--remat
save_dots` differentiates each operator inside jax.checkpoint as a training step runs a block,
`--set` changes a model setting for every operator, and `--block-sizes se:halo_fwd=true` the
kernels' default BlockSizes for the whole run (as `experiments/tune_mixers.py --candidate`
does: SE and MR share blocked_conv.BlockSizes, LI has modal_conv's).

  python -m sh2_jax.cli bench ops [--lengths 4096,8192,16384,32768] [--long 131072,1048576]
      [--ops floor,se,mr,li,mha] [--headline] [--no-xla] [--remat save_dots]
      [--set out_proj_in_kernel_bwd=false] [--block-sizes se:halo_fwd=true] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import os
import statistics
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.cli_args import parse_lengths
from experiments.timing import median_ms, random_cotangent
from sh2_jax import config as config_lib
from sh2_jax.config import ModelConfig
from sh2_jax.layers.attention import MHA
from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE
from sh2_jax.model import REMAT_POLICIES
from sh2_jax.ops import hyena as hyena_ops

logger = logging.getLogger(__name__)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One operator in one implementation."""
  name: str
  module: type[nn.Module] | None  # None: the GEMM floor
  overrides: dict[str, Any]
  hyena: bool = True
  switches: tuple[tuple[str, Any], ...] = ()  # sh2_jax.ops.hyena constants set while it runs


def default_variants(kernels: bool) -> list[Variant]:
  fast = "pallas" if kernels else "blocked"
  out = [
      Variant("GEMM floor", None, {}),
      Variant(f"SE ({fast})", HyenaSE, {"conv_method": fast}),
      # like for like with the GEMM floor, whose weights are bf16: no float32 master weights
      # to cast forward and back per call
      Variant(f"SE ({fast}, bf16 params)", HyenaSE, {"conv_method": fast, "param_dtype": "bfloat16"}),
      Variant("SE (pallas, XLA featurizer)", HyenaSE, {"conv_method": "pallas_unfused"}),
      Variant("SE (pallas direct FIR)", HyenaSE, {"conv_method": "pallas"},
              switches=(("SHORT_FILTER_KERNEL", "direct"),)),
      Variant("SE (XLA direct)", HyenaSE, {"conv_method": "direct"}),
      Variant(f"MR ({fast})", HyenaMR, {"conv_method": fast}),
      Variant("MR (pallas, fused featurizer)", HyenaMR, {"conv_method": "pallas_fused"}),
      Variant("MR (XLA blocked einsum)", HyenaMR, {"conv_method": "blocked"}),
      Variant("MR (XLA fft)", HyenaMR, {"conv_method": "fft"}),
      Variant("LI (pallas)", HyenaLI, {"li_method": "pallas"}),
      Variant("LI (pallas, fused featurizer)", HyenaLI, {"li_method": "pallas_fused"}),
      Variant("LI (XLA fft)", HyenaLI, {"li_method": "fft"}),
      Variant("LI (XLA chunked)", HyenaLI, {"li_method": "chunked"}),
      Variant("MHA (cuDNN)" if jax.default_backend() == "gpu" else "MHA (XLA)", MHA, {}, hyena=False),
  ]
  if not kernels:
    out = [v for v in out if v.overrides.get("li_method") not in ("pallas", "pallas_fused") and not v.switches
           and v.overrides.get("conv_method") not in ("pallas_unfused", "pallas_fused")]
  seen, unique = set(), []
  for v in out:
    if v.name not in seen:
      seen.add(v.name)
      unique.append(v)
  return unique


FAMILIES = ("floor", "se", "mr", "li", "mha")


def family(variant: Variant) -> str:
  """The operator family of a variant: floor, se, mr, li or mha."""
  return "floor" if variant.module is None else variant.name.split(" ")[0].lower()


def headline_names(kernels: bool) -> tuple[str, ...]:
  """The one variant per family that the acceptance ratios read (the default path of each)."""
  fast = "pallas" if kernels else "blocked"
  return ("GEMM floor", f"SE ({fast})", f"SE ({fast}, bf16 params)", f"MR ({fast})",
          "LI (pallas)" if kernels else "LI (XLA fft)",
          "MHA (cuDNN)" if jax.default_backend() == "gpu" else "MHA (XLA)")


def select_variants(variants: list[Variant], families: list[str] | None,
                    xla: bool = True, headline: tuple[str, ...] | None = None) -> list[Variant]:
  """The variants of the given families (all if None), without the plain-XLA ones if not xla,
  only those named in `headline` if given."""
  unknown = sorted(set(families or []) - set(FAMILIES))
  if unknown:
    raise ValueError(f"--ops {','.join(unknown)}: choose from {','.join(FAMILIES)}")
  return [v for v in variants if (families is None or family(v) in families)
          and (xla or "XLA" not in v.name or "pallas" in v.name)
          and (headline is None or v.name in headline)]


def projection_forward(x_BLD: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
  """The GEMM floor's forward: x @ W_in [D, 3D], then its first D columns @ W_out [D, D]."""
  return (x_BLD @ w_in)[..., :w_out.shape[0]] @ w_out


def projection_products(x_BLD: jax.Array, w_in: jax.Array, w_out: jax.Array, dz_BLE: jax.Array,
                        dy_BLD: jax.Array) -> tuple[jax.Array, ...]:
  """The GEMM floor's forward+backward: the six matrix products of a Hyena operator's projections.

  Forward z = x @ W_in ([B, L, D] x [D, 3D]) and y = z[..., :D] @ W_out; backward, from dense
  cotangents dz [B, L, 3D] (the mixer gives every column of z a gradient) and dy [B, L, D]:
  dx = dz @ W_in^T, dW_in = x^T dz, du = dy @ W_out^T, dW_out = z[..., :D]^T dy. A VJP through
  the slice would hand XLA a zero-padded dz, which it shrinks to a D-wide product (a floor
  missing 4 L D^2 of the operator's 24 L D^2 FLOPs). Returns (y, dx, dW_in, du, dW_out).
  """
  u = (x_BLD @ w_in)[..., :w_out.shape[0]]
  y = u @ w_out
  dx = dz_BLE @ w_in.T
  dw_in = jnp.einsum("bld,ble->de", x_BLD, dz_BLE)
  du = dy_BLD @ w_out.T
  dw_out = jnp.einsum("bld,ble->de", u, dy_BLD)
  return y, dx, dw_in, du, dw_out


def projection_inputs(x_BLD: jax.Array, key: jax.Array) -> tuple[jax.Array, ...]:
  """(x, W_in, W_out, dz, dy) for projection_products at x's width D and dtype (random)."""
  d, dt = x_BLD.shape[-1], x_BLD.dtype
  k1, k2, k3, k4 = jax.random.split(key, 4)
  w_in = (jax.random.normal(k1, (d, 3 * d), jnp.float32) * 0.02).astype(dt)
  w_out = (jax.random.normal(k2, (d, d), jnp.float32) * 0.02).astype(dt)
  dz = jax.random.normal(k3, x_BLD.shape[:-1] + (3 * d,), dt)
  dy = jax.random.normal(k4, x_BLD.shape, dt)
  return x_BLD, w_in, w_out, dz, dy


def gemm_floor_fns(x_BLD: jax.Array, key: jax.Array
                   ) -> tuple[Callable[[], jax.Array], Callable[[], tuple[jax.Array, ...]]]:
  """(forward, forward+backward) thunks of the GEMM floor at x's width and dtype."""
  inputs = projection_inputs(x_BLD, key)
  fwd, fwdbwd = jax.jit(projection_forward), jax.jit(projection_products)
  return (lambda: fwd(*inputs[:3])), (lambda: fwdbwd(*inputs))


REMAT = ("none", "save_dots")  # --remat: how fwd+bwd differentiates each operator


def bench_config(d_model: int = 4096, groups: int = 256, heads: int = 32, remat: str = "none",
                 overrides: dict[str, str] | None = None) -> ModelConfig:
  """The operators' settings: bf16 compute, float32 params, then `overrides` (model keys, with
  or without the "model." prefix, e.g. {"param_dtype": "bfloat16"})."""
  config = ModelConfig(d_model=d_model, num_heads=heads, se_groups=groups, mr_groups=groups,
                       layout="SE MR LI MHA", dtype="bfloat16", param_dtype="float32",
                       mr_filter_len=128, train_len=8192)
  config = dataclasses.replace(config, remat=remat != "none")  # as the modules run in a model
  if overrides:
    config = config_lib.apply_overrides(
        config_lib.Config(model=config),
        {k if k.startswith("model.") else f"model.{k}": v for k, v in overrides.items()}).model
  return config


def _module_fns(variant: Variant, config: ModelConfig, x_BLD: jax.Array, key: jax.Array,
                remat: str = "none", compile_now: bool = False):
  """(forward, forward+backward) thunks of a module variant; remat "save_dots" differentiates
  it inside jax.checkpoint with the model's save_dots policy (the products and the LI kernels'
  segment states), as a training step runs a block. `compile_now`: both are compiled here
  (ahead of time), so later changes to global defaults or jax.clear_caches() cannot retrace
  them; otherwise they compile on their first call."""
  module = variant.module(dataclasses.replace(config, **variant.overrides))
  params = nn.meta.unbox(jax.jit(module.init)(key, x_BLD[:, :128])["params"])
  fwd = jax.jit(module.apply)
  cotangent = random_cotangent(x_BLD, key)
  apply = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
  if remat == "save_dots":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES["save_dots"])

  def loss_vjp(p, x, ct):  # the output too: unreturned, its projection would be dead code
    out, pullback = jax.vjp(apply, p, x)
    return out, pullback(ct)

  grad = jax.jit(loss_vjp)
  if compile_now:
    fwd = fwd.lower({"params": params}, x_BLD).compile()
    grad = grad.lower(params, x_BLD, cotangent).compile()
  return (lambda: fwd({"params": params}, x_BLD)), (lambda: grad(params, x_BLD, cotangent))


CHUNKED_LI_MAX_LEN = 32768  # the XLA chunked LI scan is sequential over chunks: too slow beyond


def _timed_fns(variant: Variant, config: ModelConfig, x_BLD: jax.Array, key: jax.Array,
               remat: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
  """(forward, forward+backward) thunks of a variant, compiled now under its switches (so a
  later switch or the next variant's cannot change them)."""
  if variant.module is None:
    return gemm_floor_fns(x_BLD, key)
  saved = {name: getattr(hyena_ops, name) for name, _ in variant.switches}
  for name, value in variant.switches:
    setattr(hyena_ops, name, value)
  try:
    return _module_fns(variant, config, x_BLD, key, remat, compile_now=True)
  finally:
    for name, value in saved.items():
      setattr(hyena_ops, name, value)


def _error_text(error: Exception) -> str:
  message = str(error).splitlines()[0][:120]
  return "OOM" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower() else message


def run(lengths: list[int], long_lengths: list[int], d_model: int = 4096, groups: int = 256,
        heads: int = 32, kernels: bool | None = None, iters: int = 10,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None,
        families: list[str] | None = None, xla: bool = True,
        headline_only: bool = False, remat: str = "none",
        overrides: dict[str, str] | None = None, rounds: int = 1,
        names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
  """Times every variant at every length; returns rows {op, L, fwd_ms, fwdbwd_ms}.

  `families` (floor, se, mr, li, mha), `xla=False` and `headline_only` (the default path of
  each family, the rows the ratios read) restrict the variants, `names` (variant names) too,
  in place of headline_only; `remat` as in _module_fns;
  `overrides`: model settings for every operator, e.g. {"out_proj_in_kernel_bwd": "false"}.
  `rounds` > 1: at each length every variant is compiled first, then timed in that many rounds
  alternating between the variants (so a drift of the GPU's clock reaches all of them alike);
  a row holds the median of its rounds and each round's value (fwd_rounds, fwdbwd_rounds).
  With one round a variant is built, timed and dropped before the next (the least memory).

  `on_row(rows)` is called after each measurement (e.g. to rewrite the table as it grows).
  """
  if kernels is None:
    kernels = jax.default_backend() == "gpu"
  if rounds < 1:
    raise ValueError(f"rounds={rounds} must be >= 1")
  config = bench_config(d_model, groups, heads, remat, overrides)
  rows = []
  key = jax.random.key(0)
  if names is None and headline_only:
    names = headline_names(kernels)
  variants = select_variants(default_variants(kernels), families, xla, names)
  for length in sorted(set(lengths) | set(long_lengths)):
    x = jax.random.normal(jax.random.fold_in(key, length), (1, length, d_model), jnp.bfloat16)
    here = [v for v in variants
            if not (length in long_lengths and length not in lengths and not v.hyena)
            and not (v.overrides.get("li_method") == "chunked" and length > CHUNKED_LI_MAX_LEN)]
    for batch in ([here] if rounds > 1 else [[v] for v in here]):
      timed = []  # (row, fwd, fwdbwd)
      for variant in batch:
        row = {"op": variant.name, "L": length}
        try:
          timed.append((row, *_timed_fns(variant, config, x, key, remat)))
        except Exception as error:  # noqa: BLE001 - an OOM or a compile failure is a table entry
          row["error"] = _error_text(error)
          logger.warning("%s at L=%d: %s", variant.name, length, row["error"])
        rows.append(row)
      for _ in range(rounds):
        for row, fwd, fwdbwd in list(timed):
          try:
            row.setdefault("fwd_rounds", []).append(median_ms(fwd, iters=iters, max_seconds=20.0))
            row.setdefault("fwdbwd_rounds", []).append(median_ms(fwdbwd, iters=iters, max_seconds=20.0))
          except Exception as error:  # noqa: BLE001 - e.g. out of memory at run time
            row["error"] = _error_text(error)
            logger.warning("%s at L=%d: %s", row["op"], length, row["error"])
            timed.remove((row, fwd, fwdbwd))
      for row, _, _ in timed:
        row["fwd_ms"] = statistics.median(row["fwd_rounds"])
        row["fwdbwd_ms"] = statistics.median(row["fwdbwd_rounds"])
        logger.info("%s", row)
      del timed
      jax.clear_caches()
      if on_row is not None:
        on_row(rows)
  return rows


def _len(length: int) -> str:
  return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def _fmt(value: float | None) -> str:
  return "—" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


# Issue 3's targets per ratio: {L: bound} (None: every length); a ratio without one is shown
# for reading only.
TARGETS: dict[str, dict[int | None, float]] = {
    "SE / GEMM floor (fwd+bwd)": {None: 1.2},
    "SE (bf16 params) / GEMM floor (fwd+bwd)": {},
    "MR / SE (fwd+bwd)": {None: 1.3},
    "GEMM floor bwd / fwd (for MR's)": {},
    "MR bwd / MR fwd": {None: 1.5},
    "LI (best) / MHA (fwd+bwd)": {8192: 0.8, 32768: 0.5},
    "SE / MHA (fwd+bwd)": {4096: 0.75, 16384: 0.5},
}
UNTARGETED = {  # what a ratio without a target is for
    "SE (bf16 params) / GEMM floor (fwd+bwd)": "none: like for like (the floor's weights are bf16)",
    "GEMM floor bwd / fwd (for MR's)": "none: 2 by FLOPs",
}
# A Hyena operator is linear in L when its fwd+bwd time per token at every length from its
# cheapest (per token) up is within this factor of that cheapest time: shorter lengths, which
# pay fixed costs over fewer tokens, do not count against it.
LINEAR_GROWTH = 1.25
LI_VARIANTS = ("LI (pallas)", "LI (pallas, fused featurizer)", "LI (XLA fft)", "LI (XLA chunked)")


def target_text(name: str) -> str:
  """"<= 1.2", "<= 0.8 at 8K, <= 0.5 at 32K", or "none: 2 by FLOPs" (no target)."""
  bounds = TARGETS[name]
  if not bounds:
    return UNTARGETED[name]
  return ", ".join(f"<= {bound}" + ("" if L is None else f" at {_len(L)}")
                   for L, bound in bounds.items())


def target_status(name: str, length: int, value: float | None) -> str | None:
  """"met" / "missed" where the ratio has a target at this length, else None."""
  bounds = TARGETS[name]
  bound = bounds.get(length, bounds.get(None))
  if bound is None or value is None:
    return None
  return "met" if value <= bound else "missed"


def ratios(rows: list[dict[str, Any]], kernels: bool) -> list[tuple[str, int, float | None, str]]:
  """The acceptance ratios of issue 3 per length: (name, L, value, target)."""
  fast = "pallas" if kernels else "blocked"
  get = {(r["op"], r["L"]): r for r in rows}
  mha = "MHA (cuDNN)" if any(r["op"] == "MHA (cuDNN)" for r in rows) else "MHA (XLA)"
  out = []
  for length in sorted({r["L"] for r in rows}):
    def val(op, field="fwdbwd_ms"):
      return get.get((op, length), {}).get(field)

    def div(a, b):
      return None if a is None or b is None else a / b

    def bwd_over_fwd(op):
      both, fwd = val(op), val(op, "fwd_ms")
      return div(None if both is None or fwd is None else both - fwd, fwd)

    se, mr, floor, attn = val(f"SE ({fast})"), val(f"MR ({fast})"), val("GEMM floor"), val(mha)
    li = min((v for v in map(val, LI_VARIANTS) if v is not None), default=None)
    values = {"SE / GEMM floor (fwd+bwd)": div(se, floor),
              "SE (bf16 params) / GEMM floor (fwd+bwd)": div(val(f"SE ({fast}, bf16 params)"), floor),
              "MR / SE (fwd+bwd)": div(mr, se),
              "GEMM floor bwd / fwd (for MR's)": bwd_over_fwd("GEMM floor"),
              "MR bwd / MR fwd": bwd_over_fwd(f"MR ({fast})"),
              "LI (best) / MHA (fwd+bwd)": div(li, attn), "SE / MHA (fwd+bwd)": div(se, attn)}
    out += [(name, length, values[name], target_text(name)) for name in TARGETS]
  return out


def per_token_us(rows: list[dict[str, Any]], op: str) -> dict[int, float]:
  """{L: fwd+bwd microseconds per token} of one operator's timed rows."""
  return {r["L"]: 1000.0 * r["fwdbwd_ms"] / r["L"] for r in rows
          if r["op"] == op and "fwdbwd_ms" in r}


def linearity(rows: list[dict[str, Any]], kernels: bool) -> list[tuple[str, dict[int, float], str]]:
  """(operator, {L: us per token}, verdict) for the floor and each family's default Hyena path
  timed at two or more lengths; verdict "linear to <largest L>" or "grows x<g> by <L>"."""
  out = []
  for op in headline_names(kernels)[:5]:
    per_token = per_token_us(rows, op)
    if len(per_token) < 2:
      continue
    cheapest_len = min(per_token, key=per_token.get)
    longer = [L for L in per_token if L >= cheapest_len]
    worst = max(longer, key=per_token.get)
    growth = per_token[worst] / per_token[cheapest_len]
    verdict = (f"linear to {_len(max(per_token))}" if growth <= LINEAR_GROWTH
               else f"grows x{growth:.2f} by {_len(worst)}")
    out.append((op, per_token, verdict))
  return out


def ratio_lines(rows: list[dict[str, Any]], kernels: bool) -> list[str]:
  """The ratios as one markdown table, a column per length ("value (met/missed)" where a
  target applies there), then the per-token table that judges linearity."""
  computed = ratios(rows, kernels)
  lengths = sorted({L for _, L, value, _ in computed if value is not None})
  lines = []
  if lengths:
    lines = ["| ratio | " + " | ".join(_len(L) for L in lengths) + " | target |",
             "|---|" + "---|" * len(lengths) + "---|"]
  for name in TARGETS:
    cells = {L: value for n, L, value, _ in computed if n == name and value is not None}
    if not cells:
      continue
    shown = []
    for L in lengths:
      value, status = cells.get(L), target_status(name, L, cells.get(L))
      shown.append("" if value is None else f"{value:.2f}" + (f" ({status})" if status else ""))
    lines.append(f"| {name} | " + " | ".join(shown) + f" | {target_text(name)} |")
  table = linearity(rows, kernels)
  if table:
    token_lengths = sorted({L for _, per_token, _ in table for L in per_token})
    lines += ["", "| fwd+bwd per token (us) | " + " | ".join(_len(L) for L in token_lengths)
              + f" | linear in L (from the cheapest length up, within {LINEAR_GROWTH}x of it) |",
              "|---|" + "---|" * len(token_lengths) + "---|"]
    for op, per_token, verdict in table:
      lines.append(f"| {op} | " + " | ".join(
          "" if L not in per_token else f"{per_token[L]:.3f}" for L in token_lengths)
          + f" | {verdict} |")
  return lines


def write_markdown(rows: list[dict[str, Any]], kernels: bool, path: str, command: str,
                   d_model: int = 4096, param_dtype: str = "float32") -> str:
  device = jax.devices()[0]
  lengths = sorted({r["L"] for r in rows})
  ops = list(dict.fromkeys(r["op"] for r in rows))
  get = {(r["op"], r["L"]): r for r in rows}
  lines = ["# Mixer operators: forward and forward+backward time (ms)", "",
           f"- device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
           f"- date: {datetime.date.today().isoformat()}",
           f"- command: `{command}`",
           f"- B=1, D={d_model}, bf16 compute ({param_dtype} params; the GEMM floor's weights bf16), "
           "full operators with projections; "
           "median of synchronised runs after warm-up", "",
           "| operator | " + " | ".join(f"L={_len(L)} fwd | fwd+bwd" for L in lengths) + " |",
           "|---|" + "---|---|" * len(lengths)]
  for op in ops:
    cells = []
    for L in lengths:
      r = get.get((op, L))
      if r is None:
        cells += ["", ""]
      elif "error" in r:
        cells += [r["error"][:20], ""]
      else:
        cells += [_fmt(r["fwd_ms"]), _fmt(r["fwdbwd_ms"])]
    lines.append(f"| {op} | " + " | ".join(cells) + " |")
  round_counts = {len(r["fwdbwd_rounds"]) for r in rows if len(r.get("fwdbwd_rounds", ())) > 1}
  if round_counts:
    lines += ["", f"Rounds: {max(round_counts)} per length, alternating between the operators; each "
              "entry is the median of its rounds. fwd+bwd per round:", ""]
    lines += [f"- {r['op']} at {_len(r['L'])}: " + ", ".join(f"{v:.2f}" for v in r["fwdbwd_rounds"])
              for r in rows if len(r.get("fwdbwd_rounds", ())) > 1 and "error" not in r]
  lines += [""] + ratio_lines(rows, kernels)
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench ops", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", default="4096,8192,16384,32768",
                      help="sequence lengths for every operator (comma-separated token counts: "
                           "4096, 8K, 1M)")
  parser.add_argument("--long", default="",
                      help="extra lengths for the Hyena operators only, e.g. 128K,1M")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=256)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--ops", default=None,
                      help=f"operator families to time (comma-separated from {','.join(FAMILIES)}; default all)")
  parser.add_argument("--no-xla", action="store_true", help="skip the plain-XLA variants")
  parser.add_argument("--headline", action="store_true",
                      help="only the default path of each operator (the rows the ratios read)")
  parser.add_argument("--variant", action="append", default=[], metavar="NAME",
                      help="time only the variants of these names (repeat the option), e.g. "
                           "--variant 'GEMM floor' --variant 'SE (pallas)'; in place of --headline")
  parser.add_argument("--remat", default="none", choices=REMAT,
                      help="save_dots: differentiate each operator inside jax.checkpoint with the "
                           "save-the-products policy, as `sh2 train` runs a block (default none)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="model setting for every operator, e.g. out_proj_in_kernel_bwd=false")
  parser.add_argument("--block-sizes", action="append", default=[],
                      metavar="MIXER:FIELD=VALUE[,FIELD=VALUE]",
                      help="the kernels' default BlockSizes for this run (se, mr or li; SE and MR "
                           "share one class, so the last of the two given sets both)")
  parser.add_argument("--rounds", type=int, default=1,
                      help="timing rounds per length, alternating between the operators (each "
                           "compiled first; the median round is reported); default 1")
  parser.add_argument("--out", default=None, help="markdown path (default experiments/results/ops_<device>.md)")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds {args.rounds}: give 1 or more")
  overrides = config_lib.parse_set_args(args.set)
  kernels = jax.default_backend() == "gpu"
  device = jax.devices()[0].device_kind.lower().replace(" ", "_")
  path = args.out or os.path.join(RESULTS, f"ops_{device}.md")
  command = ("sh2 bench ops " + " ".join(argv or [])).strip()
  try:
    param_dtype = bench_config(args.d_model, args.groups, args.heads, args.remat,
                               overrides).param_dtype
  except ValueError as error:
    parser.error(str(error))
  rewrite = lambda rows: write_markdown(rows, kernels, path, command, args.d_model,  # noqa: E731
                                        param_dtype)
  families = None if args.ops is None else [f.strip() for f in args.ops.split(",") if f.strip()]
  try:
    select_variants(default_variants(kernels), families)
  except ValueError as error:
    parser.error(str(error))
  known = [v.name for v in default_variants(kernels)]
  if unknown := [name for name in args.variant if name not in known]:
    parser.error(f"--variant {unknown[0]!r} is not a variant here: choose from "
                 + "; ".join(known))
  lengths = parse_lengths(parser, "--lengths", args.lengths)
  long_lengths = parse_lengths(parser, "--long", args.long, allow_empty=True)
  from experiments import tune_mixers  # imports this module: here, not at the top

  try:
    defaults = [tune_mixers.parse_candidate(text) for text in args.block_sizes]
  except ValueError as error:
    parser.error(f"--block-sizes: {error}")
  with contextlib.ExitStack() as stack:
    for mixer, block_sizes in defaults:
      stack.enter_context(tune_mixers.default_block_sizes(tune_mixers.MIXERS[mixer][1],
                                                          block_sizes))
    rows = run(lengths, long_lengths, args.d_model, args.groups, args.heads, kernels,
               args.iters, on_row=rewrite, families=families, xla=not args.no_xla,
               headline_only=args.headline, remat=args.remat, overrides=overrides,
               rounds=args.rounds, names=tuple(args.variant) or None)
  print(rewrite(rows))
  return 0
