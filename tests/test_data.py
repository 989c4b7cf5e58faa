"""Tests of sh2_jax.data: readers, split, windows, grain training stream and state, Markov."""

from __future__ import annotations

import collections
import gzip
import math
import os

import grain
import numpy as np
import pytest

from sh2_jax.config import DataConfig
from sh2_jax.data import markov
from sh2_jax.data import pipeline
from sh2_jax.data.bytes import read_bytes
from sh2_jax.data.fasta import parse_fasta, read_fasta
from sh2_jax.data.pipeline import DataError
from sh2_jax.errors import UserError

FASTA_TEXT = (b">seq1 first record\r\n"
              b"ACGTN\r\n"
              b"acgtRY\r\n"
              b"\r\n"
              b">seq2 empty record\n"
              b">seq3\n"
              b"  GGKM  \n"
              b"\n"
              b"nnWS\tB\n")
FASTA_EXPECTED = np.array([ord(c) for c in "ACGTNacgtRY\nGGKMnnWSB"], dtype=np.uint8)


def _write(path, content: bytes, compress: bool = False) -> str:
  with open(path, "wb") as f:
    f.write(gzip.compress(content) if compress else content)
  return str(path)


def _random_tokens(n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.fixture(scope="module")
def genome() -> np.ndarray:
  return pipeline.load_tokens(DataConfig(path=None))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_read_fasta_multi_record(tmp_path, compress):
  path = _write(tmp_path / ("x.fa.gz" if compress else "x.fa"), FASTA_TEXT, compress)
  np.testing.assert_array_equal(read_fasta(path), FASTA_EXPECTED)


def test_read_fasta_gzip_detected_by_magic_not_extension(tmp_path):
  path = _write(tmp_path / "genome.txt", FASTA_TEXT, compress=True)
  np.testing.assert_array_equal(read_fasta(path), FASTA_EXPECTED)
  tokens = pipeline.load_tokens(DataConfig(path=path, seq_len=4))  # auto: '>' after gunzip.
  np.testing.assert_array_equal(tokens, FASTA_EXPECTED)


def test_parse_fasta_edge_cases():
  np.testing.assert_array_equal(parse_fasta(b"AC\nGT\n"), np.frombuffer(b"ACGT", np.uint8))
  np.testing.assert_array_equal(parse_fasta(b">a\rAC\rGT\r>b\rTT\r"),
                                np.frombuffer(b"ACGT\nTT", np.uint8))  # CR-only endings.
  np.testing.assert_array_equal(parse_fasta(b"  >h\nA\n"), np.frombuffer(b"A", np.uint8))
  assert parse_fasta(b">only\n>headers\n\n").size == 0


def test_read_bytes_plain_and_gzip(tmp_path):
  content = bytes(range(256)) * 3
  np.testing.assert_array_equal(read_bytes(_write(tmp_path / "a.bin", content)),
                                np.frombuffer(content, np.uint8))
  np.testing.assert_array_equal(read_bytes(_write(tmp_path / "a.bin.gz", content, True)),
                                np.frombuffer(content, np.uint8))


def test_load_tokens_formats_and_directory(tmp_path):
  text = b"hello world, not a fasta file\n" * 4
  _write(tmp_path / "b_text.txt", text)
  _write(tmp_path / "a_genome.fna.gz", FASTA_TEXT, compress=True)
  _write(tmp_path / "c_empty.txt", b"")
  os.mkdir(tmp_path / "d_subdir")
  as_bytes = pipeline.load_tokens(DataConfig(path=str(tmp_path / "b_text.txt"), seq_len=4))
  np.testing.assert_array_equal(as_bytes, np.frombuffer(text, np.uint8))
  raw = pipeline.load_tokens(DataConfig(path=str(tmp_path / "a_genome.fna.gz"), format="bytes",
                                        seq_len=4))
  np.testing.assert_array_equal(raw, np.frombuffer(FASTA_TEXT, np.uint8))
  both = pipeline.load_tokens(DataConfig(path=str(tmp_path), seq_len=4))
  expected = np.concatenate([FASTA_EXPECTED, [10], np.frombuffer(text, np.uint8)])
  np.testing.assert_array_equal(both, expected)
  # Extension alone makes FASTA: a header-less .fa file drops its newlines.
  headerless = _write(tmp_path / "x.fasta", b"ACGT\nACGT\n" * 3)
  assert bytes(pipeline.load_tokens(DataConfig(path=headerless, seq_len=4))) == b"ACGTACGT" * 3


def test_default_genome(genome):
  assert pipeline.default_genome_path().endswith("GCF_001457455.1_NCTC11397_genomic.fna.gz")
  assert genome.dtype == np.uint8 and genome.ndim == 1
  assert genome.size > 2_000_000
  acgt = np.isin(genome, np.frombuffer(b"ACGT", np.uint8)).mean()
  assert acgt > 0.99


# ---------------------------------------------------------------------------------------------
# Split and windows
# ---------------------------------------------------------------------------------------------

def test_split_by_position():
  tokens = _random_tokens(1000)
  train, held_out = pipeline.split_tokens(tokens, 0.1)
  assert train.size == 900 and held_out.size == 100
  np.testing.assert_array_equal(np.concatenate([train, held_out]), tokens)
  np.testing.assert_array_equal(held_out, tokens[900:])
  assert not np.shares_memory(train, held_out)


def test_windows_are_slices():
  tokens, seq_len = _random_tokens(103), 10
  assert pipeline.num_windows(tokens.size, seq_len) == 10
  assert pipeline.num_windows(101, 10) == 10 and pipeline.num_windows(100, 10) == 9
  assert pipeline.num_windows(5, 10) == 0
  windows = pipeline.gather_windows(tokens, np.arange(10), seq_len)
  assert windows.shape == (10, 11) and windows.dtype == np.int32
  for i in range(10):
    np.testing.assert_array_equal(windows[i], tokens[i * seq_len:i * seq_len + seq_len + 1])
    inputs, targets = windows[i, :-1], windows[i, 1:]
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    np.testing.assert_array_equal(targets, tokens[i * seq_len + 1:(i + 1) * seq_len + 1])
  np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])  # Shared boundary tokens.


