"""Byte-level data pipeline: load tokens, split by position, grain training windows, eval batches.

Conventions:
- Tokens are bytes: [N] uint8 streams from FASTA (sequence only) or raw files; batches are int32.
- Split: the first part of the stream trains, the last `eval_fraction` is held out (by position).
- Windows: window i of a split is tokens[i * L : i * L + L + 1] (L = seq_len): inputs w[:-1],
  targets w[1:]. Stride L, so consecutive windows share one boundary token and every token but
  the first is a target exactly once; a split of n tokens holds (n - 1) // L windows (the ragged
  tail is dropped).
- Training: window ids are shuffled per epoch (grain's index shuffle, seed combined with the
  epoch number), repeated forever and grouped into global batches of `batch_size` windows (a
  batch may straddle two epochs; every window appears exactly once per epoch of the flattened
  stream). Process p of P keeps rows [p * B / P, (p + 1) * B / P) of every global batch, so a
  multi-host run sees exactly the single-process batches split by rows.
- Iterator state (`get_state`/`set_state`, or orbax through `grain.checkpoint.CheckpointSave` /
  `CheckpointRestore`) is the index of the next global batch.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import logging
import os
import re
import zlib

import grain
import numpy as np

from sh2_jax.config import DataConfig
from sh2_jax.data.bytes import read_raw
from sh2_jax.data.fasta import RECORD_SEPARATOR, parse_fasta
from sh2_jax.errors import UserError

logger = logging.getLogger(__name__)

FASTA_EXTENSIONS = (".fa", ".fasta", ".fna", ".ffn", ".faa")
DEFAULT_GENOME = ("tests", "data", "GCF_001457455.1_NCTC11397_genomic.fna.gz")
READ_THREADS = 2  # In-process threads reading batches; a batch is one cheap numpy gather.
PREFETCH_BATCHES = 4  # Batches read ahead of the consumer (not part of the iterator state).
_FASTA_START = re.compile(rb"\s*>")


class DataError(UserError, ValueError):
  """Bad data input; the message is one line saying what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def default_genome_path() -> str:
  """Path of the bacterial genome (NCTC11397, ~2.46 M bases, FASTA.gz) shipped in pyrodigal."""
  spec = importlib.util.find_spec("pyrodigal")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("data.path is unset and the default genome needs the 'pyrodigal' package: "
                    "pip install pyrodigal, or set data.path to a FASTA/text file")
  for root in spec.submodule_search_locations:
    path = os.path.join(root, *DEFAULT_GENOME)
    if os.path.isfile(path):
      return path
  raise DataError(f"the default genome {'/'.join(DEFAULT_GENOME)} is missing from pyrodigal at "
                  f"{list(spec.submodule_search_locations)}: reinstall pyrodigal (pip install "
                  f"--force-reinstall pyrodigal) or set data.path to a FASTA/text file")


def _looks_like_fasta(path: str, text: bytes) -> bool:
  """FASTA if the content starts with '>' (after whitespace) or the extension says so."""
  name = path.lower()
  if name.endswith(".gz"):
    name = name[:-3]
  return _FASTA_START.match(text) is not None or name.endswith(FASTA_EXTENSIONS)


def _read_file(path: str, fmt: str) -> np.ndarray:
  """One file as [N] uint8 tokens, parsed per `fmt` ("auto" | "fasta" | "bytes")."""
  try:
    text = read_raw(path)
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(f"data file {path!r} starts like gzip but does not decompress ({e}): "
                    f"re-create the archive or point data.path at an uncompressed copy") from None
  except OSError as e:
    raise DataError(f"cannot read data file {path!r} ({e.strerror or e}): check the path and "
                    f"its permissions") from None
  if not text:
    raise DataError(f"data file {path!r} is empty: point data.path at a file with content")
  if fmt == "fasta" or (fmt == "auto" and _looks_like_fasta(path, text)):
    tokens = parse_fasta(text)
    if tokens.size == 0:
      raise DataError(f"FASTA file {path!r} has headers but no sequence: add sequence lines "
                      f"after the '>' headers, or set data.format=bytes to read it as raw text")
    return tokens
  return np.frombuffer(text, dtype=np.uint8).copy()


