"""`sh2 bench cp` at tiny width on 2 fake CPU devices: the table, the fit search, the checks.

A per-device memory limit (0.018 GiB) between what one device needs at L=256 and at 512 makes
the search stop: one device must stop at 256 and CP=2, which holds half the sequence per
device, must reach 512 (the cap). Context parallelism must also give the one-device loss.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import bench_cp, xla_memory
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(text: str) -> dict[tuple[str, int], dict[str, str]]:
  """Rows of the 'Every step measured' table keyed by (setup, L)."""
  section = text.split("## Every step measured", 1)[1].split("\n\n", 2)[1]
  lines = [line for line in section.splitlines() if line.startswith("|")]
  names = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
    rows[(cells["setup"], int(cells["L"]))] = cells
  return rows


def test_bench_cp_smoke(tmp_path):
  out = tmp_path / "cp.md"
  env = helpers.fake_devices_env(2, PYTHONPATH=ROOT)
  command = [sys.executable, "-m", "sh2_jax.cli", "bench", "cp", "--smoke", "--layout", "LI MHA",
             "--max-length", "512", "--no-refine", "--compare", "a2a", "--memory-gb", "0.018",
             "--out", str(out)]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  text = out.read_text()
  assert f"- device: cpu x 2 (cpu), jax {jax.__version__}" in text
  assert re.search(r"- date: \d{4}-\d\d-\d\d", text)
  assert "- command: `sh2 bench cp --smoke --layout LI MHA" in text

  rows = _table(text)
  cp, one, a2a = "CP=2 p2p/allgather zigzag", "1 device", "CP=2 a2a/allgather zigzag"
  assert sorted(rows) == sorted([(cp, 256), (one, 128), (one, 256), (one, 512), (cp, 512), (a2a, 256)])
  for key in [(cp, 256), (one, 128), (one, 256), (cp, 512), (a2a, 256)]:
    assert rows[key]["status"] == "ok", rows[key]
    assert float(rows[key]["tokens/s"]) > 0
  assert rows[(one, 512)]["status"].startswith("does not fit")
  # Same tokens and initial weights: context parallelism (p2p and a2a) gives the one-device loss.
  loss = float(rows[(one, 256)]["first-step loss"])
  assert float(rows[(cp, 256)]["first-step loss"]) == pytest.approx(loss, rel=2e-5)
  assert float(rows[(a2a, 256)]["first-step loss"]) == pytest.approx(loss, rel=2e-5)
  # The sequence really is split: CP=2 needs well under what one device needs per device.
  memory = lambda key: float(rows[key]["compiled memory GiB/device"])
  assert memory((cp, 512)) < 0.75 * memory((one, 512))

  assert "- 1 device: longest trainable L = 256 (next tried length 512: does not fit" in text
  assert f"- {cp}: longest trainable L = 512 (every length up to --max-length 512 fits)" in text
  assert "- ratio CP=2 / 1 device: 2.00" in text
  # 1 device fits L = 256, so strong scaling is the headline (bold); weak follows.
  strong = re.search(r"E_S = T_cp\(256\) / \(2 x T_1\(256\)\) = (\d+) / \(2 x (\d+)\) = "
                     r"\*\*([\d.]+)%", text)
  weak = re.search(r"E = T_cp\(256\) / \(2 x T_1\(128\)\) = (\d+) / \(2 x (\d+)\) = ([\d.]+)%",
                   text)
  assert strong and weak, text
  for match, key in ((strong, (one, 256)), (weak, (one, 128))):
    t_cp, t_one, percent = float(match[1]), float(match[2]), float(match[3])
    assert t_cp == pytest.approx(float(rows[(cp, 256)]["tokens/s"]), abs=1)
    assert t_one == pytest.approx(float(rows[key]["tokens/s"]), abs=1)
    # tokens/s printed as integers (each off by <= 0.5), the percentage to one decimal
    from_printed = 100 * t_cp / (2 * t_one)
    assert abs(percent - from_printed) <= from_printed * (0.5 / t_cp + 0.5 / t_one) + 0.05 + 1e-9
  assert "## Strategies under CP=2 at L = 256" in text and f"| {a2a} |" in text


def test_bench_cp_model_and_search_inputs():
  model = bench_cp.model_config(4096, 4, "bfloat16")
  assert model.layout == "SE MR LI MHA" and model.num_heads == 32 and model.se_groups == 256
  assert model.mr_groups == 256 and model.mr_filter_len == 128 and model.remat
  assert bench_cp.Setup(2, "a2a", "ring").mesh_config().context == 2
  with pytest.raises(Exception, match="--compare 'x': choose from"):
    bench_cp.main(["--devices", "1", "--compare", "x"])


def test_isolated_measurement_matches_in_process(tmp_path):
  """`--isolate` (the GPU default): a measurement in its own process gives the in-process row."""
  args = dict(d_model=32, layers=1, dtype="float32", mr_taps=4, layout="MHA")
  model = bench_cp.model_config(**args)
  here = bench_cp.Bench(model, 1, None, float("inf"), str(tmp_path / "a.md"), [])
  isolated = bench_cp.Bench(model, 1, None, float("inf"), str(tmp_path / "b.md"), [], isolate=args)
  a, b = here.measure(bench_cp.Setup(1), 32), isolated.measure(bench_cp.Setup(1), 32)
  assert a["status"] == b["status"] == "ok", (a, b)
  assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
  assert b["need_gib"] == pytest.approx(a["need_gib"], rel=1e-6)
  with pytest.raises(Exception, match="--parts 'x': choose from"):
    bench_cp.main(["--devices", "1", "--parts", "x"])


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8,
          "s64": 8}


def _shape_bytes(shape: str) -> int:
  """Bytes of an array shape written as XLA writes it, e.g. f32[2,3]."""
  match = re.fullmatch(r"(\w+)\[([\d,]*)\]", shape)
  assert match, shape
  size = _BYTES[match[1]]
  for dim in filter(None, match[2].split(",")):
    size *= int(dim)
  return size


def test_peak_buffers_of_a_program_with_known_live_values(tmp_path):
  """Three f32[256, 1024] values (of x, sin, cos, tanh) are alive at the peak whatever XLA's
  schedule: they are listed under their JAX ops and shapes, and the groups add up to the peak
  XLA's own breakdown reports; also when the persistent compilation cache holds the program."""
  def f(x):
    a, b, c = jnp.sin(x), jnp.cos(x), jnp.tanh(x)
    return (a * b).sum() + (b * c).sum() + (a * c).sum()

  lowered = jax.jit(f).lower(jax.ShapeDtypeStruct((256, 1024), jnp.float32))
  lowered.compile()  # into the test session's persistent cache (tests/conftest.py), which must
  # not stop the compiles below from dumping
  with xla_memory._persistent_cache_off():  # the test session's cache would skip the dump
    lowered.compile(compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True,
                                      "xla_dump_hlo_module_re": "jit_f"})
  peak = xla_memory.peak_buffers(str(tmp_path), "jit_f")
  assert peak, "no live-range dump parsed"
  for group in peak:
    assert group["bytes"] == group["count"] * _shape_bytes(group["shape"]), group
  big = [g for g in peak if g["shape"] == "f32[256,1024]"]
  assert sum(g["count"] for g in big) >= 3, peak
  assert {g["op"] for g in big} <= {"x", "jit(f)/sin", "jit(f)/cos", "jit(f)/tanh"}, big
  (live_range,) = tmp_path.glob("*jit_f*after_optimizations-live-range.txt")
  total = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", live_range.read_text())
  assert total and sum(g["bytes"] for g in peak) == int(total[1].replace(" ", ""))
  compiled, again = xla_memory.compile_with_dump(lowered, module="jit_f")
  assert again == peak
  assert sum(g["bytes"] for g in peak) <= xla_memory.compiled_bytes(compiled)


