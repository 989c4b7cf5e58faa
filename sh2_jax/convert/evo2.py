"""Evo 2 (vortex inference layout) state dicts <-> sh2_jax parameters.

Conventions bridged here (see ../shared/golden/README.md, read from vortex at cb229ae):
- `projections.weight` [3D, D] is `x @ W.T`; output channels interleaved (3i+0 post-gate,
  3i+1 pre-gate, 3i+2 value). Our `in_proj` [D, 3, D] puts the stream on the middle axis:
  in_proj[:, s, i] = W[3i + s, :] (`in_proj_from_vortex`); the featurizer's rows likewise,
  [3, D, K].
- featurizer `short_filter_weight` [3D, 1, 3] and SE `filter.h` [G, 1, 7] are cross-correlations
  (last tap on the current token): flipped. MR `filter.h` [G, 1, 128] already has h[0] on the
  current token and stores the effective (decayed) taps: used as is with `mr_decay=False`.
- LI `log_poles` [D, N, 1], pole = exp(log_pole): we store p = log(-log_pole), gamma = 0.
- MHA `Wqkv.weight` [3D, D]: released checkpoints order rows (head, q|k|v, dim) ("checkpoint"
  layout); vortex's in-memory layout is (q|k|v, head, dim) ("memory"). Our qkv is [D, 3, N, H].
- MLP `l1, l2, l3` are (x @ W.T); the activation applies to l1's branch.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sh2_jax.config import ModelConfig
from sh2_jax.errors import UserError

QKV_LAYOUTS = ("checkpoint", "memory")


class ConversionError(UserError, ValueError):
  """A state dict does not match the config: names the keys and shapes involved."""


def in_proj_from_vortex(weight_3DD: np.ndarray) -> np.ndarray:
  """`projections.weight` [3D, D] (rows interleaved 3i + s) -> our in_proj [D, 3, D]."""
  width = weight_3DD.shape[1]
  return weight_3DD.reshape(width, 3, width).transpose(2, 1, 0)


def in_proj_to_vortex(w_in_DSC: np.ndarray) -> np.ndarray:
  """Inverse of `in_proj_from_vortex`: [D, 3, D] -> [3D, D] with rows 3i + s."""
  width = w_in_DSC.shape[0]
  return w_in_DSC.transpose(2, 1, 0).reshape(3 * width, width)


def featurizer_from_vortex(weight_3D1K: np.ndarray) -> np.ndarray:
  """`short_filter_weight` [3D, 1, K] (rows 3i + s, cross-correlation order) -> our featurizer
  [3, D, K] (streams first, w[..., 0] on the current token)."""
  rows, _, taps = weight_3D1K.shape
  return weight_3D1K[:, 0, ::-1].reshape(rows // 3, 3, taps).transpose(1, 0, 2)


def featurizer_to_vortex(w_feat_SCK: np.ndarray) -> np.ndarray:
  """Inverse of `featurizer_from_vortex`: [3, D, K] -> [3D, 1, K]."""
  streams, width, taps = w_feat_SCK.shape
  return w_feat_SCK.transpose(1, 0, 2).reshape(streams * width, 1, taps)[..., ::-1]


def config_from_vortex(vortex: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig equivalent to a vortex YAML config (as a dict)."""
  num_layers = int(vortex["num_layers"])
  kinds = {}
  for key, kind in (("hcs_layer_idxs", "SE"), ("hcm_layer_idxs", "MR"), ("hcl_layer_idxs", "LI"),
                    ("attn_layer_idxs", "MHA")):
    for i in vortex.get(key, []):
      kinds[int(i)] = kind
  missing = [i for i in range(num_layers) if i not in kinds]
  if missing:
    raise ConversionError(f"vortex config assigns no mixer to layers {missing}")
  width = int(vortex["hidden_size"])
  fields = dict(
      vocab_size=int(vortex["vocab_size"]), d_model=width,
      layout=" ".join(kinds[i] for i in range(num_layers)),
      num_heads=int(vortex["num_attention_heads"]),
      mlp_dim=int(vortex["inner_mlp_size"]) if vortex.get("inner_mlp_size") else None,
      mlp_activation="evo2" if vortex.get("evo2_style_activations", False) else "gelu",
      featurizer_len=int(vortex.get("short_filter_length", 3)),
      se_filter_len=int(vortex.get("hcs_filter_length", 7)),
      mr_filter_len=int(vortex.get("hcm_filter_length", 128)),
      se_groups=int(vortex.get("hcs_filter_groups", width // 16)),
      mr_groups=int(vortex.get("hcm_filter_groups", width // 16)),
      li_order=int(vortex.get("state_size", 16)), mr_decay=False,
      rope_base=float(vortex.get("rotary_emb_base", 10000)), norm_eps=float(vortex.get("eps", 1e-6)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def _expect(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], used: set[str]) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"missing key {key!r} (expected shape {shape})")
  value = np.asarray(state[key])
  if value.shape != shape:
    raise ConversionError(f"{key!r} has shape {value.shape}, expected {shape} for this config")
  used.add(key)
  return value


def vortex_to_params(state: Mapping[str, Any], config: ModelConfig,
                     qkv_layout: str = "checkpoint") -> dict:
  """Converts a vortex/Evo 2 state dict (numpy arrays) to an sh2_jax parameter tree (numpy).

  Args:
    state: name -> array (torch tensors converted with .float().numpy() by the caller).
    config: the model config (from `config_from_vortex`); must use mr_decay=False.
    qkv_layout: "checkpoint" for released files, "memory" for vortex's in-memory state dict.

  Raises:
    ConversionError: naming every missing key, unknown key or shape mismatch.
  """
  if qkv_layout not in QKV_LAYOUTS:
    raise ConversionError(f"qkv_layout={qkv_layout!r}: choose one of {QKV_LAYOUTS}")
  if config.mr_decay and "MR" in config.layers:
    raise ConversionError("vortex MR filters are already decayed: convert with mr_decay=False")
  state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()
           if not k.endswith("_extra_state")}
  d, used = config.d_model, set()
  f, n_heads, head = config.ffn_dim, config.num_heads, config.head_dim
  params: dict[str, Any] = {
      "embedding": _expect(state, "embedding_layer.weight", (config.vocab_size, d), used),
      "final_norm": {"scale": _expect(state, "norm.scale", (d,), used)},
  }
  for i, kind in enumerate(config.layers):
    pre = f"blocks.{i}."
    block = {
        "pre_norm": {"scale": _expect(state, pre + "pre_norm.scale", (d,), used)},
        "post_norm": {"scale": _expect(state, pre + "post_norm.scale", (d,), used)},
        "mlp": {
            "w1": _expect(state, pre + "mlp.l1.weight", (f, d), used).T,
            "w2": _expect(state, pre + "mlp.l2.weight", (f, d), used).T,
            "w3": _expect(state, pre + "mlp.l3.weight", (d, f), used).T,
        },
    }
    if kind == "MHA":
      mha = pre + "inner_mha_cls."
      wqkv = _expect(state, mha + "Wqkv.weight", (3 * d, d), used)
      if qkv_layout == "checkpoint":
        qkv = wqkv.reshape(n_heads, 3, head, d).transpose(3, 1, 0, 2)
      else:
        qkv = wqkv.reshape(3, n_heads, head, d).transpose(3, 0, 1, 2)
      inv_freq_key = mha + "rotary_emb.inv_freq"
      if inv_freq_key in state:
        stored = _expect(state, inv_freq_key, (head // 2,), used)
        ours = 1.0 / config.rope_base ** (np.arange(0, head, 2, dtype=np.float64) / head)
        if not np.allclose(stored, ours, rtol=1e-3):
          raise ConversionError(f"{inv_freq_key!r} does not match rope_base={config.rope_base}; "
                                "set model.rope_base to the checkpoint's base")
      block["mixer"] = {
          "qkv": qkv,
          "out_proj": _expect(state, mha + "out_proj.weight", (d, d), used).T.reshape(n_heads, head, d),
          "out_bias": _expect(state, mha + "out_proj.bias", (d,), used),
      }
    else:
      mixer = {
          "in_proj": in_proj_from_vortex(_expect(state, pre + "projections.weight", (3 * d, d), used)),
          "featurizer": featurizer_from_vortex(_expect(state, pre + "filter.short_filter_weight",
                                                       (3 * d, 1, config.featurizer_len), used)),
          "out_proj": _expect(state, pre + "out_filter_dense.weight", (d, d), used).T,
          "out_bias": _expect(state, pre + "out_filter_dense.bias", (d,), used),
      }
      if kind == "SE":
        mixer["filter"] = _expect(state, pre + "filter.h", (config.se_groups, 1, config.se_filter_len),
                                  used)[:, 0, ::-1]
      elif kind == "MR":
        mixer["filter"] = _expect(state, pre + "filter.h", (config.mr_groups, 1, config.mr_filter_len),
                                  used)[:, 0, :]
        mixer["dskip"] = _expect(state, pre + "filter.D", (d,), used)
      else:
        log_poles = _expect(state, pre + "filter.log_poles", (d, config.li_order, 1), used)[..., 0]
        if np.any(log_poles >= 0):
          raise ConversionError(f"{pre}filter.log_poles has {int(np.sum(log_poles >= 0))} values >= 0 "
                                "(poles >= 1, unstable); sh2_jax keeps log_pole = -exp(p + gamma) < 0")
        mixer["pole_p"] = np.log(-log_poles)
        mixer["pole_gamma"] = np.zeros_like(log_poles)
        mixer["residues"] = _expect(state, pre + "filter.residues", (d, config.li_order), used)
        mixer["dskip"] = _expect(state, pre + "filter.D", (d,), used)
      block["mixer"] = mixer
    params[f"block_{i}"] = block
  unknown = sorted(set(state) - used)
  if unknown:
    raise ConversionError(f"{len(unknown)} unknown key(s) for this config: {unknown[:8]}"
                          f"{' ...' if len(unknown) > 8 else ''}")
  return _contiguous(params)


def params_to_vortex(params: Mapping[str, Any], config: ModelConfig,
                     qkv_layout: str = "checkpoint") -> dict[str, np.ndarray]:
  """Inverse of `vortex_to_params`: an sh2_jax parameter tree to a vortex state dict (numpy).

  MR filters are written as effective taps (the decay applied when config.mr_decay is set).
  """
  from sh2_jax.ops import filters  # deferred: keeps numpy-only users free of jax at import

  p = _to_numpy(params)
  d, head = config.d_model, config.head_dim
  state = {"embedding_layer.weight": p["embedding"], "norm.scale": p["final_norm"]["scale"]}
  for i, kind in enumerate(config.layers):
    pre, block = f"blocks.{i}.", p[f"block_{i}"]
    state[pre + "pre_norm.scale"] = block["pre_norm"]["scale"]
    state[pre + "post_norm.scale"] = block["post_norm"]["scale"]
    for name, key in (("w1", "l1"), ("w2", "l2"), ("w3", "l3")):
      state[pre + f"mlp.{key}.weight"] = block["mlp"][name].T
    mixer = block["mixer"]
    if kind == "MHA":
      mha = pre + "inner_mha_cls."
      order = (2, 1, 3, 0) if qkv_layout == "checkpoint" else (1, 2, 3, 0)
      state[mha + "Wqkv.weight"] = mixer["qkv"].transpose(order).reshape(3 * d, d)
      state[mha + "out_proj.weight"] = mixer["out_proj"].reshape(d, d).T
      state[mha + "out_proj.bias"] = mixer["out_bias"]
      state[mha + "rotary_emb.inv_freq"] = (
          1.0 / config.rope_base ** (np.arange(0, head, 2, dtype=np.float64) / head)).astype(np.float32)
      continue
    state[pre + "projections.weight"] = in_proj_to_vortex(mixer["in_proj"])
    state[pre + "filter.short_filter_weight"] = featurizer_to_vortex(mixer["featurizer"])
    state[pre + "out_filter_dense.weight"] = mixer["out_proj"].T
    state[pre + "out_filter_dense.bias"] = mixer["out_bias"]
    if kind == "SE":
      state[pre + "filter.h"] = mixer["filter"][:, None, ::-1]
    elif kind == "MR":
      h = np.asarray(filters.mr_filter(mixer["filter"], config.train_len, config.mr_decay))
      state[pre + "filter.h"] = h[:, None, :]
      state[pre + "filter.D"] = mixer["dskip"]
    else:
      log_poles = np.asarray(filters.modal_log_poles(mixer["pole_p"], mixer["pole_gamma"]))
      state[pre + "filter.log_poles"] = log_poles[..., None]
      state[pre + "filter.residues"] = mixer["residues"]
      state[pre + "filter.D"] = mixer["dskip"]
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  value = getattr(tree, "value", tree)  # flax Partitioned boxes
  return np.asarray(value, dtype=np.float32)


def _contiguous(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, dtype=np.float32)
