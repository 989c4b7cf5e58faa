"""experiments/probe_bias_add.py: every form of y @ W + b gives the output and the gradients of
numpy float64 on the same bf16-rounded inputs, in the params' dtype, and the dry run writes its
table."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import probe_bias_add as probe


def _bf16(a: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("name", list(probe.forms()))
def test_form_matches_float64(name):
  rng = np.random.default_rng(5)
  y = rng.standard_normal((40, 16)).astype(np.float32)
  w = rng.standard_normal((16, 24)).astype(np.float32)
  b = rng.standard_normal(24).astype(np.float32)
  ct = rng.standard_normal((40, 24)).astype(np.float32)
  form, param_dtype = probe.forms()[name]
  out, (dy, dw, db) = probe.fwd_bwd(form)(
      jnp.asarray(y).astype(jnp.bfloat16), jnp.asarray(w).astype(param_dtype),
      jnp.asarray(b).astype(param_dtype), jnp.asarray(ct).astype(jnp.bfloat16))
  yr, wr, br, ctr = _bf16(y), _bf16(w), _bf16(b), _bf16(ct)
  for got, want in ((out, yr @ wr + br), (dy, ctr @ wr.T), (dw, yr.T @ ctr), (db, ctr.sum(0))):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2, name
  assert dw.dtype == param_dtype and db.dtype == param_dtype and out.dtype == jnp.bfloat16


def test_dry_run_writes_table(tmp_path):
  out = tmp_path / "bias.md"
  probe.main(["--dry-run", "--iters", "1", "--out", str(out)])
  rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 |")]
  assert [row.split(" | ")[1] for row in rows] == list(probe.forms())
