"""The JAX model loaded from the Evo 2-format golden checkpoint reproduces the PyTorch
reference (vortex) logits and per-block hidden states (tests/data/golden/README.md)."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from sh2_jax.convert import evo2
from sh2_jax.model import StripedHyena2

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="module")
def golden():
  vortex_cfg = yaml.safe_load((GOLDEN / "vortex_A_config.yml").read_text())
  state = dict(np.load(GOLDEN / "vortex_A_ckpt_state.npz"))
  io = dict(np.load(GOLDEN / "vortex_A_io.npz"))
  return vortex_cfg, state, io


@pytest.mark.parametrize("conv_method,li_method", [
    ("auto", "fft"), ("direct", "chunked"), ("fft", "fft"), ("blocked", "chunked")])
def test_logits_match_reference(golden, conv_method, li_method):
  vortex_cfg, state, io = golden
  config = evo2.config_from_vortex(vortex_cfg, dtype="float32", conv_method=conv_method,
                                   li_method=li_method)
  params = evo2.vortex_to_params(state, config)
  logits, variables = StripedHyena2(config).apply({"params": params}, io["tokens"],
                                                  mutable=["intermediates"])
  hidden = variables["intermediates"]
  for i in range(config.num_layers):
    np.testing.assert_allclose(hidden[f"hidden_{i}"][0], io[f"hidden_block{i}"], atol=1e-4,
                               err_msg=f"residual stream after block {i}")
  assert float(jnp.max(jnp.abs(logits - io["logits"]))) < 1e-4


def test_config_matches_reference_layout(golden):
  config = evo2.config_from_vortex(golden[0])
  assert config.layers == ("SE", "MR", "LI", "MHA", "SE", "MR", "LI", "MHA")
  assert (config.d_model, config.ffn_dim, config.se_groups, config.num_heads) == (64, 176, 4, 2)
  assert config.mlp_activation == "evo2" and not config.mr_decay


def test_export_round_trip_is_exact(golden):
  vortex_cfg, state, _ = golden
  config = evo2.config_from_vortex(vortex_cfg)
  back = evo2.params_to_vortex(evo2.vortex_to_params(state, config), config)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_allclose(back[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("blocks.1.filter.D"), "missing key 'blocks.1.filter.D'"),
    (lambda s: s.update({"blocks.0.filter.h": np.zeros((4, 1, 5), np.float32)}),
     r"'blocks.0.filter.h' has shape \(4, 1, 5\), expected \(4, 1, 7\)"),
    (lambda s: s.update({"blocks.9.extra.weight": np.zeros(3, np.float32)}),
     r"unknown key\(s\).*blocks.9.extra.weight"),
])
def test_conversion_errors_name_the_key(golden, mutate, message):
  vortex_cfg, state, _ = golden
  state = dict(state)
  mutate(state)
  with pytest.raises(evo2.ConversionError, match=message):
    evo2.vortex_to_params(state, evo2.config_from_vortex(vortex_cfg))
