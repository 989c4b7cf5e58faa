"""Hyena-SE, Hyena-MR and Hyena-LI mixers: projections, featurizer and the inner filter.

Parameter layout (our convention, converted from Evo 2 checkpoints by sh2_jax.convert):
  in_proj      [D, 3, D]  streams post-gate, pre-gate, value on the middle axis (Evo 2
                          checkpoints interleave them: column 3i + s of [D, 3D])
  featurizer   [3, D, K]  the streams' taps, w[..., 0] on the current token (checkpoints store
                          the reverse)
  SE filter    [G, 7]   h[:, 0] on the current token (checkpoints store the reverse)
  MR filter    [G, 128] hhat, h[:, 0] on the current token, times the fixed decay if mr_decay
  LI p, gamma  [D, N]   log_pole = -exp(p + gamma); residues [D, N]
  dskip        [D]      MR and LI only
  out_proj     [D, D] and out_bias [D]
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.ops import filters, hyena
from sh2_jax.ops.bias import add_bias
from sh2_jax.parallel.context_sharding import ContextSharding


class HyenaBase(nn.Module):
  """Shared in-projection, featurizer and out-projection; subclasses supply `inner`.

  With `parallel` (context parallelism), the featurizer and the inner convolution run on the
  sequence-sharded activations through it.
  """
  config: ModelConfig
  parallel: ContextSharding | None = None

  def inner(self, post_BLD: jax.Array, pre_BLD: jax.Array, v_BLD: jax.Array) -> jax.Array:
    raise NotImplementedError

  def explicit_filter(self) -> tuple[jax.Array, jax.Array | None] | None:
    """(h [G, K] float32, dskip [D] or None) of an explicit-filter mixer (SE, MR), else None."""
    return None

  def modal_filter(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(log poles [D, N] float32, residues [D, N], dskip [D]) of a modal mixer (LI), else None."""
    return None

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    d, pdt, dt = cfg.d_model, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    w_in = P.declare(self, "in_proj", P.normal(cfg.init_std), (d, 3, d),
                     ("embed", "streams", "channels"), pdt)
    w_feat = P.declare(self, "featurizer", P.uniform_symmetric(1 / math.sqrt(cfg.featurizer_len)),
                       (3, d, cfg.featurizer_len), ("streams", "channels", "taps"), pdt)
    w_out = P.declare(self, "out_proj", P.normal(P.output_std(cfg.init_std, cfg.num_layers)),
                      (d, d), ("channels", "embed"), pdt)
    b_out = P.declare(self, "out_bias", P.constant(0.0), (d,), ("embed",), pdt)
    explicit = self.explicit_filter() if self.parallel is None else None
    modal = self.modal_filter() if self.parallel is None else None
    # One device, rematerialised: the ops apply W_out themselves, taking y for dW_out from the
    # kernel's backward where one runs (without remat the forward's y is kept anyway). Either
    # way W_out enters in the param dtype: the product casts it once and writes its gradient
    # in that dtype.
    in_op = self.parallel is None and cfg.out_proj_in_kernel_bwd and cfg.remat
    w_out_in_op = w_out if in_op else None
    if explicit is not None:  # SE/MR on one device: fused kernel where it applies
      # w_in in the param dtype: the product casts it and writes its gradient in that dtype
      y_BLD = hyena.explicit_mixer(x_BLD.astype(dt), w_in, w_feat, *explicit,
                                   cfg.conv_method, cfg.conv_chunk, w_out_in_op)
    elif modal is not None:  # LI on one device: the featurizer in the kernel (GPU auto)
      y_BLD = hyena.li_mixer(x_BLD.astype(dt), w_in.astype(dt), w_feat, *modal, cfg.li_method,
                             w_out_in_op)
    else:
      if self.parallel is None:
        post, pre, v = hyena.project_and_featurize(x_BLD.astype(dt), w_in.astype(dt), w_feat)
      else:
        post, pre, v = self.parallel.project_and_featurize(x_BLD.astype(dt), w_in.astype(dt), w_feat)
      y_BLD = self.inner(post, pre, v)
    if not in_op:
      y_BLD = hyena.matmul_weight_in_own_dtype(y_BLD.astype(dt), w_out)
    return add_bias(y_BLD.astype(dt), b_out)


class HyenaSE(HyenaBase):
  """Short explicit filter (7 taps), grouped, no skip term."""

  def explicit_filter(self):
    cfg = self.config
    h = P.declare(self, "filter", P.uniform_symmetric(1 / math.sqrt(cfg.se_filter_len)),
                  (cfg.se_groups, cfg.se_filter_len), ("groups", "taps"), jnp.dtype(cfg.param_dtype))
    return h, None

  def inner(self, post_BLD, pre_BLD, v_BLD):
    cfg = self.config
    h, _ = self.explicit_filter()
    gcg = hyena.gate_conv_gate if self.parallel is None else self.parallel.gate_conv_gate
    return gcg(post_BLD, pre_BLD, v_BLD, h, None, cfg.conv_method, cfg.conv_chunk)


class HyenaMR(HyenaBase):
  """Medium explicit filter (128 taps) with a fixed exponential decay, grouped, with skip."""

  def explicit_filter(self):
    cfg = self.config
    pdt = jnp.dtype(cfg.param_dtype)
    hhat_std = 1e-5 / math.sqrt(cfg.train_len)
    hhat = P.declare(self, "filter", P.normal(hhat_std), (cfg.mr_groups, cfg.mr_filter_len),
                     ("groups", "taps"), pdt)
    dskip = P.declare(self, "dskip", P.normal(1.0), (cfg.d_model,), ("channels",), pdt)
    return filters.mr_filter(hhat, cfg.train_len, cfg.mr_decay), dskip

  def inner(self, post_BLD, pre_BLD, v_BLD):
    cfg = self.config
    h, dskip = self.explicit_filter()
    gcg = hyena.gate_conv_gate if self.parallel is None else self.parallel.gate_conv_gate
    return gcg(post_BLD, pre_BLD, v_BLD, h, dskip, cfg.conv_method, cfg.conv_chunk)


class HyenaLI(HyenaBase):
  """Long implicit modal filter: li_order real poles per channel, ungrouped, with skip."""

  def modal_filter(self):
    cfg = self.config
    d, n, pdt = cfg.d_model, cfg.li_order, jnp.float32
    p = P.declare(self, "pole_p", P.constant(-1.0), (d, n), ("channels", "poles"), pdt)
    gamma = P.declare(self, "pole_gamma", P.log_uniform_log(0.01, 0.1), (d, n),
                      ("channels", "poles"), pdt)
    residues = P.declare(self, "residues", P.normal(0.1 / 4), (d, n), ("channels", "poles"), pdt)
    dskip = P.declare(self, "dskip", P.normal(1.0), (d,), ("channels",), jnp.dtype(cfg.param_dtype))
    return filters.modal_log_poles(p, gamma), residues, dskip

  def inner(self, post_BLD, pre_BLD, v_BLD):
    log_poles, residues, dskip = self.modal_filter()
    li = hyena.li_gate_conv_gate if self.parallel is None else self.parallel.li_gate_conv_gate
    return li(post_BLD, pre_BLD, v_BLD, log_poles, residues, dskip, self.config.li_method)
