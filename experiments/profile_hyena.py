"""Where the time of a Hyena-SE operator goes: cumulative pieces, forward+backward, on GPU.

  PYTHONPATH=. python experiments/profile_hyena.py [--lengths 16384,32768]

Pieces (each a jitted vjp with respect to x and every weight, B=1, D=4096, bf16):
  proj       z = x @ W_in, y = z[..., :D] @ W_out (the GEMM floor)
  +feat      z -> featurizer (3-tap depthwise conv on 3D channels)
  +split     + interleaved split and the gates without a convolution
  +kernel    + the Pallas gate-conv-gate (the full operator)
  kernel     the gate-conv-gate alone on contiguous inputs
  feat       the featurizer alone
"""

from __future__ import annotations

import argparse
import sys
import os

import jax
import jax.numpy as jnp

from pallas_kernels import blocked_conv
from sh2_jax.ops import hyena

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.timing import median_ms, vjp_fn  # noqa: E402



def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="16384,32768")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=256)
  args = parser.parse_args()
  d, dt = args.d_model, jnp.bfloat16
  key = jax.random.key(0)
  w_in = (jax.random.normal(key, (d, 3 * d)) * 0.02).astype(dt)
  w_out = (jax.random.normal(key, (d, d)) * 0.02).astype(dt)
  w_feat = jax.random.normal(key, (3 * d, 3)) * 0.5
  h = jax.random.normal(key, (args.groups, 7)) * 0.3

  def proj(x, w_in, w_out, w_feat, h):
    z = x @ w_in
    return z[..., :d] @ w_out

  def feat(x, w_in, w_out, w_feat, h):
    z = hyena.featurize(x @ w_in, w_feat)
    return z[..., :d] @ w_out

  def split_interleaved(z):  # columns 3i + s -> (post, pre, v): the activation-side split
    z = z.reshape(*z.shape[:-1], z.shape[-1] // 3, 3)
    return z[..., 0], z[..., 1], z[..., 2]

  def split(x, w_in, w_out, w_feat, h):
    post, pre, v = split_interleaved(hyena.featurize(x @ w_in, w_feat))
    return (post * pre * v) @ w_out

  def full(x, w_in, w_out, w_feat, h):
    post, pre, v = split_interleaved(hyena.featurize(x @ w_in, w_feat))
    return blocked_conv.gate_conv_gate_auto(post, pre, v, h) @ w_out

  def full_weight_split(x, w_in, w_out, w_feat, h):
    post, pre, v = hyena.project_and_featurize(x, w_in.reshape(d, 3, d), w_feat.reshape(3, d, 3))
    return blocked_conv.gate_conv_gate_auto(post, pre, v, h) @ w_out

  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| piece | L | fwd+bwd ms |\n|---|---|---|")
  for length in [int(x) for x in args.lengths.split(",")]:
    x = jax.random.normal(jax.random.fold_in(key, length), (1, length, d), dt)
    for name, f in (("proj", proj), ("+feat", feat), ("+split", split), ("+kernel (full SE)", full),
                    ("full SE, split on weights", full_weight_split)):
      print(f"| {name} | {length} | {median_ms(vjp_fn(f), x, w_in, w_out, w_feat, h):.2f} |", flush=True)
    z = jax.random.normal(key, (1, length, 3 * d), dt)
    post, pre, v = (jax.random.normal(jax.random.fold_in(key, i), (1, length, d), dt) for i in range(3))
    print(f"| featurizer alone | {length} | {median_ms(vjp_fn(hyena.featurize), z, w_feat):.2f} |")
    print(f"| split alone | {length} | "
          f"{median_ms(vjp_fn(lambda z: sum(split_interleaved(z))), z):.2f} |")
    kernel = lambda a, b, c, h: blocked_conv.gate_conv_gate_auto(a, b, c, h)
    print(f"| kernel alone | {length} | {median_ms(vjp_fn(kernel), post, pre, v, h):.2f} |", flush=True)
    jax.clear_caches()


if __name__ == "__main__":
  main()
