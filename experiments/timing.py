"""Timing for the benchmarks: median wall time of synchronised runs after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def median_ms(fn: Callable[..., Any], *args: Any, warmup: int = 2, iters: int = 10,
              max_seconds: float | None = None) -> float:
  """Median ms of fn(*args) with block_until_ready, after `warmup` calls (compilation).

  With max_seconds, stops early (after at least 3 timed calls) once that much time has passed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  deadline = None if max_seconds is None else time.perf_counter() + max_seconds
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
    if deadline is not None and time.perf_counter() > deadline and len(times) >= 3:
      break
  return statistics.median(times)


def random_cotangent(like: jax.Array, key: jax.Array | None = None) -> jax.Array:
  """A standard-normal cotangent shaped and typed like `like`, for timing a backward pass
  (random like a training step's, not a constant that XLA's simplifier could exploit)."""
  key = jax.random.key(7) if key is None else jax.random.fold_in(key, 7)
  return jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype)


def vjp_fn(f: Callable[..., Any]) -> Callable[..., Any]:
  """A function running f forward and backward (jitted) for timing fwd+bwd: returns (output,
  gradients), the output too so that its last operations are not dead code; the cotangent is
  random_cotangent of f's output, drawn once per argument signature and passed as an argument."""

  @jax.jit
  def run(ct, *args):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(ct)

  cotangents: dict[Any, Any] = {}

  def call(*args):
    signature = tuple((getattr(a, "shape", None), getattr(a, "dtype", None)) for a in jax.tree.leaves(args))
    if signature not in cotangents:
      cotangents[signature] = jax.tree.map(random_cotangent, jax.eval_shape(f, *args))
    return run(cotangents[signature], *args)

  return call


def child_failure(stderr: str) -> str:
  """One line for why a benchmark's child process gave no result: "OOM", "CUDA illegal
  address" (a fault that poisons the process), or its last error line."""
  if "RESOURCE_EXHAUSTED" in stderr or "out of memory" in stderr.lower():
    return "OOM"
  if "ILLEGAL_ADDRESS" in stderr:
    return "CUDA illegal address"
  errors = [line.strip() for line in stderr.splitlines() if "error" in line.lower()]
  return errors[-1][:200] if errors else stderr.strip()[-200:]
