"""Multi-host start-up through JAX's own runtime."""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def maybe_initialize() -> bool:
  """Calls `jax.distributed.initialize` when a coordinator is configured in the environment.

  Reads JAX_COORDINATOR_ADDRESS (or COORDINATOR_ADDRESS), JAX_NUM_PROCESSES / NUM_PROCESSES and
  JAX_PROCESS_ID / PROCESS_ID; cluster environments JAX detects itself (SLURM, ...) need only
  the address to be unset and SH2_DISTRIBUTED=1. Returns True if it initialised.
  """
  address = next((os.environ[v] for v in COORDINATOR_VARS if os.environ.get(v)), None)
  if address is None and os.environ.get("SH2_DISTRIBUTED") != "1":
    return False
  kwargs = {}
  if address is not None:
    count = os.environ.get("JAX_NUM_PROCESSES") or os.environ.get("NUM_PROCESSES")
    index = os.environ.get("JAX_PROCESS_ID") or os.environ.get("PROCESS_ID")
    kwargs = {"coordinator_address": address}
    if count is not None:
      kwargs["num_processes"] = int(count)
    if index is not None:
      kwargs["process_id"] = int(index)
  jax.distributed.initialize(**kwargs)
  logger.info("distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True
