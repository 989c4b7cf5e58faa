"""Multi-head attention block: fused QKV (no bias), RoPE, causal attention, biased output."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.layers import params as P
from sh2_jax.ops.attention import causal_attention
from sh2_jax.ops.bias import add_bias
from sh2_jax.ops.rotary import apply_rope
from sh2_jax.parallel.context_sharding import ContextSharding


class MHA(nn.Module):
  """Parameters: qkv [D, 3, N, H] (q|k|v, head, dim), out_proj [N, H, D], out_bias [D].

  With `parallel` (context parallelism) the attention core is all-gather or ring over the
  sequence shards, and RoPE uses the stored tokens' true positions (zigzag order).
  """
  config: ModelConfig
  parallel: ContextSharding | None = None

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    w_qkv = P.declare(self, "qkv", P.normal(cfg.init_std), (d, 3, n, h),
                      ("embed", "qkv", "heads", "kv"), pdt)
    w_out = P.declare(self, "out_proj", P.normal(P.output_std(cfg.init_std, cfg.num_layers)),
                      (n, h, d), ("heads", "kv", "embed"), pdt)
    b_out = P.declare(self, "out_bias", P.constant(0.0), (d,), ("embed",), pdt)
    qkv_BLSNH = jnp.einsum("BLD,DSNH->BLSNH", x_BLD.astype(dt), w_qkv.astype(dt))
    q, k, v = qkv_BLSNH[:, :, 0], qkv_BLSNH[:, :, 1], qkv_BLSNH[:, :, 2]
    cp = self.parallel
    positions = jnp.arange(x_BLD.shape[1]) if cp is None else jnp.asarray(cp.order(x_BLD.shape[1]))
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(k, positions, cfg.rope_base)
    out_BLNH = causal_attention(q, k, v) if cp is None else cp.attention(q, k, v, positions)
    return add_bias(jnp.einsum("BLNH,NHD->BLD", out_BLNH, w_out.astype(dt)), b_out)
