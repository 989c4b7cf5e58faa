"""What float32 parameters cost a projection: the weight's casts and column reorder (GPU).

  PYTHONPATH=. python experiments/probe_weight_casts.py [--lengths 4096,8192] [--d-model 4096]
      [--iters 10] [--out FILE] [--dry-run]

The Hyena in-projection z = x @ W (W [D, 3D]) forward and backward (z, dx, dW for a random
cotangent), as device time per kernel from a profiler trace, for:

- bf16 weight: W stored in bf16 (the GEMM floor of `sh2 bench ops`);
- bf16, interleaved + reorder: W bf16 with interleaved columns, reordered into blocks per call
  (SE's fused path with bf16 parameters while in_proj was stored interleaved, [D, 3D]);
- float32, interleaved + reorder: W float32 with interleaved columns, cast and reordered into
  [post | pre | v] blocks per call (SE's fused path while in_proj was stored interleaved);
- float32, blocked: W float32 in blocked column order, cast per call (SE's fused path since
  in_proj is stored [D, 3, D]: its reshape to [D, 3D] is blocked);
- float32, blocked, float32 dW: as above, with the weight gradient written by the GEMM in
  float32 (`jax.custom_vjp`, preferred_element_type) instead of a bf16 GEMM plus a cast;
- float32, blocked, float32 dW in row chunks: the same gradient as a batched product over
  chunks of `--chunk-rows` rows (each chunk's [D, 3D] float32 partial) summed after it: a
  candidate for long L, where SE with float32 params fell 9-13% behind bf16 params at 128K
  (ops_nvidia_h100_80gb_hbm3.md, eighteenth run) while the float32 GEMM contracts all L rows.

Every variant's (z, dx, dW) is checked against the bf16-weight variant's.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import tempfile
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import profile_trace  # noqa: E402  (sets XLA_FLAGS: one trace event per kernel)
from experiments.cli_args import parse_lengths  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


Projection = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@jax.custom_vjp
def project_f32_grad(x_LD: jax.Array, w_DE: jax.Array) -> jax.Array:
  """x @ w.astype(x.dtype), whose weight gradient the GEMM writes in w's dtype (float32)."""
  return x_LD @ w_DE.astype(x_LD.dtype)


def _project_fwd(x_LD, w_DE):
  w_view = w_DE.astype(x_LD.dtype)
  return x_LD @ w_view, (x_LD, w_view)


