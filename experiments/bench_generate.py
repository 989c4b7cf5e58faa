"""`sh2 bench generate`: decode tokens/s against context length, and a long-prompt prefill.

Decode: the evo2-1b-shaped model (25 layers, D=1920, 4 MHA layers) and the same stripe with
its MHA layers left out (21 Hyena layers), bf16 params and compute, random weights, batch 1 and
16, at contexts 1K / 8K / 64K. The state at context C is built directly (zeros, pos = C): a
decode step's work does not depend on the state's values, only on its shapes and on pos (the
MHA layers attend over the C filled cache slots, in key blocks up to pos). Timed: `steps`
tokens of the jit-compiled `lax.while_loop` decode (sampling included) after `warm` tokens that
compile it. Hyena layers hold constant-size state (FIR rows, 16 modal states per channel), so
their cost per token is flat in C; MHA layers grow with C.

Prefill: the evo2-7b-shaped model (32 layers, D=4096), random bf16 params, one 128K-token
prompt, through `inference.prefill` (the parallel path, MLP rows in chunks, every state built),
then optionally again in chunks that continue the state. Reported: wall time of a second call
(the first compiles), and the device's peak memory.

  python -m sh2_jax.cli bench generate [--part decode|prefill|all] [--tiny] [--out DIR]
  python -m experiments.bench_generate --part prefill --prefill-chunk 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import os
import time
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sh2_jax import config as config_lib
from sh2_jax.inference import init_state, prefill
from sh2_jax.inference.cache import state_bytes
from sh2_jax.inference.sampling import SamplingArrays, SamplingConfig, decode_loop, start_carry
from sh2_jax.model import abstract_params, count_params

logger = logging.getLogger(__name__)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_slug() -> str:
  kind = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else "cpu"
  return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")


def bf16_model(preset: str, **overrides) -> config_lib.ModelConfig:
  model = config_lib.get_preset(preset).model
  return dataclasses.replace(model, dtype="bfloat16", param_dtype="bfloat16", **overrides)


def random_params(model: config_lib.ModelConfig, seed: int = 0) -> dict:
  """Random params on the device in their declared dtypes (LI poles near their init).

  Leaf by leaf, so each distinct shape compiles one small generator (one jit over all ~300
  leaves took 69 s to compile for evo2-1b on CPU and timed out a GPU run)."""
  abstract = nn.meta.unbox(abstract_params(model))
  key = jax.random.key(seed, impl="unsafe_rbg")  # fast bits; the values only need to be generic

  def make(path, x):
    name = getattr(path[-1], "key", "")
    base = {"scale": 1.0, "pole_p": -1.0, "pole_gamma": float(np.log(0.05))}.get(name, 0.0)
    leaf_key = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
    return _normal(leaf_key, x.shape, jnp.dtype(x.dtype), base)

  return jax.tree_util.tree_map_with_path(make, abstract)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "base"))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, base: float) -> jax.Array:
  return (base + 0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def decode_rates(model: config_lib.ModelConfig, params: dict, batch: int, contexts: list[int],
                 steps: int, warm: int, repeats: int = 3) -> list[dict]:
  """Decode tokens/s at each context (one compiled loop: the cache holds max(contexts) + new);
  the fastest of `repeats` timed segments of `steps` tokens (robust to a shared machine)."""
  max_len = max(contexts) + warm + repeats * steps
  arrays = SamplingArrays.of(SamplingConfig(temperature=1.0, top_k=0))
  stops = jnp.asarray([-1], jnp.int32)
  key = jax.random.key(0)
  rows = []
  for context in contexts:
    state = init_state(model, batch, max_len)
    state = state._replace(pos=jnp.int32(context))
    logits = jnp.zeros((batch, model.vocab_size), jnp.float32)
    carry = start_carry(state, logits, warm + repeats * steps)
    args = (arrays.temperature, arrays.top_k, arrays.top_p, arrays.allowed_V, arrays.vocab_limit, stops)
    begin = time.perf_counter()
    carry = decode_loop(params, model, carry, key, *args, jnp.int32(warm))
    int(carry.i)
    warm_s = time.perf_counter() - begin
    times = []
    for r in range(repeats):
      begin = time.perf_counter()
      carry = decode_loop(params, model, carry, key, *args, jnp.int32(warm + (r + 1) * steps))
      assert int(carry.i) == warm + (r + 1) * steps
      times.append(time.perf_counter() - begin)
    seconds = min(times)
    rows.append({"batch": batch, "context": context, "steps": steps, "seconds": seconds,
                 "all_seconds": times, "tokens_per_s": batch * steps / seconds,
                 "ms_per_step": 1e3 * seconds / steps, "warm_s": warm_s,
                 "state_gib": state_bytes(carry.state) / 2**30})
    logger.info("%s", rows[-1])
    del carry, state
  return rows


def run_decode(args: argparse.Namespace, save) -> dict:
  if args.tiny:
    full = dataclasses.replace(config_lib.get_preset("tiny").model, dtype="bfloat16", param_dtype="bfloat16")
  elif args.width:  # the evo2-1b stripe at another width (head dim 128, 16 channels per group)
    full = bf16_model("evo2-1b", d_model=args.width, num_heads=max(1, args.width // 128),
                      se_groups=args.width // 16, mr_groups=args.width // 16)
  else:
    full = bf16_model("evo2-1b")
  hyena_only = dataclasses.replace(full, layout=" ".join(k for k in full.layers if k != "MHA"))
  out = {}
  for name, model in (("sh2", full), ("hyena_only", hyena_only)):
    if name not in args.variants:
      continue
    params = random_params(model)
    out[name] = {"layout": model.layout, "params": count_params(params), "rows": []}
    for batch in args.batches:
      try:
        out[name]["rows"] += decode_rates(model, params, batch, args.contexts, args.steps, args.warm,
                                          args.repeats)
      except Exception as error:  # noqa: BLE001 - e.g. out of memory: keep the other rows
        logger.exception("decode %s batch %d failed", name, batch)
        out[name].setdefault("errors", []).append(f"batch {batch}: {str(error).splitlines()[0][:200]}")
      save(out)
    del params
  return out


def run_prefill(args: argparse.Namespace) -> dict:
  if args.tiny:
    model = dataclasses.replace(config_lib.get_preset("tiny").model, dtype="bfloat16", param_dtype="bfloat16")
  else:
    model = bf16_model("evo2-7b")
  params = random_params(model)
  length = args.prefill_len
  tokens = jax.random.randint(jax.random.key(1), (1, length), 0, 256, jnp.int32)
  result = {"layout": model.layout, "params": count_params(params), "length": length,
            "chunk": args.prefill_chunk, "row_chunk": args.row_chunk,
            "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}
  times = []
  for _ in range(2):  # the first call compiles
    begin = time.perf_counter()
    logits, state = prefill(params, model, tokens, length + 1, chunk=args.prefill_chunk,
                            last_only=True, row_chunk=args.row_chunk, retry_chunked=False)
    jax.block_until_ready((logits, state))
    times.append(time.perf_counter() - begin)
    result["state_gib"] = state_bytes(state) / 2**30
    result["finite"] = bool(jnp.all(jnp.isfinite(logits)))
    del logits, state
    logger.info("prefill %d tokens: %.2f s", length, times[-1])
  result.update(first_s=times[0], seconds=times[1], tokens_per_s=length / times[1], peak_gib=peak_gib())
  return result


def markdown(results: dict, device: str) -> str:
  lines = [f"# Generation on {device}", "",
           f"Date {results.get('date')}, jax {results.get('jax')}, bf16 params and compute, random weights. "
           "Regenerate: `PYTHONPATH=. python -m experiments.bench_generate --part all` "
           "(or `sh2 bench generate`).", ""]
  if results.get("notes"):
    lines += ["## Notes", "", results["notes"], ""]
  decode = results.get("decode")
  if decode:
    lines += ["## Decode tokens/s (batch x steps / s, sampling included)", "",
              "State built at context C (pos = C); the jit `while_loop` decodes `steps` tokens after "
              "a compiling warm-up, three times; the fastest is shown. `sh2` is the evo2-1b stripe (4 MHA layers); `hyena_only` the "
              "same stripe without its MHA layers: its cost per token is flat in C.", "",
              "| model | batch | context | tokens/s | ms/step | state GiB |", "|---|---|---|---|---|---|"]
    for name, part in decode.items():
      for r in part["rows"]:
        lines.append(f"| {name} ({part['params'] / 1e9:.3f} B) | {r['batch']} | {r['context']} | "
                     f"{r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {r['state_gib']:.3f} |")
      lines += [f"| {name} | error: {e} | | | | |" for e in part.get("errors", [])]
    lines.append("")
  for key in sorted(k for k in results if k.startswith("prefill")):
    p = results[key]
    how = "one parallel pass" if not p["chunk"] else f"chunks of {p['chunk']} tokens continuing the state"
    peak = "n/a" if p["peak_gib"] is None else f"{p['peak_gib']:.1f} GiB"
    if p.get("mem_fraction"):
      how += f", XLA_PYTHON_CLIENT_MEM_FRACTION={p['mem_fraction']}"
    lines += [f"## Prefill ({how})", "",
              f"{p['params'] / 1e9:.2f} B params, {p['length']} tokens, batch 1, MLP rows in chunks of "
              f"{p['row_chunk']}: **{p['seconds']:.2f} s** ({p['tokens_per_s']:.0f} tokens/s; first "
              f"call with compilation {p['first_s']:.1f} s), peak device memory "
              f"{peak}, state "
              f"{p['state_gib']:.2f} GiB, finite logits: {p['finite']}.", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="sh2 bench generate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("decode", "prefill", "all"), default="all")
  parser.add_argument("--tiny", action="store_true", help="tiny preset, short contexts (CPU smoke test)")
  parser.add_argument("--width", type=int, default=None,
                      help="decode: the evo2-1b stripe at this d_model instead of 1920 (CPU runs)")
  parser.add_argument("--contexts", default=None, help="comma-separated (default 1024,8192,65536)")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--variants", default="sh2,hyena_only",
                      help="decode models: sh2 (with MHA) and/or hyena_only (kept from earlier runs)")
  parser.add_argument("--steps", type=int, default=64)
  parser.add_argument("--warm", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3, help="timed segments per context (fastest kept)")
  parser.add_argument("--prefill-len", type=int, default=None, help="default 131072 (tiny: 1024)")
  parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of T tokens")
  parser.add_argument("--row-chunk", type=int, default=16384, help="MLP rows per chunk in the prefill")
  parser.add_argument("--out", default=RESULTS, help="directory for generate_<device>.md/.json")
  args = parser.parse_args(argv)
  args.contexts = [int(c) for c in (args.contexts or ("64,256" if args.tiny else "1024,8192,65536")).split(",")]
  args.batches = [int(b) for b in args.batches.split(",")]
  args.variants = args.variants.split(",")
  args.prefill_len = args.prefill_len or (1024 if args.tiny else 131072)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  device = jax.devices()[0].device_kind
  os.makedirs(args.out, exist_ok=True)
  slug = device_slug() + ("_tiny" if args.tiny else "") + (f"_d{args.width}" if args.width else "")
  json_path = os.path.join(args.out, f"generate_{slug}.json")
  results = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      results = json.load(f)
  results["device"], results["jax"], results["date"] = device, jax.__version__, str(datetime.date.today())

  def save(part_key, value):
    results[part_key] = value
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(args.out, f"generate_{slug}.md"), "w") as f:
      f.write(markdown(results, device) + "\n")

  if args.part in ("decode", "all"):
    earlier = dict(results.get("decode", {}))
    save("decode", {**earlier, **run_decode(args, lambda partial: save("decode", {**earlier, **partial}))})
  if args.part in ("prefill", "all"):
    key = "prefill" if not args.prefill_chunk else f"prefill_chunk{args.prefill_chunk}"
    save(key, run_prefill(args))
  logger.info("results: %s", json_path)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
