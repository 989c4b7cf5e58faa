"""Position-masked flash attention (Pallas) against cuDNN causal attention, one GPU.

Rows, B=1, 32 heads of 128 (D=4096), bf16, forward and forward+backward ms (median of
synchronised runs after warm-up):
- causal self-attention at each length: cuDNN (`jax.nn.dot_product_attention`, is_causal) and
  `pallas_kernels.flash_attention` with positions 0..L-1, and their max difference
  (output and gradients, relative to cuDNN's largest value);
- the all-gather context-parallel shape of CP=2 with zigzag at each length: L/2 queries
  (chunks 0 and 3 of 4) against all L keys, gathered rank by rank (the Pallas kernel only;
  cuDNN's causal mask cannot express it). Ideal: half of the causal self-attention time;
- with `--sweep`, the block sizes of the kernel at the largest length.

  PYTHONPATH=. python -m sh2_jax.cli bench attention [--lengths 16384,65536] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli_args import parse_lengths
from experiments.timing import median_ms
from pallas_kernels import flash_attention as fa
from sh2_jax.config import ConfigError

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _qkv(length_q: int, length_k: int, heads: int, head_dim: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (1, length_q, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, length_k, heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, length_k, heads, head_dim), jnp.bfloat16)
  dout = jax.random.normal(keys[3], (1, length_q, heads, head_dim), jnp.bfloat16)
  return q, k, v, dout


def _fwd_bwd(fn):
  def run(q, k, v, dout):
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(dout))
  return jax.jit(run)


def _cudnn(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _flash(pos_q, pos_k, block_sizes=None):
  return lambda q, k, v: fa.flash_attention(q, k, v, pos_q, pos_k, block_sizes=block_sizes)


def _max_rel_diff(got, want) -> float:
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                   / jnp.max(jnp.abs(w.astype(jnp.float32)))) for g, w in zip(got, want))


def _zigzag_positions(length: int) -> tuple[np.ndarray, np.ndarray]:
  chunk = length // 4
  ranges = lambda ids: np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in ids])
  return ranges((0, 3)).astype(np.int32), ranges((0, 3, 1, 2)).astype(np.int32)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench attention", description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="16384,65536")
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--sweep", action="store_true", help="time block sizes at the last length")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  lengths = parse_lengths(parser, "--lengths", args.lengths)
  if jax.default_backend() != "gpu":
    raise ConfigError(f"sh2 bench attention times cuDNN and the Pallas kernels on a GPU; the "
                      f"backend here is {jax.default_backend()!r}")
  device = jax.devices()[0].device_kind
  lines = ["# Flash attention (Pallas, position mask) vs cuDNN causal attention", "",
           f"- device: {device}, jax {jax.__version__}",
           f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           f"- shapes: B=1, {args.heads} heads x {args.head_dim}, bf16; ms are medians of "
           f"{args.iters} synchronised runs after warm-up",
           "- command: `PYTHONPATH=. python -m sh2_jax.cli bench attention "
           f"--lengths {args.lengths}{' --sweep' if args.sweep else ''}`", "",
           "| case | L | fwd ms | fwd+bwd ms | max rel. diff vs cuDNN |", "|---|---|---|---|---|"]

  def emit(line):
    lines.append(line)
    print(line, flush=True)

  for line in lines:
    print(line)
  for length in lengths:
    q, k, v, dout = _qkv(length, length, args.heads, args.head_dim)
    pos = jnp.arange(length, dtype=jnp.int32)
    results = {}
    for name, fn in (("cuDNN causal", _cudnn), ("Pallas flash, causal", _flash(pos, pos))):
      fwd, both = jax.jit(fn), _fwd_bwd(fn)
      results[name] = both(q, k, v, dout)
      t_fwd = median_ms(fwd, q, k, v, iters=args.iters)
      t_both = median_ms(both, q, k, v, dout, iters=args.iters)
      diff = ("" if name.startswith("cuDNN") else
              f"{_max_rel_diff(results[name], results['cuDNN causal']):.2e}")
      emit(f"| {name} | {length} | {t_fwd:.2f} | {t_both:.2f} | {diff} |")
    del results
    pos_q, pos_k = (jnp.asarray(p) for p in _zigzag_positions(length))
    q, k, v, dout = _qkv(length // 2, length, args.heads, args.head_dim)
    fn = _flash(pos_q, pos_k)
    t_fwd = median_ms(jax.jit(fn), q, k, v, iters=args.iters)
    t_both = median_ms(_fwd_bwd(fn), q, k, v, dout, iters=args.iters)
    emit(f"| Pallas flash, CP=2 all-gather rank 0 (L/2 zigzag queries, L keys) | {length} | "
         f"{t_fwd:.2f} | {t_both:.2f} | |")
  if args.sweep:
    length = lengths[-1]
    q, k, v, dout = _qkv(length, length, args.heads, args.head_dim)
    pos = jnp.arange(length, dtype=jnp.int32)
    emit("")
    emit(f"Block sizes at L={length} (causal):")
    emit("")
    emit("| forward: block_q, block_k, warps, stages | fwd ms | dK/dV: block_k, block_q; dQ: "
         "block_q, block_k; warps, stages | fwd+bwd ms |")
    emit("|---|---|---|---|")
    # (forward), (dK/dV keys, queries per step, dQ queries, keys per step, warps, stages)
    configs = [((128, 64, 8, 3), (64, 64, 64, 64, 4, 2)), ((128, 64, 8, 3), (128, 32, 128, 32, 8, 2)),
               ((128, 64, 8, 3), (128, 64, 128, 64, 8, 2)), ((128, 64, 8, 3), (64, 32, 64, 32, 4, 3)),
               ((128, 128, 8, 3), (64, 64, 64, 64, 4, 3)), ((128, 64, 4, 2), (64, 128, 128, 64, 8, 2))]
    for fwd_cfg, bwd_cfg in configs:
      bs = fa.FlashBlockSizes(*fwd_cfg, *bwd_cfg)
      fn = _flash(pos, pos, bs)
      try:
        t_fwd = median_ms(jax.jit(fn), q, k, v, iters=args.iters)
        t_both = median_ms(_fwd_bwd(fn), q, k, v, dout, iters=args.iters)
        emit(f"| {fwd_cfg} | {t_fwd:.2f} | {bwd_cfg} | {t_both:.2f} |")
      except Exception as err:  # a config Triton cannot compile (shared memory): report, go on
        emit(f"| {fwd_cfg} | error | {bwd_cfg} | {str(err).splitlines()[0][:80]} |")
  out = args.out or os.path.join(
      RESULTS, f"attention_{device.lower().replace(' ', '_').replace('-', '_')}.md")
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
