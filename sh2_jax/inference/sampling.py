"""Sampling (temperature, top-k, top-p) and the jit-compiled batched decode loop.

The loop is one `lax.while_loop` over single-token steps; it runs in segments of at most
`segment` tokens (the same compiled loop, resumed from its carry) so a caller can report
progress between them. The key of step i is fold_in(key, i): results do not depend on the
segmentation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sh2_jax.config import ModelConfig
from sh2_jax.errors import UserError
from sh2_jax.inference.cache import DecodeState
from sh2_jax.inference.engine import extend, prefill


class SamplingError(UserError, ValueError):
  """Invalid sampling settings."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; only tokens < vocab_limit are drawn
  (256: bytes), and only bytes of `alphabet` when given (e.g. b"ACGT")."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 256
  alphabet: bytes | None = None

  def __post_init__(self) -> None:
    if self.temperature < 0:
      raise SamplingError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise SamplingError(f"--top-k {self.top_k} must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"--top-p {self.top_p} must be in (0, 1] (1 = off)")
    if self.vocab_limit < 1:
      raise SamplingError(f"vocab_limit {self.vocab_limit} must be >= 1")
    if self.alphabet is not None and (not self.alphabet or max(self.alphabet) >= self.vocab_limit):
      raise SamplingError(f"--alphabet {self.alphabet!r} must hold at least one byte below "
                          f"{self.vocab_limit}")


def filter_logits(logits_BV: jax.Array, config: SamplingConfig | "SamplingArrays") -> jax.Array:
  """Temperature-scaled float32 logits with -inf outside the vocab limit, the top k, and the
  top-p nucleus (the smallest set of most likely tokens, after top-k, whose probability reaches
  top_p). Settings may be traced (SamplingArrays): one compiled loop serves all of them."""
  arrays = config if isinstance(config, SamplingArrays) else SamplingArrays.of(config)
  logits = logits_BV[:, :arrays.vocab_limit].astype(jnp.float32)
  logits = jnp.where(arrays.allowed_V, logits, -jnp.inf)
  vocab = logits.shape[-1]
  temperature = arrays.temperature
  logits = logits / jnp.where(temperature > 0, temperature, 1.0)
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(arrays.top_k > 0, jnp.minimum(arrays.top_k, vocab), vocab)
  kth = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  sorted_desc = jnp.where(jnp.arange(vocab) < k, sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
  kept = jnp.where(before < arrays.top_p, sorted_desc, jnp.inf)
  threshold = jnp.where(arrays.top_p < 1.0, jnp.min(kept, axis=-1, keepdims=True), -jnp.inf)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits_BV: jax.Array, key: jax.Array,
                  config: SamplingConfig | "SamplingArrays") -> jax.Array:
  """int32 [B] tokens: argmax for temperature 0, else a draw from the filtered distribution."""
  arrays = config if isinstance(config, SamplingArrays) else SamplingArrays.of(config)
  logits = filter_logits(logits_BV, arrays)
  drawn = jax.random.categorical(key, logits, axis=-1)
  return jnp.where(arrays.temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


class SamplingArrays(NamedTuple):
  """SamplingConfig as traced scalars (vocab_limit stays static: it sets a shape)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  allowed_V: jax.Array  # bool [vocab_limit]
  vocab_limit: int

  @classmethod
  def of(cls, config: SamplingConfig) -> "SamplingArrays":
    allowed = np.ones(config.vocab_limit, bool)
    if config.alphabet is not None:
      allowed[:] = False
      allowed[list(config.alphabet)] = True
    return cls(jnp.float32(config.temperature), jnp.int32(config.top_k), jnp.float32(config.top_p),
               jnp.asarray(allowed), config.vocab_limit)


class DecodeCarry(NamedTuple):
  i: jax.Array            # tokens generated so far
  state: DecodeState
  logits_BV: jax.Array    # next-token logits
  tokens_BN: jax.Array    # generated tokens (0 after a stop)
  lengths_B: jax.Array    # generated length before the first stop token
  done_B: jax.Array


def start_carry(state: DecodeState, logits_BV: jax.Array, max_new: int) -> DecodeCarry:
  batch = logits_BV.shape[0]
  carry = DecodeCarry(jnp.zeros((), jnp.int32), state, logits_BV.astype(jnp.float32),
                      jnp.zeros((batch, max_new), jnp.int32), jnp.zeros((batch,), jnp.int32),
                      jnp.zeros((batch,), bool))
  # strongly typed and committed, as the loop returns them: later segments reuse the compiled loop
  device = logits_BV.devices().pop() if len(logits_BV.devices()) == 1 else None
  carry = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), carry)
  return carry if device is None else jax.device_put(carry, device)


@functools.partial(jax.jit, static_argnames=("config", "vocab_limit"), donate_argnames=("carry",))
def decode_loop(params: dict, config: ModelConfig, carry: DecodeCarry, key: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, allowed_V: jax.Array,
                vocab_limit: int, stops: jax.Array, limit: jax.Array) -> DecodeCarry:
  """Samples until `limit` tokens exist, the buffer is full, or every sequence has stopped.

  stops: int32 [S] stop tokens (-1 entries never match)."""
  max_new = carry.tokens_BN.shape[1]
  sampling = SamplingArrays(temperature, top_k, top_p, allowed_V, vocab_limit)

  def cond(c: DecodeCarry):
    return (c.i < jnp.minimum(limit, max_new)) & ~jnp.all(c.done_B)

  def body(c: DecodeCarry):
    token = sample_logits(c.logits_BV, jax.random.fold_in(key, c.i), sampling)
    stopped = jnp.isin(token, stops)
    token = jnp.where(c.done_B | stopped, 0, token)
    lengths = jnp.where(c.done_B | stopped, c.lengths_B, c.i + 1)
    tokens = jax.lax.dynamic_update_slice(c.tokens_BN, token[:, None], (0, c.i))
    logits, state = extend(params, config, c.state, token[:, None])
    return DecodeCarry(c.i + 1, state, logits[:, 0], tokens, lengths, c.done_B | stopped)

  return jax.lax.while_loop(cond, body, carry)


def generate(params: dict, config: ModelConfig, prompt_BL: np.ndarray, max_new: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_tokens: Sequence[int] = (), prefill_chunk: int | None = None,
             segment: int | None = None,
             on_progress: Callable[[int], None] | None = None) -> dict:
  """Prefill the prompts (equal lengths) and sample up to max_new tokens each.

  Returns:
    {"tokens": int32 [B, max_new] (0 past each sequence's end), "lengths": [B] (the stop byte
    excluded), "prefill_s", "decode_s" (with compilation), "decoded" (steps run),
    "steady_tokens_per_s" (B x steps / s after the first segment)}.
  """
  if max_new < 1:
    raise SamplingError(f"--max-new {max_new} must be >= 1")
  prompt = jnp.asarray(prompt_BL, jnp.int32)
  begin = time.perf_counter()
  logits, state = prefill(params, config, prompt, prompt.shape[1] + max_new, chunk=prefill_chunk,
                          last_only=True)
  jax.block_until_ready(logits)
  prefill_s = time.perf_counter() - begin
  carry = start_carry(state, logits[:, 0], max_new)
  key = jax.random.key(seed)
  stops = jnp.asarray(sorted(set(int(t) for t in stop_tokens)) or [-1], jnp.int32)
  arrays = SamplingArrays.of(sampling)
  segment = segment or max_new
  begin, done, first = time.perf_counter(), 0, None
  while done < max_new:
    carry = decode_loop(params, config, carry, key, arrays.temperature, arrays.top_k, arrays.top_p,
                        arrays.allowed_V, arrays.vocab_limit, stops, jnp.int32(done + segment))
    new = int(carry.i)
    if first is None:
      first = (new, time.perf_counter() - begin)
    if on_progress is not None:
      on_progress(new - done)
    stopped = new < min(done + segment, max_new)  # every sequence stopped
    done = new
    if stopped:
      break
  decode_s = time.perf_counter() - begin
  # steady state: the segments after the first (which includes compilation), when there are any
  steady = (done - first[0], decode_s - first[1]) if done > first[0] else (done, decode_s)
  return {"tokens": np.asarray(carry.tokens_BN), "lengths": np.asarray(carry.lengths_B),
          "prefill_s": prefill_s, "decode_s": decode_s, "decoded": done,
          "steady_tokens_per_s": prompt.shape[0] * steady[0] / max(steady[1], 1e-9)}