def test_eval_batches_in_order_and_deterministic():
  tokens, seq_len = _random_tokens(20 * 8 + 5), 8
  batches = pipeline.eval_batches(tokens, seq_len, batch_size=3)
  assert len(batches) == 6  # 20 windows -> 6 full batches, 2 dropped.
  stacked = np.concatenate(batches)
  np.testing.assert_array_equal(stacked, pipeline.gather_windows(tokens, np.arange(18), seq_len))
  again = pipeline.eval_batches(tokens, seq_len, batch_size=3)
  assert all((a == b).all() for a, b in zip(batches, again))
  assert len(pipeline.eval_batches(tokens, seq_len, batch_size=3, max_batches=2)) == 2
  halves = [pipeline.eval_batches(tokens, seq_len, 4, 0, p, 2) for p in range(2)]
  full = pipeline.eval_batches(tokens, seq_len, 4)
  for b, batch in enumerate(full):
    np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), batch)


# ---------------------------------------------------------------------------------------------
# Training stream
# ---------------------------------------------------------------------------------------------

def _take(dataset: grain.MapDataset, n: int) -> np.ndarray:
  """[n, B, L + 1] from the first n elements."""
  return np.stack([dataset[i]["tokens"] for i in range(n)])


def _window_ids(batches: np.ndarray, tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """Recovers window ids of [..., L + 1] rows (random tokens make rows unique)."""
  count = pipeline.num_windows(tokens.size, seq_len)
  table = {pipeline.gather_windows(tokens, np.array([i]), seq_len)[0].tobytes(): i
           for i in range(count)}
  assert len(table) == count
  rows = batches.reshape(-1, seq_len + 1)
  return np.array([table[r.tobytes()] for r in rows])


@pytest.mark.parametrize("num_win,batch_size", [(24, 4), (23, 5)])
def test_train_dataset_epochs(num_win, batch_size):
  seq_len = 8
  tokens = _random_tokens(num_win * seq_len + 1)
  ds = pipeline.train_dataset(tokens, seq_len, batch_size, seed=7)
  n_batches = math.ceil(3 * num_win / batch_size)
  batches = _take(ds, n_batches)
  assert batches.shape == (n_batches, batch_size, seq_len + 1) and batches.dtype == np.int32
  ids = _window_ids(batches, tokens, seq_len)
  epochs = [ids[e * num_win:(e + 1) * num_win] for e in range(3)]
  for epoch in epochs:  # Every window exactly once per epoch.
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_win))
  assert not (epochs[0] == epochs[1]).all() and not (epochs[1] == epochs[2]).all()
  assert not (epochs[0] == np.arange(num_win)).all()  # Shuffled.
  np.testing.assert_array_equal(_take(pipeline.train_dataset(tokens, seq_len, batch_size, 7), 4),
                                batches[:4])  # Deterministic.
  other = _take(pipeline.train_dataset(tokens, seq_len, batch_size, 8), 4)
  assert not (other == batches[:4]).all()


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_splits_rows(process_count):
  tokens, seq_len, batch_size = _random_tokens(50 * 16 + 1), 16, 8
  single = _take(pipeline.train_dataset(tokens, seq_len, batch_size, 3), 10)
  parts = [_take(pipeline.train_dataset(tokens, seq_len, batch_size, 3, p, process_count), 10)
           for p in range(process_count)]
  assert parts[0].shape == (10, batch_size // process_count, seq_len + 1)
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), single)