def load_tokens(config: DataConfig) -> np.ndarray:
  """Reads the configured data as byte tokens.

  Args:
    config: path (file, directory or None = default genome) and format ("auto" = FASTA if the
      decompressed content starts with '>' or the extension is .fa/.fasta/.fna/.ffn/.faa[.gz],
      raw bytes otherwise). A directory contributes its regular files (not recursive) in sorted
      name order, empty ones skipped, joined by one b"\\n" byte.

  Returns:
    [N] uint8 tokens with N >= 2 * (seq_len + 1) (one window for each split).
  """
  path = config.path if config.path is not None else default_genome_path()
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = sorted(e.path for e in os.scandir(path) if e.is_file())
    nonempty = [f for f in files if os.path.getsize(f) > 0]
    if not nonempty:
      raise DataError(f"data directory {path!r} has no non-empty regular files: put FASTA/text "
                      f"files in it or point data.path at a file")
    for skipped in sorted(set(files) - set(nonempty)):
      logger.warning("skipping empty data file %s", skipped)
    parts = [_read_file(f, config.format) for f in nonempty]
    separator = np.frombuffer(RECORD_SEPARATOR, dtype=np.uint8)
    tokens = np.concatenate([x for part in parts for x in (separator, part)][1:])
  elif os.path.exists(path):
    files = [path]
    tokens = _read_file(path, config.format)
  else:
    raise DataError(f"data.path={path!r} does not exist: point it at a FASTA/text file or a "
                    f"directory of them (or leave it unset for the default genome)")
  needed = 2 * (config.seq_len + 1)
  if tokens.size < needed:
    raise DataError(f"data at {path!r} has {tokens.size} tokens, fewer than the {needed} needed "
                    f"for one window of data.seq_len + 1 = {config.seq_len + 1} tokens in each of "
                    f"train and eval: lower data.seq_len or use more data")
  logger.info("loaded %d tokens from %s (%d file(s), format=%s)", tokens.size, path, len(files),
              config.format)
  return tokens


