"""Does the out-projection's bias add fold into the GEMM with float32 params? (GPU)

  PYTHONPATH=. python experiments/probe_bias_add.py [--lengths 32768] [--d-model 4096]
      [--iters 5] [--out FILE] [--dry-run]

out = y @ W + b (y [L, D] bf16, W [D, D], b [D]), forward + backward for a random cotangent, as
device time per kernel from a profiler trace, for: bf16 W and b; float32 W and b cast per call
(the mixers' out-projection forward; their bias gradient is since summed in float32 by
`sh2_jax.ops.bias.add_bias`, which this probe does not use); the bias cast behind an optimization barrier; the weight
cast behind one; both behind one; the add in float32 after a float32-output GEMM. With bf16
params XLA folds the add into the GEMM (a cuBLASLt bias epilogue); with float32 params SE's
profile at 128K has a separate [L, D] add pass (`ops_nvidia_h100_80gb_hbm3.md`, thirty-second
session; `probe_bias_add_nvidia_h100_80gb_hbm3.md`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.cli_args import parse_lengths  # noqa: E402
from experiments.probe_weight_casts import kernels_per_call  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

Form = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _barrier_bf16(a: jax.Array) -> jax.Array:
  return jax.lax.optimization_barrier(a.astype(jnp.bfloat16))


def _cast_per_call(y: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  return y @ w.astype(y.dtype) + b.astype(y.dtype)


def _both_behind_one_barrier(y: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  w_bf16, b_bf16 = jax.lax.optimization_barrier((w.astype(y.dtype), b.astype(y.dtype)))
  return y @ w_bf16 + b_bf16


def forms() -> dict[str, tuple[Form, jnp.dtype]]:
  """{name: (out(y, w, b), the params' dtype)}."""
  return {
      "bf16 W, b": (_cast_per_call, jnp.bfloat16),
      "float32 W, b cast per call (today)": (_cast_per_call, jnp.float32),
      "float32, bias cast behind a barrier": (
          lambda y, w, b: y @ w.astype(y.dtype) + _barrier_bf16(b), jnp.float32),
      "float32, weight cast behind a barrier": (
          lambda y, w, b: y @ _barrier_bf16(w) + b.astype(y.dtype), jnp.float32),
      "float32, both casts behind one barrier": (_both_behind_one_barrier, jnp.float32),
      "float32, add in float32": (
          lambda y, w, b: (jnp.dot(y, w.astype(y.dtype), preferred_element_type=jnp.float32)
                           + b).astype(y.dtype), jnp.float32),
  }


def fwd_bwd(form: Form) -> Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]:
  """jit of (y, w, b, ct) -> (out, (dy, dw, db))."""
  def run(y, w, b, ct):
    out, pull = jax.vjp(form, y, w, b)
    return out, pull(ct)
  return jax.jit(run)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="32768")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--out", default=None, help="markdown file (default: print only)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
  args = parser.parse_args(argv)
  lengths = [64] if args.dry_run else parse_lengths(parser, "--lengths", args.lengths)
  d = 32 if args.dry_run else args.d_model
  lines = [f"# The out-projection's bias add with float32 params (D={d})", "",
           f"- device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           "- command: `PYTHONPATH=. python3 experiments/probe_bias_add.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
           f"- forward + backward, device ms per call from a profiler trace of {args.iters} calls",
           "", "| L | form | device ms | kernels (ms) |", "|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for length in lengths:
    keys = jax.random.split(jax.random.key(length), 4)
    y = jax.random.normal(keys[0], (length, d), jnp.float32).astype(jnp.bfloat16)
    ct = jax.random.normal(keys[1], (length, d), jnp.float32).astype(jnp.bfloat16)
    w = 0.02 * jax.random.normal(keys[2], (d, d), jnp.float32)
    b = 0.02 * jax.random.normal(keys[3], (d,), jnp.float32)
    for name, (form, param_dtype) in forms().items():
      kernels = kernels_per_call(fwd_bwd(form), (y, w.astype(param_dtype), b.astype(param_dtype),
                                                 ct), args.iters)
      listed = ", ".join(f"{k} {v:.3f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
      lines.append(f"| {length} | {name} | {sum(kernels.values()):.3f} | {listed} |")
      print(lines[-1], flush=True)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
  main()
