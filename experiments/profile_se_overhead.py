"""Where the Hyena-SE operator's time above the GEMM floor goes, forward+backward, on GPU.

  PYTHONPATH=. python experiments/profile_se_overhead.py [--lengths 4096,32768]

Each row is a jitted vjp with respect to x and every weight (B=1, D=4096, bf16 compute):
  floor                 the projections' six products alone (bench_ops.projection_products:
                        forward and backward with dense cotangents, bf16 weights)
  module f32 params     the HyenaSE Linen module as the model runs it (float32 params);
                        also with conv_method "pallas_fused" (the featurizer in the kernel)
  module bf16 params    the same module with bfloat16 params (no per-call weight casts)
  blocked: gemm+slices  one x @ W [D, 3D] with [post | pre | v] column blocks, slices, gates
  blocked: +feat        ... with the 3-tap featurizer on the [L, 3D] product
  blocked: +kernel      ... with the Pallas gate-conv-gate (the whole operator)
  fused SE/MR kernel    pallas_kernels.featurized_conv alone on z [B, L, 3D]: fwd, fwd+bwd

With --check, first compares the fused kernel with its plain-JAX reference on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.bench_ops import projection_inputs, projection_products  # noqa: E402
from experiments.timing import median_ms, vjp_fn  # noqa: E402
from pallas_kernels import blocked_conv, featurized_conv  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.layers.hyena import HyenaSE  # noqa: E402
from sh2_jax.ops import hyena  # noqa: E402



def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="4096,32768")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=256)
  parser.add_argument("--check", action="store_true")
  args = parser.parse_args()
  d, dt = args.d_model, jnp.bfloat16
  key = jax.random.key(0)
  w_in = (jax.random.normal(key, (d, 3 * d)) * 0.02).astype(dt)
  w_out = (jax.random.normal(key, (d, d)) * 0.02).astype(dt)
  w_feat = jax.random.normal(key, (3 * d, 3)) * 0.5
  h = jax.random.normal(key, (args.groups, 7)) * 0.3

  def gemm_slices(x, w_in, w_out, w_feat, h):
    z = x @ w_in
    return (z[..., :d] * z[..., d:2 * d] * z[..., 2 * d:]) @ w_out

  def gemm_feat(x, w_in, w_out, w_feat, h):
    f = hyena.featurize(x @ w_in, w_feat)
    return (f[..., :d] * f[..., d:2 * d] * f[..., 2 * d:]) @ w_out

  def gemm_feat_kernel(x, w_in, w_out, w_feat, h):
    f = hyena.featurize(x @ w_in, w_feat)
    return blocked_conv.gate_conv_gate_auto(f[..., :d], f[..., d:2 * d], f[..., 2 * d:], h) @ w_out

  config = ModelConfig(d_model=d, num_heads=32, se_groups=args.groups, layout="SE",
                       dtype="bfloat16", param_dtype="float32", conv_method="pallas")

  def module_fn(param_dtype, method="pallas"):
    module = HyenaSE(dataclasses.replace(config, param_dtype=param_dtype, conv_method=method))
    x0 = jnp.zeros((1, 128, d), dt)
    params = nn.meta.unbox(jax.jit(module.init)(key, x0)["params"])
    return vjp_fn(lambda p, x: module.apply({"params": p}, x)), params

  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  if args.check:
    check(key)
  print("| piece | L | fwd+bwd ms |\n|---|---|---|")
  for length in [int(x) for x in args.lengths.split(",")]:
    x = jax.random.normal(jax.random.fold_in(key, length), (1, length, d), dt)
    floor_ms = median_ms(jax.jit(projection_products), *projection_inputs(x, key))
    print(f"| floor | {length} | {floor_ms:.2f} |", flush=True)
    for name, f in (("blocked: gemm+slices+gates", gemm_slices),
                    ("blocked: +feat", gemm_feat), ("blocked: +kernel", gemm_feat_kernel)):
      print(f"| {name} | {length} | {median_ms(vjp_fn(f), x, w_in, w_out, w_feat, h):.2f} |",
            flush=True)
    z = jax.random.normal(key, (1, length, 3 * d), dt)
    for name, taps, dskip in (("SE", 7, None), ("MR", 128, jnp.ones((d,)))):
      hk = jax.random.normal(key, (args.groups, taps)) * 0.1
      fn = lambda z, w, hk: featurized_conv.featurized_gate_conv_gate_pallas(z, w, hk, dskip)
      fwd = median_ms(jax.jit(fn), z, w_feat, hk)
      both = median_ms(vjp_fn(fn), z, w_feat, hk)
      print(f"| fused {name} kernel fwd / fwd+bwd / bwd/fwd | {length} | {fwd:.2f} / {both:.2f} / "
            f"{(both - fwd) / fwd:.2f} |", flush=True)
    for pdt in ("float32", "bfloat16"):
      fn, params = module_fn(pdt)
      print(f"| module {pdt} params | {length} | {median_ms(fn, params, x):.2f} |", flush=True)
    fn, params = module_fn("float32", "pallas_fused")
    print(f"| module float32 params, pallas_fused | {length} | {median_ms(fn, params, x):.2f} |",
          flush=True)
    jax.clear_caches()


def check(key: jax.Array) -> None:
  """Fused kernel vs its plain-JAX reference on this device: output and gradients."""
  for dtype, taps, tol in ((jnp.float32, 7, 1e-5), (jnp.bfloat16, 7, 2e-2), (jnp.bfloat16, 128, 2e-2),
                           (jnp.float32, 128, 1e-5)):
    keys = jax.random.split(jax.random.fold_in(key, taps), 5)
    z = jax.random.normal(keys[0], (2, 1000, 3 * 512), dtype)
    w = jax.random.normal(keys[1], (3 * 512, 3)) * 0.5
    hk = jax.random.normal(keys[2], (8, taps)) / taps ** 0.5
    dskip = jax.random.normal(keys[3], (512,))
    ct = jax.random.normal(keys[4], (2, 1000, 512), dtype)
    outs = []
    for fn in (featurized_conv.featurized_gate_conv_gate_pallas,
               lambda *a: featurized_conv.featurized_gate_conv_gate(*a, chunk=128)):
      with jax.default_matmul_precision("highest"):
        out, pullback = jax.vjp(fn, z, w, hk, dskip)
        outs.append((out, *pullback(ct)))
    errs = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
            for a, b in zip(*outs)]
    status = "ok" if max(errs) < tol else "FAIL"
    print(f"check {jnp.dtype(dtype).name} K={taps}: rel err out,dz,dw,dh,ddskip = "
          + ", ".join(f"{e:.1e}" for e in errs) + f" (tol {tol}) {status}", flush=True)


if __name__ == "__main__":
  main()
