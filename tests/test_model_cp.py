"""The whole model under context parallelism equals one device (8 fake CPU devices).

One fresh process (the device count must be set before jax initialises) computes, for a tiny
model whose layout holds every mixer (SE MR LI MHA), the per-token losses and the gradients of
their mean wrt every parameter:
- on one device (the reference);
- on meshes (data, fsdp, tensor, context) = (8,1,1,1), (2,2,1,2) a2a/ring, (1,2,2,2)
  p2p/ring/zigzag, (1,1,1,8) p2p/all-gather with parameters sharded over context
  (mesh.context_fsdp) and the model rematerialised with its block inputs offloaded to host
  memory (model.offload_residuals), through `step.make_model` / `next_token_nll` (what the train step runs);
- causality under CP (context 8, ring, zigzag): a changed token moves no earlier loss.
It prints JSON; the tests below read it.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

TOLERANCE = 2e-5  # float32: max |cp - single| / max |single| per output / parameter leaf

MODEL_CP_SCRIPT = r"""
import dataclasses, json, sys, time
START = time.time()
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
sys.path.insert(0, sys.argv[1])
from sh2_jax import config as C
from sh2_jax.model import StripedHyena2
from sh2_jax.parallel import mesh as mesh_lib
from sh2_jax.train import optim, step as step_lib
from sh2_jax.train.state import state_shardings

cfg = C.ModelConfig(d_model=32, layout="SE MR LI MHA", num_heads=2, se_groups=4, mr_groups=4,
                    mr_filter_len=8, li_order=4, train_len=64, dtype="float32",
                    conv_method="blocked", conv_chunk=8, li_method="fft", mlp_activation="gelu")
rng = np.random.default_rng(0)
window = jnp.asarray(rng.integers(0, 256, (8, 129)), jnp.int32)
# Random parameters of the model's shapes (not the init: e.g. the MR filters start at ~1e-7),
# as host arrays (the train step donates its state); norm scales near 1.
shapes = nn.meta.unbox(jax.eval_shape(StripedHyena2(cfg).init, jax.random.key(0), window[:, :-1]))
params = jax.tree_util.tree_map_with_path(
    lambda path, x: (("scale" in jax.tree_util.keystr(path)) + 0.3 * rng.standard_normal(x.shape)
                     ).astype(np.float32), shapes["params"])
tx = optim.make_optimizer(C.TrainConfig(warmup_steps=0))
out = {}


def loss_and_grads(mesh_cfg, devices, cfg=cfg):
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  model = step_lib.make_model(cfg, mesh, mesh_cfg)
  _, shardings = state_shardings(cfg, tx, mesh, mesh_cfg)
  p = jax.device_put(params, shardings.params)
  w = jax.device_put(window, mesh_lib.batch_sharding(mesh))

  def loss(p, w):
    nll = step_lib.next_token_nll(model, p, w)
    return jnp.mean(nll), nll

  (_, nll), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p, w)
  return np.asarray(nll), jax.tree.map(np.asarray, grads)


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


nll0, grads0 = loss_and_grads(C.MeshConfig(data=1), jax.devices()[:1])
out["seconds/single"] = time.time() - START
CASES = [  # name: (data, fsdp, tensor, context), context_conv, context_attention, zigzag
    ("8,1,1,1", (8, 1, 1, 1), "p2p", "allgather", False),
    ("2,2,1,2 a2a ring", (2, 2, 1, 2), "a2a", "ring", False),
    ("1,2,2,2 p2p ring zigzag", (1, 2, 2, 2), "p2p", "ring", True),
    ("1,1,1,8 p2p allgather context-fsdp offload", (1, 1, 1, 8), "p2p", "allgather", False),
]
for name, shape, conv, attention, zigzag in CASES:
  t = time.time()
  mesh_cfg = C.MeshConfig(*shape, context_conv=conv, context_attention=attention, zigzag=zigzag,
                          context_fsdp="context-fsdp" in name)
  offload = dataclasses.replace(cfg, remat=True, offload_residuals=True)
  nll, grads = loss_and_grads(mesh_cfg, jax.devices(), offload if "offload" in name else cfg)
  flat, flat0 = jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads0)
  out[name] = {"nll": rel_err(nll, nll0),
               **{jax.tree_util.keystr(path): rel_err(g, g0) for (path, g), g0 in zip(flat, flat0)}}
  out[f"seconds/{name}"] = time.time() - t

