"""experiments/probe_se_weight_grad.py: every dW form it swaps into the in-projection's product
gives the float64 weight gradient, the swap is undone after its block, and the dry run writes
its table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import probe_se_weight_grad as probe
from sh2_jax.ops import hyena


def _bf16(a: np.ndarray) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("name", list(probe.weight_grad_forms((16,))))
def test_form_gives_float64_gradients(name):
  rng = np.random.default_rng(11)
  x = rng.standard_normal((2, 24, 8)).astype(np.float32)  # 48 rows: three 16-row chunks
  w = rng.standard_normal((8, 12)).astype(np.float32)
  dz = rng.standard_normal((2, 24, 12)).astype(np.float32)
  with probe.weight_grad_form(probe.weight_grad_forms((16,))[name]):
    z, pull = jax.vjp(hyena.matmul_weight_in_own_dtype,
                      jnp.asarray(x).astype(jnp.bfloat16), jnp.asarray(w))
    dx, dw = pull(jnp.asarray(dz).astype(jnp.bfloat16))
  xr, wr, dzr = _bf16(x), _bf16(w), _bf16(dz)
  assert dw.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
  for got, want in ((z, xr @ wr), (dx, dzr @ wr.T), (dw, np.einsum("bld,ble->de", xr, dzr))):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_swap_is_undone():
  x = jnp.ones((1, 4, 2), jnp.bfloat16)
  w = jnp.ones((2, 3), jnp.float32)
  form = probe.weight_grad_forms(())["bf16 dW + cast"]
  with probe.weight_grad_form(form):
    inside = str(jax.make_jaxpr(jax.grad(lambda w: hyena.matmul_weight_in_own_dtype(
        x, w).astype(jnp.float32).sum()))(w))
  after = str(jax.make_jaxpr(jax.grad(lambda w: hyena.matmul_weight_in_own_dtype(
      x, w).astype(jnp.float32).sum()))(w))
  # the library's form asks the GEMM for float32; the swapped one casts a bf16 product
  assert "preferred_element_type=float32" in after
  assert "preferred_element_type=float32" not in inside


def test_dry_run_writes_table(tmp_path):
  out = tmp_path / "se_dw.md"
  probe.main(["--dry-run", "--iters", "1", "--rounds", "1", "--out", str(out)])
  text = out.read_text()
  rows = [line for line in text.splitlines() if line.startswith("| 128 |")]
  assert len(rows) == 4, text  # bf16 params, then the three float32 forms
  assert "float32 params, float32 dW in 64-row chunks" in text