def test_tuple_subshapes():
  shape = "(s32[], f32[1,2]{1,0}, /*index=2*/(bf16[3]{0}, u8[4,5]{1,0}), pred[])"
  assert xla_memory._shape_at(shape, "") == "(s32[], f32[1,2], /*index=2*/(bf16[3], u8[4,5]), pred[])"
  assert xla_memory._shape_at(shape, "1") == "f32[1,2]"
  assert xla_memory._shape_at(shape, "2,1") == "u8[4,5]"
  assert xla_memory._shape_at(shape, "3") == "pred[]"


def test_explain_and_compile_only(tmp_path):
  """`--explain --compile-only`: the step is compiled, not run; the buffers alive at its memory
  peak land under the table, their sizes consistent with their shapes and the compiled need."""
  model = bench_cp.model_config(32, 1, "float32", 4, "MHA")
  bench = bench_cp.Bench(model, 1, None, float("inf"), str(tmp_path / "cp.md"), [], explain=True,
                         compile_only=True)
  row = bench.measure(bench_cp.Setup(1), 64)
  assert row["status"] == bench_cp.COMPILED_FIT and "loss" not in row, row
  peak = row["peak_buffers"]
  assert peak and all(g["bytes"] == g["count"] * _shape_bytes(g["shape"]) for g in peak
                      if not g["shape"].startswith("(")), peak
  assert sum(g["bytes"] for g in peak) <= row["need_gib"] * bench_cp.GIB
  assert bench.ok(bench_cp.Setup(1), 64)
  text = (tmp_path / "cp.md").read_text()
  assert "### Largest buffers at the memory peak: 1 device, L = 64" in text
  assert f"| 1 device | 64 | {bench_cp.COMPILED_FIT} |" in text
  top = peak[0]
  assert f"| {top['bytes'] / bench_cp.GIB:.2f} | {top['count']} | {top['shape']} |" in text

