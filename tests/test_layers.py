"""sh2_jax.layers and sh2_jax.model vs a float64 numpy reimplementation of SPEC.md sections 1-4.

Each module is initialised, its parameters are replaced by random values of order one (the real
init makes some paths vanish, e.g. the MR taps start at 1e-5 / sqrt(L_train)), and
`module.apply` is compared with a numpy float64 reference that reads the same parameter tree.
Parameter gradients are compared with central finite differences of the numpy reference on a
few random entries of every parameter. Also: model shape, causality, preset sizes and config
validation. Runs in the default float32 mode (ModelConfig accepts no float64 dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from sh2_jax import config as C
from sh2_jax import model as M
from sh2_jax.layers.attention import MHA
from sh2_jax.layers.block import Block
from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE
from sh2_jax.layers.mlp import GatedMLP
from sh2_jax.layers.norm import RMSNorm
from tests.helpers import assert_close as _assert_close
from tests.helpers import np_causal_conv
from tests.helpers import seeded_rng as _rng

# (rtol, atol as a fraction of max |expected|) per compute dtype.
TOL = {"float32": (1e-4, 1e-5), "bfloat16": (5e-2, 3e-2)}

BASE = C.ModelConfig(d_model=32, num_heads=2, se_groups=4, mr_groups=2, mr_filter_len=16,
                     li_order=4, train_len=64, layout="SE MR LI MHA", dtype="float32",
                     param_dtype="float32", conv_chunk=16)


# ---------------------------------------------------------------------------------------------
# numpy float64 reference of SPEC.md sections 1-4
# ---------------------------------------------------------------------------------------------

def np_rms_norm(x, scale, eps):
  return scale * x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps)


def np_hyena(p, x, kind, cfg):
  """in_proj [D, 3, D] (streams post, pre, v), featurizer [3, D, K], inner filter, gates,
  out_proj + bias."""
  post, pre, v = (np_causal_conv(x @ p["in_proj"][:, s], p["featurizer"][s]) for s in range(3))
  u = pre * v
  length = x.shape[1]
  if kind == "SE":
    y = np_causal_conv(u, p["filter"])
  else:
    if kind == "MR":
      groups, taps = p["filter"].shape
      rates = 10.0 ** np.linspace(-2.0, 2.0, groups)
      decay = np.exp(-rates[:, None] * np.arange(taps) / (cfg.train_len - 1))
      h = p["filter"] * decay if cfg.mr_decay else p["filter"]
    else:
      log_poles = -np.exp(p["pole_p"] + p["pole_gamma"])
      t = np.arange(length)
      h = np.einsum("cn,cnt->ct", p["residues"], np.exp(log_poles[:, :, None] * t))
    y = np_causal_conv(u, h) + p["dskip"] * u
  return (post * y) @ p["out_proj"] + p["out_bias"]


def np_rope(x_BLNH, base):
  length, head_dim = x_BLNH.shape[1], x_BLNH.shape[-1]
  half = head_dim // 2
  theta = np.arange(length)[:, None] * base ** (-2.0 * np.arange(half) / head_dim)  # [L, H/2]
  cos, sin = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]
  a0, a1 = x_BLNH[..., :half], x_BLNH[..., half:]
  return np.concatenate([a0 * cos - a1 * sin, a0 * sin + a1 * cos], axis=-1)


def np_mha(p, x, cfg):
  qkv = np.einsum("bld,dsnh->blsnh", x, p["qkv"])
  q, k, v = (np_rope(qkv[:, :, 0], cfg.rope_base), np_rope(qkv[:, :, 1], cfg.rope_base),
             qkv[:, :, 2])
  length, head_dim = x.shape[1], q.shape[-1]
  scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(head_dim)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bknh->bqnh", weights, v)
  return np.einsum("blnh,nhd->bld", out, p["out_proj"]) + p["out_bias"]


NP_ACT = {
    "gelu": lambda a: 0.5 * a * (1.0 + erf(a / np.sqrt(2.0))),
    "identity": lambda a: a,
    "silu": lambda a: a / (1.0 + np.exp(-a)),
}


def np_mlp(p, x, activation):
  return (NP_ACT[activation](x @ p["w1"]) * (x @ p["w2"])) @ p["w3"]


def np_evo2_activation(cfg, layer):
  if cfg.mlp_activation == "evo2":
    return "gelu" if layer == 0 else "identity"
  return cfg.mlp_activation


def np_mixer(p, x, kind, cfg):
  return np_mha(p, x, cfg) if kind == "MHA" else np_hyena(p, x, kind, cfg)


def np_block(p, x, cfg, layer):
  kind = cfg.layers[layer]
  x = x + np_mixer(p["mixer"], np_rms_norm(x, p["pre_norm"]["scale"], cfg.norm_eps), kind, cfg)
  h = np_rms_norm(x, p["post_norm"]["scale"], cfg.norm_eps)
  return x + np_mlp(p["mlp"], h, np_evo2_activation(cfg, layer))


def np_model(p, tokens, cfg):
  x = p["embedding"][tokens]
  for i in range(cfg.num_layers):
    x = np_block(p[f"block_{i}"], x, cfg, i)
  x = np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)
  return x @ p["embedding"].T


# ---------------------------------------------------------------------------------------------
# Parameter handling
# ---------------------------------------------------------------------------------------------

def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """Order-one random parameters that exercise every path (and keep the LI poles stable)."""
  normal = rng.standard_normal(shape)
  if name == "pole_p":
    return -1.0 + 0.3 * normal
  if name == "pole_gamma":
    return np.log(rng.uniform(0.1, 1.0, shape))  # decay over a few to tens of tokens
  if name == "scale":
    return 1.0 + 0.2 * normal
  if name in ("out_bias", "residues"):
    return 0.3 * normal
  if name in ("dskip", "embedding"):
    return normal
  if name in ("filter", "featurizer"):
    return normal / np.sqrt(shape[-1])
  fan_in = {"qkv": shape[0], "out_proj": int(np.prod(shape[:-1]))}.get(name, shape[0])
  return normal / np.sqrt(fan_in)


def _init(module: nn.Module, x: jax.Array, seed: object) -> tuple[dict, dict]:
  """Abstract init: checks that the tree is boxed with logical axes, draws random values.

  Returns (params for apply, float32 jax arrays; the same values as float64 numpy).
  """
  boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  boxes = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  assert all(len(b.names) == b.value.ndim for b in boxes)
  rng = _rng("params", seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(_random_value(path[-1].key, leaf.shape, rng), leaf.dtype),
      nn.meta.unbox(boxed))
  return params, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _set(tree: dict, path: tuple, value: np.ndarray) -> dict:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _check_param_grads(module: nn.Module, params: dict, params64: dict, x: jax.Array,
                       np_forward: Callable[[dict], np.ndarray], seed: object, entries: int = 3,
                       rtol: float = 2e-3) -> None:
  """jax.grad of sum(out * cot) wrt every parameter leaf vs central finite differences of the
  numpy reference on `entries` random entries of each leaf."""
  rng = _rng("grad", seed)
  out_shape = jax.eval_shape(module.apply, {"params": params}, x).shape
  cot = rng.standard_normal(out_shape)
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(module.apply({"params": p}, x) * jnp.asarray(cot, jnp.float32))))(params)
  leaves = jax.tree_util.tree_leaves_with_path(params64)
  assert leaves
  eps = 1e-6
  for path, value in leaves:
    keys = tuple(k.key for k in path)
    g_jax = np.asarray(_get(grads, keys), np.float64)
    assert np.all(np.isfinite(g_jax)), keys
    g_scale = max(float(np.max(np.abs(g_jax))), 1e-12)
    for flat in rng.choice(value.size, size=min(entries, value.size), replace=False):
      idx = np.unravel_index(flat, value.shape)
      plus, minus = value.copy(), value.copy()
      plus[idx] += eps
      minus[idx] -= eps
      f_plus = np.sum(cot * np_forward(_set(params64, keys, plus)))
      f_minus = np.sum(cot * np_forward(_set(params64, keys, minus)))
      fd = (f_plus - f_minus) / (2 * eps)
      assert abs(g_jax[idx] - fd) <= rtol * g_scale + 1e-6, (keys, idx, g_jax[idx], fd)


def _x(shape: tuple[int, ...], seed: object) -> jax.Array:
  return jnp.asarray(_rng("x", seed).standard_normal(shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

HYENA = {"SE": HyenaSE, "MR": HyenaMR, "LI": HyenaLI}
HYENA_CASES = [
    ("SE", {}), ("SE", {"conv_method": "fft"}), ("SE", {"conv_method": "blocked", "se_groups": 1}),
    ("MR", {}), ("MR", {"mr_decay": False}), ("MR", {"conv_method": "fft", "mr_groups": 32}),
    ("MR", {"conv_method": "blocked"}),
    ("LI", {}), ("LI", {"li_method": "chunked"}),
]
HYENA_IDS = [k + "-" + "-".join(f"{a}={b}" for a, b in o.items()) for k, o in HYENA_CASES]


HYENA_DTYPE_CASES = ([(k, o, "float32") for k, o in HYENA_CASES]
                     + [(k, {}, "bfloat16") for k in ("SE", "MR", "LI")])


@pytest.mark.parametrize("kind,overrides,dtype", HYENA_DTYPE_CASES,
                         ids=[f"{i}-{d}" for i, (_, _, d) in zip(
                             HYENA_IDS + ["SE", "MR", "LI"], HYENA_DTYPE_CASES)])
def test_hyena_module(kind, overrides, dtype):
  cfg = dataclasses.replace(BASE, dtype=dtype, **overrides)
  module = HYENA[kind](cfg)
  x = _x((2, 24, cfg.d_model), (kind, overrides))
  params, params64 = _init(module, x, (kind, overrides))
  d = cfg.d_model
  shapes = {"in_proj": (d, 3, d), "featurizer": (3, d, 3), "out_proj": (d, d), "out_bias": (d,)}
  shapes.update({"SE": {"filter": (cfg.se_groups, 7)},
                 "MR": {"filter": (cfg.mr_groups, 16), "dskip": (d,)},
                 "LI": {"pole_p": (d, 4), "pole_gamma": (d, 4), "residues": (d, 4),
                        "dskip": (d,)}}[kind])
  assert {k: v.shape for k, v in params.items()} == shapes
  out = module.apply({"params": params}, x)
  assert out.dtype == jnp.dtype(dtype) and out.shape == x.shape
  expected = np_hyena(params64, np.asarray(x, np.float64), kind, cfg)
  _assert_close(out, expected, TOL[dtype])


def test_mr_decay_flag_matters():
  """With order-one taps, decay on and off give clearly different outputs (the test above
  would notice a decay applied twice or never)."""
  x = _x((1, 24, 32), "mr_flag")
  params, params64 = _init(HyenaMR(BASE), x, "mr_flag")
  on = HyenaMR(BASE).apply({"params": params}, x)
  off = HyenaMR(dataclasses.replace(BASE, mr_decay=False)).apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(on - off))) > 1e-2 * float(jnp.max(jnp.abs(on)))


@pytest.mark.parametrize("kind,overrides", [("SE", {}), ("MR", {"conv_method": "blocked"}),
                                            ("LI", {}), ("LI", {"li_method": "chunked"})],
                         ids=["SE", "MR-blocked", "LI-fft", "LI-chunked"])
def test_hyena_param_grads(kind, overrides):
  cfg = dataclasses.replace(BASE, **overrides)
  module = HYENA[kind](cfg)
  x = _x((1, 20, cfg.d_model), ("grad", kind))
  params, params64 = _init(module, x, ("grad", kind))
  x64 = np.asarray(x, np.float64)
  _check_param_grads(module, params, params64, x,
                     lambda p: np_hyena(p, x64, kind, cfg), (kind, overrides))


@pytest.mark.parametrize("dtype,rope_base", [("float32", 1e4), ("float32", 1e6), ("bfloat16", 1e4)])
def test_mha(dtype, rope_base):
  cfg = dataclasses.replace(BASE, dtype=dtype, rope_base=rope_base, num_heads=4)
  module = MHA(cfg)
  x = _x((2, 19, 32), ("mha", dtype))
  params, params64 = _init(module, x, ("mha", dtype))
  assert params["qkv"].shape == (32, 3, 4, 8) and params["out_proj"].shape == (4, 8, 32)
  out = module.apply({"params": params}, x)
  assert out.dtype == jnp.dtype(dtype)
  _assert_close(out, np_mha(params64, np.asarray(x, np.float64), cfg), TOL[dtype])


def test_mha_param_grads():
  module = MHA(BASE)
  x = _x((1, 12, 32), "mha_grad")
  params, params64 = _init(module, x, "mha_grad")
  x64 = np.asarray(x, np.float64)
  _check_param_grads(module, params, params64, x, lambda p: np_mha(p, x64, BASE), "mha",
                     entries=4)


@pytest.mark.parametrize("activation,layer", [("evo2", 0), ("evo2", 1), ("evo2", 5), ("gelu", 3),
                                              ("silu", 0), ("identity", 0)])
def test_gated_mlp(activation, layer):
  cfg = dataclasses.replace(BASE, mlp_activation=activation, layout="SE MR LI MHA SE MR")
  module = GatedMLP(cfg, layer)
  x = _x((2, 7, 32), ("mlp", activation, layer))
  params, params64 = _init(module, x, ("mlp", activation, layer))
  assert params["w1"].shape == params["w2"].shape == (32, 128) and params["w3"].shape == (128, 32)
  expected_act = {"evo2": "gelu" if layer == 0 else "identity"}.get(activation, activation)
  assert cfg.activation(layer) == expected_act
  out = module.apply({"params": params}, x)
  _assert_close(out, np_mlp(params64, np.asarray(x, np.float64), expected_act), TOL["float32"])


def test_gated_mlp_param_grads():
  module = GatedMLP(BASE, 0)
  x = _x((1, 5, 32), "mlp_grad")
  params, params64 = _init(module, x, "mlp_grad")
  x64 = np.asarray(x, np.float64)
  _check_param_grads(module, params, params64, x, lambda p: np_mlp(p, x64, "gelu"), "mlp")


def _np_silu_mlp_grads(p, x, cot):
  """Analytic float64 gradients of sum(cot * mlp(x)) with SiLU: (dx, {w1, w2, w3})."""
  h1, h2 = x @ p["w1"], x @ p["w2"]
  sig = 1.0 / (1.0 + np.exp(-h1))
  act = h1 * sig
  d_hidden = cot @ p["w3"].T
  d_h1 = d_hidden * h2 * sig * (1.0 + h1 * (1.0 - sig))
  d_h2 = d_hidden * act
  flat = lambda a: a.reshape(-1, a.shape[-1])
  grads = {"w1": flat(x).T @ flat(d_h1), "w2": flat(x).T @ flat(d_h2),
           "w3": flat(act * h2).T @ flat(cot)}
  return d_h1 @ p["w1"].T + d_h2 @ p["w2"].T, grads


@pytest.mark.parametrize("slices,length", [(4, 12), (3, 12), (5, 12)])
def test_sliced_mlp_matches_float64(slices, length):
  """model.mlp_slices: outputs and gradients (input and every weight) of the MLP run in
  strided token slices equal the float64 MLP (5 slices of 12 tokens: gcd 1, unsliced)."""
  cfg = dataclasses.replace(BASE, mlp_activation="silu", mlp_slices=slices)
  module = GatedMLP(cfg, 0)
  x = _x((2, length, 32), ("sliced_mlp", slices))
  params, params64 = _init(module, x, ("sliced_mlp", slices))
  x64 = np.asarray(x, np.float64)
  cot = _rng("cot", ("sliced_mlp", slices)).standard_normal((2, length, 32))
  out, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, x)
  _assert_close(out, np_mlp(params64, x64, "silu"), TOL["float32"])
  d_params, d_x = vjp(jnp.asarray(cot, jnp.float32))
  want_dx, want_dp = _np_silu_mlp_grads(params64, x64, cot)
  _assert_close(d_x, want_dx, TOL["float32"])
  for name in ("w1", "w2", "w3"):
    _assert_close(d_params[name], want_dp[name], TOL["float32"])


@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_rms_norm_module(eps):
  x = _x((2, 5, 32), ("norm", eps)) * 0.01
  module = RMSNorm(eps, "float32")
  boxed = module.init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(np.asarray(nn.meta.unbox(boxed)["scale"]), np.ones(32))
  params, params64 = _init(module, x, ("norm", eps))
  out = module.apply({"params": params}, x)
  _assert_close(out, np_rms_norm(np.asarray(x, np.float64), params64["scale"], eps),
                TOL["float32"])


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_block(layer):
  """Layout SE MR LI MHA: one block per mixer kind; layer 0 has the GELU MLP."""
  module = Block(BASE, layer)
  x = _x((2, 21, 32), ("block", layer))
  params, params64 = _init(module, x, ("block", layer))
  assert set(params) == {"pre_norm", "mixer", "post_norm", "mlp"}
  out = module.apply({"params": params}, x)
  _assert_close(out, np_block(params64, np.asarray(x, np.float64), BASE, layer), TOL["float32"])


# ---------------------------------------------------------------------------------------------
# Full model
# ---------------------------------------------------------------------------------------------

MODEL_CFG = dataclasses.replace(BASE, layout="SE MR LI MHA SE", vocab_size=512)


def test_model_matches_numpy_and_shapes():
  model = M.StripedHyena2(MODEL_CFG)
  tokens = jnp.asarray(_rng("tokens").integers(0, 256, (2, 17)), jnp.int32)
  params, params64 = _init(model, tokens, "model")
  logits, state = jax.jit(lambda p, t: model.apply(p, t, mutable=["intermediates"]))(
      {"params": params}, tokens)
  assert logits.shape == (2, 17, 512) and logits.dtype == jnp.float32
  assert set(state["intermediates"]) == {f"hidden_{i}" for i in range(5)}
  _assert_close(logits, np_model(params64, np.asarray(tokens), MODEL_CFG), (2e-4, 2e-5))


def test_model_bf16_compute_returns_float32_logits():
  cfg = dataclasses.replace(MODEL_CFG, dtype="bfloat16")
  model = M.StripedHyena2(cfg)
  tokens = jnp.zeros((1, 9), jnp.int32)
  params, _ = _init(model, tokens, "bf16")
  logits = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.shape == (1, 9, 512) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


CAUSAL_CASES = [("direct", "chunked", True), ("blocked", "chunked", True), ("fft", "fft", False)]


@pytest.mark.parametrize("conv_method,li_method,exact", CAUSAL_CASES)
def test_model_is_causal_in_tokens(conv_method, li_method, exact):
  """Changing token t never changes logits before t (exactly, except for FFT round-off)."""
  cfg = dataclasses.replace(MODEL_CFG, conv_method=conv_method, li_method=li_method)
  model = M.StripedHyena2(cfg)
  length = 40
  tokens = np.asarray(_rng("causal").integers(0, 256, (2, length)), np.int32)
  params, _ = _init(model, jnp.asarray(tokens), ("causal", conv_method))
  apply = jax.jit(lambda t: model.apply({"params": params}, t))
  base = np.asarray(apply(jnp.asarray(tokens)))
  scale = float(np.max(np.abs(base)))
  for t in (0, 1, 16, 17, 39):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 101) % 256
    logits = np.asarray(apply(jnp.asarray(changed)))
    if exact:
      np.testing.assert_array_equal(logits[:, :t], base[:, :t], err_msg=f"t={t}")
    else:
      assert np.max(np.abs(logits[:, :t] - base[:, :t]), initial=0.0) <= 1e-5 * scale, t
    assert np.max(np.abs(logits[:, t] - base[:, t])) > 1e-3 * scale, t


@pytest.mark.parametrize("layer,overrides,exact", [
    (0, {}, True), (1, {"conv_method": "blocked"}, True), (2, {"li_method": "chunked"}, True),
    (2, {"li_method": "fft"}, False), (3, {}, True)], ids=["SE", "MR-blocked", "LI-chunked",
                                                          "LI-fft", "MHA"])
def test_block_future_positions_get_zero_gradient(layer, overrides, exact):
  """d out[:, t] / d x[:, s] == 0 for s > t (levanter's causality check). L = 300 crosses the
  LI chunk (256) and many blocked chunks (16)."""
  cfg = dataclasses.replace(BASE, **overrides)
  module = Block(cfg, layer)
  length = 300
  x = _x((1, length, 32), ("causal_grad", layer))
  params, _ = _init(module, x, ("causal_grad", layer, tuple(overrides.items())))
  cot = jnp.asarray(_rng("cot").standard_normal((1, length, 32)), jnp.float32)

  @jax.jit
  def grad_at(t):
    mask = (jnp.arange(length) == t)[None, :, None]
    return jax.grad(lambda a: jnp.sum(module.apply({"params": params}, a) * cot * mask))(x)

  for t in (0, 100, 255, 256, 299):
    g = np.asarray(grad_at(t))
    scale = float(np.max(np.abs(g)))
    assert np.max(np.abs(g[:, t])) > 0.0
    future = np.max(np.abs(g[:, t + 1:]), initial=0.0)
    if exact:
      assert future == 0.0, (t, future)
    else:
      assert future <= 1e-5 * scale, (t, future, scale)
    if t > 0:
      assert np.max(np.abs(g[:, :t])) > 1e-4 * scale  # the past does matter


@pytest.mark.parametrize("name,target", [("evo2-1b", 1e9), ("evo2-7b", 6.5e9), ("evo2-40b", 40e9)])
def test_preset_parameter_counts(name, target):
  cfg = C.get_preset(name).model
  params = M.abstract_params(cfg)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
  count = M.count_params(params)
  assert abs(count - target) <= 0.15 * target, count


@pytest.mark.parametrize("name,layers,width,heads,mha_at,groups,ffn", [
    ("evo2-1b", 25, 1920, 15, (3, 10, 17, 24), 15, 5120),
    ("evo2-7b", 32, 4096, 32, (3, 10, 17, 24, 31), 256, 11008),
    ("evo2-40b", 50, 8192, 64, (3, 10, 17, 24, 31, 35, 42, 49), 512, 21888),
])
def test_preset_layouts_follow_spec_table(name, layers, width, heads, mha_at, groups, ffn):
  cfg = C.get_preset(name).model
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.ffn_dim) == (layers, width, heads, ffn)
  assert tuple(i for i, k in enumerate(cfg.layers) if k == "MHA") == mha_at
  hyena = [k for k in cfg.layers if k != "MHA"]
  assert hyena == [("SE", "MR", "LI")[i % 3] for i in range(len(hyena))]
  assert (cfg.se_groups, cfg.mr_groups, cfg.mr_filter_len, cfg.se_filter_len) == (groups, groups,
                                                                                   128, 7)
  assert cfg.head_dim == 128 and cfg.li_order == 16 and cfg.mlp_activation == "evo2"
  assert cfg.rope_base == (1e6 if name == "evo2-40b" else 1e4)


def test_tiny_preset_builds_and_runs():
  cfg = C.get_preset("tiny").model
  model = M.StripedHyena2(cfg)
  tokens = jnp.asarray(_rng("tiny").integers(0, 256, (2, 12)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  logits = jax.jit(model.apply)(variables, tokens)
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  params = nn.meta.unbox(variables["params"])
  assert M.count_params(params) == M.count_params(M.abstract_params(cfg))
  # SPEC.md initialisations: norm scales 1, output biases 0, LI p = -1 and gamma = log U[.01, .1],
  # MR taps ~ N(0, 1) / sqrt(L_train) * 1e-5.
  for i in range(cfg.num_layers):
    block = params[f"block_{i}"]
    for norm in ("pre_norm", "post_norm"):
      np.testing.assert_array_equal(np.asarray(block[norm]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(block["mixer"]["out_bias"]), 0.0)
  li = params["block_2"]["mixer"]
  np.testing.assert_array_equal(np.asarray(li["pole_p"]), -1.0)
  gamma = np.exp(np.asarray(li["pole_gamma"], np.float64))
  assert gamma.min() >= 0.01 * (1 - 1e-6) and gamma.max() <= 0.1 * (1 + 1e-6)
  assert li["pole_p"].dtype == li["residues"].dtype == jnp.float32
  hhat_std = float(np.std(np.asarray(params["block_1"]["mixer"]["filter"])))
  assert 0.8 < hhat_std / (1e-5 / np.sqrt(cfg.train_len)) < 1.2


# ---------------------------------------------------------------------------------------------
# Config validation, overrides
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"layout": "SE XX MHA"}, r"unknown mixer\(s\) \['XX'\]"),
    ({"layout": " , "}, "empty"),
    ({"d_model": 30, "se_groups": 4, "layout": "SE"}, "se_groups=4 must divide model.d_model=30"),
    ({"d_model": 32, "mr_groups": 3, "layout": "MR"}, "mr_groups=3 must divide"),
    ({"d_model": 30, "num_heads": 4, "layout": "MHA"}, "num_heads=4"),
    ({"d_model": 0}, "positive integer"),
    ({"dtype": "float64"}, "choose one of"),
    ({"conv_method": "blocked", "mr_filter_len": 256, "conv_chunk": 128}, "conv_chunk=128"),
    ({"mlp_activation": "relu"}, "choose one of"),
    ({"remat_policy": "dots"}, r"model.remat_policy='dots': choose one of \('full', 'save_dots', 'save_dots_features'\)"),
])
def test_config_validation_errors(kwargs, match):
  with pytest.raises(C.ConfigError, match=match):
    C.ModelConfig(**kwargs)


def test_config_accepts_valid_layouts():
  cfg = C.ModelConfig(d_model=30, se_groups=4, mr_groups=3, num_heads=4, layout="mr,li")
  assert cfg.layers == ("MR", "LI")
  assert C.ModelConfig(layout=["se", "MHA"]).layers == ("SE", "MHA")


def test_config_rejects_odd_head_dim():
  with pytest.raises(C.ConfigError, match="head dim 15 must be even"):
    C.ModelConfig(d_model=30, num_heads=2, layout="MHA", se_groups=2, mr_groups=2)


def test_apply_overrides_types_and_forms():
  base = C.get_preset("tiny")
  cfg = C.apply_overrides(base, C.parse_set_args([
      "model.d_model=256", " train.steps = 7", "model.mr_decay=false", "model.mlp_dim=null",
      "model.rope_base=1e6", "train.learning_rate=1e-4", "data.path=/tmp/x.fa",
      "train.warmup_steps=1e1"]))
  assert cfg.model.d_model == 256 and cfg.train.steps == 7 and cfg.model.mr_decay is False
  assert cfg.model.mlp_dim is None and cfg.model.rope_base == 1e6
  assert cfg.train.learning_rate == 1e-4 and cfg.data.path == "/tmp/x.fa"
  assert cfg.train.warmup_steps == 10 and isinstance(cfg.train.warmup_steps, int)
  assert cfg.model.layout == base.model.layout  # untouched fields survive
  nested = C.apply_overrides(base, {"model": {"d_model": 256}, "train": {"steps": 7}})
  dotted = C.apply_overrides(base, {"model.d_model": 256, "train.steps": 7})
  assert nested == dotted


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_config_dict_round_trip(name):
  cfg = C.get_preset(name)
  assert C.Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides,match", [
    ({"model.dmodel": "3"}, r"unknown setting 'model.dmodel': model has \[.*'d_model'"),
    ({"modle.d_model": "3"}, r"sections are \['data', 'mesh', 'model', 'train'\]"),
    ({"model": 3}, "unknown setting 'model'"),
    ({"model.d_model": "abc"}, r"model.d_model='abc' is not a valid int"),
    ({"model.d_model": "1.5"}, "not a valid int"),
    ({"model.mr_decay": "maybe"}, "not a valid bool"),
    ({"model.rope_base": "fast"}, "not a valid float"),
    ({"model.d_model": "null"}, "cannot be null"),
    ({"model.d_model": "30"}, "se_groups=8 must divide"),  # re-validated after the override
])
def test_apply_overrides_errors(overrides, match):
  with pytest.raises(C.ConfigError, match=match):
    C.apply_overrides(C.get_preset("tiny"), overrides)


def test_apply_overrides_refuses_fractional_exponent_int():
  with pytest.raises(C.ConfigError, match="not a valid int"):
    C.apply_overrides(C.Config(), {"train.steps": "2.5e0"})


@pytest.mark.parametrize("item", ["model.d_model", "=5", "  =5"])
def test_parse_set_args_errors(item):
  with pytest.raises(C.ConfigError, match="must look like section.name=value"):
    C.parse_set_args([item])


def test_unknown_preset_lists_valid_ones():
  with pytest.raises(C.ConfigError, match=r"choose one of \['evo2-1b', 'evo2-40b', 'evo2-7b', "
                     r"'tiny'\]"):
    C.get_preset("evo2-3b")


@pytest.mark.parametrize("module_cls", [HyenaSE, HyenaMR])
def test_hyena_pallas_method_matches_direct(module_cls):
  """conv_method="pallas" (the fused kernel, interpret mode on CPU) gives the model the same
  outputs and parameter gradients as the XLA direct convolution."""
  cfg = C.ModelConfig(d_model=32, num_heads=2, se_groups=2, mr_groups=2, mr_filter_len=16,
                      train_len=64, dtype="float32", layout="SE MR")
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 40, 32)), jnp.float32)
  params = nn.meta.unbox(module_cls(cfg).init(jax.random.key(3), x)["params"])
  params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  results = {}
  for method in ("pallas", "direct"):
    module = module_cls(dataclasses.replace(cfg, conv_method=method))
    out, pullback = jax.vjp(lambda p: module.apply({"params": p}, x), params)
    results[method] = out, pullback(jnp.cos(out))[0]  # the gradient of sum(sin(out))
  out, want = results["pallas"][0], results["direct"][0]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(want))))
  for a, b in zip(jax.tree.leaves(results["pallas"][1]), jax.tree.leaves(results["direct"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
