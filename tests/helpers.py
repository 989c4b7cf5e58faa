"""Shared test helpers: seeded inputs, float64 comparisons, gradients of random functionals."""

from __future__ import annotations

import functools
import json
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


@pytest.fixture
def x64():
  """Use as `pytestmark = pytest.mark.usefixtures("x64")`: x64 for one module only (other
  test files run in float32 in the same process)."""
  with jax.enable_x64(True):
    yield


# XLA flags of the test subprocesses on fake CPU devices: LLVM at optimisation level 0 compiles
# their multi-device programs ~30% faster (test_model_cp's script: 73 -> 52 s on 2 CPU cores)
# and runs them slower, which these compile-bound tiny models do not notice; numerics are the
# same IEEE operations (their tests compare within float32 tolerances).
SUBPROCESS_XLA_FLAGS = "--xla_backend_optimization_level=0"


def optimizing_env(**extra: str) -> dict[str, str]:
  """os.environ for a child process that compiles with XLA's default LLVM optimisation (the
  session compiles at level 0, see conftest): for the few tests that run many steps, where
  execution, not compilation, sets the time."""
  flags = os.environ.get("XLA_FLAGS", "").replace(SUBPROCESS_XLA_FLAGS, "").strip()
  return dict(os.environ, **extra, XLA_FLAGS=flags)


def fake_devices_env(count: int, **extra: str) -> dict[str, str]:
  """os.environ for a child process on `count` fake CPU devices (plus `extra` variables)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", **extra,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={count} {SUBPROCESS_XLA_FLAGS}")


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str,
                     compute: Callable[[], Any], timeout: float = 900.0) -> Any:
  """compute() once per test session, shared by the pytest-xdist workers (JSON-able result).

  A module fixture otherwise runs once in every worker that gets one of its tests; for the
  multi-device subprocesses that doubles minutes of CI. The first worker computes (holding an
  O_EXCL lock file in the session's shared temp root) and the others wait for its result.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    return compute()
  root = tmp_path_factory.getbasetemp().parent  # the session's root, shared by its workers
  result, lock = root / f"{name}.json", root / f"{name}.lock"
  try:
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    deadline = time.time() + timeout
    while not result.exists():
      if time.time() > deadline:
        raise TimeoutError(f"{name}: no result from the worker computing it after {timeout} s")
      time.sleep(0.5)
    value = json.loads(result.read_text())
    if isinstance(value, dict) and "__error__" in value:
      raise RuntimeError(f"{name} failed in another worker: {value['__error__']}")
    return value
  try:
    value = compute()
  except BaseException as error:
    payload = {"__error__": f"{type(error).__name__}: {str(error)[-3000:]}"}
    _write_atomically(result, json.dumps(payload))
    raise
  _write_atomically(result, json.dumps(value))
  return value


def _write_atomically(path, text: str) -> None:
  partial = path.with_suffix(".partial")
  partial.write_text(text)
  os.replace(partial, path)


def seeded_rng(*key: object) -> np.random.Generator:
  """A generator seeded from the test's own key: fresh inputs per case, reproducible runs."""
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str,
                 scale: float = 1.0) -> tuple[jax.Array, np.ndarray]:
  """A random jax array in `dtype` and its exact value in float64."""
  x = jnp.asarray(scale * rng.standard_normal(shape), DTYPES[dtype])
  return x, np.asarray(x).astype(np.float64)


def assert_close(actual, expected, tol: tuple[float, float], err_msg: str = "") -> None:
  """rtol, and atol as a fraction of max |expected|, compared in float64."""
  rtol, atol = tol
  expected = np.asarray(expected, np.float64)
  actual = np.asarray(actual).astype(np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg)


def jax_vjp(fn: Callable, args: tuple, cot: np.ndarray, argnums: tuple[int, ...]) -> tuple:
  """Gradient of sum(fn(*args) * cot) wrt args[argnums], as float64 numpy arrays."""
  def functional(*a):
    return jnp.sum(fn(*a).astype(jnp.float64) * jnp.asarray(cot))
  grads = jax.jit(jax.grad(functional, argnums=argnums))(*args)
  return tuple(np.asarray(g).astype(np.float64) for g in grads)


