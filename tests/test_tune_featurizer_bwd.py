"""experiments/tune_featurizer_bwd.py: the dry run (interpret mode) times the defaults and the
grid with each candidate checked against the defaults; bad candidates are one-line errors."""

import pytest

from experiments import tune_featurizer_bwd as tune


def test_dry_run_writes_a_row_per_launch(tmp_path):
  out = tmp_path / "feat.md"
  tune.main(["--dry-run", "--candidate", "chunk=16,block_c=32", "--candidate", "num_stages=2",
             "--out", str(out)])
  rows = [line.split(" | ")[0] for line in out.read_text().splitlines()
          if line.startswith("| ") and not line.startswith(("| launch", "|---"))]
  assert rows == ["| defaults", "| chunk=16, block_c=32", "| num_stages=2"]


def test_candidates_parse_or_say_which_fields_exist():
  assert tune.parse_candidate("chunk=16,block_c=128") == {"chunk": 16, "block_c": 128}
  with pytest.raises(ValueError, match="FIELD=INTEGER with FIELD one of chunk, block_c"):
    tune.parse_candidate("warps=4")
  with pytest.raises(SystemExit):
    tune.main(["--dry-run", "--candidate", "chunk=x"])


def test_a_candidate_with_other_outputs_is_refused(monkeypatch):
  """A launch whose dz differs from the defaults' (a race, an unwritten tile) stops the sweep."""
  real = tune.fc.featurizer_backward_pallas

  def off_by_a_percent(df, z, w, **kwargs):
    dz, dw = real(df, z, w, **kwargs)
    return (dz * 1.01, dw) if kwargs.get("num_warps") == 2 else (dz, dw)

  monkeypatch.setattr(tune.fc, "featurizer_backward_pallas", off_by_a_percent)
  with pytest.raises(AssertionError,
                     match="num_warps=2: outputs differ from the defaults' by 1.00e-02"):
    tune.sweep(64, 32, [{"num_stages": 2}, {"num_warps": 2}], tune.jnp.float32, iters=1,
               interpret=True)
