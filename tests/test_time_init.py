"""experiments/time_init.py: both ways of drawing fresh parameters run and are tabulated."""

import pytest

from experiments import time_init


def test_table_of_a_small_layout(tmp_path):
  out = tmp_path / "init.md"
  time_init.main(["--presets", "tiny", "--layout", "SE MHA", "--out", str(out)])
  row = [line for line in out.read_text().splitlines() if line.startswith("| tiny |")]
  assert len(row) == 1
  cells = [cell.strip() for cell in row[0].strip("|").split("|")]
  assert cells[1].endswith(" M") and all(float(c) > 0 for c in cells[2:5])
  assert 0 <= int(cells[5]) <= 16 and cells[6].endswith("x")  # samplers may be cached
  with pytest.raises(SystemExit):
    time_init.main(["--presets", "tiny,evo9"])
