"""Checkpoints with orbax: train state plus the grain data-iterator state, keep-last-N.

Each save is atomic (orbax writes a temporary directory and renames it when complete), so a
run killed between or during saves resumes from the last complete checkpoint.

Every process of a multi-host run writes its shards of the state into the one directory (orbax
coordinates), and grain writes one iterator file per process (`process_<i>-of-<n>.json`).
Restoring reads the arrays straight into the shardings of the abstract state given, so a
checkpoint written on one mesh shape (or process count) resumes on any other. The iterator
state of our pipeline is the index of the next global batch, the same in every process, so a
run may also resume with a different number of processes (see `_shared_data_state`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sh2_jax.errors import UserError
from sh2_jax.inference.checkpoint import stored_array_metadata
from sh2_jax.layers.params import stored_shape_mismatch
from sh2_jax.train.state import TrainState

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be restored as asked (one line)."""


class Checkpointer:
  """Saves and restores (TrainState, data iterator) under `directory/<step>`."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_iterator: Any | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))
    logger.info("checkpoint saved: step %d -> %s", step, self.directory)

  def restore(self, step: int, abstract_state: TrainState,
              data_iterator: Any | None = None) -> TrainState:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs), and the
    data iterator in place when given."""
    stored = stored_array_metadata(os.path.join(self.directory, str(step), "state"))
    reason = stored_shape_mismatch(stored, abstract_state)
    if reason:
      raise CheckpointError(f"checkpoint step {step} in {self.directory!r}: {reason}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    shared_data = None
    if data_iterator is not None:
      own = self._data_file(step, jax.process_index(), jax.process_count())
      if os.path.isfile(own):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        shared_data = self._shared_data_state(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if shared_data is not None:
      data_iterator.set_state(shared_data)
      if hasattr(data_iterator, "start_prefetch"):
        data_iterator.start_prefetch()
    logger.info("checkpoint restored: step %d from %s", step, self.directory)
    return restored["state"]

  def _data_file(self, step: int, process_index: int, process_count: int) -> str:
    return os.path.join(self.directory, str(step), "data",
                        f"process_{process_index}-of-{process_count}.json")

  def _shared_data_state(self, step: int) -> dict[str, Any]:
    """The iterator state of a checkpoint written by a different number of processes.

    Valid because every process of our pipeline saves the same state (the next global batch);
    errors if the saved files disagree or are missing.
    """
    directory = os.path.join(self.directory, str(step), "data")
    names = sorted(n for n in os.listdir(directory) if n.startswith("process_")) \
        if os.path.isdir(directory) else []
    if not names:
      raise CheckpointError(f"checkpoint step {step} in {self.directory!r} has no data-iterator "
                            "state: restore without the data iterator or pick another step")
    states = []
    for name in names:
      with open(os.path.join(directory, name)) as f:
        states.append(json.load(f))
    if any(state != states[0] for state in states):
      raise CheckpointError(f"checkpoint step {step}: the processes saved different data-iterator "
                            f"states ({names}); resume with the process count that wrote it")
    logger.info("data iterator state %s from the %d file(s) of another process count", states[0],
                len(names))
    return states[0]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
