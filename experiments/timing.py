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


def vjp_fn(f: Callable[..., Any]) -> Callable[..., Any]:
  """A jitted function running f forward and backward (cotangent ones) for timing fwd+bwd."""

  def run(*args):
    out, pullback = jax.vjp(f, *args)
    return pullback(jnp.ones_like(out))

  return jax.jit(run)


def child_failure(stderr: str) -> str:
  """One line for why a benchmark's child process gave no result: "OOM", "CUDA illegal
  address" (a fault that poisons the process), or its last error line."""
  if "RESOURCE_EXHAUSTED" in stderr or "out of memory" in stderr.lower():
    return "OOM"
  if "ILLEGAL_ADDRESS" in stderr:
    return "CUDA illegal address"
  errors = [line.strip() for line in stderr.splitlines() if "error" in line.lower()]
  return errors[-1][:200] if errors else stderr.strip()[-200:]
