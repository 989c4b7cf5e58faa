"""`sh2 bench cp` at tiny width on 2 fake CPU devices: the table, the fit search, the checks.

A per-device memory limit (0.022 GiB) between what one device needs at L=256 and at 512 makes
the search stop: one device must stop at 256 and CP=2, which holds half the sequence per
device, must reach 512 (the cap). Context parallelism must also give the one-device loss.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import pytest

from experiments import bench_cp

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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  command = [sys.executable, "-m", "sh2_jax.cli", "bench", "cp", "--smoke", "--layout", "MR LI MHA",
             "--max-length", "512", "--no-refine", "--compare", "a2a", "--memory-gb", "0.022",
             "--out", str(out)]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  text = out.read_text()
  assert f"- device: cpu x 2 (cpu), jax {jax.__version__}" in text
  assert re.search(r"- date: \d{4}-\d\d-\d\d", text)
  assert "- command: `sh2 bench cp --smoke --layout MR LI MHA" in text

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
    assert percent == pytest.approx(100 * t_cp / (2 * t_one), abs=0.1)
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


_OOM_TEXT = """RESOURCE_EXHAUSTED: Out of memory while trying to allocate 208305913856 bytes.
BufferAssignment OOM Debugging.
BufferAssignment stats:
             parameter allocation:   12.00GiB
     preallocated temp allocation:  194.00GiB
Peak buffers:
\tBuffer 1:
\t\tSize: 8.00GiB
\t\tOperator: op_name="jit(step)/jit(main)/transpose(jvp(Model))/blocks_3/mixer/all_gather" source_file="/x/sh2_jax/parallel/context_attention.py" source_line=211
\t\tXLA Label: fusion
\t\tShape: bf16[786432,32,128]
\t\t==========================

\tBuffer 2:
\t\tSize: 6.00GiB
\t\tEntry Parameter Subshape: f32[4096,12288]
\t\t==========================

"""


def test_peak_buffers_from_an_out_of_memory_report(tmp_path):
  """`--explain`: XLA's peak-buffer list parses into rows and lands under the table."""
  buffers = bench_cp.peak_buffers(_OOM_TEXT)
  assert buffers == [
      {"size": "8.00GiB", "op": "jit(step)/jit(main)/transpose(jvp(Model))/blocks_3/mixer/all_gather",
       "source": "context_attention.py:211", "label": "fusion", "shape": "bf16[786432,32,128]"},
      {"size": "6.00GiB", "shape": "f32[4096,12288]"}]
  assert bench_cp.peak_buffers("RESOURCE_EXHAUSTED: out of memory") == []
  model = bench_cp.model_config(32, 1, "float32", 4, "MHA")
  bench = bench_cp.Bench(model, 1, None, float("inf"), str(tmp_path / "cp.md"), [], explain=True)
  bench.results[(bench_cp.Setup(2), 1024)] = {"status": "does not fit (194 > 133 GiB)",
                                              "peak_buffers": buffers}
  bench.write()
  text = (tmp_path / "cp.md").read_text()
  assert "### Largest buffers at the memory peak: CP=2 p2p/allgather zigzag, L = 1024" in text
  assert ("| 8.00GiB | bf16[786432,32,128] | fusion | transpose(jvp(Model))/blocks_3/mixer/"
          "all_gather | context_attention.py:211 |") in text
