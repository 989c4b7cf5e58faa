"""Block-size sweep of the fused featurizer + gate-conv-gate kernels on GPU (B=1, D=4096, bf16).

  PYTHONPATH=. python experiments/tune_featurized_conv.py [--lengths 32768] [--taps 7,128]

Prints forward and forward+backward ms of the kernel alone (z [B, L, 3D] -> out [B, L, D],
gradients for z, taps, filter, skip) per BlockSizes, next to the unfused pair (XLA
featurizer + blocked_conv kernel) for reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.timing import median_ms, vjp_fn  # noqa: E402
from pallas_kernels import blocked_conv as bc  # noqa: E402
from pallas_kernels import featurized_conv as fc  # noqa: E402
from pallas_kernels import featurized_short_conv as fsc  # noqa: E402



def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="32768")
  parser.add_argument("--taps", default="7,128")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--groups", type=int, default=256)
  parser.add_argument("--quick", action="store_true", help="only the unfused pair and the defaults")
  args = parser.parse_args()
  d = args.d_model
  key = jax.random.key(0)
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| K | L | config | fwd ms | fwd+bwd ms | bwd/fwd |\n|---|---|---|---|---|---|")
  for length, taps in itertools.product([int(x) for x in args.lengths.split(",")],
                                        [int(x) for x in args.taps.split(",")]):
    z = jax.random.normal(key, (1, length, 3 * d), jnp.bfloat16)
    w = jax.random.normal(key, (3 * d, 3)) * 0.5
    h = jax.random.normal(key, (args.groups, taps)) * 0.1
    dskip = jnp.ones((d,))

    def report(name, fn):
      try:
        fwd = median_ms(jax.jit(fn), z, w, h)
        both = median_ms(vjp_fn(fn), z, w, h)
        print(f"| {taps} | {length} | {name} | {fwd:.3f} | {both:.3f} | {(both - fwd) / fwd:.2f} |",
              flush=True)
      except Exception as error:  # noqa: BLE001 - a config that does not compile is a row
        print(f"| {taps} | {length} | {name} | {str(error).splitlines()[0][:80]} | | |", flush=True)

    def unfused(z, w, h):
      post, pre, v = fc.featurize_streams(z, w)
      return bc.gate_conv_gate_pallas(post, pre, v, h, dskip)

    report("unfused: XLA featurizer + blocked_conv", unfused)
    chunk = 64 if taps <= 64 else 128
    widest = min(64, d // args.groups)  # a channel tile lies in one group
    configs = [(dc, wb, sb, sf) for dc in sorted({16, widest}) for wb, sb in ((4, 1), (4, 2), (8, 2))
               for sf in (2, 4)]
    for block_c, warps_b, stages_b, stages_f in ([] if args.quick else configs):
      bs = bc.BlockSizes(chunk=chunk, block_c=block_c, num_warps_bwd=warps_b,
                         num_stages_bwd=stages_b, num_stages_fwd=stages_f)
      report(f"dc={block_c} bwd warps={warps_b} stages={stages_b} fwd stages={stages_f}",
             lambda z, w, h, bs=bs: fc.featurized_gate_conv_gate_pallas(z, w, h, dskip, block_sizes=bs))
    report("defaults", lambda z, w, h: fc.featurized_gate_conv_gate_pallas(z, w, h, dskip))
    report("defaults, tap_grads=kernel",
           lambda z, w, h: fc.featurized_gate_conv_gate_pallas(z, w, h, dskip, tap_grads="kernel"))
    report("defaults, layout=interleaved (strided stream columns)",
           lambda z, w, h: fc.featurized_gate_conv_gate_pallas(z, w, h, dskip, layout="interleaved"))
    if taps <= fsc.MAX_TAPS:
      for layout in fc.LAYOUTS:
        report(f"direct FIR (featurized_short_conv), layout={layout}",
               lambda z, w, h, layout=layout: fsc.featurized_short_conv_pallas(z, w, h, dskip,
                                                                               layout=layout))
    jax.clear_caches()


if __name__ == "__main__":
  main()