def split_tokens(tokens: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits by position: train = the first part, eval = the last round(N * eval_fraction) tokens.

  Args:
    tokens: [N] uint8.
    eval_fraction: in (0, 1).

  Returns:
    (train [N - E] uint8, eval [E] uint8): views of `tokens`, disjoint, in stream order.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise DataError(f"data.eval_fraction={eval_fraction} must be in (0, 1)")
  n_eval = int(round(tokens.size * eval_fraction))
  cut = tokens.size - n_eval
  return tokens[:cut], tokens[cut:]


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

def num_windows(n_tokens: int, seq_len: int) -> int:
  """Windows of seq_len + 1 tokens at stride seq_len that fit in n_tokens: (n - 1) // seq_len."""
  return max(0, (n_tokens - 1) // seq_len)


def check_windows(split: str, n_tokens: int, seq_len: int, batch_size: int = 1) -> int:
  """Returns the split's window count; DataError if it holds fewer than one batch of windows."""
  count = num_windows(n_tokens, seq_len)
  if split == "train":
    fix = "lower data.seq_len or data.eval_fraction, or use more data"
  else:
    fix = "lower data.seq_len, raise data.eval_fraction, or use more data"
  if count < 1:
    raise DataError(f"{split} split has {n_tokens} tokens, fewer than one window of "
                    f"data.seq_len + 1 = {seq_len + 1} tokens: {fix}")
  if count < batch_size:
    raise DataError(f"{split} split has {n_tokens} tokens = {count} windows of {seq_len + 1} "
                    f"tokens, fewer than one batch of {batch_size}: lower the batch size or "
                    f"{fix.removeprefix('lower ')}")
  return count


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
  """Windows by id: row r is tokens[id_r * seq_len : id_r * seq_len + seq_len + 1].

  Args:
    tokens: [N] uint8.
    window_ids: [B] integer ids in [0, num_windows(N, seq_len)).
    seq_len: L.

  Returns:
    [B, L + 1] int32.
  """
  starts_B = np.asarray(window_ids, dtype=np.int64) * seq_len
  index_BW = starts_B[:, None] + np.arange(seq_len + 1, dtype=np.int64)
  return tokens[index_BW].astype(np.int32)


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
  """Validates process sharding; returns the per-process batch size."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count="
                    f"{process_count}): pass jax.process_index() and jax.process_count()")
  if batch_size < 1 or batch_size % process_count:
    raise DataError(f"batch size {batch_size} must be a positive multiple of the process count "
                    f"{process_count}: every process takes an equal share of each global batch")
  return batch_size // process_count


@dataclasses.dataclass(frozen=True, eq=False)
class _GatherRows:
  """grain map: global batch of window ids [B] -> this process's rows {"tokens": [B/P, L+1]}."""
  tokens: np.ndarray
  seq_len: int
  row_start: int
  row_stop: int

  def __call__(self, window_ids_B: np.ndarray) -> dict[str, np.ndarray]:
    ids = window_ids_B[self.row_start:self.row_stop]
    return {"tokens": gather_windows(self.tokens, ids, self.seq_len)}


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite, per-epoch shuffled training batches.

  Args:
    tokens: [N] uint8 training split.
    seq_len: L; windows hold L + 1 tokens.
    batch_size: global batch B (windows per step over all processes); divisible by P.
    seed: shuffle seed (taken mod 2**32); epoch e uses seed + e, so each epoch differs.
    process_index, process_count: p and P; process p keeps rows [p B/P, (p+1) B/P).

  Returns:
    MapDataset of length sys.maxsize // B whose element i is {"tokens": [B/P, L + 1] int32},
    the rows of global batch i.
  """
  local = _check_processes(batch_size, process_index, process_count)
  count = check_windows("train", tokens.size, seq_len, batch_size)
  gather = _GatherRows(np.ascontiguousarray(tokens, dtype=np.uint8), seq_len,
                       process_index * local, (process_index + 1) * local)
  return (grain.MapDataset.range(count)
          .shuffle(seed=int(seed) % 2**32)
          .repeat()
          .batch(batch_size)
          .map(gather))


def _ensure_absl_flags_parsed() -> None:
  """grain worker processes read absl flags and fail if they were never parsed (SPEC 10)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Same effect as FLAGS(sys.argv[:1]) without touching argv.


def dataset_iterator(dataset: grain.MapDataset, worker_count: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset`.

  Args:
    dataset: e.g. from `train_dataset`.
    worker_count: 0 reads in this process (a few threads); > 0 uses grain worker processes
      (`mp_prefetch`), which yields the same elements in the same order.

  Returns:
    A DatasetIterator with get_state()/set_state() (works with grain.checkpoint.CheckpointSave /
    CheckpointRestore under orbax).
  """
  options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  iter_ds = dataset.to_iter_dataset(options)
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
  """Held-out batches: windows 0, 1, 2, ... in order, grouped by batch_size, ragged tail dropped.

  Args:
    tokens: [N] uint8 eval split.
    seq_len: L.
    batch_size: global batch B; process p gets rows [p B/P, (p+1) B/P) of each.
    max_batches: at most this many batches (0 = all).

  Returns:
    List of [B/P, L + 1] int32 arrays, the same on every call.
  """
  local = _check_processes(batch_size, process_index, process_count)
  count = check_windows("eval", tokens.size, seq_len, batch_size)
  n_batches = count // batch_size
  if max_batches > 0:
    n_batches = min(n_batches, max_batches)
  out = []
  for b in range(n_batches):
    first = b * batch_size + process_index * local
    out.append(gather_windows(tokens, np.arange(first, first + local), seq_len))
  return out


# ---------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Data:
  """Loaded, split and validated data of one run (see `build_data`).

  Attributes:
    config: the DataConfig it came from.
    batch_size: global batch size B.
    process_index, process_count: this process's share of every batch.
    train_tokens: [N_train] uint8, the head of the stream.
    eval_tokens: [N_eval] uint8, the tail of the stream.
  """
  config: DataConfig
  batch_size: int
  process_index: int
  process_count: int
  train_tokens: np.ndarray
  eval_tokens: np.ndarray

  @property
  def train_windows(self) -> int:
    """Training windows per epoch (an epoch is train_windows / batch_size steps)."""
    return num_windows(self.train_tokens.size, self.config.seq_len)

  @property
  def eval_windows(self) -> int:
    return num_windows(self.eval_tokens.size, self.config.seq_len)

  def train_dataset(self) -> grain.MapDataset:
    """Infinite MapDataset of {"tokens": [B/P, L + 1] int32}."""
    return train_dataset(self.train_tokens, self.config.seq_len, self.batch_size,
                         self.config.seed, self.process_index, self.process_count)

  def train_iterator(self) -> grain.DatasetIterator:
    """A fresh checkpointable iterator at the first batch (config.worker_count workers)."""
    return dataset_iterator(self.train_dataset(), self.config.worker_count)

  def eval_batches(self, batch_size: int | None = None, max_batches: int = 0) -> list[np.ndarray]:
    """This process's rows of the held-out batches (batch_size: global, default the train B)."""
    return eval_batches(self.eval_tokens, self.config.seq_len, batch_size or self.batch_size,
                        max_batches, self.process_index, self.process_count)


def build_data(config: DataConfig, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> Data:
  """Loads, splits and validates the data: both splits hold at least one batch of windows.

  Args:
    config: data settings.
    batch_size: global batch size (also the default eval batch size).
    process_index, process_count: e.g. jax.process_index(), jax.process_count().
  """
  _check_processes(batch_size, process_index, process_count)
  tokens = load_tokens(config)
  train, held_out = split_tokens(tokens, config.eval_fraction)
  train_count = check_windows("train", train.size, config.seq_len, batch_size)
  eval_count = check_windows("eval", held_out.size, config.seq_len, batch_size)
  logger.info("data: %d train tokens (%d windows of %d), %d eval tokens (%d windows)",
              train.size, train_count, config.seq_len + 1, held_out.size, eval_count)
  return Data(config, batch_size, process_index, process_count, train, held_out)


def make_train_iterator(config: DataConfig, batch_size: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Shortcut: build_data(...).train_iterator()."""
  return build_data(config, batch_size, process_index, process_count).train_iterator()
