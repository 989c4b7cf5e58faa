"""Model directories for inference: a `sh2 train` run directory or a `sh2 convert` output.

  run directory:        config.json + checkpoints/<step>/state (train state; params restored)
  converted directory:  config.json + params/ (an Orbax checkpoint of the parameter tree)

Neither path imports grain (the data pipeline), so inference runs anywhere jax does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from sh2_jax.config import Config, ModelConfig
from sh2_jax.errors import UserError
from sh2_jax.layers.params import stored_shape_mismatch
from sh2_jax.model import abstract_params

logger = logging.getLogger(__name__)
PARAMS_DIR = "params"


class ModelDirError(UserError, ValueError):
  """A --checkpoint directory that holds no usable model."""


def load_config(directory: str) -> Config:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ModelDirError(f"{directory!r} has no config.json: pass a run directory of `sh2 train` or "
                        "an output directory of `sh2 convert`")
  with open(path) as f:
    return Config.from_dict(json.load(f))


def save_model(directory: str, model: ModelConfig, params: Any) -> None:
  """Writes config.json and params/ (Orbax) into a new or empty directory."""
  directory = os.path.abspath(directory)
  target = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(target):
    raise ModelDirError(f"{directory!r} already holds a model (params/): choose another --output")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(Config(model=model).to_dict(), f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, jax.tree.map(jnp.asarray, params))
  checkpointer.wait_until_finished()
  logger.info("model written: %s", directory)


def _abstract(model: ModelConfig) -> Any:
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      nn.meta.unbox(abstract_params(model)))


def load_model(directory: str, step: int | None = None) -> tuple[ModelConfig, dict, int | None]:
  """(model config, params, checkpoint step or None) of a run or converted directory.

  For a run directory, the parameters of the latest (or the given) checkpoint step are restored
  and the optimizer state is skipped.
  """
  if not os.path.isdir(directory):
    raise ModelDirError(f"--checkpoint {directory!r} is not a directory")
  model = load_config(directory).model
  abstract = _abstract(model)
  converted = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if os.path.isdir(converted):
    _check_shapes(stored_array_metadata(converted), abstract, directory)
    return model, ocp.StandardCheckpointer().restore(converted, abstract), None
  ckpt_dir = os.path.join(os.path.abspath(directory), "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir) if os.path.isdir(ckpt_dir) else None
  steps = list(manager.all_steps()) if manager else []
  if not steps:
    raise ModelDirError(f"{directory!r} holds no checkpoint (no params/ and no checkpoints/<step>): "
                        "train longer or pass another directory")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ModelDirError(f"no checkpoint at step {step} in {directory!r}; available: {sorted(steps)}")
  stored = stored_array_metadata(os.path.join(ckpt_dir, str(step), "state"))
  _check_shapes(stored.get("params") if stored is not None else None, abstract, directory)
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=x.sharding),
                              abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
  manager.close()
  logger.info("restored params of step %d from %s", step, directory)
  return model, restored["state"]["params"], step


def stored_array_metadata(item_dir: str) -> Any | None:
  """The array metadata tree (shapes, dtypes) of an Orbax item directory written by a standard
  save (a model's params/ or a train checkpoint's <step>/state), or None if it has none that
  this Orbax reads; nothing is loaded."""
  try:
    return ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  except (OSError, ValueError, KeyError):
    return None


def _check_shapes(stored: Any, abstract: Any, directory: str) -> None:
  """Raises ModelDirError when the stored parameters' shapes differ from the config's."""
  reason = stored_shape_mismatch(stored, abstract)
  if reason:
    raise ModelDirError(f"{directory!r}: {reason}")


def with_dtype(model: ModelConfig, dtype: str | None) -> ModelConfig:
  """The config with another compute dtype (None: unchanged)."""
  return model if dtype is None else dataclasses.replace(model, dtype=dtype)


def cast_params(params: Any, dtype: str) -> Any:
  """Parameters stored in `dtype` except the LI poles and residues (float32 always)."""
  def cast(path, x):
    name = getattr(path[-1], "key", "")
    keep = name in ("pole_p", "pole_gamma", "residues")
    return jnp.asarray(x, jnp.float32 if keep else jnp.dtype(dtype))
  return jax.tree_util.tree_map_with_path(cast, params)


__all__ = ["load_model", "save_model", "load_config", "ModelDirError", "with_dtype", "cast_params"]
