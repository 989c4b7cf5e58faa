"""Each Evo 2 (vortex) convention pinned by a hand-checked example: projection interleave, the
featurizer/SE flip versus the unflipped MR/LI filters, the MR decay baked into exported taps,
LI poles, the Wqkv row order and the identity MLP activation after layer 0 (golden README)."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax.config import ModelConfig
from sh2_jax.convert import evo2
from sh2_jax.ops import filters, hyena

D, G = 4, 2
CONFIG = ModelConfig(d_model=D, layout="SE MR LI MHA", num_heads=2, se_groups=G, mr_groups=G,
                     mr_filter_len=4, li_order=2, mlp_dim=8, mr_decay=False, train_len=300,
                     dtype="float32")


def hand_state() -> dict[str, np.ndarray]:
  """A state dict whose every entry says where it came from: value = 1000 * tensor + index."""
  shapes = {}
  for key, value in evo2.params_to_vortex(_zeros(), CONFIG).items():
    shapes[key] = value.shape
  state = {}
  for t, (key, shape) in enumerate(sorted(shapes.items())):
    state[key] = (1000.0 * t + np.arange(math.prod(shape), dtype=np.float64)).reshape(shape).astype(np.float32)
  for i in (2,):
    state[f"blocks.{i}.filter.log_poles"] = -np.array([[[0.5], [2.0]]] * D, np.float32)
  state["blocks.3.inner_mha_cls.rotary_emb.inv_freq"] = (
      1.0 / 1e4 ** (np.arange(0, 2, 2) / 2)).astype(np.float32)
  return state


def _zeros():
  from sh2_jax.model import abstract_params
  import flax.linen as nn
  import jax
  return jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.meta.unbox(abstract_params(CONFIG)))


@pytest.fixture(scope="module")
def converted():
  state = hand_state()
  return state, evo2.vortex_to_params(state, CONFIG)


def test_projection_interleave_post_pre_value(converted):
  """projections.weight row 3i+0 feeds the output gate (post), 3i+1 the input gate (pre), 3i+2
  v (x @ W.T); our in_proj [D, 3, D] holds stream s of channel i at [:, s, i]."""
  state, params = converted
  w = state["blocks.0.projections.weight"]  # [3D, D]
  ours = params["block_0"]["mixer"]["in_proj"]  # [D, 3, D]
  assert ours.shape == (D, 3, D)
  for i in range(D):
    for s in range(3):
      np.testing.assert_array_equal(ours[:, s, i], w[3 * i + s])
  x = np.eye(D, dtype=np.float32)[None]  # unit inputs: z[c] = W[c, :] . e
  post, pre, v = hyena.project_streams(jnp.asarray(x), jnp.asarray(ours))
  np.testing.assert_array_equal(np.asarray(post)[0], w[0::3].T)
  np.testing.assert_array_equal(np.asarray(pre)[0], w[1::3].T)
  np.testing.assert_array_equal(np.asarray(v)[0], w[2::3].T)


def impulse_response(h_ours: np.ndarray, length: int) -> np.ndarray:
  """Response of hyena.featurize (our causal conv, h[0] on the current token) to a unit impulse
  at t = 0 on every channel: [length, C]."""
  x = np.zeros((1, length, h_ours.shape[0]), np.float32)
  x[0, 0] = 1.0
  return np.asarray(hyena.featurize(jnp.asarray(x), jnp.asarray(h_ours)))[0]


def test_featurizer_and_se_are_cross_correlations(converted):
  """vortex conv1d: z'[t] = w[0] z[t-2] + w[1] z[t-1] + w[2] z[t]: an impulse at 0 reads w[2],
  then w[1], w[0]. Same for SE with 7 taps (last tap on the current sample)."""
  state, params = converted
  w = state["blocks.0.filter.short_filter_weight"][:, 0]  # [3D, 3], rows 3i + s
  for s in range(3):
    np.testing.assert_array_equal(
        impulse_response(params["block_0"]["mixer"]["featurizer"][s], 3), w[s::3, ::-1].T)
  h = state["blocks.0.filter.h"][:, 0]  # [G, 7]
  response = impulse_response(params["block_0"]["mixer"]["filter"], 7)  # [7, G]
  np.testing.assert_array_equal(response, h[:, ::-1].T)
  assert response[0, 0] == h[0, 6] and response[6, 1] == h[1, 0]


def test_mr_filter_is_a_true_convolution_and_export_bakes_the_decay(converted):
  state, params = converted
  h = state["blocks.1.filter.h"][:, 0]  # [G, 4], h[0] on the current sample
  np.testing.assert_array_equal(impulse_response(params["block_1"]["mixer"]["filter"], 4), h.T)
  # savanna-style run-time decay exp(-r_g n / (L_train - 1)), r = logspace(-2, 2, G) = [0.01, 100]
  hhat = np.ones((G, 4), np.float32)
  decayed = np.asarray(filters.mr_filter(jnp.asarray(hhat), train_len=300, decay=True))
  n = np.arange(4)
  expected = np.stack([np.exp(-0.01 * n / 299), np.exp(-100.0 * n / 299)])
  np.testing.assert_allclose(decayed, expected, rtol=1e-6)
  tree = {**params, "block_1": {**params["block_1"], "mixer": {**params["block_1"]["mixer"], "filter": hhat}}}
  exported = evo2.params_to_vortex(tree, dataclasses.replace(CONFIG, mr_decay=True))
  np.testing.assert_allclose(exported["blocks.1.filter.h"][:, 0], expected, rtol=1e-6)


def test_li_poles_residues_and_skip(converted):
  """pole = exp(log_pole); h[c, t] = sum_n R[c, n] pole^t, h[0] on the current sample."""
  state, params = converted
  mixer = params["block_2"]["mixer"]
  log_poles = np.asarray(filters.modal_log_poles(mixer["pole_p"], mixer["pole_gamma"]))
  np.testing.assert_allclose(log_poles, np.array([[-0.5, -2.0]] * D), rtol=1e-6)
  residues = state["blocks.2.filter.residues"]
  h = np.asarray(filters.modal_filter(jnp.asarray(log_poles), jnp.asarray(mixer["residues"]), 3))
  np.testing.assert_allclose(h[:, 1], residues @ np.exp([-0.5, -2.0]), rtol=1e-6)
  np.testing.assert_allclose(h[:, 0], residues.sum(1), rtol=1e-6)
  np.testing.assert_array_equal(mixer["dskip"], state["blocks.2.filter.D"])


def test_wqkv_checkpoint_rows_are_head_then_qkv(converted):
  """Released checkpoints order Wqkv rows (head, q|k|v, dim); ours is [D, 3, N, H]."""
  state, params = converted
  w = state["blocks.3.inner_mha_cls.Wqkv.weight"]  # [3D, D], dim H = D / 2 = 2
  qkv = params["block_3"]["mixer"]["qkv"]
  for head in range(2):
    for s in range(3):
      for d in range(2):
        np.testing.assert_array_equal(qkv[:, s, head, d], w[head * 6 + s * 2 + d])
  memory = evo2.vortex_to_params({**state, "blocks.3.inner_mha_cls.Wqkv.weight": w}, CONFIG,
                                 qkv_layout="memory")["block_3"]["mixer"]["qkv"]
  np.testing.assert_array_equal(memory[:, 1, 0, 1], w[1 * 4 + 0 * 2 + 1])  # (q|k|v, head, dim)


def test_evo2_activation_is_gelu_in_layer_0_only():
  config = evo2.config_from_vortex({"num_layers": 4, "hidden_size": 32, "vocab_size": 512,
                                    "hcs_layer_idxs": [0], "hcm_layer_idxs": [1], "hcl_layer_idxs": [2],
                                    "attn_layer_idxs": [3], "num_attention_heads": 2,
                                    "evo2_style_activations": True})
  assert [config.activation(i) for i in range(4)] == ["gelu", "identity", "identity", "identity"]
  plain = evo2.config_from_vortex({"num_layers": 1, "hidden_size": 32, "vocab_size": 512,
                                   "hcs_layer_idxs": [0], "num_attention_heads": 2})
  assert plain.activation(0) == plain.activation(5) == "gelu"