def test_iterator_state_roundtrip():
  tokens, seq_len = _random_tokens(40 * 8 + 1), 8
  data = pipeline.Data(DataConfig(seq_len=seq_len, seed=1), 4, 0, 1, tokens, tokens)
  it = data.train_iterator()
  first = [next(it)["tokens"] for _ in range(13)]  # Past the first epoch (10 batches).
  state = it.get_state()
  rest = [next(it)["tokens"] for _ in range(7)]
  resumed = data.train_iterator()
  resumed.set_state(state)
  for expected in rest:
    np.testing.assert_array_equal(next(resumed)["tokens"], expected)
  fresh = data.train_iterator()
  for expected in first:
    np.testing.assert_array_equal(next(fresh)["tokens"], expected)


def test_orbax_checkpoint_of_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tokens, seq_len = _random_tokens(40 * 8 + 1), 8
  data = pipeline.Data(DataConfig(seq_len=seq_len, seed=2), 4, 0, 1, tokens, tokens)
  it = data.train_iterator()
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(str(tmp_path / "ckpt"),
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as manager:
    manager.save(5, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"w": np.arange(3.0)}),
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it)["tokens"] for _ in range(4)]
  restored_it = data.train_iterator()
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    assert manager.latest_step() == 5
    restored = manager.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}),
        data=grain.checkpoint.CheckpointRestore(restored_it)))
  np.testing.assert_allclose(np.asarray(restored["state"]["w"]), np.arange(3.0))
  assert restored["data"] is restored_it
  for batch in expected:
    np.testing.assert_array_equal(next(restored_it)["tokens"], batch)


def test_worker_processes_match_in_process():
  tokens, seq_len = _random_tokens(40 * 8 + 1), 8
  base = pipeline.Data(DataConfig(seq_len=seq_len), 4, 0, 1, tokens, tokens)
  workers = pipeline.Data(DataConfig(seq_len=seq_len, worker_count=1), 4, 0, 1, tokens, tokens)
  expected = [next(it)["tokens"] for it in [base.train_iterator()] for _ in range(6)]
  it = workers.train_iterator()
  for batch in expected[:3]:
    np.testing.assert_array_equal(next(it)["tokens"], batch)
  state = it.get_state()
  resumed = workers.train_iterator()
  resumed.set_state(state)
  for batch in expected[3:]:
    np.testing.assert_array_equal(next(resumed)["tokens"], batch)
  it.close()
  resumed.close()


def test_build_data_bundle(genome):
  config = DataConfig(path=None, seq_len=256, eval_fraction=0.05, seed=0)
  data = pipeline.build_data(config, batch_size=8)
  np.testing.assert_array_equal(np.concatenate([data.train_tokens, data.eval_tokens]), genome)
  assert data.eval_tokens.size == round(genome.size * 0.05)
  batch = next(data.train_iterator())["tokens"]
  assert batch.shape == (8, 257) and batch.dtype == np.int32
  eval_batches = data.eval_batches(max_batches=3)
  assert len(eval_batches) == 3 and eval_batches[0].shape == (8, 257)
  np.testing.assert_array_equal(eval_batches[0][0], data.eval_tokens[:257])
  iterator = pipeline.make_train_iterator(config, 8)
  np.testing.assert_array_equal(next(iterator)["tokens"], batch)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_error_missing_path(tmp_path):
  with pytest.raises(DataError, match=r"does not exist: point it at a FASTA/text file"):
    pipeline.load_tokens(DataConfig(path=str(tmp_path / "nope.fa")))


