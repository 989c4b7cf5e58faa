"""The model as a state machine: `extend` consumes T tokens from a DecodeState, `prefill` builds
the state from a prompt (one parallel pass, or chunks), `step` is one token.

With `fresh=True` (zero state, position 0) every mixer runs exactly the training path
(ops.hyena.gate_conv_gate / li_gate_conv_gate, causal attention) and the states are read off
its intermediates: the last rows of the projected streams and of u = pre * v, the LI modal
state as a chunked weighted sum of u, and the rotated keys/values. Otherwise the mixers
continue the cached history: FIRs over [cache; new rows], LI as its own chunked convolution
plus the decayed readout of the carried state (or the one-step recurrence for T = 1), and
attention of the new queries over the KV cache.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp

from sh2_jax.config import ModelConfig
from sh2_jax.errors import UserError
from sh2_jax.inference import recurrent
from sh2_jax.inference.cache import AttentionCache, DecodeState, HyenaCache, init_state
from sh2_jax.layers import params as P
from sh2_jax.layers.mlp import ACTIVATIONS
from sh2_jax.ops import filters, hyena
from sh2_jax.ops.attention import causal_attention
from sh2_jax.ops.norms import rms_norm
from sh2_jax.ops.rotary import apply_rope

logger = logging.getLogger(__name__)


class PromptError(UserError, ValueError):
  """A prompt does not fit the requested generation (empty, or longer than the cache)."""


def project(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """x [..., K] @ w [K, N] (result in out_dtype, default the inputs'). A single row goes in
  padded to two: XLA:GPU lowers an M = 1 dot to a multiply + reduce over the whole weight,
  which made batch-1 decode 4.3x slower per token on an H100."""
  matmul = functools.partial(jnp.matmul, preferred_element_type=out_dtype)
  if math.prod(x.shape[:-1]) != 1:
    return matmul(x, w)
  rows = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
  return matmul(rows, w)[:1].reshape(*x.shape[:-1], w.shape[-1])


def hyena_extend(p: dict, config: ModelConfig, kind: str, x_BTD: jax.Array, cache: HyenaCache,
                 fresh: bool) -> tuple[jax.Array, HyenaCache]:
  """Hyena SE/MR/LI mixer over T new rows; returns ([B, T, D] in the compute dtype, cache)."""
  dt, length = jnp.dtype(config.dtype), x_BTD.shape[1]
  w_in_DSC = p["in_proj"].astype(dt)
  w_feat_SCK = p["featurizer"]
  x = x_BTD.astype(dt)
  streams, feats = [], []
  for s in range(3):
    z_BTD = project(x, w_in_DSC[:, s])
    if fresh:
      streams.append(hyena.featurize(z_BTD, w_feat_SCK[s]))
    else:
      streams.append(recurrent.fir_extend(z_BTD, cache.feat[s], w_feat_SCK[s], "direct"))
    feats.append(recurrent.last_rows(z_BTD, cache.feat[s]))
  post, pre, v = streams
  u_BTD = pre.astype(jnp.float32) * v.astype(jnp.float32)  # as in ops.hyena.gated
  dskip = p.get("dskip")
  if kind in ("SE", "MR"):
    h_GK = p["filter"] if kind == "SE" else filters.mr_filter(p["filter"], config.train_len,
                                                               config.mr_decay)
    if fresh:
      y = hyena.gate_conv_gate(post, pre, v, h_GK, dskip, config.conv_method, config.conv_chunk)
    else:
      y = hyena.gated(post, pre, v, dskip, lambda u: recurrent.fir_extend(
          u, cache.inner, h_GK, config.conv_method, config.conv_chunk))
    inner = recurrent.last_rows(u_BTD, cache.inner)
  else:
    log_poles = filters.modal_log_poles(p["pole_p"], p["pole_gamma"])
    residues = p["residues"]
    if fresh:
      y = hyena.li_gate_conv_gate(post, pre, v, log_poles, residues, dskip, config.li_method)
      inner = recurrent.modal_state(u_BTD, log_poles)
    elif length == 1:
      y_BC, inner = recurrent.modal_step(u_BTD[:, 0], cache.inner, log_poles, residues)
      y = hyena.gated(post, pre, v, dskip, lambda u: y_BC[:, None])
    else:
      y = hyena.gated(post, pre, v, dskip, lambda u: (
          hyena.li_long_conv(u, log_poles, residues, config.li_method)
          + recurrent.modal_state_readout(cache.inner, log_poles, residues, length)))
      inner = recurrent.modal_state(u_BTD, log_poles, cache.inner)
  out = project(y.astype(dt), p["out_proj"].astype(dt)) + p["out_bias"].astype(dt)
  return out, HyenaCache(jnp.stack(feats), inner)


def mha_extend(p: dict, config: ModelConfig, x_BTD: jax.Array, cache: AttentionCache,
               pos: jax.Array, fresh: bool) -> tuple[jax.Array, AttentionCache]:
  """MHA over T new rows at positions pos..pos+T-1; keys/values written into the cache."""
  dt = jnp.dtype(config.dtype)
  w_qkv = p["qkv"].astype(dt)
  batch, length, d = x_BTD.shape
  qkv = project(x_BTD.astype(dt), w_qkv.reshape(d, -1)).reshape(batch, length, *w_qkv.shape[1:])
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  positions = pos + jnp.arange(x_BTD.shape[1])
  q = apply_rope(q, positions, config.rope_base)
  k = apply_rope(k, positions, config.rope_base)
  k_cache = jax.lax.dynamic_update_slice(cache.k, jnp.swapaxes(k, 1, 2).astype(cache.k.dtype), (0, 0, pos, 0))
  v_cache = jax.lax.dynamic_update_slice(cache.v, jnp.swapaxes(v, 1, 2).astype(cache.v.dtype), (0, 0, pos, 0))
  if fresh:
    out = causal_attention(q, k, v)
  else:
    out, k_cache, v_cache = recurrent.cached_attention(q, k_cache, v_cache, positions)
  w_out = p["out_proj"].astype(dt)
  out = project(out.reshape(batch, length, -1), w_out.reshape(-1, d)) + p["out_bias"].astype(dt)
  return out, AttentionCache(k_cache, v_cache)


def mlp(p: dict, config: ModelConfig, layer: int, x_BTD: jax.Array,
        row_chunk: int | None = None) -> jax.Array:
  """Gated MLP (same math as layers.mlp.GatedMLP); with row_chunk, rows go in chunks so the
  [T, F] hidden never exists for the whole sequence."""
  dt = jnp.dtype(config.dtype)
  act = ACTIVATIONS[config.activation(layer)]

  def apply(x):
    x = x.astype(dt)
    hidden = act(project(x, p["w1"].astype(dt))) * project(x, p["w2"].astype(dt))
    return project(hidden, p["w3"].astype(dt))

  batch, length, width = x_BTD.shape
  if row_chunk is None or length <= row_chunk:
    return apply(x_BTD)
  num = -(-length // row_chunk)
  x = jnp.pad(x_BTD, ((0, 0), (0, num * row_chunk - length), (0, 0)))
  x = jnp.moveaxis(x.reshape(batch, num, row_chunk, width), 1, 0)
  y = jax.lax.map(apply, x)
  return jnp.moveaxis(y, 0, 1).reshape(batch, num * row_chunk, width)[:, :length]


def extend(params: dict, config: ModelConfig, state: DecodeState, tokens_BT: jax.Array,
           fresh: bool = False, last_only: bool = False,
           row_chunk: int | None = None) -> tuple[jax.Array, DecodeState]:
  """Consumes tokens [B, T] after the state's history.

  Args:
    params: the StripedHyena2 parameter tree (unboxed arrays).
    state: DecodeState (pos tokens consumed); `fresh=True` requires the zero state.
    last_only: return logits of the last position only ([B, 1, V]).
    row_chunk: rows per chunk of the MLP (long prompts; None = all at once).

  Returns:
    (float32 logits [B, T or 1, V], the state after the tokens).
  """
  cfg = config
  embedding_VD = params["embedding"]
  x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(jnp.float32)
  layers = []
  with P.matmul_precision(cfg.dtype):
    for i, kind in enumerate(cfg.layers):
      bp, cache = params[f"block_{i}"], state.layers[i]
      h = rms_norm(x_BTD, bp["pre_norm"]["scale"], cfg.norm_eps)
      if kind == "MHA":
        h, cache = mha_extend(bp["mixer"], cfg, h, cache, state.pos, fresh)
      else:
        h, cache = hyena_extend(bp["mixer"], cfg, kind, h, cache, fresh)
      x_BTD = x_BTD + h.astype(x_BTD.dtype)
      h = mlp(bp["mlp"], cfg, i, rms_norm(x_BTD, bp["post_norm"]["scale"], cfg.norm_eps), row_chunk)
      x_BTD = x_BTD + h.astype(x_BTD.dtype)
      layers.append(cache)
    x_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], cfg.norm_eps)
    if last_only:
      x_BTD = x_BTD[:, -1:]
    dt = jnp.dtype(cfg.dtype)
    logits = project(x_BTD.astype(dt), embedding_VD.astype(dt).T, jnp.float32)
  return logits, DecodeState(state.pos + tokens_BT.shape[1], tuple(layers))


extend_jit = jax.jit(extend, static_argnames=("config", "fresh", "last_only", "row_chunk"),
                     donate_argnames=("state",))


OOM_RETRY_CHUNKS = (32768, 16384, 8192, 4096)  # chunk sizes tried after a one-pass run runs out of memory

Result = TypeVar("Result")


def out_of_memory(error: Exception) -> bool:
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def with_chunk_retry(run: Callable[[int], Result], length: int, what: str) -> Result:
  """run(length) (one pass); while the device runs out of memory, run(chunk) for the chunk
  sizes of OOM_RETRY_CHUNKS below length, largest first, with a warning; then a PromptError."""
  for chunk in (length, *(c for c in OOM_RETRY_CHUNKS if c < length)):
    try:
      return run(chunk)
    except jax.errors.JaxRuntimeError as error:
      if not out_of_memory(error):
        raise
      logger.warning("%s of %d tokens in chunks of %d ran out of device memory", what, length, chunk)
  raise PromptError(f"{what} of {length} tokens does not fit in device memory even in chunks of "
                    f"{chunk} tokens: use a smaller batch or a shorter sequence")


def prefill(params: dict, config: ModelConfig, tokens_BL: jax.Array, max_len: int,
            chunk: int | None = None, last_only: bool = False,
            row_chunk: int | None = None, retry_chunked: bool = True) -> tuple[jax.Array, DecodeState]:
  """Builds the state of a prompt [B, L] for up to `max_len` total tokens.

  With `chunk`, the prompt goes in pieces of `chunk` tokens: the first through the parallel
  (training) path, the rest continuing the state (bounded activation memory for long prompts).
  Without it the prompt goes in one pass; if that runs out of device memory and retry_chunked,
  it is retried in chunks (with_chunk_retry).

  Returns:
    (float32 logits [B, L, V], or [B, 1, V] with last_only; the state at position L).
  """
  batch, length = tokens_BL.shape
  if length < 1:
    raise PromptError("the prompt is empty: give at least one byte")
  if length > max_len:
    raise PromptError(f"prompt of {length} tokens does not fit max_len={max_len}")
  run = functools.partial(_prefill_chunks, params, config, tokens_BL, max_len,
                          last_only=last_only, row_chunk=row_chunk)
  if chunk is not None or not retry_chunked:
    return run(chunk or length)
  return with_chunk_retry(run, length, f"prefill (batch {batch})")


def _prefill_chunks(params: dict, config: ModelConfig, tokens_BL: jax.Array, max_len: int,
                    chunk: int, last_only: bool, row_chunk: int | None) -> tuple[jax.Array, DecodeState]:
  """prefill in chunks of `chunk` tokens (chunk >= L: one pass)."""
  state = init_state(config, tokens_BL.shape[0], max_len)
  outputs = []
  for start in range(0, tokens_BL.shape[1], chunk):
    logits, state = extend_jit(params, config, state, tokens_BL[:, start:start + chunk],
                               fresh=start == 0, last_only=last_only, row_chunk=row_chunk)
    outputs.append(logits)
  return (outputs[-1] if last_only else jnp.concatenate(outputs, axis=1)), state


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def step(params: dict, config: ModelConfig, state: DecodeState,
         token_B: jax.Array) -> tuple[jax.Array, DecodeState]:
  """One token per sequence: (float32 logits [B, V], next state). The state is donated."""
  logits, state = extend(params, config, state, token_B[:, None])
  return logits[:, 0], state
