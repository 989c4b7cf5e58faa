"""experiments/time_startup.py: both ways of drawing fresh parameters and both train-step
compiles (cold, from the persistent cache) run and are tabulated."""

import pytest

from experiments import time_startup


def test_table_of_a_small_layout(tmp_path):
  out = tmp_path / "init.md"
  time_startup.main(["--presets", "tiny", "--layout", "MHA", "--step-presets", "tiny",
                     "--step-length", "32", "--out", str(out)])
  row = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
  assert len(row) == 2  # the parameters' row, then the train step's
  cells = [cell.strip() for cell in row[0].strip("|").split("|")]
  assert cells[1].endswith(" M") and all(float(c) > 0 for c in cells[2:5])
  assert 0 <= int(cells[5]) <= 16 and cells[6].endswith("x")  # samplers may be cached
  step_row = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")][1]
  step_cells = [cell.strip() for cell in step_row.strip("|").split("|")]
  assert all(float(c) > 0 for c in step_cells[1:3])
  assert step_cells[4:6] == ["0.0e+00, 0.0e+00"] * 2  # on a CPU the step is bitwise reproducible
  with pytest.raises(SystemExit):
    time_startup.main(["--presets", "tiny,evo9"])
