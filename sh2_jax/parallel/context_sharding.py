"""How the model runs with its sequence sharded over the `context` mesh axis (SPEC.md s6).

`ContextSharding` is built once from the mesh and the mesh config (`from_mesh`) and handed to
the model; every sequence mixer then calls its context-parallel path through it:
- featurizer: p2p halo exchange (2 rows);
- SE / MR inner convolution: p2p or all-to-all (`mesh.context_conv`);
- LI: all-to-all (full-length modal convolution on D/N channels);
- MHA: all-gather K/V or ring (`mesh.context_attention`), RoPE with the tokens' true positions.
MLPs and norms are pointwise in L and run on the local shard under GSPMD; the residual stream
is constrained to [batch over data x fsdp, length over context, width whole].

Each mixer core is a `jax.shard_map` over the whole mesh: batch over (data, fsdp) when it
divides, sequence over context, everything else (channels, filters, heads) whole: the
projections around it stay in GSPMD land, where fsdp/tensor shard them.

Zigzag (`mesh.zigzag`): the tokens (and targets) are permuted once into zigzag order
(`zigzag_order`, rank r holds chunks r and 2N-1-r), the model runs on that order, and the
per-token losses are put back only where needed. Positions for RoPE and the attention mask come
from the same permutation; the halo and all-to-all primitives know the layout.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import blocked_conv
from sh2_jax.config import ConfigError, MeshConfig, ModelConfig
from sh2_jax.ops import conv, hyena
from sh2_jax.parallel import context as cp
from sh2_jax.parallel import context_attention as cp_attention

AXIS = "context"
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ContextSharding:
  """The mesh and the context-parallel strategies (see the module docstring).

  Attributes:
    mesh: device mesh with a `context` axis of size > 1 (and data, fsdp, tensor).
    conv_strategy: "p2p" | "a2a" for the SE/MR inner convolutions.
    attention_strategy: "allgather" | "ring".
    zigzag: the sequence is stored in zigzag order (rank r: chunks r, 2N-1-r).
  """
  mesh: Mesh
  conv_strategy: str = "p2p"
  attention_strategy: str = "allgather"
  zigzag: bool = False

  @property
  def size(self) -> int:
    return self.mesh.shape[AXIS]

  # ---- layout --------------------------------------------------------------------------------

  def order(self, length: int) -> np.ndarray:
    """Position of each stored token ([L] int32): zigzag order or 0..L-1."""
    if self.zigzag:
      return cp.zigzag_order(length, self.size)
    return np.arange(length, dtype=np.int32)

  def to_layout(self, x_BL: jax.Array) -> jax.Array:
    """Natural order -> storage order along axis 1 (identity without zigzag)."""
    return jnp.take(x_BL, self.order(x_BL.shape[1]), axis=1) if self.zigzag else x_BL

  def from_layout(self, x_BL: jax.Array) -> jax.Array:
    """Storage order -> natural order along axis 1."""
    if not self.zigzag:
      return x_BL
    return jnp.take(x_BL, np.argsort(self.order(x_BL.shape[1])), axis=1)

  def _batch_axes(self, batch: int) -> tuple[str, ...] | None:
    shards = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
    return BATCH_AXES if batch % shards == 0 else None

  def seq_spec(self, batch: int, rank: int) -> P:
    """[B, L, ...] spec: batch over data x fsdp (when it divides), L over context."""
    return P(self._batch_axes(batch), AXIS, *([None] * (rank - 2)))

  def constrain(self, x: jax.Array) -> jax.Array:
    """Pins an activation [B, L, ...] to the sequence-sharded layout."""
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, self.seq_spec(x.shape[0], x.ndim)))

  def _shard_map(self, body, seq_args, rep_args):
    """shard_map of body(*seq_args, *rep_args) over the whole mesh (output like seq_args[0]).

    check_vma=False: the bodies may call Pallas kernels (SE/MR/LI on GPU), whose outputs carry
    no varying-axes type; the gradients of the replicated arguments are still summed over the
    mesh (tests/test_model_cp.py checks them against one device).
    """
    spec = self.seq_spec(seq_args[0].shape[0], seq_args[0].ndim)
    in_specs = tuple(self.seq_spec(a.shape[0], a.ndim) for a in seq_args) + (P(),) * len(rep_args)
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(*seq_args, *rep_args)

  def validate(self, length: int, halo: int = 0) -> None:
    cp.validate_length(length, self.size, halo, self.zigzag)

  # ---- mixers ------------------------------------------------------------------------------

  def project_and_featurize(self, x_BLD: jax.Array, w_in_DSC: jax.Array,
                            w_feat_SCK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`hyena.project_and_featurize` with the featurizer's 2-row halo exchanged (p2p).

    The three products run in GSPMD land (the single-device path's per-stream weight
    slices); the depthwise featurizer runs in one shard_map on all three streams.
    """
    self.validate(x_BLD.shape[1], w_feat_SCK.shape[-1] - 1)
    streams = tuple(self.constrain(z) for z in hyena.project_streams(x_BLD, w_in_DSC))
    zigzag = self.zigzag

    def body(post, pre, v, w_SCK):
      return tuple(cp.cp_causal_conv_p2p(z, w_SCK[s], AXIS, method="direct", zigzag=zigzag)
                   for s, z in enumerate((post, pre, v)))

    spec = self.seq_spec(x_BLD.shape[0], 3)
    return jax.shard_map(body, mesh=self.mesh, in_specs=(spec,) * 3 + (P(),),
                         out_specs=(spec,) * 3)(*streams, w_feat_SCK)

  def gate_conv_gate(self, post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                     h_GK: jax.Array, dskip_D: jax.Array | None, method: str = "auto",
                     chunk: int = blocked_conv.DEFAULT_CHUNK) -> jax.Array:
    """`hyena.gate_conv_gate` (SE, MR) under context parallelism (p2p or a2a).

    p2p runs the single-device gate-conv-gate (`method`: the Pallas kernel on GPU) on the
    shard's segments and adds what the exchanged halo rows contribute to their first K-1 outputs
    (`cp_gate_conv_gate_p2p`); a2a exchanges u and runs `conv.causal_conv` ("pallas" as its
    blocked reference) on the rank's channels.
    """
    strategy = self.conv_strategy
    self.validate(v_BLD.shape[1], h_GK.shape[-1] - 1 if strategy == "p2p" else 0)
    method = "pallas" if method in ("pallas_fused", "pallas_unfused") else method
    method = conv.resolve_method(method, h_GK.shape[-1], chunk, fused=True)
    if strategy == "p2p":
      fn = cp.cp_gate_conv_gate_p2p
    else:
      method = "blocked" if method == "pallas" else method
      fn = cp.cp_gate_conv_gate_a2a
    zigzag = self.zigzag

    def body(post, pre, v, h, dskip=None):
      return fn(post, pre, v, h, dskip, AXIS, method, chunk, zigzag)

    rep = (h_GK,) if dskip_D is None else (h_GK, dskip_D)
    return self._shard_map(body, (post_BLD, pre_BLD, v_BLD), rep)

  def li_gate_conv_gate(self, post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array,
                        log_poles_DN: jax.Array, residues_DN: jax.Array, dskip_D: jax.Array,
                        method: str = "auto") -> jax.Array:
    """`hyena.li_gate_conv_gate` under context parallelism (always all-to-all)."""
    self.validate(v_BLD.shape[1])
    zigzag = self.zigzag

    def body(post, pre, v, log_poles, residues, dskip):
      return cp.cp_li_gate_conv_gate_a2a(post, pre, v, log_poles, residues, dskip, AXIS, method,
                                         zigzag)

    return self._shard_map(body, (post_BLD, pre_BLD, v_BLD), (log_poles_DN, residues_DN, dskip_D))

  def attention(self, q_BLNH: jax.Array, k_BLNH: jax.Array, v_BLNH: jax.Array,
                positions_L: jax.Array) -> jax.Array:
    """Causal attention (all-gather or ring) on sequence-sharded q, k, v [B, L, N, H].

    positions_L: [L] int positions of the stored tokens (`order`), used for the mask.
    """
    self.validate(q_BLNH.shape[1])
    strategy = self.attention_strategy
    spec = self.seq_spec(q_BLNH.shape[0], 4)

    def body(q, k, v, pos):  # each rank's positions ascend (contiguous, or chunks r < 2N-1-r)
      return cp_attention.context_attention(q, k, v, pos, AXIS, strategy, local_sorted=True)

    return jax.shard_map(body, mesh=self.mesh, in_specs=(spec,) * 3 + (P(AXIS),),
                         out_specs=spec, check_vma=False)(q_BLNH, k_BLNH, v_BLNH, positions_L)


