"""Compile-only memory analysis of the decode loop and the prefill, and decode step time
against batch size (GPU diagnosis for `sh2 bench generate`).

  PYTHONPATH=. python -m experiments.diagnose_generate [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.bench_generate import bf16_model, random_params
from sh2_jax.inference import init_state
from sh2_jax.inference.engine import extend_jit
from sh2_jax.inference.sampling import DecodeCarry, SamplingArrays, SamplingConfig, decode_loop, start_carry
from sh2_jax.model import abstract_params

GIB = 2**30


def memory(compiled) -> str:
  m = compiled.memory_analysis()
  return (f"args {m.argument_size_in_bytes / GIB:.2f} GiB, out {m.output_size_in_bytes / GIB:.2f}, "
          f"alias {m.alias_size_in_bytes / GIB:.2f}, temp {m.temp_size_in_bytes / GIB:.2f}")


def abstract_carry(model, batch: int, max_len: int, max_new: int) -> DecodeCarry:
  state = jax.eval_shape(lambda: init_state(model, batch, max_len))
  s = jax.ShapeDtypeStruct
  return DecodeCarry(s((), jnp.int32), state, s((batch, model.vocab_size), jnp.float32),
                     s((batch, max_new), jnp.int32), s((batch,), jnp.int32), s((batch,), bool))


def decode_args(model, carry):
  a = SamplingArrays.of(SamplingConfig(temperature=1.0, top_k=0))
  return (carry, jax.random.key(0), a.temperature, a.top_k, a.top_p, a.allowed_V, a.vocab_limit,
          jnp.asarray([-1], jnp.int32), jnp.int32(1))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--parts", default="decode_mem,prefill_mem,batch_sweep")
  args = parser.parse_args()
  parts = args.parts.split(",")
  if "decode_mem" in parts:
    model = bf16_model("evo2-1b")
    params = nn.meta.unbox(abstract_params(model))
    for batch in (1, 16):
      compiled = decode_loop.lower(params, model, *decode_args(model, abstract_carry(model, batch, 65732, 196))).compile()
      print(f"decode evo2-1b batch {batch} max_len 65732: {memory(compiled)}", flush=True)
  if "prefill_mem" in parts:
    model = bf16_model("evo2-7b")
    params = nn.meta.unbox(abstract_params(model))
    for length, chunk in ((131072, None), (131072, 32768), (131072, 16384)):
      state = jax.eval_shape(lambda: init_state(model, 1, length + 1))
      t = chunk or length
      tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
      for fresh in ((True,) if chunk is None else (True, False)):
        compiled = extend_jit.lower(params, model, state, tokens, fresh=fresh, last_only=True,
                                    row_chunk=16384).compile()
        print(f"prefill evo2-7b L {length} chunk {chunk} fresh {fresh}: {memory(compiled)}", flush=True)
  if "batch_sweep" in parts:
    model = bf16_model("evo2-1b")
    model = dataclasses.replace(model, layout=" ".join(k for k in model.layers if k != "MHA"))
    params = random_params(model)
    for batch in (1, 2, 4, 8, 16):
      carry = start_carry(init_state(model, batch, 512), jnp.zeros((batch, model.vocab_size)), 200)
      a = decode_args(model, carry)
      carry = decode_loop(params, model, carry, *a[1:-1], jnp.int32(4))
      int(carry.i)
      begin = time.perf_counter()
      carry = decode_loop(params, model, carry, *a[1:-1], jnp.int32(132))
      int(carry.i)
      print(f"hyena_only decode batch {batch}: {1e3 * (time.perf_counter() - begin) / 128:.2f} ms/step", flush=True)
    for batch in (1, 2, 16):
      x = jnp.ones((batch, 1920), jnp.bfloat16)
      w = jnp.ones((1920, 5760), jnp.bfloat16)
      f = jax.jit(lambda x, w: x @ w)
      f(x, w).block_until_ready()
      begin = time.perf_counter()
      for _ in range(100):
        y = f(x, w)
      y.block_until_ready()
      print(f"matmul [{batch},1920]x[1920,5760] bf16: {1e6 * (time.perf_counter() - begin) / 100:.1f} us", flush=True)


if __name__ == "__main__":
  main()
