"""A longer CPU training run of the `tiny` preset on the bundled genome, compared with the
order-0 and order-3 Markov baselines; writes experiments/results/train_tiny_cpu.md (+ .png).

  python experiments/train_cpu.py --steps 1500 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sh2_jax import config as config_lib  # noqa: E402
from sh2_jax.train.loop import read_metrics, train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  parser.add_argument("--run-dir", default="runs/tiny_cpu_long")
  parser.add_argument("--name", default="train_tiny_cpu")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  overrides = {"train.steps": args.steps, "train.eval_every": max(args.steps // 10, 1),
               "train.checkpoint_every": args.steps, "train.eval_batches": 0,
               **config_lib.parse_set_args(args.overrides)}
  config = config_lib.apply_overrides(config_lib.get_preset("tiny"), overrides)
  if os.path.exists(args.run_dir):
    shutil.rmtree(args.run_dir)
  start = time.time()
  summary = train(config, args.run_dir, progress=False)
  wall = time.time() - start
  records = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
  evals = [r for r in records if "eval_bpb" in r]
  speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
  os.makedirs(RESULTS, exist_ok=True)
  plot = f"{args.name}.png"
  shutil.copy(summary["plot"], os.path.join(RESULTS, plot))
  command = "python experiments/train_cpu.py --steps " + str(args.steps) + "".join(
      f" --set {s}" for s in args.overrides)
  lines = [
      "# `tiny` preset, longer CPU run on the bundled genome",
      "",
      f"- date: {datetime.date.today().isoformat()}",
      f"- machine: {cpu_name()}, {os.cpu_count()} cores (CPU only), jax "
      f"{__import__('jax').__version__}",
      f"- command: `{command}`",
      f"- model: {config.model.layout}, d_model={config.model.d_model}, "
      f"{config.train.batch_size} x {config.data.seq_len} tokens/step, {config.train.steps} steps",
      f"- wall time {wall / 60:.1f} min, median {sorted(speeds)[len(speeds) // 2]:.0f} tokens/s" if speeds else "",
      "",
      "Held-out bits per byte (last 5% of the genome, all windows):",
      "",
      "| step | held-out bits/byte |",
      "|---|---|",
      *[f"| {r['step']} | {r['eval_bpb']:.4f} |" for r in evals],
      "",
      "| baseline (fitted on the training split) | held-out bits/byte |",
      "|---|---|",
      f"| order-0 Markov | {summary['markov0_bpb']:.4f} |",
      f"| order-3 Markov | {summary['markov3_bpb']:.4f} |",
      f"| **sh2 tiny, step {summary['step']}** | **{summary['eval_bpb']:.4f}** |",
      "",
      f"The model is {summary['markov3_bpb'] - summary['eval_bpb']:+.4f} bits/byte "
      f"{'below' if summary['eval_bpb'] < summary['markov3_bpb'] else 'above'} the order-3 baseline and "
      f"{summary['markov0_bpb'] - summary['eval_bpb']:+.4f} below order-0.",
      "",
      f"![loss curve]({plot})",
      "",
  ]
  with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
    f.write("\n".join(line for line in lines if line is not None))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
