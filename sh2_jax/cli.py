"""`sh2`: the command line. Thin: parses arguments, logs versions and devices, calls the library.

  sh2 train [--preset tiny] [--config run.yaml] [--set model.d_model=256 ...] [--run-dir DIR] [--resume]
  sh2 eval --run-dir DIR [--step N] [--max-batches N]
  sh2 info [PRESET] [--set ...]
  sh2 bench ops [--lengths ...]           (from the source checkout)
  sh2 generate --checkpoint DIR --prompt ACGT --max-new N [--temperature --top-k --top-p --seed
               --batch --stop ... --output out.fasta]
  sh2 score --checkpoint DIR --fasta F [--batch-size N] [--output scores.tsv]
  sh2 convert --input STATE_DICT(.pt|.npz) --config VORTEX.yml --output DIR

Bad input (unknown setting, missing data file, window longer than the data, ...) ends with one
`sh2: error: ...` line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from sh2_jax import config as config_lib

logger = logging.getLogger("sh2_jax")

EPILOG_SETTINGS = """settings (--set section.name=value, or the same keys in a YAML file):
  model.*  vocab_size d_model layout num_heads mlp_dim mlp_activation featurizer_len
           se_filter_len mr_filter_len se_groups mr_groups li_order mr_decay train_len
           rope_base norm_eps dtype param_dtype conv_method li_method conv_chunk remat remat_policy
           init_std
  data.*   path format seq_len eval_fraction seed worker_count
  train.*  steps batch_size grad_accum learning_rate warmup_steps min_lr_ratio weight_decay
           b1 b2 clip_norm seed log_every eval_every eval_batches checkpoint_every keep_checkpoints
  mesh.*   data fsdp tensor context   (-1 = all remaining devices)
           context_conv (p2p|a2a) context_attention (allgather|ring) zigzag
