"""Does each mixer run forward+backward at a length? One fresh process per operator.

A CUDA fault (illegal address) poisons the whole process, so every operator (the bench-ops
module at D=4096, 256 groups, 32 heads, bf16, default methods) runs in its own subprocess;
each prints one line: ok with its fwd+bwd ms, or the first line of its error.

  PYTHONPATH=. python experiments/probe_length.py --length 262144 [--ops se,mr,li,mha]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MODULES = {"se": "HyenaSE", "mr": "HyenaMR", "li": "HyenaLI", "mha": "MHA"}


def _run_one(op: str, length: int) -> None:
  import jax
  import jax.numpy as jnp

  from experiments.bench_ops import Variant, _module_fns
  from experiments.timing import median_ms
  from sh2_jax.config import ModelConfig
  from sh2_jax.layers import attention, hyena

  module = getattr(hyena if op != "mha" else attention, MODULES[op])
  config = ModelConfig(d_model=4096, num_heads=32, se_groups=256, mr_groups=256,
                       layout="SE MR LI MHA", dtype="bfloat16", param_dtype="float32",
                       mr_filter_len=128, train_len=8192)
  x = jax.random.normal(jax.random.key(0), (1, length, 4096), jnp.bfloat16)
  _, fwdbwd = _module_fns(Variant(op, module, {}), config, x, jax.random.key(1))
  print(f"{op} L={length}: ok, fwd+bwd {median_ms(fwdbwd, warmup=1, iters=2):.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, required=True)
  parser.add_argument("--ops", default="se,mr,li,mha")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's operator
  parser.add_argument("--timeout", type=float, default=240.0, help="seconds per operator")
  args = parser.parse_args(argv)
  from experiments.timing import child_failure
  if args.one:
    _run_one(args.one, args.length)
    return
  for op in args.ops.split(","):
    if op not in MODULES:
      raise SystemExit(f"--ops {op}: choose from {','.join(MODULES)}")
    start = time.time()
    try:
      result = subprocess.run([sys.executable, os.path.abspath(__file__), "--length",
                               str(args.length), "--one", op], capture_output=True, text=True,
                              timeout=args.timeout)
      lines = [l for l in result.stdout.splitlines() if l.startswith(f"{op} L=")]
      print(lines[-1] if lines else f"{op} L={args.length}: FAILED (exit {result.returncode}): "
            f"{child_failure(result.stderr)}", flush=True)
    except subprocess.TimeoutExpired:
      print(f"{op} L={args.length}: timed out after {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
