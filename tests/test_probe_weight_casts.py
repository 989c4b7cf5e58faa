"""experiments/probe_weight_casts.py: every projection variant (float32 weights cast per call,
interleaved and reordered, the float32-gradient custom VJP) gives x @ W and its gradients as
numpy float64 does on the same bf16-rounded inputs, and the dry run writes its table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import probe_weight_casts as probe


def _bf16(a: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("name", list(probe.variants(jnp.bfloat16)))
def test_variant_matches_float64(name):
  rng = np.random.default_rng(7)
  length, d = 48, 16
  x = rng.standard_normal((length, d)).astype(np.float32)
  dz = rng.standard_normal((length, 3 * d)).astype(np.float32)
  w_blocked = rng.standard_normal((d, 3 * d)).astype(np.float32)
  fn, storage = probe.variants(jnp.bfloat16, chunk_rows=16)[name]
  weight = {"bf16": jnp.asarray(w_blocked).astype(jnp.bfloat16), "blocked": jnp.asarray(w_blocked),
            "interleaved": probe._interleave(jnp.asarray(w_blocked)),
            "bf16_interleaved": probe._interleave(jnp.asarray(w_blocked).astype(jnp.bfloat16))
            }[storage]
  z, dx, dw = fn(jnp.asarray(x).astype(jnp.bfloat16), weight, jnp.asarray(dz).astype(jnp.bfloat16))
  if storage in ("interleaved", "bf16_interleaved"):
    dw = probe._blocked(dw)
  xr, wr, dzr = _bf16(x), _bf16(w_blocked), _bf16(dz)
  for got, want in ((z, xr @ wr), (dx, dzr @ wr.T), (dw, xr.T @ dzr)):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
  expected_dw_dtype = jnp.bfloat16 if storage.startswith("bf16") else jnp.float32
  assert dw.dtype == expected_dw_dtype


def test_chunked_weight_gradient_sums_row_chunks():
  """The chunked variant's dW is a batched product over L / chunk_rows chunks, summed; one
  chunk where L is not a multiple of chunk_rows."""
  x, dz = jnp.ones((48, 16), jnp.bfloat16), jnp.ones((48, 48), jnp.bfloat16)
  w = jnp.ones((16, 48), jnp.float32)
  for chunk_rows, partials in ((16, "f32[3,16,48]"), (20, "f32[1,16,48]")):
    fn, _ = probe.variants(jnp.bfloat16, chunk_rows=chunk_rows)[
        "float32, blocked, float32 dW in row chunks"]
    assert partials in str(jax.make_jaxpr(fn)(x, w, dz)), chunk_rows


def test_interleave_inverts_blocked():
  w = jax.random.normal(jax.random.key(3), (8, 24))
  back = probe._blocked(probe._interleave(w))
  np.testing.assert_array_equal(np.asarray(back), np.asarray(w))
  # column 3i + s of the interleaved weight is column s D + i of the blocked one
  np.testing.assert_array_equal(np.asarray(probe._interleave(w))[:, 3 * 5 + 2],
                                np.asarray(w)[:, 2 * 8 + 5])


def test_dry_run_writes_table(tmp_path):
  out = tmp_path / "casts.md"
  probe.main(["--dry-run", "--iters", "2", "--out", str(out)])
  rows = [line for line in out.read_text().splitlines() if line.startswith("| 64 |")]
  assert [row.split(" | ")[1] for row in rows] == list(probe.variants(jnp.bfloat16))