def _project_bwd(residuals, dz_LE):
  x_LD, w_view = residuals
  dx_LD = dz_LE @ w_view.T
  dw_DE = jax.lax.dot_general(x_LD, dz_LE, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
  return dx_LD, dw_DE


project_f32_grad.defvjp(_project_fwd, _project_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project_f32_grad_chunked(x_LD: jax.Array, w_DE: jax.Array, chunk_rows: int) -> jax.Array:
  """project_f32_grad with dW summed over chunks of `chunk_rows` rows (one chunk where L is
  not a multiple of it)."""
  return x_LD @ w_DE.astype(x_LD.dtype)


def _project_chunked_fwd(x_LD, w_DE, chunk_rows):
  return _project_fwd(x_LD, w_DE)


def _project_chunked_bwd(chunk_rows, residuals, dz_LE):
  x_LD, w_view = residuals
  length = x_LD.shape[0]
  chunks = length // chunk_rows if length % chunk_rows == 0 else 1
  x_NCD = x_LD.reshape(chunks, length // chunks, -1)
  dz_NCE = dz_LE.reshape(chunks, length // chunks, -1)
  dw_NDE = jax.lax.dot_general(x_NCD, dz_NCE, (((1,), (1,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)
  return dz_LE @ w_view.T, dw_NDE.sum(axis=0)


project_f32_grad_chunked.defvjp(_project_chunked_fwd, _project_chunked_bwd)


def _vjp(view: Callable[[jax.Array], jax.Array] | None,
         custom: Callable[[jax.Array, jax.Array], jax.Array] | None = None) -> Projection:
  def run(x, w, dz):
    if custom is not None:
      z, pull = jax.vjp(custom, x, w)
    else:
      z, pull = jax.vjp(lambda x, w: x @ view(w), x, w)
    dx, dw = pull(dz)
    return z, dx, dw
  return jax.jit(run)


def variants(dtype: jnp.dtype, chunk_rows: int = 32768) -> dict[str, tuple[Projection, str]]:
  """{name: (fn(x, w, dz) -> (z, dx, dW), weight storage)}; storage "bf16" (blocked columns),
  "bf16_interleaved", "interleaved" (float32, interleaved columns) or "blocked" (float32,
  blocked columns); `chunk_rows` for the chunked float32 dW."""
  def interleaved_view(w):
    return _blocked(w.astype(dtype))
  return {
      "bf16 weight (floor)": (_vjp(lambda w: w), "bf16"),
      "bf16, interleaved + reorder": (_vjp(interleaved_view), "bf16_interleaved"),
      "float32, interleaved + reorder": (_vjp(interleaved_view), "interleaved"),
      "float32, blocked (today)": (_vjp(lambda w: w.astype(dtype)), "blocked"),
      "float32, blocked, float32 dW": (_vjp(None, custom=project_f32_grad), "blocked"),
      "float32, blocked, float32 dW in row chunks": (
          _vjp(None, custom=lambda x, w: project_f32_grad_chunked(x, w, chunk_rows)), "blocked"),
  }


def _interleave(w_blocked_DE: jax.Array) -> jax.Array:
  """Blocked columns [post | pre | v] -> interleaved (3i + s), the inverse of `_blocked`."""
  d = w_blocked_DE.shape[0]
  return jnp.swapaxes(w_blocked_DE.reshape(d, 3, d), 1, 2).reshape(d, 3 * d)


def _blocked(w_interleaved_DE: jax.Array) -> jax.Array:
  """Interleaved columns (3i + s) -> blocks [post | pre | v] (the per-call reorder measured)."""
  d = w_interleaved_DE.shape[0]
  return jnp.swapaxes(w_interleaved_DE.reshape(d, d, 3), 1, 2).reshape(d, 3 * d)


def kernels_per_call(fn: Callable[..., Any], args: tuple, iters: int) -> dict[str, float]:
  """{HLO op: device ms per call} of fn(*args), from a profiler trace of `iters` calls."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        jax.block_until_ready(fn(*args))
    totals_ns, _ = profile_trace.kernel_times(trace_dir)
  return {name: ns / iters / 1e6 for name, ns in totals_ns.items()}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192")
  parser.add_argument("--d-model", type=int, default=4096)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--chunk-rows", type=int, default=32768,
                      help="rows per chunk of the chunked float32 dW (one chunk where L is not "
                           "a multiple)")
  parser.add_argument("--out", default=None, help="markdown file (default: print only)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
  args = parser.parse_args(argv)
  lengths = [64] if args.dry_run else parse_lengths(parser, "--lengths", args.lengths)
  d = 32 if args.dry_run else args.d_model
  dtype = jnp.bfloat16
  device = jax.devices()[0].device_kind
  lines = [f"# Float32 parameters in a projection: casts and column reorder (D={d})", "",
           f"- device: {device}, jax {jax.__version__}, "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
           "- command: `PYTHONPATH=. python3 experiments/probe_weight_casts.py "
           f"{' '.join(argv or sys.argv[1:])}`",
           "- z = x @ W, W [D, 3D]; forward + backward (z, dx, dW for a random bf16 cotangent), "
           f"bf16 compute; device ms per call from a profiler trace of {args.iters} calls", "",
           "| L | weight | device ms | over the bf16 weight | kernels (ms) |",
           "|---|---|---|---|---|"]
  for length in lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    x = jax.random.normal(keys[0], (length, d), jnp.float32).astype(dtype)
    dz = jax.random.normal(keys[1], (length, 3 * d), jnp.float32).astype(dtype)
    w_blocked = 0.02 * jax.random.normal(keys[2], (d, 3 * d), jnp.float32)
    weights = {"bf16": w_blocked.astype(dtype), "blocked": w_blocked,
               "interleaved": _interleave(w_blocked),
               "bf16_interleaved": _interleave(w_blocked.astype(dtype))}
    reference = None
    floor_ms = None
    for name, (fn, storage) in variants(dtype, 16 if args.dry_run else args.chunk_rows).items():
      z, dx, dw = fn(x, weights[storage], dz)
      if storage in ("interleaved", "bf16_interleaved"):
        dw = _blocked(dw)
      got = [np.asarray(a, np.float32) for a in (z, dx, dw)]
      if reference is None:
        reference = got
      errors = [float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, reference)]
      if max(errors) > 2e-2:
        raise SystemExit(f"{name} at L={length} differs from the bf16-weight projection: "
                         f"relative errors z, dx, dW = {errors}")
      kernels = kernels_per_call(fn, (x, weights[storage], dz), args.iters)
      total = sum(kernels.values())
      floor_ms = total if floor_ms is None else floor_ms
      listed = ", ".join(f"{k} {v:.3f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
      lines.append(f"| {length} | {name} | {total:.3f} | {total - floor_ms:+.3f} | {listed} |")
      print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
