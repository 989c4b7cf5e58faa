"""Gate kernels followed by their output projection, with the gate output for dW_out taken from
the backward kernels (pallas_kernels/output_projection.py): the three *_proj_pallas operators
in interpret mode against float64 references (output and every gradient, W_out's included),
NaN poisoning of the backward kernels' new output, and the point of it all: under a
save-the-products remat policy the forward kernel runs once, not twice."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import blocked_conv as bc
from pallas_kernels import featurized_conv as fc
from pallas_kernels import modal_conv as mc
from tests import helpers
from tests import test_pallas_blocked_conv as blocked_tests
from tests import test_pallas_featurized_conv as featurized_tests
from tests import test_pallas_modal_conv as modal_tests


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.all(np.isfinite(got)), "non-finite values (unwritten, NaN-poisoned tile?)"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _case(kind: str, seed: int, dtype):
  """(projected op, plain float64 reference (operands, ct_y) -> (y, operand grads), operands,
  channels C of the gate output)."""
  if kind == "blocked":
    post, pre, v, h, dskip, _ = blocked_tests._inputs(seed, 2, 150, 32, 2, 7, dtype)
    op = functools.partial(bc.gate_conv_gate_proj_pallas, interpret=True,
                           block_sizes=bc.BlockSizes(chunk=16, num_segments_fwd=2,
                                                     num_segments_bwd=2))
    return op, lambda ops, ct: blocked_tests._reference_f64(*ops, ct), (post, pre, v, h, dskip), 32
  if kind in ("featurized", "featurized_halo"):
    z, w_feat, h, dskip, _ = featurized_tests._inputs(seed, 2, 150, 32, 2, 7, 3, dtype)
    op = functools.partial(fc.featurized_gate_conv_gate_proj_pallas, interpret=True,
                           block_sizes=bc.BlockSizes(chunk=16, num_segments_bwd=2,
                                                     halo_fwd=kind == "featurized_halo",
                                                     halo_bwd=kind == "featurized_halo"))
    return op, lambda ops, ct: featurized_tests._reference_f64(*ops, ct), (z, w_feat, h, dskip), 32
  args, _ = modal_tests._featurized_case(seed, 2, 150, 32, 16, 3, dtype)
  op = functools.partial(mc.featurized_gate_conv_gate_proj_pallas, interpret=True,
                         block_sizes=mc.BlockSizes(chunk=8, block_c=16, segment_chunks=4))
  return op, modal_tests.featurized_reference_f64, args, 32


def _check(kind: str, seed: int, dtype, tol: float) -> None:
  """op(*operands, W_out) and its gradients == (y W_out, grads of y for ct W_out^T, y^T ct)
  with y and its gradients from the plain operator's float64 reference."""
  op, reference, operands, channels = _case(kind, seed, dtype)
  rng = np.random.default_rng(seed + 100)
  w_out = jnp.asarray(rng.standard_normal((channels, 24)) / np.sqrt(channels), dtype)
  ct = jnp.asarray(rng.standard_normal(operands[0].shape[:2] + (24,)), dtype)
  out, vjp = jax.vjp(op, *operands, w_out)
  got = (out, *vjp(ct))
  w64, ct64 = np.asarray(w_out, np.float64), np.asarray(ct, np.float64)
  y, grads = reference(operands, ct64 @ w64.T)
  want = (y @ w64, *grads, np.einsum("blc,ble->ce", y, ct64))
  errs = [_rel_err(g, w) for g, w in zip(got, want)]
  assert len(errs) == len(operands) + 2 and max(errs) < tol, errs