presets: """ + ", ".join(sorted(config_lib.PRESETS))


def _add_config_args(parser: argparse.ArgumentParser, preset_positional: bool = False) -> None:
  if preset_positional:
    parser.add_argument("preset", nargs="?", default="tiny",
                        help="preset name (default: tiny); one of " + ", ".join(sorted(config_lib.PRESETS)))
  else:
    parser.add_argument("--preset", default="tiny",
                        help="preset to start from (default: tiny); one of " + ", ".join(sorted(config_lib.PRESETS)))
  parser.add_argument("--config", metavar="YAML", help="YAML file of settings, e.g. 'model: {d_model: 256}'; "
                      "applied after the preset, before --set")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override one setting, e.g. --set model.d_model=256 --set train.steps=200 (repeatable)")


def build_config(preset: str, config_file: str | None, overrides: Sequence[str]) -> config_lib.Config:
  """Preset, then YAML file, then --set overrides (later wins)."""
  config = config_lib.get_preset(preset)
  if config_file:
    config = config_lib.apply_overrides(config, config_lib.load_yaml_overrides(config_file))
  return config_lib.apply_overrides(config, config_lib.parse_set_args(overrides))


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="sh2", description="StripedHyena 2 (Evo 2 architecture) language models in JAX.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  parser.add_argument("--compile-cache", metavar="DIR|off", default=None,
                      help="persistent XLA compilation cache: a later run of the same programs "
                      "loads them instead of compiling (default: $SH2_COMPILE_CACHE, else "
                      "$XDG_CACHE_HOME/sh2-jax/xla or ~/.cache/sh2-jax/xla; 'off' disables it; "
                      "a JAX_COMPILATION_CACHE_DIR in the environment wins)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  p = sub.add_parser("train", help="train a model (default: tiny preset on the bundled bacterial genome)",
                     description="Train a StripedHyena 2 model. With no arguments: the `tiny` preset on the "
                                 "Corynebacterium diphtheriae genome shipped in the pyrodigal package. Writes "
                                 "config.json, metrics.jsonl, checkpoints/ and loss.png into the run directory.",
                     epilog=EPILOG_SETTINGS, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_config_args(p)
  p.add_argument("--data", metavar="PATH", help="FASTA(.gz), text or bytes file or directory "
                 "(shorthand for --set data.path=PATH; default: the bundled genome)")
  p.add_argument("--mesh", metavar="AXIS=N,...", help="device mesh, e.g. data=2,context=4 "
                 "(axes data, fsdp, tensor, context; default: all devices on data)")
  p.add_argument("--run-dir", default=None, help="run directory (default: runs/<preset>)")
  p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
  p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                 help="stop at STEP with a checkpoint, keeping the schedule of train.steps "
                      "(for time-limited jobs; continue with --resume)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")

  p = sub.add_parser("eval", help="held-out loss and bits per byte of a run, against Markov baselines",
                     description="Evaluate a run's checkpoint on its held-out split: loss (nats/byte) and "
                                 "bits per byte, next to order-0 and order-3 Markov models fitted on the "
                                 "training split, so you can see whether the model learned anything.")
  p.add_argument("--run-dir", required=True, help="run directory written by `sh2 train`")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--max-batches", type=int, default=0, help="held-out batches to use (default 0: all)")
  p.add_argument("--batch-size", type=int, default=None, help="eval batch size (default: the run's)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")

  p = sub.add_parser("bench", help="benchmarks (code in experiments/; run from the source checkout)",
                     description="Run a benchmark from experiments/ and write its table to "
                                 "experiments/results/. `sh2 bench NAME --help` lists its options.")
  p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark: " + ", ".join(
      f"{k} ({v[1]})" for k, v in sorted(BENCHMARKS.items())))
  p.add_argument("args", nargs=argparse.REMAINDER, help="options passed to the benchmark")

  p = sub.add_parser("info", help="layout and parameter count of a preset (abstract evaluation: no allocation)",
                     description="Print a model's layout, sizes and parameter count, computed by abstract "
                                 "evaluation (nothing is allocated, so evo2-40b works on a laptop).",
                     epilog=EPILOG_SETTINGS, formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_config_args(p, preset_positional=True)
  _add_inference_parsers(sub)
  return parser


def _add_inference_parsers(sub: argparse._SubParsersAction) -> None:
  checkpoint_help = ("model directory: a `sh2 train` run directory (latest checkpoint's params) or "
                     "a `sh2 convert` output")
  dtype_help = "compute dtype (default: the model's config): float32 or bfloat16"
  p = sub.add_parser("generate", help="sample continuations of a prompt (recurrent decode) as FASTA",
                     description="Prefill the prompt once, then decode token by token with constant-size "
                                 "Hyena states (and a KV cache for MHA layers) in one compiled loop.")
  p.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="prompt bytes, e.g. ACGTACGT")
  src.add_argument("--prompt-file", metavar="F", help="FASTA (one generation per record) or a plain text file")
  p.add_argument("--max-new", type=int, required=True, metavar="N", help="bytes to generate per sample")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely bytes (default 0: off)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
  p.add_argument("--alphabet", default=None, help="sample only these bytes, e.g. ACGT (default: any byte)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--batch", type=int, default=1, help="samples per prompt, decoded together (default 1)")
  p.add_argument("--stop", action="append", default=None, metavar="BYTES",
                 help="stop a sample at any of these bytes (repeatable; default '\\n', the record "
                      "separator of training data; --stop '' for none)")
  p.add_argument("--prefill-chunk", type=int, default=None, metavar="T",
                 help="prefill long prompts in chunks of T tokens (bounded memory)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help=dtype_help)
  p.add_argument("--output", metavar="FASTA", help="write samples here (default: stdout)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")

  p = sub.add_parser("score", help="per-sequence log-likelihood of FASTA records (variant scoring)",
                     description="Log-likelihood (nats) of each record given its first byte, and bits "
                                 "per byte, batched; writes a TSV (name, length, loglik_nats, bits_per_byte).")
  p.add_argument("--checkpoint", required=True, metavar="DIR", help=checkpoint_help)
  p.add_argument("--fasta", required=True, metavar="F", help="FASTA(.gz) of sequences to score")
  p.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help=dtype_help)
  p.add_argument("--output", metavar="TSV", help="write the table here (default: stdout)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")

  p = sub.add_parser("convert", help="import an Evo 2 (vortex layout) state dict as a model directory",
                     description="Convert a PyTorch state dict of the public Evo 2 inference format "
                                 "(vortex) plus its YAML config into config.json + an Orbax params "
                                 "checkpoint that `sh2 generate` and `sh2 score` load. .pt needs torch "
                                 "(optional extra); .npz needs nothing.")
  p.add_argument("--input", required=True, metavar="STATE_DICT", help=".pt/.pth (torch) or .npz state dict")
  p.add_argument("--config", required=True, metavar="VORTEX_YML", help="the model's vortex YAML config")
  p.add_argument("--output", required=True, metavar="DIR", help="model directory to write")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                 help="compute dtype stored in config.json (default bfloat16)")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="storage dtype of the params (LI poles/residues stay float32; default float32)")
  p.add_argument("--qkv-layout", choices=("checkpoint", "memory"), default="checkpoint",
                 help="Wqkv row order: released checkpoints (default) or vortex's in-memory state dict")


BENCHMARKS = {
    "ops": ("experiments.bench_ops", "fwd and fwd+bwd ms of SE/MR/LI/MHA operators and the GEMM floor"),
    "train": ("experiments.bench_train", "tokens/s and MFU of a train step, SH2 vs all-MHA"),
    "cp": ("experiments.bench_cp", "longest trainable sequence on 1 vs N devices (context "
           "parallelism), tokens/s, scaling efficiency, p2p vs a2a"),
    "profile-train": ("experiments.profile_train", "device time of a train step by model part, pass "
                      "and kernel kind (GEMM, Pallas, cuDNN attention, fusions), SH2 vs all-MHA"),
    "generate": ("experiments.bench_generate", "decode tokens/s vs context, long-prompt prefill"),
    "attention": ("experiments.bench_attention", "Pallas position-masked flash attention vs cuDNN "
                  "(GPU), block-size sweep"),
}


def cmd_bench(args: argparse.Namespace) -> int:
  import importlib
  module_name = BENCHMARKS[args.name][0]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if not (error.name or "").startswith("experiments"):
      raise
    raise config_lib.ConfigError(
        f"sh2 bench needs the source checkout ({module_name} is not installed): run it from the "
        "repository root, e.g. `PYTHONPATH=. sh2 bench ops`") from None
  _log_environment()
  return module.main(list(args.args))


def _parse_mesh(text: str) -> dict[str, str]:
  out = {}
  for item in text.split(","):
    axis, sep, size = item.partition("=")
    if not sep or axis.strip() not in config_lib.MeshConfig.AXES:
      raise config_lib.ConfigError(f"--mesh {text!r}: use AXIS=N pairs separated by commas, axes "
                                   f"{list(config_lib.MeshConfig.AXES)}, e.g. data=2,context=4")
    out[f"mesh.{axis.strip()}"] = size.strip()
  return out


def _log_environment() -> None:
  import jax
  import flax
  import optax
  logger.info("jax %s, flax %s, optax %s; backend %s, devices %s", jax.__version__, flax.__version__,
              optax.__version__, jax.default_backend(), jax.devices())


def cmd_train(args: argparse.Namespace) -> int:
  config = build_config(args.preset, args.config, args.overrides)
  extra = {}
  if args.data:
    extra["data.path"] = args.data
  if args.mesh:
    extra.update({"mesh.data": "1", **_parse_mesh(args.mesh)})
  config = config_lib.apply_overrides(config, extra)
  from sh2_jax.parallel.distributed import maybe_initialize
  maybe_initialize()
  _log_environment()
  from sh2_jax.train.loop import train
  run_dir = args.run_dir or os.path.join("runs", args.preset)
  summary = train(config, run_dir, resume=args.resume, progress=not args.no_progress,
                  stop_at=args.stop_at)
  print(_format_eval(summary, title=f"trained to step {summary['step']}"))
  print(f"run directory: {run_dir} (metrics.jsonl, loss.png, checkpoints/)")
  return 0


def _format_eval(result: dict, title: str) -> str:
  lines = [title, f"  {'model':<16} {result['eval_bpb']:.4f} bits/byte  "
                  f"({result['eval_loss']:.4f} nats/byte, {int(result['eval_tokens'])} held-out bytes)"]
  for key in sorted(k for k in result if k.startswith("markov")):
    order = key[len("markov"):-len("_bpb")]
    lines.append(f"  {'order-' + order + ' Markov':<16} {result[key]:.4f} bits/byte")
  return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
  _log_environment()
  from sh2_jax.train.loop import evaluate_run
  result = evaluate_run(args.run_dir, step=args.step, max_batches=args.max_batches,
                        batch_size=args.batch_size)
  print(json.dumps(result) if args.json else _format_eval(result, f"{args.run_dir} step {result['step']}"))
  return 0


def cmd_info(args: argparse.Namespace) -> int:
  from sh2_jax.model import abstract_params, count_params
  config = build_config(args.preset, args.config, args.overrides)
  model = config.model
  params = abstract_params(model)
  total = count_params(params)
  by_kind: dict[str, int] = {}
  for i, kind in enumerate(model.layers):
    by_kind[kind] = by_kind.get(kind, 0) + count_params(params[f"block_{i}"]["mixer"])
  print(f"preset        {args.preset}")
  print(f"layout        {model.layout}  ({model.num_layers} layers)")
  print(f"width         d_model={model.d_model}, heads={model.num_heads} x {model.head_dim}, "
        f"mlp={model.ffn_dim} ({model.mlp_activation})")
  print(f"filters       featurizer {model.featurizer_len}, SE {model.se_groups}x{model.se_filter_len}, "
        f"MR {model.mr_groups}x{model.mr_filter_len}, LI {model.li_order} poles/channel")
  print(f"parameters    {total:,} ({total / 1e9:.3f} B)")
  for kind, n in by_kind.items():
    print(f"  {kind + ' mixers':<12}{n:,}")
  print(f"  {'embedding':<12}{model.vocab_size * model.d_model:,} (tied)")
  return 0


def cmd_generate(args: argparse.Namespace) -> int:
  from sh2_jax.inference import commands
  from sh2_jax.inference.sampling import SamplingConfig
  _log_environment()
  if args.prompt is not None:
    if not args.prompt:
      raise commands.InputError("--prompt is empty: give at least one byte, e.g. --prompt ACGT")
    prompts = [("prompt", args.prompt.encode())]
  else:
    prompts = commands.read_records(args.prompt_file)
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            alphabet=None if args.alphabet is None else args.alphabet.encode())
  stops = commands.parse_stops(["\\n"] if args.stop is None else args.stop)
  result = commands.run_generate(args.checkpoint, prompts, args.max_new, sampling, args.seed,
                                 args.batch, stops, args.output,
                                 dtype=args.dtype, prefill_chunk=args.prefill_chunk,
                                 progress=not args.no_progress)
  if not args.output:
    print(commands.write_fasta(None, result["records"]), end="")
  logger.info("decode: %.1f tokens/s%s", result["tokens_per_s"],
              f"; samples written to {args.output}" if args.output else "")
  return 0


def cmd_score(args: argparse.Namespace) -> int:
  from sh2_jax.inference import commands
  _log_environment()
  rows = commands.run_score(args.checkpoint, args.fasta, args.batch_size, args.output,
                            dtype=args.dtype, progress=not args.no_progress)
  if not args.output:
    print("name\tlength\tloglik_nats\tbits_per_byte")
    for r in rows:
      print(f"{r['name']}\t{r['length']}\t{r['loglik']:.6f}\t{r['bits_per_byte']:.6f}")
  return 0


def cmd_convert(args: argparse.Namespace) -> int:
  from sh2_jax.inference import commands
  model = commands.run_convert(args.input, args.config, args.output, dtype=args.dtype,
                               param_dtype=args.param_dtype, qkv_layout=args.qkv_layout)
  print(f"converted: {model.num_layers} layers ({model.layout}), d_model {model.d_model} -> {args.output}")
  return 0


def default_compile_cache(environ: dict[str, str] | None = None) -> str:
  """$XDG_CACHE_HOME/sh2-jax/xla, or ~/.cache/sh2-jax/xla."""
  environ = os.environ if environ is None else environ
  root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "sh2-jax", "xla")


def configure_compile_cache(requested: str | None, environ: dict[str, str] | None = None
                            ) -> str | None:
  """Points JAX's persistent compilation cache (and child processes, through
  JAX_COMPILATION_CACHE_DIR in `environ`) at the directory `sh2` uses; returns it, or None when
  off or when JAX_COMPILATION_CACHE_DIR already chose one (JAX reads that itself).

  requested: --compile-cache (a directory or "off"); None: $SH2_COMPILE_CACHE, else
  default_compile_cache(). JAX caches programs that took >= 1 s to compile.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  choice = requested or environ.get("SH2_COMPILE_CACHE") or default_compile_cache(environ)
  if choice == "off":
    return None
  import jax
  path = os.path.abspath(os.path.expanduser(choice))
  jax.config.update("jax_compilation_cache_dir", path)
  environ["JAX_COMPILATION_CACHE_DIR"] = path  # for child processes (benchmarks spawn some)
  return path


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "bench": cmd_bench,
            "generate": cmd_generate, "score": cmd_score, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from sh2_jax.errors import USER_ERRORS
  if args.command != "convert":  # the converter compiles nothing
    cache = configure_compile_cache(args.compile_cache)
    logger.debug("XLA compilation cache: %s", cache or "JAX's setting")
  try:
    return COMMANDS[args.command](args)
  except USER_ERRORS as error:
    print(f"sh2: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("sh2: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