def test_error_empty_file(tmp_path):
  path = _write(tmp_path / "empty.fa", b"")
  with pytest.raises(DataError, match=r"is empty"):
    pipeline.load_tokens(DataConfig(path=path))
  with pytest.raises(DataError, match=r"has no non-empty regular files"):
    pipeline.load_tokens(DataConfig(path=str(tmp_path)))


def test_error_fasta_only_headers(tmp_path):
  path = _write(tmp_path / "h.fa.gz", b">one\n>two\r\n\n", compress=True)
  with pytest.raises(DataError, match=r"has headers but no sequence.*data.format=bytes"):
    pipeline.load_tokens(DataConfig(path=path))


def test_error_window_longer_than_data(tmp_path):
  path = _write(tmp_path / "short.txt", b"x" * 100)
  with pytest.raises(DataError, match=r"has 100 tokens, fewer than the 202 needed.*"
                                      r"lower data.seq_len"):
    pipeline.load_tokens(DataConfig(path=path, seq_len=100))
  with pytest.raises(DataError, match=r"eval split has 5 tokens, fewer than one window of "
                                      r"data.seq_len \+ 1 = 11 tokens: lower data.seq_len, "
                                      r"raise data.eval_fraction"):
    pipeline.build_data(DataConfig(path=path, seq_len=10, eval_fraction=0.05), batch_size=1)
  with pytest.raises(DataError, match=r"train split has 100 tokens = 9 windows of 11 tokens, "
                                      r"fewer than one batch of 16: lower the batch size"):
    pipeline.train_dataset(np.zeros(100, np.uint8), 10, 16, seed=0)
  with pytest.raises(DataError, match=r"eval split .* fewer than one batch of 8"):
    pipeline.eval_batches(np.zeros(50, np.uint8), 10, 8)


def test_error_process_split():
  with pytest.raises(DataError, match=r"batch size 6 must be a positive multiple of the process "
                                      r"count 4"):
    pipeline.train_dataset(np.zeros(1000, np.uint8), 10, 6, 0, 1, 4)


def test_error_messages_are_one_line(tmp_path):
  path = _write(tmp_path / "h.fa", b">x\n")
  with pytest.raises(DataError) as info:
    pipeline.load_tokens(DataConfig(path=path))
  assert "\n" not in str(info.value)
  assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------
# Markov baseline
# ---------------------------------------------------------------------------------------------

def _naive_bits_per_byte(train: np.ndarray, test: np.ndarray, order: int, alpha: float) -> float:
  pair, ctx = collections.Counter(), collections.Counter()
  train_l, test_l = train.tolist(), test.tolist()
  for t in range(order, len(train_l)):
    c = tuple(train_l[t - order:t])
    pair[c, train_l[t]] += 1
    ctx[c] += 1
  total = 0.0
  for t in range(order, len(test_l)):
    c = tuple(test_l[t - order:t])
    total -= math.log2((pair[c, test_l[t]] + alpha) / (ctx[c] + 256 * alpha))
  return total / (len(test_l) - order)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_markov_matches_naive(order):
  rng = np.random.default_rng(order)
  train = rng.choice(np.array([0, 7, 65, 200, 255], np.uint8), 3000, p=[.4, .3, .1, .1, .1])
  test = rng.choice(np.array([0, 7, 65, 66, 255], np.uint8), 500)  # Unseen bytes and contexts.
  model = markov.fit_markov(train, order, alpha=0.05)
  expected = _naive_bits_per_byte(train, test, order, 0.05)
  assert abs(model.bits_per_byte(test) - expected) < 1e-9
  assert abs(model.bits_per_byte(train) - _naive_bits_per_byte(train, train, order, 0.05)) < 1e-9


def test_markov_unseen_context_is_uniform():
  model = markov.fit_markov(np.zeros(100, np.uint8), order=2)
  np.testing.assert_allclose(model.log2_probs(np.array([5, 5, 9], np.uint8)), [-8.0])


def test_markov_on_genome(genome):
  train, held_out = pipeline.split_tokens(genome, 0.05)
  bpb = {k: markov.fit_markov(train, k).bits_per_byte(held_out) for k in (0, 3)}
  assert bpb[3] < bpb[0] < 2.1