def np_causal_conv(x_BLC: np.ndarray, h_GK: np.ndarray) -> np.ndarray:
  """y[b, t, c] = sum_{k <= t} h[c // dg, k] x[b, t - k, c], one output position at a time."""
  _, length, channels = x_BLC.shape
  groups, taps = h_GK.shape
  h_CK = np.repeat(h_GK, channels // groups, axis=0)
  y = np.zeros_like(x_BLC)
  for t in range(length):
    n = min(taps, t + 1)
    window = x_BLC[:, t - n + 1:t + 1][:, ::-1]  # window[:, k] = x[t - k]
    y[:, t] = np.einsum("bkc,ck->bc", window, h_CK[:, :n])
  return y


class _PallasWithFixedProgramIds:
  """The pallas module, but program_id returns given values (interpret mode cannot
  evaluate program_id inside the pl.when branch that the wrapped kernel runs in)."""

  def __init__(self, pallas_module, program_ids):
    self._pallas = pallas_module
    self._program_ids = program_ids

  def program_id(self, axis):
    return self._program_ids[axis]

  def __getattr__(self, name):
    return getattr(self._pallas, name)


def skip_one_program(kernel: Callable, kernel_module, skipped: tuple[int, ...]) -> Callable:
  """Wraps a Pallas kernel of `kernel_module` so that the program with ids `skipped` (one per
  grid axis) writes nothing: interpret mode fills outputs with NaN, so a reference comparison
  of the result must then fail. Used to prove that the kernel tests catch unwritten tiles."""
  from jax.experimental import pallas as pl

  def wrapped(*refs, **kwargs):
    program_ids = [pl.program_id(axis) for axis in range(len(skipped))]
    skip = functools.reduce(jnp.logical_and, [i == s for i, s in zip(program_ids, skipped)])

    @pl.when(jnp.logical_not(skip))
    def _():
      kernel_module.pl = _PallasWithFixedProgramIds(pl, program_ids)
      try:
        kernel(*refs, **kwargs)
      finally:
        kernel_module.pl = pl

  return wrapped


def assert_module_matches_direct(module_cls, config, method: str, shape_BLD: tuple[int, int, int],
                                 seed: int, tol: float = 1e-5) -> None:
  """A Hyena module with conv_method=`method` == the same module with "direct": output and
  every parameter and input gradient (float32, highest matmul precision, fresh inputs)."""
  import dataclasses

  import flax.linen as nn

  x = jax.random.normal(jax.random.key(seed), shape_BLD)
  ct = jax.random.normal(jax.random.key(seed + 1), shape_BLD)
  params = nn.meta.unbox(module_cls(config).init(jax.random.key(seed + 2), x)["params"])
  results = []
  for conv_method in (method, "direct"):
    module = module_cls(dataclasses.replace(config, conv_method=conv_method))
    with jax.default_matmul_precision("highest"):
      out, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
      results.append(jax.tree_util.tree_leaves((out, vjp(ct))))
  for got, want in zip(*results):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got))
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def masked_attention_float64(q, k, v, pos_q, pos_k, dout):
  """Softmax attention with the position mask (query i sees key j iff pos_q[i] >= pos_k[j])
  in float64: (out, lse, dq, dk, dv) for the cotangent dout; q [B, Q, N, H], k, v [B, K, N, H].
  A query that sees no key gets out 0, lse -inf."""
  q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
  scale = 1.0 / np.sqrt(q.shape[-1])
  s = np.einsum("bqnh,bknh->bnqk", q, k) * scale
  seen = np.asarray(pos_q)[:, None] >= np.asarray(pos_k)[None, :]
  s = np.where(seen, s, -np.inf)
  top = np.max(s, axis=-1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  e = np.where(seen, np.exp(s - top), 0.0)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)
  with np.errstate(divide="ignore"):
    lse = (np.log(total) + top)[..., 0]
  out = np.einsum("bnqk,bknh->bqnh", p, v)
  dp = np.einsum("bqnh,bknh->bnqk", dout, v)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = np.einsum("bnqk,bknh->bqnh", ds, k) * scale
  dk = np.einsum("bnqk,bqnh->bknh", ds, q) * scale
  dv = np.einsum("bnqk,bqnh->bknh", p, dout)
  return out, lse, dq, dk, dv


def cudnn_contract_forward(q, k, v, causal, scale):
  """float32 stand-in for `cudnn_blocks.block_forward` (CPU tests): (o [B, T, N, H], lse
  [B, N, T]) of an unmasked or top-left causal block."""
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), v)
  return out.astype(q.dtype), lse


def cudnn_contract_backward(q, k, v, out, lse, d_out, causal, scale):
  """float32 stand-in for `cudnn_blocks.block_backward`: (dq, dk, dv) of a block given the
  queries' FINAL output and lse."""
  s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  p = jnp.exp(s - lse[..., None])
  if causal:
    p = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), p, 0.0)
  delta = jnp.einsum("btnh,btnh->bnt", d_out, out)
  ds = p * (jnp.einsum("btnh,bsnh->bnts", d_out, v) - delta[..., None])
  return (jnp.einsum("bnts,bsnh->btnh", ds, k) * scale, jnp.einsum("bnts,btnh->bsnh", ds, q) * scale,
          jnp.einsum("bnts,btnh->bsnh", p, d_out))
