"""Session set-up: one persistent XLA compilation cache shared by the whole test run.

Many tests compile the same programs (the small model's train and eval steps in every
`train` test, the CLI subprocesses, the pytest-xdist workers): with JAX's persistent cache in a
directory made fresh for this session, each distinct program compiles once per run and its
later uses load the executable (test_resume_gives_identical_parameters alone: 42 -> 24 s on
2 CPU cores). The cache holds compiled programs keyed by their HLO and compile options, so a
changed trace (a poisoned kernel, another block size) is a different entry; nothing survives
the session. The controller sets the environment before it starts the workers, and child
processes inherit it.

The session also compiles at LLVM optimisation level 0 (helpers.SUBPROCESS_XLA_FLAGS, which the
multi-device subprocesses already used): the suite's programs are tiny and compile-bound, and
the tests compare IEEE results within tolerances, so ~30% less compile time costs nothing
(test_remat_gives_identical_loss_and_gradients plus the featurized modal kernels' float64
comparisons: 103 -> 72 s on 2 CPU cores). A level the caller set in XLA_FLAGS wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import helpers

CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config: pytest.Config) -> None:
  if hasattr(config, "workerinput"):
    return  # an xdist worker: it inherited the controller's environment
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} {helpers.SUBPROCESS_XLA_FLAGS}".strip()
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # the caller chose a cache
  cache_dir = tempfile.mkdtemp(prefix="sh2-jax-test-xla-cache-")
  config.stash[_CACHE_DIR] = cache_dir
  os.environ.update(CACHE_ENV, JAX_COMPILATION_CACHE_DIR=cache_dir)
  import jax  # noqa: PLC0415 - after the environment, for a jax imported before this hook
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config: pytest.Config) -> None:
  cache_dir = config.stash.get(_CACHE_DIR, None)
  if cache_dir is not None:
    shutil.rmtree(cache_dir, ignore_errors=True)


_CACHE_DIR = pytest.StashKey[str]()
