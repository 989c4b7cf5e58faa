"""Context-parallel attention on the GPUs present: every block kernel and strategy against
one-device cuDNN causal attention (outputs and q/k/v gradients), and fwd+bwd time.

The sequence is stored in zigzag order and sharded over all devices on the `context` axis;
the reference is `jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")` on one
device in natural order (XLA's off GPU). bf16 inputs: relative differences ~1e-2 are agreement.

  PYTHONPATH=. python experiments/check_cp_attention.py [--length 32768] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from experiments.compare import max_rel_diff
from experiments.timing import median_ms
from sh2_jax.parallel import context as cp, context_attention as ca

AXIS = "context"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--kernels", default="cudnn,pallas")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  devices = jax.devices()
  n = len(devices)
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  shape = (1, args.length, args.heads, args.head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16)
                    for key in jax.random.split(jax.random.key(0), 4))
  order = cp.zigzag_order(args.length, n)
  inverse = np.argsort(order)
  positions = jnp.asarray(order, jnp.int32)

  def reference(q, k, v):
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

  def sharded(strategy):
    spec = jax.P(None, AXIS, None, None)
    body = lambda q, k, v, p: ca.context_attention(q, k, v, p, AXIS, strategy, local_sorted=True)
    attend = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3 + (jax.P(AXIS),),
                           out_specs=spec, check_vma=False)
    return lambda q, k, v: attend(q[:, order], k[:, order], v[:, order], positions)[:, inverse]

  def value_and_grads(fn):
    @jax.jit
    def run(q, k, v, d_out):
      out, pullback = jax.vjp(fn, q, k, v)
      return out, pullback(d_out)
    return run

  want_out, want_grads = value_and_grads(reference)(q, k, v, d_out)
  lines = [f"# Context-parallel attention vs one-device cuDNN ({devices[0].device_kind} x {n})", "",
           f"- jax {jax.__version__}, date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           f"- L={args.length}, B=1, {args.heads} heads x {args.head_dim}, bf16, zigzag over {n} devices",
           "- command: `PYTHONPATH=. python experiments/check_cp_attention.py "
           f"--length {args.length}`", "",
           "| blocks | strategy | fwd+bwd ms | out | dq | dk | dv |", "|---|---|---|---|---|---|---|"]
  run_ref = value_and_grads(reference)
  lines.append(f"| cuDNN, one device | - | {median_ms(run_ref, q, k, v, d_out):.2f} | | | | |")
  for kernel in args.kernels.split(","):
    for strategy in ca.STRATEGIES:
      ca.KERNEL = kernel
      try:
        run = value_and_grads(sharded(strategy))
        out, grads = run(q, k, v, d_out)
        errors = [max_rel_diff(out, want_out)] + [max_rel_diff(g, w)
                                                  for g, w in zip(grads, want_grads)]
        ms = median_ms(run, q, k, v, d_out)
        lines.append(f"| {kernel} | {strategy} | {ms:.2f} | "
                     + " | ".join(f"{e:.1e}" for e in errors) + " |")
      except Exception as error:  # noqa: BLE001 - one row per failure, the others still run
        lines.append(f"| {kernel} | {strategy} | error: {str(error).splitlines()[0][:200]} |"
                     " | | | |")
      finally:
        ca.KERNEL = "auto"
      print(lines[-1], flush=True)
  report.emit(lines, args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
