"""`sh2 bench ops` at tiny width on CPU: operator selection, the table and its ratios."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_ops


def test_select_variants_by_family_and_without_xla():
  variants = bench_ops.default_variants(kernels=True)
  names = [v.name for v in bench_ops.select_variants(variants, ["se", "floor"], xla=False)]
  assert names == ["GEMM floor", "SE (pallas)", "SE (pallas, bf16 params)", "SE (pallas, XLA featurizer)",
                   "SE (pallas direct FIR)"]
  assert all(not v.switches for v in bench_ops.default_variants(kernels=False))
  assert [v.name for v in bench_ops.select_variants(variants, ["li"])] == [
      "LI (pallas)", "LI (pallas, fused featurizer)", "LI (XLA fft)", "LI (XLA chunked)"]
  with pytest.raises(ValueError, match="--ops attention: choose from floor,se,mr,li,mha"):
    bench_ops.select_variants(variants, ["attention"])
  headline = [v.name for v in bench_ops.select_variants(variants, None, xla=True,
                                                         headline=bench_ops.headline_names(True))]
  assert headline == ["GEMM floor", "SE (pallas)", "SE (pallas, bf16 params)", "MR (pallas)",
                      "LI (pallas)", "MHA (XLA)"]
  bf16 = next(v for v in variants if v.name == "SE (pallas, bf16 params)")
  assert bf16.overrides == {"conv_method": "pallas", "param_dtype": "bfloat16"}


def test_gemm_floor_products_match_float64_and_count_every_flop():
  """The floor's six products equal numpy float64 on random inputs, and its compiled program
  has 3x the forward's FLOPs (a VJP through the D-wide slice lets XLA drop a third of dW_in or
  dx: 22 or 20 L D^2 instead of 24)."""
  rng = np.random.default_rng()
  b, length, d = 2, 48, 16
  x, w_in, w_out, dz, dy = (rng.standard_normal(s) for s in
                            ((b, length, d), (d, 3 * d), (d, d), (b, length, 3 * d), (b, length, d)))
  got = bench_ops.projection_products(*(jnp.asarray(a, jnp.float32) for a in (x, w_in, w_out, dz, dy)))
  u = (x @ w_in)[..., :d]
  want = (u @ w_out, dz @ w_in.T, np.einsum("bld,ble->de", x, dz), dy @ w_out.T,
          np.einsum("bld,ble->de", u, dy))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4, atol=1e-4)
  x_BLD = jnp.asarray(rng.standard_normal((1, 512, 64)), jnp.float32)
  fwd, fwdbwd = bench_ops.gemm_floor_fns(x_BLD, jax.random.key(int(rng.integers(1 << 30))))
  args = (x_BLD, jnp.ones((64, 192)), jnp.ones((64, 64)), jnp.ones((1, 512, 192)), jnp.ones((1, 512, 64)))
  both = jax.jit(bench_ops.projection_products).lower(*args).compile().cost_analysis()["flops"]
  forward = jax.jit(bench_ops.projection_forward).lower(*args[:3]).compile().cost_analysis()["flops"]
  assert both == pytest.approx(3 * forward, rel=0.01) and forward == pytest.approx(8 * 512 * 64 * 64, rel=0.01)
  assert fwd().shape == (1, 512, 64) and [a.shape for a in fwdbwd()] == [
      (1, 512, 64), (1, 512, 64), (64, 192), (1, 512, 64), (64, 64)]


def test_bench_ops_tiny_table(tmp_path):
  """main() with --ops floor at tiny width: the table, its header and the ratio rows."""
  out = tmp_path / "ops.md"
  bench_ops.main(["--lengths", "128", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--iters", "2", "--ops", "floor",
                  "--out", str(out)])
  text = out.read_text()
  floor = [line for line in text.splitlines() if line.startswith("| GEMM floor |")]
  assert len(floor) == 1 and all(float(c) > 0 for c in floor[0].strip("| ").split(" | ")[1:])
  # the floor alone gives one ratio (its own backward / forward); the others have no value
  ratio_rows = [line for line in text.splitlines()
                if line.startswith("| ") and " / " in line.split(" | ")[0]]
  assert len(ratio_rows) == 1 and ratio_rows[0].startswith("| GEMM floor bwd / fwd (for MR's) | ")
  assert ratio_rows[0].endswith(" | none: 2 by FLOPs |")
  assert "- command: `sh2 bench ops --lengths 128" in text
  assert "bf16 compute (float32 params; the GEMM floor's weights bf16)" in text


def test_ratios_from_rows():
  rows = [{"op": "GEMM floor", "L": 4096, "fwd_ms": 1.0, "fwdbwd_ms": 2.0},
          {"op": "SE (pallas)", "L": 4096, "fwd_ms": 1.2, "fwdbwd_ms": 3.0},
          {"op": "MR (pallas)", "L": 4096, "fwd_ms": 1.0, "fwdbwd_ms": 3.3},
          {"op": "MHA (cuDNN)", "L": 4096, "fwd_ms": 1.5, "fwdbwd_ms": 4.0}]
  got = {name: value for name, _, value, _ in bench_ops.ratios(rows, kernels=True)}
  assert got["SE / GEMM floor (fwd+bwd)"] == pytest.approx(1.5)
  assert got["SE (bf16 params) / GEMM floor (fwd+bwd)"] is None
  rows.append({"op": "SE (pallas, bf16 params)", "L": 4096, "fwd_ms": 1.1, "fwdbwd_ms": 2.5})
  got = {name: value for name, _, value, _ in bench_ops.ratios(rows, kernels=True)}
  assert got["SE (bf16 params) / GEMM floor (fwd+bwd)"] == pytest.approx(1.25)
  assert got["MR / SE (fwd+bwd)"] == pytest.approx(1.1)
  assert got["MR bwd / MR fwd"] == pytest.approx(2.3)
  assert got["GEMM floor bwd / fwd (for MR's)"] == pytest.approx(1.0)
  assert got["SE / MHA (fwd+bwd)"] == pytest.approx(0.75)
  assert got["LI (best) / MHA (fwd+bwd)"] is None


def _rows(per_length: dict[int, dict[str, float]]) -> list[dict]:
  """Rows {op, L, fwd_ms, fwdbwd_ms} with fwd = fwd+bwd / 3 (for MR: / 2.2)."""
  return [{"op": op, "L": L, "fwd_ms": ms / (2.2 if op.startswith("MR") else 3.0), "fwdbwd_ms": ms}
          for L, ops in per_length.items() for op, ms in ops.items()]


def test_ratio_table_marks_each_target_where_it_applies():
  """One column per length; a ratio with a target at that length says met / missed, one
  without (LI / MHA at 4K) shows the value alone; a ratio no row can give is left out."""
  rows = _rows({4096: {"GEMM floor": 2.0, "SE (pallas)": 3.0, "MR (pallas)": 3.3,
                       "LI (pallas)": 3.6, "MHA (cuDNN)": 4.0},
                8192: {"GEMM floor": 4.0, "SE (pallas)": 4.6, "MR (pallas)": 5.0,
                       "LI (pallas)": 6.0, "MHA (cuDNN)": 9.0}})
  lines = bench_ops.ratio_lines(rows, kernels=True)
  assert lines[0] == "| ratio | 4K | 8K | target |"
  table = {line.split(" | ")[0][2:]: line for line in lines[2:] if line.startswith("| ")}
  assert table["SE / GEMM floor (fwd+bwd)"] == (
      "| SE / GEMM floor (fwd+bwd) | 1.50 (missed) | 1.15 (met) | <= 1.2 |")
  assert table["LI (best) / MHA (fwd+bwd)"] == (
      "| LI (best) / MHA (fwd+bwd) | 0.90 | 0.67 (met) | <= 0.8 at 8K, <= 0.5 at 32K |")
  assert table["SE / MHA (fwd+bwd)"].startswith("| SE / MHA (fwd+bwd) | 0.75 (met) | 0.51 | ")
  assert table["MR bwd / MR fwd"].startswith("| MR bwd / MR fwd | 1.20 (met) | 1.20 (met) |")
  only_floor = bench_ops.ratio_lines(_rows({4096: {"GEMM floor": 2.0}}), kernels=True)
  assert [line.split(" | ")[0] for line in only_floor[2:]] == ["| GEMM floor bwd / fwd (for MR's)"]


def test_linearity_judges_growth_per_token_against_the_cheapest_length():
  """us per token from fwd+bwd; SE flat past a costlier short length is linear, MR doubling
  per token by 32K is not, LI timed at one length and MHA (not Hyena) are left out."""
  rows = _rows({4096: {"GEMM floor": 2.4, "SE (pallas)": 4.096, "MR (pallas)": 2.048,
                       "LI (pallas)": 4.0, "MHA (cuDNN)": 4.0},
                8192: {"GEMM floor": 4.8, "SE (pallas)": 5.7344, "MR (pallas)": 4.096},
                32768: {"GEMM floor": 19.2, "SE (pallas)": 22.9376, "MR (pallas)": 32.768}})
  got = {op: (per_token, verdict) for op, per_token, verdict in bench_ops.linearity(rows, True)}
  assert list(got) == ["GEMM floor", "SE (pallas)", "MR (pallas)"]
  assert got["SE (pallas)"][0] == pytest.approx({4096: 1.0, 8192: 0.7, 32768: 0.7})
  assert got["SE (pallas)"][1] == "linear to 32K"  # 4K is 1.43x the cheapest: fixed costs
  assert got["MR (pallas)"][1] == "grows x2.00 by 32K"
  assert got["GEMM floor"][1] == "linear to 32K"
  lines = bench_ops.ratio_lines(rows, kernels=True)
  assert "| SE (pallas) | 1.000 | 0.700 | 0.700 | linear to 32K |" in lines


def test_bench_ops_rejects_unknown_family(capsys):
  with pytest.raises(SystemExit):
    bench_ops.main(["--ops", "se,attention"])
  assert "--ops attention: choose from" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench_ops.main(["--variant", "GEMM floor", "--variant", "SE (fast)"])
  assert "--variant 'SE (fast)' is not a variant here: choose from GEMM floor; SE (" in capsys.readouterr().err


def test_vjp_fn_uses_a_random_cotangent():
  """timing.vjp_fn returns the output and pulls back a fixed standard-normal cotangent: the
  gradients equal numpy float64 products with it."""
  from experiments import timing  # noqa: PLC0415

  rng = np.random.default_rng()
  x = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
  out, (dx, dw) = timing.vjp_fn(lambda a, b: a @ b)(x, w)
  ct = np.asarray(timing.random_cotangent(jax.ShapeDtypeStruct((6, 4), jnp.float32)), np.float64)
  assert np.std(ct) > 0.5 and len(np.unique(ct)) == ct.size
  np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float64) @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), ct @ np.asarray(w, np.float64).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(x, np.float64).T @ ct, rtol=1e-5, atol=1e-5)


def test_bench_ops_remat_and_settings(tmp_path, capsys):
  """--remat save_dots and --set reach the timed operators: the table names them in its command
  line, and a row is timed for each; an unknown setting is a one-line error."""
  out = tmp_path / "ops.md"
  bench_ops.main(["--lengths", "64", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--iters", "1", "--ops", "se", "--headline", "--remat", "save_dots",
                  "--set", "out_proj_in_kernel_bwd=false", "--set", "param_dtype=bfloat16",
                  "--out", str(out)])
  text = out.read_text()
  assert "--remat save_dots --set out_proj_in_kernel_bwd=false --set param_dtype=bfloat16" in text
  assert "(bfloat16 params;" in text
  rows = [line for line in text.splitlines() if line.startswith("| SE (")]
  assert [row.split(" | ")[0] for row in rows] == ["| SE (blocked)", "| SE (blocked, bf16 params)"]
  assert all(float(c) > 0 for row in rows for c in row.strip("| ").split(" | ")[1:])
  assert "| ratio |" not in text  # no floor: no ratio to show
  with pytest.raises(SystemExit):
    bench_ops.main(["--lengths", "64", "--ops", "se", "--set", "param_dtype=float64"])
  assert "error: model.param_dtype='float64': choose one of" in capsys.readouterr().err
  with pytest.raises(Exception, match="unknown setting 'model.no_such'"):
    bench_ops.run([64], [], 32, 2, 2, kernels=False, iters=1, families=["se"], overrides={"no_such": "1"})


def test_remat_fwd_bwd_runs_under_checkpoint(monkeypatch):
  """_module_fns with remat "save_dots" differentiates inside jax.checkpoint with the model's
  save_dots policy (and only then); both return the same output and gradients."""
  from sh2_jax.model import REMAT_POLICIES  # noqa: PLC0415
  from sh2_jax.config import ModelConfig  # noqa: PLC0415
  from sh2_jax.layers.attention import MHA  # noqa: PLC0415

  policies = []
  checkpoint = jax.checkpoint
  monkeypatch.setattr(jax, "checkpoint", lambda f, **k: policies.append(k.get("policy")) or checkpoint(f, **k))
  config = ModelConfig(d_model=32, num_heads=2, layout="MHA", dtype="float32")
  variant = bench_ops.Variant("MHA (XLA)", MHA, {}, hyena=False)
  x = jax.random.normal(jax.random.key(3), (1, 64, 32), jnp.float32)
  results = []
  for remat in ("none", "save_dots"):
    results.append(bench_ops._module_fns(variant, config, x, jax.random.key(4), remat)[1]())
    assert policies == ([] if remat == "none" else [REMAT_POLICIES["save_dots"]])
  for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_rounds_alternate_between_operators_and_report_the_median(tmp_path, monkeypatch):
  """--rounds 3: at each length every operator is timed once per round, in turn (floor, SE,
  floor, SE, ...), and its row holds the median of its rounds; the table lists each round.
  --variant NAME (repeated) times just the variants so named."""
  calls = []

  def fake_median_ms(fn, *, iters, max_seconds):
    calls.append(fn)
    return float(len(calls))

  monkeypatch.setattr(bench_ops, "median_ms", fake_median_ms)
  out = tmp_path / "ops.md"
  bench_ops.main(["--lengths", "64", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--ops", "floor,se", "--headline", "--rounds", "3", "--out", str(out)])
  # 3 operators x (fwd, fwd+bwd) per round: 6 distinct thunks, called in the same order each round
  assert len(calls) == 18 and len(set(calls[:6])) == 6 and calls[6:12] == calls[:6] == calls[12:]
  text = out.read_text()
  assert "| GEMM floor | 7.00 | 8.00 |" in text  # rounds 1 / 7 / 13 and 2 / 8 / 14
  assert "| SE (blocked) | 9.00 | 10.00 |" in text
  assert "- SE (blocked, bf16 params) at 64: 6.00, 12.00, 18.00" in text
  with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
    bench_ops.run([64], [], 32, 2, 2, kernels=False, families=["floor"], rounds=0)
  calls.clear()
  bench_ops.main(["--lengths", "64", "--d-model", "32", "--groups", "2", "--heads", "2",
                  "--variant", "SE (blocked, bf16 params)", "--variant", "GEMM floor",
                  "--rounds", "2", "--out", str(out)])
  rows = [line.split(" | ")[0] for line in out.read_text().splitlines() if " | " in line]
  assert len(calls) == 8 and rows[1:3] == ["| GEMM floor", "| SE (blocked, bf16 params)"], rows


def test_block_sizes_set_the_kernels_defaults_for_the_run(tmp_path, monkeypatch, capsys):
  """--block-sizes se:halo_bwd=false,chunk=32 makes blocked_conv.BlockSizes.get_default() that
  candidate while the operators run (the kernels resolve every None field from it), restored
  after; a bad field is a one-line error naming the choices."""
  from pallas_kernels import blocked_conv as bc  # noqa: PLC0415

  seen = []

  def fake_run(*args, **kwargs):
    seen.append(bc.BlockSizes.get_default())
    return []

  monkeypatch.setattr(bench_ops, "run", fake_run)
  monkeypatch.setattr(bench_ops, "write_markdown", lambda *a, **k: "")
  bench_ops.main(["--lengths", "64", "--ops", "se", "--block-sizes", "se:halo_bwd=false,chunk=32",
                  "--out", str(tmp_path / "ops.md")])
  assert seen == [bc.BlockSizes(halo_bwd=False, chunk=32)]
  assert bc.BlockSizes.get_default() == bc.BlockSizes()
  with pytest.raises(SystemExit):
    bench_ops.main(["--lengths", "64", "--ops", "se", "--block-sizes", "se:no_such=1"])
  assert "--block-sizes: candidate 'se:no_such=1'" in capsys.readouterr().err
