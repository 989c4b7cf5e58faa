"""Multi-host start-up through JAX's own runtime."""

from __future__ import annotations

import logging
import os

import jax

from sh2_jax.errors import UserError

logger = logging.getLogger(__name__)

COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


class DistributedError(UserError, ValueError):
  """The multi-process environment variables are inconsistent (one line)."""


def _env_int(names: tuple[str, ...]) -> int | None:
  for name in names:
    text = os.environ.get(name)
    if text:
      try:
        return int(text)
      except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer: set it to a whole number "
                               "(or unset it)") from None
  return None


def _use_gloo_on_cpu() -> None:
  """CPU processes exchange collectives through gloo over TCP (jax's default where it has one);
  set it explicitly when unset so multi-process CPU runs never fall back to "no collectives"."""
  try:
    if jax.config.jax_cpu_collectives_implementation is None:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # A jax without the option: nothing to choose.
    pass


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
    count = _env_int(("JAX_NUM_PROCESSES", "NUM_PROCESSES"))
    index = _env_int(("JAX_PROCESS_ID", "PROCESS_ID"))
    if count is not None and index is not None and not 0 <= index < count:
      raise DistributedError(f"process id {index} is outside [0, {count}): give each of the "
                             f"{count} processes a distinct JAX_PROCESS_ID from 0 to {count - 1}")
    kwargs = {"coordinator_address": address}
    if count is not None:
      kwargs["num_processes"] = count
    if index is not None:
      kwargs["process_id"] = index
  _use_gloo_on_cpu()
  jax.distributed.initialize(**kwargs)
  logger.info("distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def batch_rows(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
  """Which rows of every global batch this process must load: (index, count) meaning rows
  [index * B / count, (index + 1) * B / count).

  `count` is the number of distinct row blocks the processes hold under `sharding` (a [B, ...]
  batch sharding), not the process count: when an axis that does not split the batch
  (context, tensor) spans processes, those processes hold the same rows and must load the same
  data. One process, or data parallelism across processes: (process_index, process_count).
  """
  try:
    indices = sharding.devices_indices_map((batch_size, 1))
  except ValueError:  # jax's IndivisibleError: the batch does not split evenly.
    probe = sharding.devices_indices_map((sharding.num_devices, 1)).values()
    shards = len({index[0].indices(sharding.num_devices) for index in probe})
    raise DistributedError(f"train.batch_size={batch_size} does not split over the {shards} batch "
                           f"shards (data x fsdp) of the mesh: use a multiple of {shards}") from None
  rows: dict[int, set[int]] = {}
  for device, index in indices.items():
    start, stop, _ = index[0].indices(batch_size)
    rows.setdefault(device.process_index, set()).update(range(start, stop))
  blocks = sorted({tuple(sorted(r)) for r in rows.values()})
  count = len(blocks)
  if batch_size % count:
    raise DistributedError(f"train.batch_size={batch_size} does not split into the {count} row "
                           f"blocks the processes hold: use a multiple of {count}")
  expected = [tuple(range(i * batch_size // count, (i + 1) * batch_size // count))
              for i in range(count)]
  if blocks != expected:
    raise DistributedError(f"the mesh gives processes overlapping or non-contiguous batch rows "
                           f"({[(b[0], b[-1]) for b in blocks]}): order the devices so that each "
                           "process holds whole, contiguous data/fsdp shards")
  return expected.index(tuple(sorted(rows[jax.process_index()]))), count
