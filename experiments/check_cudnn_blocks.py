"""Can cuDNN run the blocks of a sharded causal attention with exact gradients? (one GPU)

Context parallelism needs attention of a query block against key blocks that sit before it
(no mask) or on it (causal, aligned), combined through the log-sum-exp. cuDNN's public jax API
cannot do that with gradients: it drops the lse cotangent. FlashAttention-2's identity says a
block's gradients are its backward run with the FINAL output and lse. jax's cuDNN backward
primitive takes exactly those (private API), so this script checks, for the second half of a
causal sequence (queries [L/2, L) against keys [0, L/2) unmasked + [L/2, L) causal):
- forward: the two cuDNN blocks combined by lse == rows [L/2, L) of full causal cuDNN attention;
- backward: the private cuDNN backward per block with the final (out, lse) == the gradients of
  the full attention restricted to those queries;
and times split vs full. On failure it prints the private signatures it found, to adapt to.

  PYTHONPATH=. python experiments/check_cudnn_blocks.py [--length 16384]
"""

from __future__ import annotations

import argparse
import inspect
import math

import jax
import jax.numpy as jnp

from experiments.compare import max_rel_diff as _rel
from experiments.timing import median_ms


def _private():
  from jax._src.cudnn import fused_attention_stablehlo as fas
  return fas


def block_forward(q, k, v, causal: bool, scale: float):
  """(out [B, T, N, H], lse [B, N, T] float32) of one cuDNN block."""
  fas = _private()
  mask = fas.MaskType.CAUSAL if causal else fas.MaskType.NO_MASK
  out, lse = fas.dot_product_attention(q, k, v, scale=scale, mask_type=mask, qkv_layout="BTNH",
                                       return_residual=True)
  return out, lse.astype(jnp.float32)


def block_backward(q, k, v, out, lse, dout, causal: bool, scale: float):
  """(dq, dk, dv) of one block given the final out and lse (jax's private cuDNN backward)."""
  fas = _private()
  mask = fas.MaskType.CAUSAL if causal else fas.MaskType.NO_MASK
  unused = jnp.zeros(0, dtype=q.dtype)
  grads = fas._dot_product_attention_bwd_p_wrapper.bind(
      q, k, v, unused, unused, unused, unused, unused, unused, unused, lse, out, dout,
      scale=scale, seed=42, dropout_rate=0.0, variadic_args=(False, False), mask_type=mask,
      layout=fas.AttentionLayout.BTNH.value, sliding_window_length=None)
  return grads[0], grads[1], grads[2]


def split_attention(q2, k, v, scale):
  """Queries of the second half against [first half: no mask] + [second half: causal]."""
  half = k.shape[1] // 2
  o1, l1 = block_forward(q2, k[:, :half], v[:, :half], False, scale)
  o2, l2 = block_forward(q2, k[:, half:], v[:, half:], True, scale)
  lse = jnp.logaddexp(l1, l2)
  weight = lambda l: jnp.exp(l - lse).transpose(0, 2, 1)[..., None]
  out = (o1.astype(jnp.float32) * weight(l1) + o2.astype(jnp.float32) * weight(l2))
  return out.astype(q2.dtype), lse


def split_backward(q2, k, v, out, lse, dout, scale):
  half = k.shape[1] // 2
  dq1, dk1, dv1 = block_backward(q2, k[:, :half], v[:, :half], out, lse, dout, False, scale)
  dq2, dk2, dv2 = block_backward(q2, k[:, half:], v[:, half:], out, lse, dout, True, scale)
  dq = dq1.astype(jnp.float32) + dq2.astype(jnp.float32)
  return dq, jnp.concatenate([dk1, dk2], axis=1), jnp.concatenate([dv1, dv2], axis=1)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=16384)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--head-dim", type=int, default=128)
  args = parser.parse_args(argv)
  length, half = args.length, args.length // 2
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (1, length, args.heads, args.head_dim)
  q, k, v, dout_full = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  dout_full = dout_full.at[:, :half].set(0)  # only the second half's queries carry a cotangent
  scale = 1.0 / math.sqrt(args.head_dim)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, L={length}", flush=True)
  try:
    def full(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    out_full, pullback = jax.vjp(full, q, k, v)
    dq_ref, dk_ref, dv_ref = pullback(dout_full)
    q2, dout = q[:, half:], dout_full[:, half:]
    out, lse = jax.jit(split_attention, static_argnums=3)(q2, k, v, scale)
    dq, dk, dv = jax.jit(split_backward, static_argnums=6)(q2, k, v, out, lse, dout, scale)
    print(f"forward: max rel diff {_rel(out, out_full[:, half:]):.2e}")
    print(f"backward: dq {_rel(dq, dq_ref[:, half:]):.2e}, dk {_rel(dk, dk_ref):.2e}, "
          f"dv {_rel(dv, dv_ref):.2e}  (bf16 inputs: ~1e-2 is agreement)")
    split_fwd = jax.jit(split_attention, static_argnums=3)
    split_bwd = jax.jit(split_backward, static_argnums=6)
    t_split = (median_ms(split_fwd, q2, k, v, scale)
               + median_ms(split_bwd, q2, k, v, out, lse, dout, scale))
    t_full = median_ms(jax.jit(lambda q, k, v, d: jax.vjp(full, q, k, v)[1](d)),
                       q, k, v, dout_full)
    print(f"split blocks fwd+bwd {t_split:.2f} ms (3/4 of the full causal work) vs full causal "
          f"fwd+bwd {t_full:.2f} ms")
  except Exception as error:  # noqa: BLE001 - report what the private API looks like here
    print(f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    fas = _private()
    for name in ("dot_product_attention", "_dot_product_attention_bwd_rule",
                 "_dot_product_attention_bwd_impl"):
      if hasattr(fas, name):
        print(f"{name}{inspect.signature(getattr(fas, name))}")
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
