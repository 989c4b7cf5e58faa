"""train.state.init_params: the parameter tree flax's init declares, each leaf drawn by its
declared initialiser from its own key, with one compiled sampler per distinct (initialiser,
shape, dtype, sharding). The sampling of a sharded mesh is checked in test_checkpoint_mesh's
four-device process."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax import config as config_lib
from sh2_jax.layers import params as P
from sh2_jax.model import StripedHyena2
from sh2_jax.train import state as state_lib

MODEL = dataclasses.replace(config_lib.get_preset("tiny").model, d_model=64, num_heads=2,
                            se_groups=4, mr_groups=4, mr_filter_len=16, li_order=4,
                            layout="SE MR LI MHA")


def _flax_init(model_config):
  """flax's own init of the model, evaluated abstractly: boxed ShapeDtypeStructs."""
  return jax.eval_shape(StripedHyena2(model_config).init, jax.random.key(5),
                        jnp.zeros((1, 8), jnp.int32))["params"]


def _declared(model_config):
  """The Declared boxes of flax's init, flattened."""
  return jax.tree.leaves(_flax_init(model_config), is_leaf=lambda x: isinstance(x, P.Declared))


def test_each_parameter_is_its_initializer_at_its_own_key():
  rng = jax.random.key(np.random.default_rng().integers(2**31))
  params = state_lib.init_params(MODEL, rng)
  boxes = _declared(MODEL)
  leaves = jax.tree.leaves(params)
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(_flax_init(MODEL)))
  assert len(leaves) == len(boxes) > 20
  for index, (leaf, box) in enumerate(zip(leaves, boxes, strict=True)):
    assert (leaf.shape, leaf.dtype) == (box.value.shape, box.value.dtype)
    want = box.initializer(jax.random.fold_in(rng, index), box.value.shape, box.value.dtype)
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(want), rtol=1e-6, atol=1e-7,
                               err_msg=f"leaf {index}: {box.initializer}")


def test_parameters_follow_their_distributions_independently():
  """Against numpy: normals have their std, uniforms their bounds and variance, the LI gamma
  lies in log [0.01, 0.1], constants are exact; leaves of one initialiser and shape differ."""
  params = state_lib.init_params(MODEL, jax.random.key(11))
  seen: dict[tuple, np.ndarray] = {}
  for leaf, box in zip(jax.tree.leaves(params), _declared(MODEL), strict=True):
    value, init = np.asarray(leaf, np.float64), box.initializer
    if isinstance(init, P.Normal) and value.size >= 1000:
      assert abs(value.std() / init.std - 1) < 5 / math.sqrt(value.size), init
      assert abs(value.mean()) < 5 * init.std / math.sqrt(value.size), init
    elif isinstance(init, P.UniformSymmetric):
      assert np.all(np.abs(value) <= init.bound), init
      if value.size >= 1000:
        assert abs(value.var() / (init.bound ** 2 / 3) - 1) < 0.1, init
    elif isinstance(init, P.LogUniformLog):
      gamma = np.exp(value)
      assert np.all((gamma >= init.low * (1 - 1e-6)) & (gamma <= init.high * (1 + 1e-6))), init
    elif isinstance(init, P.Constant):
      np.testing.assert_array_equal(value, init.value)
    if not isinstance(init, P.Constant):
      key = (init, value.shape)
      if key in seen:
        assert not np.array_equal(seen[key], value), f"two {init} leaves drew the same values"
      seen[key] = value
  assert any(isinstance(init, P.Normal) for init, _ in seen)


def test_same_seed_same_parameters_other_seed_others():
  a, b, c = (state_lib.init_params(MODEL, jax.random.key(seed)) for seed in (3, 3, 4))
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if np.ptp(np.asarray(x)) > 0:  # constants are equal under any seed
      assert not np.array_equal(np.asarray(x), np.asarray(z))


def test_one_compiled_sampler_per_distinct_initializer_shape_and_dtype(monkeypatch):
  monkeypatch.setattr(state_lib, "_COMPILED", {})
  model = dataclasses.replace(MODEL, layout="SE MR LI MHA SE MR LI MHA")
  boxes = _declared(model)
  wanted = {(b.initializer, tuple(b.value.shape), jnp.dtype(b.value.dtype), None) for b in boxes}
  state_lib.init_params(model, jax.random.key(0))
  assert set(state_lib._COMPILED) == wanted
  assert len(wanted) < len(boxes) // 2  # eight layers of four kinds share their samplers
  compiled = dict(state_lib._COMPILED)
  state_lib.init_params(model, jax.random.key(1))
  assert state_lib._COMPILED == compiled  # nothing compiled again


def test_undeclared_parameter_is_named(monkeypatch):
  boxed = state_lib.abstract_params(MODEL)
  boxed["embedding"] = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  monkeypatch.setattr(state_lib, "abstract_params", lambda model_config: boxed)
  with pytest.raises(TypeError, match=r"parameter \['embedding'\] was not declared with"):
    state_lib.init_params(MODEL, jax.random.key(0))
