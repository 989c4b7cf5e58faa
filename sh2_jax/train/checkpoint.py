"""Checkpoints with orbax: train state plus the grain data-iterator state, keep-last-N.

Each save is atomic (orbax writes a temporary directory and renames it when complete), so a
run killed between or during saves resumes from the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from sh2_jax.train.state import TrainState

logger = logging.getLogger(__name__)


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
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logger.info("checkpoint restored: step %d from %s", step, self.directory)
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
