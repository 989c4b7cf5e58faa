"""Library side of `sh2 generate`, `sh2 score` and `sh2 convert`: read inputs, run, write FASTA
or TSV, report progress and tokens/s. The CLI only parses arguments and calls these."""

from __future__ import annotations

import codecs
import logging
import math
import os
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
import tqdm

from sh2_jax.errors import UserError
from sh2_jax.inference import checkpoint
from sh2_jax.inference.sampling import SamplingConfig, generate
from sh2_jax.inference.scoring import score_sequences

logger = logging.getLogger(__name__)
FASTA_WIDTH = 80
SCORE_BUCKET = 128  # scored batches are padded to a multiple of this (few compiled shapes)


class InputError(UserError, ValueError):
  """A prompt, FASTA or state-dict input that cannot be used."""


def read_records(path: str) -> list[tuple[str, bytes]]:
  """(name, sequence bytes) of each FASTA record; a file without '>' headers is one record named
  after the file. Whitespace inside sequences is dropped."""
  if not os.path.isfile(path):
    raise InputError(f"{path!r} does not exist")
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    import gzip
    data = gzip.decompress(data)
  text = data.replace(b"\r", b"\n")
  records: list[tuple[str, bytes]] = []
  if not text.lstrip().startswith(b">"):
    seq = b"".join(text.split())
    records = [(os.path.basename(path), seq)] if seq else []
  else:
    for chunk in text.lstrip().split(b"\n>"):
      header, _, body = chunk.lstrip(b">").partition(b"\n")
      name = header.decode("utf-8", "replace").strip().split()[0] if header.strip() else f"seq{len(records)}"
      records.append((name, b"".join(body.split())))
  records = [(n, s) for n, s in records if s]
  if not records:
    raise InputError(f"{path!r} holds no sequence")
  return records