def from_mesh(mesh: Mesh, mesh_config: MeshConfig | None = None) -> ContextSharding | None:
  """The model's context sharding for `mesh`, or None when its context axis is 1."""
  if AXIS not in mesh.shape or mesh.shape[AXIS] == 1:
    return None
  mc = mesh_config or MeshConfig()
  return ContextSharding(mesh, mc.context_conv, mc.context_attention, mc.zigzag)


def validate_model_length(model: ModelConfig, length: int, context: int,
                          mesh_config: MeshConfig = MeshConfig()) -> None:
  """ConfigError (one line, listing valid lengths) unless every mixer of `model` can run a
  sequence of `length` tokens over `context` shards with these strategies."""
  if context <= 1:
    return
  layers = set(model.layers)
  halos = {"featurizer": model.featurizer_len - 1} if layers & {"SE", "MR", "LI"} else {}
  if mesh_config.context_conv == "p2p":
    halos.update({k: getattr(model, f"{k.lower()}_filter_len") - 1 for k in ("SE", "MR")
                  if k in layers})
  halo_name, halo = max(halos.items(), key=lambda kv: kv[1], default=("", 0))
  blocks = 2 * context if mesh_config.zigzag else context
  if length % blocks or length < max(halo, 1) * blocks:
    split = f"{blocks} zigzag chunks" if mesh_config.zigzag else f"{context} context shards"
    valid = f"multiples of {blocks}"
    if halo > 0:
      valid += f" that are >= {halo * blocks} ({halo_name} halo {halo} per block)"
      if halo_name in ("SE", "MR"):
        valid += ", or set mesh.context_conv=a2a"
    raise ConfigError(f"data.seq_len={length} cannot be split into {split}: valid lengths are "
                      f"{valid}")
  uses_a2a = "LI" in layers or (mesh_config.context_conv == "a2a" and layers & {"SE", "MR"})
  if uses_a2a and model.d_model % context:
    raise ConfigError(f"model.d_model={model.d_model} must be divisible by mesh.context={context} "
                      "for the all-to-all (LI, or mesh.context_conv=a2a)")
  if mesh_config.context_conv == "a2a":
    for kind in ("SE", "MR"):
      groups = getattr(model, f"{kind.lower()}_groups")
      if kind in layers and groups % context and context % groups:
        raise ConfigError(f"model.{kind.lower()}_groups={groups} and mesh.context={context}: the "
                          "all-to-all gives each rank whole filter groups, so one must divide the "
                          "other; change one or set mesh.context_conv=p2p")
