"""The cuDNN pair path of context-parallel attention (context_attention KERNEL="cudnn") on CPU.

cuDNN itself needs a GPU (experiments/check_cudnn_blocks.py checks its contract there), so its
two calls are replaced by a float32 implementation of the same contract: forward (o, lse) of
an unmasked or top-left causal block; backward given the FINAL output and lse. What is tested
is ours: cutting blocks into half-blocks, classifying each pair by positions (skipped,
unmasked, causal, or the general kernel), combining through the lse, and the backward.
Here each rank of an all-gather attention runs in a loop (its queries against all keys), for
zigzag, contiguous and irregular (sorted random) layouts, against float64 attention; ring and
all-gather attention themselves (custom VJPs with collectives, which need a bound mesh axis)
run through this path on 2 fake devices in tests/test_context_parallel.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sh2_jax.parallel import context as cp, context_attention as ca, cudnn_blocks
from tests import helpers

TOL = 2e-5


@pytest.fixture
def cudnn_contract(monkeypatch):
  monkeypatch.setattr(cudnn_blocks, "block_forward", helpers.cudnn_contract_forward)
  monkeypatch.setattr(cudnn_blocks, "block_backward", helpers.cudnn_contract_backward)
  monkeypatch.setattr(cudnn_blocks, "unsupported_reason", lambda dtype, head_dim: None)
  monkeypatch.setattr(ca, "KERNEL", "cudnn")


def _layout(kind: str, length: int, ranks: int, rng) -> np.ndarray:
  """Positions of the stored tokens, rank after rank (each rank's ascending)."""
  if kind == "zigzag":
    return np.asarray(cp.zigzag_order(length, ranks))
  if kind == "contiguous":
    return np.arange(length)
  return np.sort(rng.permutation(length).reshape(ranks, -1), axis=1).reshape(-1)


@pytest.mark.parametrize("kind,ranks", [("zigzag", 2), ("contiguous", 2), ("irregular", 2)])
def test_cudnn_pairs_match_float64_attention(cudnn_contract, kind, ranks):
  """What all-gather attention computes on each rank, ranks in a loop: the rank's queries
  (ascending) against all keys (ascending within every rank's run), out and all gradients."""
  rng = helpers.seeded_rng("cudnn_pairs", kind, ranks)
  batch, length, heads, head_dim = 2, 32, 2, 8
  pos = _layout(kind, length, ranks, rng)  # q, k, v, d_out are in this stored order
  q, k, v, d_out = (rng.standard_normal((batch, length, heads, head_dim)) for _ in range(4))
  pos_j = jnp.asarray(pos, jnp.int32)

  def all_ranks(q, k, v):
    outs = [ca.masked_attention(q_r, k, v, p_r, pos_j, sorted_q=True, sorted_k_runs=True)
            for q_r, p_r in zip(jnp.split(q, ranks, axis=1), jnp.split(pos_j, ranks))]
    return jnp.concatenate(outs, axis=1)

  out, vjp = jax.vjp(jax.jit(all_ranks), *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  grads = vjp(jnp.asarray(d_out, jnp.float32))
  want = helpers.masked_attention_float64(q, k, v, pos, pos, d_out)
  for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (want[0], *want[2:])):
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), name
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err <= TOL, (name, err)


def test_zigzag_pairs_need_no_general_kernel():
  """Every pair of zigzag half-blocks is skipped, unmasked or causal (cuDNN alone runs them);
  rank r's chunks r and 2N-1-r see chunk j entirely iff j is earlier, causally iff the same."""
  ranks, length = 4, 64
  pos = np.asarray(cp.zigzag_order(length, ranks))
  chunk = length // (2 * ranks)
  chunks = [pos[i * chunk:(i + 1) * chunk] for i in range(2 * ranks)]
  for a in chunks:
    for b in chunks:
      want = 2 if a[0] == b[0] else (1 if a[0] > b[0] else 0)
      assert int(ca._relation(jnp.asarray(a), jnp.asarray(b))) == want
  shifted = np.arange(chunk) * 2  # interleaved with the other half: the general kernel's case
  assert int(ca._relation(jnp.asarray(shifted), jnp.asarray(shifted + 1))) == 3


def test_cudnn_kernel_off_gpu_is_a_one_line_error(monkeypatch):
  monkeypatch.setattr(ca, "KERNEL", "cudnn")
  x = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"KERNEL='cudnn' cannot run here: .+; set it to 'auto'"):
    ca.masked_attention(x, x, x, jnp.arange(8), jnp.arange(8), sorted_q=True, sorted_k_runs=True)
  assert "CUDA GPU" in cudnn_blocks.unsupported_reason(jnp.bfloat16, 128)
  assert "float32" in cudnn_blocks.unsupported_reason(jnp.float32, 128)
  assert "multiple of 8" in cudnn_blocks.unsupported_reason(jnp.bfloat16, 12)