def parse_stops(stops: Sequence[str]) -> list[int]:
  """Stop bytes from --stop values; escapes like '\\n' are decoded ('\\n' -> byte 10)."""
  out = []
  for text in stops:
    try:
      raw = codecs.decode(text, "unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError):
      raise InputError(f"--stop {text!r}: give bytes, e.g. --stop N or --stop '\\n'") from None
    out.extend(raw)  # '' adds nothing: --stop '' means no stop bytes
  return sorted(set(out))


PRINTABLE = bytes(range(33, 127)).replace(b">", b"")
UNPRINTABLE_AS = ord("?")


def fasta_safe(seq: bytes) -> tuple[bytes, int]:
  """seq with bytes that would break FASTA (whitespace, '>', control and non-ASCII bytes)
  written as '?'; returns (bytes, how many were replaced)."""
  table = bytes(b if b in PRINTABLE else UNPRINTABLE_AS for b in range(256))
  safe = seq.translate(table)
  return safe, sum(a != b for a, b in zip(seq, safe))


def write_fasta(path: str | None, records: Sequence[tuple[str, bytes]]) -> str:
  text = "".join(f">{name}\n" + "".join(seq[i:i + FASTA_WIDTH].decode("latin-1") + "\n"
                                        for i in range(0, max(len(seq), 1), FASTA_WIDTH))
                 for name, seq in records)
  if path:
    with open(path, "w") as f:
      f.write(text)
  return text


def load(directory: str, dtype: str | None) -> tuple[Any, dict]:
  model, params, step = checkpoint.load_model(directory)
  model = checkpoint.with_dtype(model, dtype)
  logger.info("model %s (%d layers, d_model %d, compute %s)%s", directory, model.num_layers,
              model.d_model, model.dtype, "" if step is None else f", step {step}")
  return model, params


def run_generate(checkpoint_dir: str, prompts: Sequence[tuple[str, bytes]], max_new: int,
                 sampling: SamplingConfig, seed: int, batch: int, stops: Sequence[int],
                 output: str | None, dtype: str | None = None, prefill_chunk: int | None = None,
                 progress: bool = True) -> dict:
  """Samples `batch` continuations of each prompt; writes them as FASTA (continuations only).

  Returns: {"records": [(name, bytes)], "tokens_per_s": steady decode tokens/s (mean over prompts)}."""
  if batch < 1:
    raise InputError(f"--batch {batch} must be >= 1")
  model, params = load(checkpoint_dir, dtype)
  records, rates = [], []
  for p_index, (name, prompt) in enumerate(prompts):
    tokens = np.tile(np.frombuffer(prompt, np.uint8).astype(np.int32), (batch, 1))
    segment = max(1, min(256, max_new // 20))
    with tqdm.tqdm(total=max_new, desc=f"generate {name}", unit="tok", disable=not progress,
                   leave=False) as bar:
      start = time.perf_counter()

      def on_progress(n: int) -> None:
        bar.update(n)
        bar.set_postfix(tok_s=f"{batch * bar.n / max(time.perf_counter() - start, 1e-9):.0f}")

      result = generate(params, model, tokens, max_new, sampling, seed=seed + p_index,
                        stop_tokens=stops, prefill_chunk=prefill_chunk, segment=segment,
                        on_progress=on_progress)
    rates.append(result["steady_tokens_per_s"])
    logger.info("%s: prompt %d bytes prefilled in %.2f s; %d x %d tokens in %.2f s with "
                "compilation, %.1f tokens/s after it", name, len(prompt), result["prefill_s"], batch,
                result["decoded"], result["decode_s"], result["steady_tokens_per_s"])
    for j in range(batch):
      seq, replaced = fasta_safe(bytes(result["tokens"][j, :result["lengths"][j]].astype(np.uint8)))
      if replaced:
        logger.warning("%s sample %d: %d generated bytes are not printable in FASTA; written as '?'",
                       name, j, replaced)
      records.append((f"{name}_sample{j} prompt_len={len(prompt)} new={len(seq)} seed={seed + p_index}",
                      seq))
  write_fasta(output, records)
  return {"records": records, "tokens_per_s": float(np.mean(rates))}


def run_score(checkpoint_dir: str, fasta: str, batch_size: int, output: str | None,
              dtype: str | None = None, progress: bool = True) -> list[dict]:
  """Per-record log-likelihood (nats, first byte as context) and bits per byte; writes a TSV."""
  if batch_size < 1:
    raise InputError(f"--batch-size {batch_size} must be >= 1")
  records = read_records(fasta)
  model, params = load(checkpoint_dir, dtype)
  order = sorted(range(len(records)), key=lambda i: len(records[i][1]))
  results: dict[int, dict] = {}
  total = sum(len(s) for _, s in records)
  start = time.perf_counter()
  with tqdm.tqdm(total=total, desc="score", unit="tok", unit_scale=True, disable=not progress) as bar:
    for first in range(0, len(order), batch_size):
      idx = order[first:first + batch_size]
      lengths = np.array([len(records[i][1]) for i in idx], np.int32)
      width = SCORE_BUCKET * math.ceil(lengths.max() / SCORE_BUCKET)
      tokens = np.zeros((batch_size, width), np.int32)  # fixed batch shape: padded rows score 0
      for row, i in enumerate(idx):
        tokens[row, :lengths[row]] = np.frombuffer(records[i][1], np.uint8)
      padded_lengths = np.zeros(batch_size, np.int32)
      padded_lengths[:len(idx)] = lengths
      loglik = np.asarray(score_sequences(params, model, jnp.asarray(tokens), jnp.asarray(padded_lengths)))
      for row, i in enumerate(idx):
        scored = max(int(lengths[row]) - 1, 0)
        results[i] = {"name": records[i][0], "length": int(lengths[row]),
                      "loglik": float(loglik[row]),
                      "bits_per_byte": -float(loglik[row]) / math.log(2) / scored if scored else float("nan")}
      bar.update(int(lengths.sum()))
      bar.set_postfix(tok_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.0f}")
  rows = [results[i] for i in range(len(records))]
  lines = ["name\tlength\tloglik_nats\tbits_per_byte"] + [
      f"{r['name']}\t{r['length']}\t{r['loglik']:.6f}\t{r['bits_per_byte']:.6f}" for r in rows]
  if output:
    with open(output, "w") as f:
      f.write("\n".join(lines) + "\n")
  logger.info("scored %d records (%d bytes) in %.2f s", len(rows), total, time.perf_counter() - start)
  return rows


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from .npz (numpy) or .pt/.pth/.bin (torch, optional extra: pip install torch)."""
  if not os.path.isfile(path):
    raise InputError(f"--input {path!r} does not exist")
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  try:
    import torch
  except ImportError:
    raise InputError(f"reading {path!r} needs torch (pip install 'sh2-jax[convert]'), or convert "
                     "the state dict to .npz first") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise InputError(f"{path!r} does not hold a state dict (name -> tensor)")
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def run_convert(input_path: str, vortex_config: str, output: str, dtype: str = "bfloat16",
                param_dtype: str = "float32", qkv_layout: str = "checkpoint") -> Any:
  """Evo 2 (vortex layout) state dict + YAML config -> model directory (config.json + params/)."""
  import yaml
  from sh2_jax.convert import evo2
  if not os.path.isfile(vortex_config):
    raise InputError(f"--config {vortex_config!r} does not exist")
  with open(vortex_config) as f:
    tree = yaml.safe_load(f)
  if not isinstance(tree, dict):
    raise InputError(f"--config {vortex_config!r} is not a vortex YAML mapping")
  try:
    model = evo2.config_from_vortex(tree, dtype=dtype, param_dtype=param_dtype)
  except KeyError as error:
    raise InputError(f"--config {vortex_config!r} lacks the key {error}") from None
  params = evo2.vortex_to_params(read_state_dict(input_path), model, qkv_layout=qkv_layout)
  params = checkpoint.cast_params(params, param_dtype)
  checkpoint.save_model(output, model, params)
  return model
