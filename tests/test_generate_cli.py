"""`sh2 generate`, `sh2 score` and `sh2 convert` end to end: a short-trained run directory of
the tiny preset, FASTA/TSV outputs checked against the parallel forward, the convert round trip
(random model -> Evo 2 state dict file -> CLI -> identical logits), one-line input errors."""

import dataclasses
import logging
import math

import jax
import numpy as np
import pytest
import yaml

from sh2_jax import cli
from sh2_jax.config import ModelConfig
from sh2_jax.convert import evo2
from sh2_jax.inference.checkpoint import load_model
from tests.test_inference import GOLDEN, SMALL, forward, random_params

TINY_RUN = ["--preset", "tiny", "--set", "model.d_model=32", "--set", "model.se_groups=4",
            "--set", "model.mr_groups=4", "--set", "model.mr_filter_len=16", "--set", "model.li_order=4",
            "--set", "data.seq_len=32", "--set", "train.steps=2", "--set", "train.batch_size=2",
            "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
            "--set", "train.checkpoint_every=0"]


def run_cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gen") / "run"
  assert cli.main(["train", *TINY_RUN, "--run-dir", str(directory), "--no-progress"]) == 0
  return directory


def test_run_directory_params_are_the_trained_checkpoint(run_dir):
  from tests.test_train import restore_params
  from sh2_jax.train.loop import load_config
  config, params, step = load_model(str(run_dir))
  assert step == 2 and config == load_config(str(run_dir)).model
  state = restore_params(str(run_dir), load_config(str(run_dir)))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_generate_writes_fasta_reproducibly_and_greedy_follows_the_model(run_dir, tmp_path, capsys,
                                                                        caplog):
  caplog.set_level(logging.INFO)
  out = tmp_path / "a.fasta"
  args = ["generate", "--checkpoint", run_dir, "--prompt", "ACGTTGCAAC", "--max-new", 24,
          "--batch", 3, "--top-k", 4, "--top-p", 0.9, "--seed", 3, "--no-progress"]
  code, _, err = run_cli(capsys, *args, "--output", out)
  assert code == 0, err
  assert "tokens/s" in caplog.text
  records = _parse(out.read_text())
  assert [n.split("_")[0] for n, _ in records] == ["prompt"] * 3
  for name, seq in records:  # stops at '\n' by default; the header says how many bytes came
    assert len(seq) == int(name.split("new=")[1].split()[0]) <= 24
    assert all(33 <= b < 127 and b != ord(">") for b in seq)  # others are written as '?'

  code, stdout, _ = run_cli(capsys, *args)  # same seed -> the same FASTA, on stdout
  assert code == 0 and stdout == out.read_text()
  # greedy from a FASTA prompt file: each byte is the argmax of the parallel forward (float32)
  prompt_file = tmp_path / "p.fa"
  prompt_file.write_text(">p1\nACGTAC\nGTAA\n")
  code, stdout, err = run_cli(capsys, "generate", "--checkpoint", run_dir, "--prompt-file", prompt_file,
                              "--max-new", 8, "--temperature", 0, "--dtype", "float32", "--stop", "",
                              "--alphabet", "ACGT", "--no-progress")
  assert code == 0, err
  (name, seq), = [(n, s) for n, s in _parse(stdout)]
  assert name.startswith("p1_sample0")
  config, params, _ = load_model(str(run_dir))
  config = dataclasses.replace(config, dtype="float32")
  tokens = np.frombuffer(b"ACGTACGTAA" + seq, np.uint8).astype(np.int32)[None]
  logits = forward(params, config, tokens)
  acgt = np.frombuffer(b"ACGT", np.uint8)
  np.testing.assert_array_equal(acgt[logits[0, 9:-1][:, acgt].argmax(-1)], tokens[0, 10:])


def _parse(text):
  records = []
  for chunk in text.strip().split(">")[1:]:
    header, _, body = chunk.partition("\n")
    records.append((header, body.replace("\n", "").encode()))
  return records


