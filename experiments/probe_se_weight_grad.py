"""SE with float32 params, fwd+bwd wall time under each form of the in-projection's dW (GPU).

  PYTHONPATH=. python experiments/probe_se_weight_grad.py [--lengths 131072] [--d-model 4096]
      [--iters 5] [--rounds 3] [--out FILE] [--dry-run]

The whole Hyena-SE operator (as `sh2 bench ops` and `experiments/profile_trace.py` build it),
B = 1, bf16 compute, timed as the median of `--iters` synchronised calls per round, with the
backward of `ops.hyena._matmul_cast` (the in-projection's float32-weight product) swapped for:

- float32 dW GEMM: the library's form, the GEMM writing dW in float32 (preferred_element_type);
- bf16 dW + cast: a bf16 GEMM and a float32 cast pass (autodiff's form before the custom VJP);
- float32 dW in N-row chunks: a batched product over chunks of N rows, float32 partials summed;

beside the same operator with bf16 params (no cast, no custom VJP). The question it answers:
does SE's float32 path lose time to the float32-output GEMM at long L (the eighteenth ops run
had SE 9-13% slower with float32 params than with bf16 params at 128K)?
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import probe_weight_casts  # noqa: E402
from experiments.cli_args import parse_lengths  # noqa: E402
from experiments.profile_trace import fwd_bwd_fn  # noqa: E402
from experiments.timing import median_ms  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.ops import hyena  # noqa: E402

WeightGrad = Callable[[jnp.dtype, tuple[jax.Array, jax.Array], jax.Array],
                      tuple[jax.Array, jax.Array]]


def _dw_bf16_cast(w_dtype: jnp.dtype, residuals: tuple[jax.Array, jax.Array],
                  dz_BLE: jax.Array) -> tuple[jax.Array, jax.Array]:
  x_BLD, w_view = residuals
  return dz_BLE @ w_view.T, jnp.einsum("bld,ble->de", x_BLD, dz_BLE).astype(w_dtype)


def _dw_row_chunks(rows: int) -> WeightGrad:
  def bwd(w_dtype, residuals, dz_BLE):
    x_BLD, w_view = residuals
    dx_ND, dw_DE = probe_weight_casts._project_chunked_bwd(
        rows, (x_BLD.reshape(-1, x_BLD.shape[-1]), w_view), dz_BLE.reshape(-1, dz_BLE.shape[-1]))
    return dx_ND.reshape(x_BLD.shape), dw_DE.astype(w_dtype)
  return bwd


def weight_grad_forms(chunk_rows: tuple[int, ...]) -> dict[str, WeightGrad]:
  """{name: backward of ops.hyena._matmul_cast}; the first is the library's own."""
  forms: dict[str, WeightGrad] = {"float32 dW GEMM (library)": hyena._matmul_cast_bwd,
                                  "bf16 dW + cast": _dw_bf16_cast}
  for rows in chunk_rows:
    forms[f"float32 dW in {rows}-row chunks"] = _dw_row_chunks(rows)
  return forms


@contextlib.contextmanager
def weight_grad_form(bwd: WeightGrad) -> Iterator[None]:
  """ops.hyena._matmul_cast differentiates with `bwd` inside the block (trace inside it)."""
  hyena._matmul_cast.defvjp(hyena._matmul_cast_fwd, bwd)
  try:
    yield
  finally:
    hyena._matmul_cast.defvjp(hyena._matmul_cast_fwd, hyena._matmul_cast_bwd)


def round_medians(fn: Callable[..., Any], args: tuple, iters: int, rounds: int) -> list[float]:
  """Median ms of `iters` synchronised calls, per round, after two warm-up calls."""
  return [median_ms(fn, *args, warmup=2 if r == 0 else 0, iters=iters) for r in range(rounds)]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="131072")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--chunk-rows", default="16384,32768",
                      help="row counts of the chunked float32 dW forms (comma-separated)")
  parser.add_argument("--out", default=None, help="markdown file (default: print only)")
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny shapes (CPU: SE takes its XLA path there, so the dW forms "
                           "differ only on GPU)")
  args = parser.parse_args(argv)
  lengths = [128] if args.dry_run else parse_lengths(parser, "--lengths", args.lengths)
  d = 64 if args.dry_run else args.d_model
  chunk_rows = (64,) if args.dry_run else tuple(int(v) for v in args.chunk_rows.split(","))
  config = ModelConfig(d_model=d, num_heads=max(1, d // 128), se_groups=d // 16,
                       mr_groups=d // 16, layout="SE MR LI MHA", dtype="bfloat16",
                       param_dtype="float32", mr_filter_len=128, train_len=8192)
  lines = [f"# SE fwd+bwd with float32 params under each dW form (D={d}, B=1)", "",
           f"- device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           "- command: `PYTHONPATH=. python3 experiments/probe_se_weight_grad.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
           f"- median of {args.iters} synchronised calls per round, {args.rounds} rounds", "",
           "| L | SE | fwd+bwd ms per round |", "|---|---|---|"]
  print("\n".join(lines), flush=True)
  for length in lengths:
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, length), (1, length, d), jnp.bfloat16)
    runs = [("bf16 params", "se_bf16", hyena._matmul_cast_bwd)]
    runs += [(f"float32 params, {name}", "se", bwd)
             for name, bwd in weight_grad_forms(chunk_rows).items()]
    for label, operator, bwd in runs:
      with weight_grad_form(bwd):
        fn, fn_args = fwd_bwd_fn(operator, config, x, key)
        medians = round_medians(fn, fn_args, args.iters, args.rounds)
      lines.append(f"| {length} | {label} | {' / '.join(f'{m:.2f}' for m in medians)} |")
      print(lines[-1], flush=True)
      jax.clear_caches()
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
