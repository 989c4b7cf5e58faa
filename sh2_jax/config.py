"""Configuration as data: frozen dataclasses, presets, layout parsing and overrides.

Every knob of a run lives in one `Config` (model, data, train, mesh). Configs are validated
once, here, with errors that say the value, the constraint and the fix. Overrides use dotted
keys (`model.d_model=256`) from the CLI or a YAML file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

from sh2_jax.errors import UserError

MIXER_TYPES = ("SE", "MR", "LI", "MHA")
CONV_METHODS = ("auto", "direct", "fft", "blocked", "pallas", "pallas_fused", "pallas_unfused")
LI_METHODS = ("auto", "fft", "chunked", "pallas", "pallas_fused")
REMAT_POLICIES = ("full", "save_dots", "save_dots_features")
MLP_ACTIVATIONS = ("evo2", "gelu", "identity", "silu")
DTYPES = ("float32", "bfloat16", "float16")
CONTEXT_CONV = ("p2p", "a2a")
CONTEXT_ATTENTION = ("allgather", "ring")


class ConfigError(UserError, ValueError):
  """A configuration value is invalid; the message says which, why and how to fix it."""


def parse_layout(layout: str | typing.Sequence[str]) -> tuple[str, ...]:
  """Parses a layout string such as "SE MR LI MHA" (spaces or commas) into mixer names."""
  if isinstance(layout, str):
    names = layout.replace(",", " ").split()
  else:
    names = list(layout)
  names = [n.strip().upper() for n in names]
  if not names:
    raise ConfigError("model.layout is empty: give mixers separated by spaces, e.g. 'SE MR LI MHA'")
  bad = [n for n in names if n not in MIXER_TYPES]
  if bad:
    raise ConfigError(
        f"model.layout has unknown mixer(s) {bad}: valid mixers are {list(MIXER_TYPES)}")
  return tuple(names)


def evo2_layout(num_layers: int, attn_layers: typing.Sequence[int]) -> str:
  """The Evo 2 stripe: SE, MR, LI repeated, with MHA at the given layer indices."""
  cycle = ("SE", "MR", "LI")
  names, hyena_index = [], 0
  for i in range(num_layers):
    if i in attn_layers:
      names.append("MHA")
    else:
      names.append(cycle[hyena_index % 3])
      hyena_index += 1
  return " ".join(names)


def round_up(x: int, multiple: int) -> int:
  return ((x + multiple - 1) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """StripedHyena 2 architecture (SPEC.md sections 1-4).

  Attributes:
    vocab_size: byte vocabulary (512 in Evo 2; bytes use 0..255).
    d_model: width D.
    layout: mixer per layer, e.g. "SE MR LI MHA" (one of SE, MR, LI, MHA per layer).
    num_heads: attention heads; head dim is d_model // num_heads.
    mlp_dim: gated-MLP inner size; None uses round_up(int(8 D / 3), 128).
    mlp_activation: "evo2" (GELU in layer 0 only, identity after: the Evo 2 quirk), or one
      activation for every layer ("gelu", "identity", "silu").
    featurizer_len: taps of the short depthwise conv on the 3D projection channels.
    se_filter_len / mr_filter_len: taps of the SE / MR inner filters (reference: hcs/hcm_filter_length).
    se_groups / mr_groups: filter groups; channels per group = d_model // groups.
    li_order: real poles per channel of the LI modal filter (reference: state_size).
    mr_decay: multiply MR taps by exp(-r_g n / (train_len - 1)) at run time (savanna); False
      when the stored taps are already effective (vortex/released Evo 2 weights).
    train_len: L_train in the MR decay (8192 for Evo 2).
    rope_base: RoPE base (1e4; Evo 2 40B uses 1e6).
    norm_eps: RMSNorm epsilon, added to the RMS outside the sqrt.
    dtype: compute dtype of projections and attention; filters and FFTs stay float32.
    param_dtype: storage dtype of parameters (master weights).
    conv_method: inner-convolution method for SE/MR: "direct" (sum of shifted copies), "fft",
      "blocked" (two-stage chunked GEMMs in XLA), "pallas" (the blocked GPU kernels, with the
      featurizer fused into them for filters of <= 64 taps, i.e. SE, where that measured
      faster on an H100; Pallas interpret mode off GPU, slow), "pallas_fused" /
      "pallas_unfused" (force the featurizer into / out of the kernel), or "auto" ("pallas" on
      GPU where the shape allows, else direct for short filters and blocked up to the chunk).
    li_method: LI long-convolution method: "fft" (float32 FFT of the materialised filter),
      "chunked" (exact Toeplitz inside chunks, 16-state carry between), "pallas" (the fused
      modal-recurrence GPU kernel; interpret mode off GPU, slow), "pallas_fused" (the same
      kernels featurizing the in-projection's streams themselves; one device, else "pallas"),
      "auto" (on GPU "pallas_fused" on one device and "pallas" under context parallelism,
      where the shape allows; else fft / chunked by length).
    out_proj_in_kernel_bwd: with remat, Hyena mixers on one device whose gate runs as a Pallas
      kernel take the output projection's weight gradient from the kernel's backward, which
      also writes the gate output (pallas_kernels/output_projection.py), so the rematerialised
      block does not rerun the forward kernel. False, or without remat: XLA's autodiff of
      y @ W_out (which, with remat, reruns the forward kernel for y).
    conv_chunk: chunk length of the blocked convolution (>= the longest blocked filter).
    remat: rematerialise each block in the backward pass.
    remat_policy: what a rematerialised block keeps from its forward pass: "full" (nothing but
      its input: least memory), "save_dots" (also the outputs of matrix products without batch
      dimensions, i.e. the projections and the MLP, so the backward recomputes only norms,
      gates, convolutions and attention, and the LI kernels' segment-start states: 2 S N
      float32 values a channel per LI block, S the sequence segments of the kernels, so
      the backward skips their state pass; and the Hyena in-projection's reordered or sliced
      weight, 3 D^2 values of `dtype` per Hyena block, so the backward does not rebuild it),
      "save_dots_features" (also the featurized streams of the Hyena mixers that run the
      featurizer outside their kernels, MR on GPU: 3 L D values of `dtype` per such block, so
      the backward does not rerun the featurizer; no faster on an H100 at evo2-1b 8K).
    mlp_slices: run the MLP over this many token slices in turn, each rematerialised: its
      [L, mlp_dim] hidden values exist one slice at a time (long context; 1 = off; lengths
      that are not a multiple of it run in gcd(L, mlp_slices) slices).
    offload_residuals: with remat, keep each block's input (the float32 residual stream,
      [B, L, D]) and the final norm's in pinned host memory from the forward to the backward
      pass instead of on the device: 4 * L * D bytes per block freed for one copy each way.
    cast_weights_once: with remat, the train step casts the matrix weights (projections, qkv,
      MLP; layers.params.COMPUTE_WEIGHTS) to `dtype` once, before the model, instead of each
      block casting them inside its rematerialised forward, which the backward pass reruns:
      one float32 read of those weights less per step, for a `dtype` copy of them held from
      the forward to the backward pass (2 bytes a parameter).
    init_std: standard deviation of embedding and projection init.
  """
  vocab_size: int = 512
  d_model: int = 128
  layout: str = "SE MR LI MHA"
  num_heads: int = 2
  mlp_dim: int | None = None
  mlp_activation: str = "evo2"
  featurizer_len: int = 3
  se_filter_len: int = 7
  mr_filter_len: int = 128
  se_groups: int = 8
  mr_groups: int = 8
  li_order: int = 16
  mr_decay: bool = True
  train_len: int = 8192
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  conv_method: str = "auto"
  li_method: str = "auto"
  out_proj_in_kernel_bwd: bool = True
  conv_chunk: int = 128
  remat: bool = False
  remat_policy: str = "full"
  mlp_slices: int = 1
  offload_residuals: bool = False
  cast_weights_once: bool = True
  init_std: float = 0.02

  def __post_init__(self) -> None:
    layers = parse_layout(self.layout)
    for name in ("vocab_size", "d_model", "num_heads", "featurizer_len", "se_filter_len",
                 "mr_filter_len", "se_groups", "mr_groups", "li_order", "train_len", "conv_chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r} must be a positive integer")
    if self.vocab_size < 256:
      raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 256 to hold every byte")
    if "MHA" in layers and self.d_model % self.num_heads:
      raise ConfigError(f"model.d_model={self.d_model} must be divisible by "
                        f"model.num_heads={self.num_heads}; pick heads that divide the width")
    for kind, groups in (("SE", self.se_groups), ("MR", self.mr_groups)):
      if kind in layers and self.d_model % groups:
        raise ConfigError(f"model.{kind.lower()}_groups={groups} must divide "
                          f"model.d_model={self.d_model} (channels are split into equal groups)")
    if "MHA" in layers and (self.d_model // self.num_heads) % 2:
      raise ConfigError(f"head dim {self.d_model // self.num_heads} must be even for rotary "
                        f"embeddings: change model.d_model={self.d_model} or model.num_heads={self.num_heads}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ConfigError(f"model.mlp_activation={self.mlp_activation!r}: choose one of {MLP_ACTIVATIONS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name}={getattr(self, name)!r}: choose one of {DTYPES}")
    if self.conv_method not in CONV_METHODS:
      raise ConfigError(f"model.conv_method={self.conv_method!r}: choose one of {CONV_METHODS}")
    if self.li_method not in LI_METHODS:
      raise ConfigError(f"model.li_method={self.li_method!r}: choose one of {LI_METHODS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"model.remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
    if self.conv_method in ("blocked", "pallas", "pallas_fused", "pallas_unfused"):
      longest = max([self.se_filter_len if "SE" in layers else 0,
                     self.mr_filter_len if "MR" in layers else 0])
      if longest > self.conv_chunk:
        raise ConfigError(f"model.conv_chunk={self.conv_chunk} must be >= the longest blocked "
                          f"filter ({longest} taps) for conv_method={self.conv_method!r}")
    if not isinstance(self.mlp_slices, int) or self.mlp_slices < 1:
      raise ConfigError(f"model.mlp_slices={self.mlp_slices!r} must be a positive integer "
                        "(1 runs the MLP in one piece)")
    if self.offload_residuals and not self.remat:
      raise ConfigError("model.offload_residuals=true needs model.remat=true (without remat "
                        "the backward keeps every activation on the device anyway)")
    if self.mlp_dim is not None and (not isinstance(self.mlp_dim, int) or self.mlp_dim < 1):
      raise ConfigError(f"model.mlp_dim={self.mlp_dim!r} must be a positive integer or null")

  @property
  def layers(self) -> tuple[str, ...]:
    return parse_layout(self.layout)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def ffn_dim(self) -> int:
    """Inner MLP size: explicit mlp_dim, else round_up(int(2 * D * 4 / 3), 128)."""
    if self.mlp_dim is not None:
      return self.mlp_dim
    return round_up(int(2 * self.d_model * 4 / 3), 128)

  def activation(self, layer: int) -> str:
    """The MLP activation of a layer ('gelu' | 'identity' | 'silu'), with the Evo 2 quirk."""
    if self.mlp_activation == "evo2":
      return "gelu" if layer == 0 else "identity"
    return self.mlp_activation


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Byte-level training data.

  Attributes:
    path: FASTA/FASTA.gz or any text/bytes file (or a directory of them); None = the bacterial
      genome shipped inside the pyrodigal package.
    format: "auto" (by extension / content), "fasta" or "bytes".
    seq_len: tokens per training window (each window holds seq_len + 1 bytes: inputs and
      next-byte targets).
    eval_fraction: tail fraction of the data held out for evaluation (split by position).
    seed: shuffling seed of the training windows.
    worker_count: grain worker processes (0 = in-process).
  """
  path: str | None = None
  format: str = "auto"
  seq_len: int = 512
  eval_fraction: float = 0.05
  seed: int = 0
  worker_count: int = 0

  def __post_init__(self) -> None:
    if self.format not in ("auto", "fasta", "bytes"):
      raise ConfigError(f"data.format={self.format!r}: choose one of ('auto', 'fasta', 'bytes')")
    if not isinstance(self.seq_len, int) or self.seq_len < 1:
      raise ConfigError(f"data.seq_len={self.seq_len!r} must be a positive integer")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in (0, 1)")
    if self.worker_count < 0:
      raise ConfigError(f"data.worker_count={self.worker_count} must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and run bookkeeping.

  Attributes:
    steps: optimizer steps.
    batch_size: sequences per optimizer step (split into grad_accum micro-batches).
    grad_accum: micro-batches per step.
    learning_rate: peak learning rate of warmup + cosine.
    warmup_steps: linear warmup steps.
    min_lr_ratio: final learning rate as a fraction of the peak.
    weight_decay: AdamW decay, applied to matrices only.
    b1, b2: Adam moments.
    clip_norm: global-norm gradient clip.
    seed: parameter init and dropout-free RNG seed.
    log_every: steps between progress/metric records.
    eval_every: steps between held-out evaluations (0 = only at the end).
    eval_batches: held-out batches per evaluation (0 = all).
    checkpoint_every: steps between checkpoints (0 = only at the end).
    keep_checkpoints: checkpoints kept (keep-last-N).
  """
  steps: int = 1000
  batch_size: int = 8
  grad_accum: int = 1
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 16
  checkpoint_every: int = 500
  keep_checkpoints: int = 3

  def __post_init__(self) -> None:
    for name in ("steps", "batch_size", "grad_accum"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.{name}={value!r} must be a positive integer")
    for name in ("warmup_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ConfigError(f"train.{name}={value!r} must be a non-negative integer")
    if self.batch_size % self.grad_accum:
      raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                        f"train.grad_accum={self.grad_accum}")
    if self.keep_checkpoints < 1:
      raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1")
    if self.learning_rate <= 0:
      raise ConfigError(f"train.learning_rate={self.learning_rate} must be > 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; -1 means "all remaining devices" (at most one axis).

  Context parallelism (context > 1; sh2_jax.parallel.context_sharding):
    context_conv: "p2p" (halo exchange) or "a2a" (sequence <-> channel all-to-all) for the
      inner convolutions of SE and MR (the featurizer is always p2p, LI always all-to-all).
    context_attention: "allgather" (gather K/V) or "ring" (K/V blocks passed around the axis,
      online softmax).
    zigzag: load-balance causal attention: rank r of N holds chunks r and 2N-1-r of 2N.
    context_fsdp: also shard parameters and optimizer state over the context axis (their
      "embed" dimension over fsdp x context; XLA gathers each weight where it is used), so a
      context mesh does not hold N replicas of them.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  context: int = 1
  context_conv: str = "p2p"
  context_attention: str = "allgather"
  zigzag: bool = False
  context_fsdp: bool = False

  AXES: typing.ClassVar[tuple[str, ...]] = ("data", "fsdp", "tensor", "context")

  def __post_init__(self) -> None:
    if self.context_conv not in CONTEXT_CONV:
      raise ConfigError(f"mesh.context_conv={self.context_conv!r}: choose one of {CONTEXT_CONV}")
    if self.context_attention not in CONTEXT_ATTENTION:
      raise ConfigError(f"mesh.context_attention={self.context_attention!r}: choose one of "
                        f"{CONTEXT_ATTENTION}")
    sizes = [getattr(self, a) for a in self.AXES]
    if sum(s == -1 for s in sizes) > 1:
      raise ConfigError(f"mesh {dict(zip(self.AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh {dict(zip(self.AXES, sizes))}: sizes must be positive or -1")

  def shape(self, num_devices: int) -> tuple[int, ...]:
    """Resolves -1 against the device count; errors if the product does not match."""
    sizes = [getattr(self, a) for a in self.AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(f"mesh {dict(zip(self.AXES, sizes))} does not divide {num_devices} devices")
      sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"mesh {dict(zip(self.AXES, sizes))} uses {math.prod(sizes)} devices "
                        f"but {num_devices} {'is' if num_devices == 1 else 'are'} available; make the product "
                        "match or use -1")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()

  def to_dict(self) -> dict[str, Any]:
    return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, tree: Mapping[str, Any]) -> "Config":
    return apply_overrides(cls(), tree)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def _tiny() -> Config:
  """Trains on a laptop CPU in minutes; all four mixers present."""
  return Config(
      model=ModelConfig(d_model=128, layout="SE MR LI MHA", num_heads=2, se_groups=8,
                        mr_groups=8, mr_filter_len=64, train_len=512, mlp_activation="gelu"),
      data=DataConfig(seq_len=256),
      train=TrainConfig(steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30,
                        log_every=10, eval_every=100, eval_batches=8, checkpoint_every=100),
  )


def _evo2(num_layers: int, d_model: int, heads: int, attn: tuple[int, ...], groups: int,
          rope_base: float = 1e4) -> Config:
  return Config(
      model=ModelConfig(d_model=d_model, layout=evo2_layout(num_layers, attn), num_heads=heads,
                        se_groups=groups, mr_groups=groups, mr_filter_len=128, train_len=8192,
                        rope_base=rope_base, mlp_activation="evo2", init_std=0.02),
      data=DataConfig(seq_len=8192),
      train=TrainConfig(steps=100000, batch_size=8, learning_rate=3e-4, warmup_steps=2000),
  )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _tiny,
    "evo2-1b": lambda: _evo2(25, 1920, 15, (3, 10, 17, 24), 15),
    "evo2-7b": lambda: _evo2(32, 4096, 32, (3, 10, 17, 24, 31), 256),
    "evo2-40b": lambda: _evo2(50, 8192, 64, (3, 10, 17, 24, 31, 35, 42, 49), 512, rope_base=1e6),
}


def get_preset(name: str) -> Config:
  """Returns a preset by name; unknown names list the valid ones."""
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
  return PRESETS[name]()


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------

def _coerce(section: str, field: dataclasses.Field, raw: Any) -> Any:
  """Converts a raw override (string from the CLI, or a YAML scalar) to the field's type."""
  hint = field.type if not isinstance(field.type, str) else field.type
  text = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
  key = f"{section}.{field.name}"
  if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
    if "None" in text:
      return None
    raise ConfigError(f"{key} cannot be null")
  try:
    if text.startswith("bool"):
      if isinstance(raw, bool):
        return raw
      if str(raw).lower() in ("1", "true", "yes", "on"):
        return True
      if str(raw).lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError
    if text.startswith("int"):
      if isinstance(raw, bool):
        raise ValueError
      if isinstance(raw, str) and "e" in raw.lower():
        raw = float(raw)
      if isinstance(raw, float) and not raw.is_integer():
        raise ValueError
      return int(raw)
    if text.startswith("float"):
      return float(raw)
    return str(raw)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={raw!r} is not a valid {text.split(' ')[0]}") from None


def apply_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
  """Returns config with overrides applied.

  Args:
    overrides: either dotted keys ({"model.d_model": 256}) or nested sections
      ({"model": {"d_model": 256}}), values as strings or YAML scalars.
  """
  flat: dict[str, Any] = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      for sub, sub_value in value.items():
        flat[f"{key}.{sub}"] = sub_value
    else:
      flat[key] = value
  sections = {f.name: f for f in dataclasses.fields(Config)}
  updates: dict[str, dict[str, Any]] = {}
  for key, value in flat.items():
    section, _, name = key.partition(".")
    if section not in sections or not name:
      raise ConfigError(f"unknown setting {key!r}: keys look like 'model.d_model', sections are "
                        f"{sorted(sections)}")
    fields = {f.name: f for f in dataclasses.fields(getattr(config, section))}
    if name not in fields:
      raise ConfigError(f"unknown setting {key!r}: {section} has {sorted(fields)}")
    updates.setdefault(section, {})[name] = _coerce(section, fields[name], value)
  replaced = {s: dataclasses.replace(getattr(config, s), **u) for s, u in updates.items()}
  return dataclasses.replace(config, **replaced)


def parse_set_args(items: typing.Sequence[str]) -> dict[str, str]:
  """Parses CLI `--set key=value` items into a dict of dotted keys."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"--set {item!r} must look like section.name=value, e.g. model.d_model=256")
    out[key.strip()] = value.strip()
  return out


def load_yaml_overrides(path: str) -> dict[str, Any]:
  """Reads a YAML file of nested sections or dotted keys."""
  import os
  import yaml
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  with open(path) as f:
    tree = yaml.safe_load(f)
  if tree is None:
    return {}
  if not isinstance(tree, Mapping):
    raise ConfigError(f"config file {path!r} must hold a mapping of sections, e.g. 'model: {{d_model: 256}}'")
  if "preset" in tree:
    tree = {k: v for k, v in tree.items() if k != "preset"}
  return dict(tree)
