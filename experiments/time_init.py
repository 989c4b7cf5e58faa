"""Start-up cost of fresh parameters: one jitted flax init against train.state.init_params.

  PYTHONPATH=. python experiments/time_init.py [--presets tiny,evo2-1b,evo2-7b]
      [--layout "SE MHA"] [--out FILE]

For each preset (in this process, one after the other): "one program" lowers and compiles
jax.jit of the model's flax init (unboxed), the way create_train_state drew parameters before
init_params (every parameter's random generator inlined into one program), and runs it;
"init_params" draws the same tree with one small sampler per distinct (initialiser, shape,
dtype), compiled in parallel threads, then run per parameter. Seconds from the call to the
parameters being ready, compilation included; each preset's "init_params" row also says how
many samplers it compiled (samplers compiled for an earlier preset are reused). --layout
replaces the presets' layouts (a quick run on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report  # noqa: E402
from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.config import ModelConfig  # noqa: E402
from sh2_jax.model import StripedHyena2, count_params  # noqa: E402
from sh2_jax.train import state as state_lib  # noqa: E402


def time_one_program(model_config: ModelConfig, seed: int = 0) -> tuple[float, float]:
  """(compile s, total s) of jax.jit(flax init) on the default device."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda rng: nn.meta.unbox(StripedHyena2(model_config).init(rng, tokens)))
  start = time.perf_counter()
  compiled = init.lower(jax.random.key(seed)).compile()
  compiled_at = time.perf_counter()
  jax.block_until_ready(compiled(jax.random.key(seed)))
  return compiled_at - start, time.perf_counter() - start


def time_init_params(model_config: ModelConfig, seed: int = 0) -> tuple[float, int]:
  """(total s, samplers compiled by this call) of state.init_params on the default device."""
  before = len(state_lib._COMPILED)
  start = time.perf_counter()
  jax.block_until_ready(state_lib.init_params(model_config, jax.random.key(seed)))
  return time.perf_counter() - start, len(state_lib._COMPILED) - before


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="tiny,evo2-1b,evo2-7b")
  parser.add_argument("--layout", help="replace each preset's layout (e.g. 'SE MHA')")
  parser.add_argument("--out", help="markdown file (default: print only)")
  args = parser.parse_args(argv)
  presets = [name for name in args.presets.split(",") if name]
  for name in presets:
    if name not in config_lib.PRESETS:
      parser.error(f"--presets {name}: choose from {','.join(sorted(config_lib.PRESETS))}")
  jax.block_until_ready(jnp.zeros(()) + 1)  # the backend's start-up, outside the first row
  rows = []
  for name in presets:
    model = config_lib.get_preset(name).model
    if args.layout:
      model = dataclasses.replace(model, layout=args.layout)
    count = count_params(state_lib.abstract_params(model))
    compile_s, one_program_s = time_one_program(model)
    init_params_s, compiled = time_init_params(model)
    rows.append((name, count, compile_s, one_program_s, init_params_s, compiled))
    print(f"{name}: one program {one_program_s:.2f} s (compile {compile_s:.2f}), init_params "
          f"{init_params_s:.2f} s ({compiled} samplers compiled)", flush=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = ["# Fresh parameters: one jitted flax init against init_params", "",
           f"- device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
           f"{jax.__version__}, {os.cpu_count()} CPU cores, {stamp}",
           "- command: `PYTHONPATH=. python3 experiments/time_init.py "
           + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
           "- seconds from the call to the parameters being ready, compilation included", "",
           "| preset | parameters | one program: compile s | one program: total s | "
           "init_params: total s | samplers it compiled | one program / init_params |",
           "|---|---|---|---|---|---|---|"]
  lines += [f"| {name} | {count / 1e6:.1f} M | {compile_s:.2f} | {one:.2f} | {new:.2f} | "
            f"{compiled} | {one / new:.1f}x |"
            for name, count, compile_s, one, new, compiled in rows]
  report.emit(lines, args.out)


if __name__ == "__main__":
  main()