def test_score_tsv_equals_log_softmax_of_the_forward(run_dir, tmp_path, capsys):
  rng = np.random.default_rng(0)
  seqs = [rng.choice(list(b"ACGT"), n).astype(np.uint8).tobytes() for n in (30, 7, 19)]
  fasta = tmp_path / "s.fa"
  fasta.write_text("".join(f">r{i} description\n{s.decode()}\n" for i, s in enumerate(seqs)))
  out = tmp_path / "s.tsv"
  code, _, err = run_cli(capsys, "score", "--checkpoint", run_dir, "--fasta", fasta, "--batch-size", 2,
                         "--dtype", "float32", "--output", out, "--no-progress")
  assert code == 0, err
  lines = out.read_text().splitlines()
  assert lines[0] == "name\tlength\tloglik_nats\tbits_per_byte"
  config, params, _ = load_model(str(run_dir))
  config = dataclasses.replace(config, dtype="float32")
  width = 30
  tokens = np.zeros((3, width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = np.frombuffer(s, np.uint8)
  logits = forward(params, config, tokens).astype(np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  for i, (line, s) in enumerate(zip(lines[1:], seqs)):
    name, length, loglik, bpb = line.split("\t")
    expected = sum(logp[i, t - 1, s[t]] for t in range(1, len(s)))
    assert (name, int(length)) == (f"r{i}", len(s))
    np.testing.assert_allclose(float(loglik), expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(float(bpb), -expected / math.log(2) / (len(s) - 1), rtol=1e-4)


def vortex_yaml(config: ModelConfig) -> dict:
  """A vortex YAML config (the keys config_from_vortex reads) describing `config`."""
  idx = {k: [i for i, kind in enumerate(config.layers) if kind == k] for k in ("SE", "MR", "LI", "MHA")}
  return {"num_layers": config.num_layers, "hidden_size": config.d_model, "vocab_size": config.vocab_size,
          "hcs_layer_idxs": idx["SE"], "hcm_layer_idxs": idx["MR"], "hcl_layer_idxs": idx["LI"],
          "attn_layer_idxs": idx["MHA"], "num_attention_heads": config.num_heads,
          "inner_mlp_size": config.ffn_dim, "evo2_style_activations": config.mlp_activation == "evo2",
          "short_filter_length": config.featurizer_len, "hcs_filter_length": config.se_filter_len,
          "hcm_filter_length": config.mr_filter_len, "hcs_filter_groups": config.se_groups,
          "hcm_filter_groups": config.mr_groups, "state_size": config.li_order,
          "rotary_emb_base": config.rope_base, "eps": config.norm_eps}


def test_convert_round_trip_gives_identical_logits(tmp_path, capsys):
  """Random model (savanna-style MR decay applied at run time) -> params_to_vortex -> .npz ->
  `sh2 convert` -> load_model: the same logits."""
  config = ModelConfig(layout="SE MR LI MHA", dtype="float32", **SMALL)
  params = random_params(config, seed=21)
  np.savez(tmp_path / "state.npz", **evo2.params_to_vortex(params, config))
  (tmp_path / "model.yml").write_text(yaml.safe_dump(vortex_yaml(config)))
  out = tmp_path / "converted"
  code, stdout, err = run_cli(capsys, "convert", "--input", tmp_path / "state.npz", "--config",
                              tmp_path / "model.yml", "--output", out, "--dtype", "float32")
  assert code == 0, err
  assert "4 layers" in stdout
  converted, converted_params, step = load_model(str(out))
  assert step is None and not converted.mr_decay and converted.layers == config.layers
  tokens = np.random.default_rng(1).integers(0, 256, (2, 40))
  np.testing.assert_allclose(forward(converted_params, converted, tokens), forward(params, config, tokens),
                             rtol=1e-5, atol=1e-5)
  code, _, err = run_cli(capsys, "convert", "--input", tmp_path / "state.npz", "--config",
                         tmp_path / "model.yml", "--output", out)
  assert code == 2 and "already holds a model" in err


def test_convert_golden_checkpoint_matches_vortex_logits(tmp_path, capsys):
  out = tmp_path / "golden"
  code, _, err = run_cli(capsys, "convert", "--input", GOLDEN / "vortex_A_ckpt_state.npz", "--config",
                         GOLDEN / "vortex_A_config.yml", "--output", out, "--dtype", "float32")
  assert code == 0, err
  config, params, _ = load_model(str(out))
  io = np.load(GOLDEN / "vortex_A_io.npz")
  assert float(np.max(np.abs(forward(params, config, io["tokens"]) - io["logits"]))) < 1e-4


@pytest.mark.parametrize("case,expected", [
    ("no_checkpoint_dir", "is not a directory"),
    ("not_a_model_dir", "has no config.json"),
    ("empty_prompt", "--prompt is empty"),
    ("bad_top_p", "--top-p 1.5 must be in (0, 1]"),
    ("missing_fasta", "does not exist"),
    ("torch_missing", "needs torch"),
    ("missing_key", "missing key 'blocks.1.filter.D'"),
])
def test_bad_input_gives_one_error_line(capsys, tmp_path, case, expected):
  state = dict(np.load(GOLDEN / "vortex_A_ckpt_state.npz"))
  del state["blocks.1.filter.D"]
  np.savez(tmp_path / "broken.npz", **state)
  (tmp_path / "x.pt").write_bytes(b"\0")
  (tmp_path / "empty_dir").mkdir()
  argv = {
      "no_checkpoint_dir": ["generate", "--checkpoint", tmp_path / "nope", "--prompt", "A", "--max-new", 2],
      "not_a_model_dir": ["score", "--checkpoint", tmp_path / "empty_dir", "--fasta", GOLDEN / "README.md"],
      "empty_prompt": ["generate", "--checkpoint", tmp_path, "--prompt", "", "--max-new", 2],
      "bad_top_p": ["generate", "--checkpoint", tmp_path, "--prompt", "A", "--max-new", 2, "--top-p", 1.5],
      "missing_fasta": ["score", "--checkpoint", tmp_path, "--fasta", tmp_path / "none.fa"],
      "torch_missing": ["convert", "--input", tmp_path / "x.pt", "--config", GOLDEN / "vortex_A_config.yml",
                        "--output", tmp_path / "o"],
      "missing_key": ["convert", "--input", tmp_path / "broken.npz", "--config",
                      GOLDEN / "vortex_A_config.yml", "--output", tmp_path / "o"],
  }[case]
  if case == "torch_missing":
    try:
      import torch  # noqa: F401
      pytest.skip("torch is installed")
    except ImportError:
      pass
  code, _, err = run_cli(capsys, *argv)
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("sh2: error:")]
  assert len(lines) == 1 and expected in lines[0], err
  assert "Traceback" not in err