# Causality: change tokens from position t on; the losses at positions < t - 1 (which predict
# tokens < t from tokens < t) must not move.
t_change = 77
mesh_cfg = C.MeshConfig(data=1, context=8, context_conv="p2p", context_attention="ring", zigzag=True)
mesh = mesh_lib.make_mesh(mesh_cfg)
model = step_lib.make_model(cfg, mesh, mesh_cfg)
changed = window.at[:, t_change:].set((window[:, t_change:] + 1) % 256)
both = jnp.concatenate([window[:4], changed[:4]])
nll = np.asarray(jax.jit(lambda w: step_lib.next_token_nll(model, params, w))(both))
diff = np.abs(nll[4:] - nll[:4])
out["causal"] = [float(diff[:, :t_change - 1].max()), float(diff[:, t_change - 1:].max())]
out["seconds"] = time.time() - START
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def model_cp_results(tmp_path_factory):
  def run():
    env = helpers.fake_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", MODEL_CP_SCRIPT, root],
                            capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

  return helpers.once_per_session(tmp_path_factory, "model_cp", run)


CASE_NAMES = ["8,1,1,1", "2,2,1,2 a2a ring", "1,2,2,2 p2p ring zigzag",
              "1,1,1,8 p2p allgather context-fsdp offload"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_model_on_mesh_equals_one_device(model_cp_results, case):
  """Per-token losses and the gradient of every parameter (each mixer's in/out projections,
  featurizer, filters, poles, attention weights) equal the single-device ones."""
  errors = model_cp_results[case]
  assert any("block_3" in k for k in errors) and any("pole_p" in k for k in errors)
  bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
  assert not bad, bad


def test_model_is_causal_under_cp(model_cp_results):
  earlier, later = model_cp_results["causal"]
  assert earlier <= 1e-5 * later and later > 1e-3, model_cp_results["causal"]


def test_sequence_length_errors_list_valid_lengths():
  """Lengths that do not split over the context shards fail at the config edge, one line."""
  from sh2_jax import config as config_lib
  from sh2_jax.parallel.context_sharding import validate_model_length

  model = config_lib.ModelConfig(d_model=32, layout="SE MR LI MHA", se_groups=4, mr_groups=4,
                                 mr_filter_len=16)
  validate_model_length(model, 64, 4)  # 16 rows per shard >= MR halo 15
  validate_model_length(model, 100, 1)  # no context parallelism: anything goes
  with pytest.raises(config_lib.ConfigError) as info:
    validate_model_length(model, 102, 4)
  assert str(info.value) == ("data.seq_len=102 cannot be split into 4 context shards: valid "
                             "lengths are multiples of 4 that are >= 60 (MR halo 15 per block), "
                             "or set mesh.context_conv=a2a")
  zigzag = config_lib.MeshConfig(zigzag=True)
  with pytest.raises(config_lib.ConfigError, match="into 8 zigzag chunks: valid lengths are "
                     "multiples of 8 that are >= 120"):
    validate_model_length(model, 64, 4, zigzag)
  a2a = config_lib.MeshConfig(context_conv="a2a", zigzag=True)
  validate_model_length(model, 64, 4, a2a)  # only the featurizer's 2-row halo remains
  with pytest.raises(config_lib.ConfigError, match="multiples of 8 that are >= 16 .featurizer"):
    validate_model_length(model, 12, 4, a2a)
  with pytest.raises(config_lib.ConfigError, match="d_model=32 must be divisible by mesh.context=3"):
    validate_model_length(model, 96, 3, a2a)
  validate_model_length(model, 64, 8, a2a)  # 4 groups over 8 ranks: two ranks per group
  wide = config_lib.ModelConfig(d_model=48, layout="SE MR LI MHA", se_groups=8, mr_groups=8)
  with pytest.raises(config_lib.ConfigError, match="se_groups=8 and mesh.context=3: the all-to-all"):
    validate_model_length(wide, 96, 3, config_lib.MeshConfig(context_conv="a2a"))
  validate_model_length(wide, 384, 3)  # p2p: no constraint on the groups
  with pytest.raises(config_lib.ConfigError, match="mesh.context_attention='flash'"):
    config_lib.MeshConfig(context_attention="flash")
