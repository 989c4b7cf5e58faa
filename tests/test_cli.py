"""The `sh2` command line: help, info, and one-line errors for bad input."""

import gzip
import os
import subprocess
import sys

import pytest

from sh2_jax import cli


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["info"]])
def test_help_is_complete(capsys, command):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(command + ["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "usage: sh2" in out
  if command in (["train"], ["info"]):
    for key in ("model.d_model", "data.seq_len", "train.steps", "mesh.context", "evo2-7b"):
      assert key.split(".")[-1] in out, key
  if command == ["train"]:
    for flag in ("--resume", "--set", "--config", "--run-dir", "--data", "--mesh", "--stop-at"):
      assert flag in out


def test_info_prints_layout_and_parameter_count(capsys):
  code, out, _ = run_cli(capsys, "info", "evo2-7b")
  assert code == 0
  assert "32 layers" in out and "MHA" in out
  count = int(out.split("parameters")[1].split("(")[0].replace(",", ""))
  assert 6.0e9 < count < 7.0e9
  code, out, _ = run_cli(capsys, "info", "tiny", "--set", "model.layout=SE SE LI", "--set", "model.d_model=64")
  assert code == 0 and "SE SE LI  (3 layers)" in out and "MHA" not in out


def _write(path, data: bytes, gz: bool = False):
  path.write_bytes(gzip.compress(data) if gz else data)
  return str(path)


@pytest.mark.parametrize("case,expected", [
    ("unknown_setting", "unknown setting 'model.bogus'"),
    ("bad_value", "model.d_model='abc' is not a valid int"),
    ("bad_preset", "unknown preset 'evo3'"),
    ("missing_file", "does not exist"),
    ("empty_file", "is empty"),
    ("fasta_without_sequence", "no sequence"),
    ("window_longer_than_data", "data.seq_len"),
    ("bad_layout", "unknown mixer"),
    ("bad_mesh", "--mesh"),
    ("mesh_product", "uses 4 devices but 1 is available"),
    ("bench_attention_without_gpu", "on a GPU; the backend here is 'cpu'"),
])
def test_bad_input_gives_one_error_line(capsys, tmp_path, case, expected):
  run_dir = str(tmp_path / "run")
  argv = {
      "unknown_setting": ["train", "--set", "model.bogus=1"],
      "bad_value": ["train", "--set", "model.d_model=abc"],
      "bad_preset": ["train", "--preset", "evo3"],
      "missing_file": ["train", "--data", str(tmp_path / "nope.fa")],
      "empty_file": ["train", "--data", _write(tmp_path / "empty.fa", b"")],
      "fasta_without_sequence": ["train", "--data", _write(tmp_path / "h.fa.gz", b">a\n>b\n\n", gz=True)],
      "window_longer_than_data": ["train", "--data", _write(tmp_path / "s.fa", b">x\n" + b"ACGT" * 100 + b"\n")],
      "bad_layout": ["info", "--set", "model.layout=SE XX"],
      "bad_mesh": ["train", "--mesh", "pipeline=2"],
      "mesh_product": ["train", "--mesh", "data=2,tensor=2"],
      "bench_attention_without_gpu": ["bench", "attention"],
  }[case]
  code, out, err = run_cli(capsys, *argv, "--run-dir", run_dir) if argv[0] == "train" else run_cli(capsys, *argv)
  assert code == 2
  lines = [line for line in err.splitlines() if line.startswith("sh2: error:")]
  assert len(lines) == 1 and expected in lines[0], err
  assert "Traceback" not in err


def test_console_entry_point_runs_as_module():
  """`python -m sh2_jax.cli` (what the `sh2` script calls) exits 2 with one line, no traceback."""
  result = subprocess.run([sys.executable, "-m", "sh2_jax.cli", "train", "--set", "train.steps=0"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == "sh2: error: train.steps=0 must be a positive integer"
  assert "Traceback" not in result.stderr


def test_yaml_config_then_set_overrides(capsys, tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("model:\n  d_model: 64\n  layout: SE MR MHA\ntrain: {steps: 7}\n")
  code, out, _ = run_cli(capsys, "info", "tiny", "--config", str(path), "--set", "model.num_heads=4")
  assert code == 0
  assert "SE MR MHA  (3 layers)" in out and "d_model=64, heads=4 x 16" in out
  config = cli.build_config("tiny", str(path), ["train.steps=9"])
  assert (config.model.d_model, config.train.steps) == (64, 9)
  path.write_text("- not a mapping\n")
  code, _, err = run_cli(capsys, "info", "--config", str(path))
  assert code == 2 and "must hold a mapping" in err


def test_compile_cache_directory_choice(tmp_path, monkeypatch):
  """--compile-cache, then $SH2_COMPILE_CACHE, then the XDG default; 'off' disables it; a
  JAX_COMPILATION_CACHE_DIR already set wins; the choice reaches JAX and child processes."""
  import jax
  chosen = {}

  def update(name, value):
    chosen[name] = value

  monkeypatch.setattr(jax.config, "update", update)
  env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
  assert cli.configure_compile_cache(None, env) == str(tmp_path / "xdg" / "sh2-jax" / "xla")
  assert chosen["jax_compilation_cache_dir"] == env["JAX_COMPILATION_CACHE_DIR"]
  env = {"SH2_COMPILE_CACHE": str(tmp_path / "env")}
  assert cli.configure_compile_cache(None, env) == str(tmp_path / "env")
  env = {"SH2_COMPILE_CACHE": str(tmp_path / "env")}
  assert cli.configure_compile_cache(str(tmp_path / "arg"), env) == str(tmp_path / "arg")
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "arg")
  chosen.clear()
  assert cli.configure_compile_cache("off", {"SH2_COMPILE_CACHE": str(tmp_path)}) is None
  assert cli.configure_compile_cache(str(tmp_path), {"JAX_COMPILATION_CACHE_DIR": "/x"}) is None
  assert not chosen
  assert cli.default_compile_cache({}) == os.path.join(os.path.expanduser("~"), ".cache",
                                                       "sh2-jax", "xla")
