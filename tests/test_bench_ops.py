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
  """main() with --ops floor at tiny width: the table, its header and the ratio rows."""
  out = tmp_path / "ops.md"
  bench_ops.main(["--lengths", "128", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--iters", "2", "--ops", "floor",
                  "--out", str(out)])
  text = out.read_text()
  floor = [line for line in text.splitlines() if line.startswith("| GEMM floor |")]
  assert len(floor) == 1 and all(float(c) > 0 for c in floor[0].strip("| ").split(" | ")[1:])
  assert "| SE / GEMM floor (fwd+bwd) | 128 | — | <= 1.2 |" in text
  assert "- command: `sh2 bench ops --lengths 128" in text


def test_ratios_from_rows():
  rows = [{"op": "GEMM floor", "L": 4096, "fwd_ms": 1.0, "fwdbwd_ms": 2.0},
          {"op": "SE (pallas)", "L": 4096, "fwd_ms": 1.2, "fwdbwd_ms": 3.0},
          {"op": "MR (pallas)", "L": 4096, "fwd_ms": 1.0, "fwdbwd_ms": 3.3},
          {"op": "MHA (cuDNN)", "L": 4096, "fwd_ms": 1.5, "fwdbwd_ms": 4.0}]
  got = {name: value for name, _, value, _ in bench_ops.ratios(rows, kernels=True)}
  assert got["SE / GEMM floor (fwd+bwd)"] == pytest.approx(1.5)
  assert got["MR / SE (fwd+bwd)"] == pytest.approx(1.1)
  assert got["MR bwd / MR fwd"] == pytest.approx(2.3)
  assert got["SE / MHA (fwd+bwd)"] == pytest.approx(0.75)
  assert got["LI (best) / MHA (fwd+bwd)"] is None


def test_bench_ops_rejects_unknown_family(capsys):
  with pytest.raises(SystemExit):
    bench_ops.main(["--ops", "se,attention"])
  assert "--ops attention: choose from" in capsys.readouterr().err
