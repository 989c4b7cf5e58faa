"""`sh2 bench ops` at tiny width on CPU: operator selection, the table and its ratios."""

from __future__ import annotations

import pytest

from experiments import bench_ops


def test_select_variants_by_family_and_without_xla():
  variants = bench_ops.default_variants(kernels=True)
  names = [v.name for v in bench_ops.select_variants(variants, ["se", "floor"], xla=False)]
  assert names == ["GEMM floor", "SE (pallas)", "SE (pallas, XLA featurizer)",
                   "SE (pallas, interleaved z)", "SE (pallas direct FIR)",
                   "SE (pallas direct FIR, interleaved z)"]
  assert all(not v.switches for v in bench_ops.default_variants(kernels=False))
  assert [v.name for v in bench_ops.select_variants(variants, ["li"])] == [
      "LI (pallas)", "LI (XLA fft)", "LI (XLA chunked)"]
  with pytest.raises(ValueError, match="--ops attention: choose from floor,se,mr,li,mha"):
    bench_ops.select_variants(variants, ["attention"])


def test_bench_ops_tiny_table(tmp_path):
  out = tmp_path / "ops.md"
  bench_ops.main(["--lengths", "128", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--iters", "2", "--ops", "floor,se", "--no-xla", "--out", str(out)])
  text = out.read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
          if line.startswith("| ")}
  assert set(rows) >= {"GEMM floor", "SE (blocked)"} and "SE (XLA direct)" not in rows
  floor = [float(c) for c in rows["GEMM floor"].strip("| ").split(" | ")[1:]]
  assert len(floor) == 2 and all(v > 0 for v in floor)
  ratio = [line for line in text.splitlines() if line.startswith("| SE / GEMM floor")][0]
  assert float(ratio.split(" | ")[2]) > 0
  assert "- command: `sh2 bench ops --lengths 128" in text


def test_bench_ops_rejects_unknown_family(capsys):
  with pytest.raises(SystemExit):
    bench_ops.main(["--ops", "se,attention"])
  assert "--ops attention: choose from" in capsys.readouterr().err