@pytest.mark.parametrize("kind", ["blocked", "featurized", "featurized_halo", "modal"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_projected_kernels_match_float64(kind, dtype, tol):
  """L = 150 (not a multiple of any chunk), B = 2, several segments in the backward."""
  _check(kind, 3 if dtype == jnp.float32 else 5, dtype, tol)


@pytest.mark.parametrize("kind,module,name,program", [
    ("blocked", bc, "_gcg_bwd_kernel", (1, 0, 1)),
    ("featurized", fc, "_fgcg_bwd_kernel", (0, 1, 0)),
    ("featurized_halo", fc, "_fgcg_bwd_halo_kernel", (1, 1, 1)),
    ("modal", mc, "_bwd_forward_kernel", (1, 1, 2))])
def test_unwritten_gate_output_is_caught(monkeypatch, kind, module, name, program):
  """One backward program that writes nothing (NaN in interpret mode) fails the check: the
  gate output the backward kernel writes for dW_out is compared too."""
  monkeypatch.setattr(module, name, helpers.skip_one_program(getattr(module, name), module, program))
  jax.clear_caches()
  try:
    with pytest.raises(AssertionError):
      _check(kind, 7, jnp.float32, 2e-5)
  finally:
    jax.clear_caches()


def _kernel_launches(text: str, name: str) -> int:
  """Launches of the Pallas kernel named `name` in a CUDA-lowered module."""
  return len(re.findall(f'name = "{name}"', text))


@pytest.mark.parametrize("kind,fwd_name,bwd_name,w_dtype", [
    ("blocked", "gate_conv_gate_fwd", "gate_conv_gate_bwd", jnp.bfloat16),
    ("featurized", "featurized_gate_conv_gate_fwd", "featurized_gate_conv_gate_bwd", jnp.bfloat16),
    ("featurized", "featurized_gate_conv_gate_fwd", "featurized_gate_conv_gate_bwd", jnp.float32),
    ("modal", "modal_conv_fwd", "modal_conv_bwd_forward", jnp.bfloat16)])
def test_remat_runs_the_forward_kernel_once(kind, fwd_name, bwd_name, w_dtype):
  """grad of a checkpointed block (the model's save_dots policy, as training runs it) lowered
  for CUDA: the projected operator launches its forward kernel once (and the modal kernels
  their state pass once: the states are saved), a float32 W_out (its cast held behind a
  barrier) included; the plain kernel followed by `@ W_out` launches it twice (the backward
  reruns it for dW_out)."""
  from sh2_jax import model as model_lib  # noqa: PLC0415

  op, _, operands, channels = _case(kind, 1, jnp.bfloat16)
  plain = {"blocked": bc.gate_conv_gate_pallas, "featurized": fc.featurized_gate_conv_gate_pallas,
           "modal": mc.featurized_gate_conv_gate_pallas}[kind]
  w_out = jnp.ones((channels, 32), w_dtype)
  policy = model_lib.REMAT_POLICIES["save_dots"]
  counts = {}
  for projected in (True, False):
    def block(ops, w):
      return op.func(*ops, w) if projected else plain(*ops) @ w.astype(jnp.bfloat16)

    loss = lambda ops, w: jnp.sum(jax.checkpoint(block, policy=policy)(ops, w).astype(jnp.float32) ** 2)  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(operands, w_out).lower(
        lowering_platforms=("cuda",)).as_text()
    counts[projected] = (_kernel_launches(text, fwd_name), _kernel_launches(text, bwd_name))
    if kind == "modal" and projected:
      assert _kernel_launches(text, "modal_conv_states") == 1
  assert counts == {True: (1, 1), False: (2, 1)}


@pytest.mark.parametrize("layout,setting", [("SE", {"conv_method": "pallas"}),
                                            ("MR", {"conv_method": "pallas"}),
                                            ("LI", {"li_method": "pallas_fused"})])
def test_module_projects_in_the_kernel_only_with_remat(monkeypatch, layout, setting):
  """A Hyena module (Pallas kernels in interpret mode) calls the projected operator when the
  model is rematerialised and out_proj_in_kernel_bwd is on, the plain kernel otherwise; output
  and every gradient agree either way."""
  import dataclasses

  import flax.linen as nn

  from sh2_jax.config import ModelConfig
  from sh2_jax.layers.hyena import HyenaLI, HyenaMR, HyenaSE

  calls = []
  for module, name in ((bc, "gate_conv_gate_proj_pallas"), (fc, "featurized_gate_conv_gate_proj_pallas"),
                       (mc, "featurized_gate_conv_gate_proj_pallas")):
    monkeypatch.setattr(module, name, lambda *a, real=getattr(module, name), **k:
                        calls.append(1) or real(*a, **k))
  cls = {"SE": HyenaSE, "MR": HyenaMR, "LI": HyenaLI}[layout]
  config = ModelConfig(d_model=32, num_heads=2, se_groups=2, mr_groups=2, layout=layout,
                       dtype="float32", train_len=64, **setting)
  x = jax.random.normal(jax.random.key(1), (1, 70, 32))
  ct = jax.random.normal(jax.random.key(2), (1, 70, 32))
  params = nn.meta.unbox(cls(config).init(jax.random.key(3), x)["params"])
  results = {}
  for remat, on in ((True, True), (True, False), (False, True)):
    calls.clear()
    module = cls(dataclasses.replace(config, remat=remat, out_proj_in_kernel_bwd=on))
    with jax.default_matmul_precision("highest"):
      out, vjp = jax.vjp(lambda p, xx: module.apply({"params": p}, xx), params, x)
      results[remat, on] = jax.tree.leaves((out, vjp(ct)))
    assert bool(calls) == (remat and on), (remat, on, calls)
  for key in ((True, False), (False, True)):
    for got, want in zip(results[True, True], results[key]):
      assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind", ["blocked", "featurized_halo", "modal"])
def test_float32_w_out_takes_its_gradient_in_float32(kind):
  """bf16 operands with float32 master W_out: the output is the bf16-cast W_out's, and dW_out
  comes in float32 straight from the float32 accumulation, several times closer to the float64
  y^T ct (y the kernel's own bf16 output) than a bf16 rounding of it would be."""
  op, _, operands, channels = _case(kind, 11, jnp.bfloat16)
  plain = functools.partial({"blocked": bc.gate_conv_gate_pallas,
                             "featurized_halo": fc.featurized_gate_conv_gate_pallas,
                             "modal": mc.featurized_gate_conv_gate_pallas}[kind], **op.keywords)
  rng = np.random.default_rng(12)
  w_out = jnp.asarray(rng.standard_normal((channels, 24)) / np.sqrt(channels), jnp.float32)
  ct = jnp.asarray(rng.standard_normal(operands[0].shape[:2] + (24,)), jnp.bfloat16)
  out, vjp = jax.vjp(op, *operands, w_out)
  dw_out = vjp(ct)[-1]
  assert out.dtype == jnp.bfloat16 and dw_out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(op(*operands, w_out.astype(jnp.bfloat16)), np.float32))
  y64 = np.asarray(plain(*operands), np.float64)
  want = np.einsum("blc,ble->ce", y64, np.asarray(ct, np.float64))
  rounded = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16), np.float64)
  assert _rel_err(dw_out, want) < _rel_err(rounded, want) / 4, (_rel_err(dw_out, want),
                                                                _rel_err(rounded, want))
