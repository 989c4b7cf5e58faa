"""Position-masked flash attention (pallas_kernels.flash_attention) in interpret mode.

Against a float64 numpy softmax attention: outputs and q/k/v gradients for random, zigzag and
natural positions, lengths that are not multiples of the tiles, B > 1, several heads, head
sizes that are not powers of two; a query that sees no key; two key blocks combined through
lse with the block backward given the final statistics (the ring-attention use); unwritten
tiles (interpret mode fills outputs with NaN) fail the comparison; lowering for CUDA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa
from tests import helpers

SMALL = fa.FlashBlockSizes(block_q=32, block_k=16, block_k_dkdv=32, block_q_dkdv=16,
                           block_q_dq=32, block_k_dq=16)
TOL = 2e-5  # max |error| / max |reference|, float32 kernels vs float64


def _rel_err(got, want):
  got = np.asarray(got, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values (unwritten, NaN-poisoned tile?)"
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _inputs(key, batch, len_q, len_k, heads, head_dim):
  rng = helpers.seeded_rng(*key)
  shapes = [(batch, len_q, heads, head_dim), (batch, len_k, heads, head_dim),
            (batch, len_k, heads, head_dim), (batch, len_q, heads, head_dim)]
  return rng, tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def _positions(rng, kind, len_q, len_k):
  if kind == "natural":  # causal self-attention (len_q == len_k)
    return np.arange(len_q), np.arange(len_k)
  if kind == "zigzag":  # queries: two chunks of a zigzag rank; keys: all chunks, rank by rank
    chunk = len_k // 4
    keys = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in (0, 3, 1, 2)])
    return np.concatenate([np.arange(chunk), np.arange(3 * chunk, 4 * chunk)]), keys
  keys = rng.permutation(len_k)
  return rng.choice(len_k, len_q, replace=False), keys


def _check_attention(q, k, v, dout, pos_q, pos_k, block_sizes):
  fn = lambda q, k, v: fa.flash_attention(q, k, v, jnp.asarray(pos_q), jnp.asarray(pos_k),
                                          block_sizes=block_sizes, interpret=True)
  out, vjp = jax.vjp(fn, q, k, v)
  got = (out, *vjp(dout))
  want_out, _, *want_grads = helpers.masked_attention_float64(q, k, v, pos_q, pos_k, dout)
  errs = {n: _rel_err(g, w) for n, g, w in zip(("out", "dq", "dk", "dv"), got,
                                               (want_out, *want_grads))}
  assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("batch,len_q,len_k,heads,head_dim,kind", [
    (2, 70, 100, 2, 24, "random"),
    (1, 64, 128, 3, 16, "zigzag"),
    (2, 67, 67, 1, 32, "natural"),
])
def test_flash_attention_matches_float64(batch, len_q, len_k, heads, head_dim, kind):
  rng, (q, k, v, dout) = _inputs(("flash", kind), batch, len_q, len_k, heads, head_dim)
  pos_q, pos_k = _positions(rng, kind, len_q, len_k)
  _check_attention(q, k, v, dout, pos_q, pos_k, SMALL)


def test_flash_attention_default_tiles():
  rng, (q, k, v, dout) = _inputs(("flash", "default"), 1, 200, 200, 2, 16)
  _check_attention(q, k, v, dout, np.arange(200), np.arange(200), None)


def test_presorted_sides_skip_the_sort_with_the_same_result():
  """sorted_q / sorted_k (ascending positions promised by the caller) change no value."""
  rng, (q, k, v, dout) = _inputs(("flash", "sorted"), 1, 48, 80, 2, 16)
  pos_q = np.sort(rng.choice(80, 48, replace=False))
  pos_k = np.sort(rng.permutation(80))
  args = (q, k, v, jnp.asarray(pos_q), jnp.asarray(pos_k))
  want_out, want_lse, want_dq, want_dk, want_dv = helpers.masked_attention_float64(q, k, v, pos_q, pos_k, dout)
  for sorted_q, sorted_k in ((True, False), (True, True)):
    out, lse = fa.attention_block_forward(*args, block_sizes=SMALL, interpret=True,
                                          sorted_q=sorted_q, sorted_k=sorted_k)
    assert _rel_err(out, want_out) < TOL and _rel_err(lse, want_lse) < TOL
    delta = jnp.einsum("bqnh,bqnh->bnq", dout, out)
    grads = fa.attention_block_backward(*args, dout, lse, delta, block_sizes=SMALL,
                                        interpret=True, sorted_q=sorted_q, sorted_k=sorted_k)
    for got, want in zip(grads, (want_dq, want_dk, want_dv)):
      assert _rel_err(got, want) < TOL


def test_block_forward_query_that_sees_no_key():
  rng, (q, k, v, _) = _inputs(("flash", "unseen"), 1, 40, 48, 2, 16)
  pos_q = rng.permutation(40) - 5  # five queries before every key
  pos_k = rng.permutation(48)
  out, lse = fa.attention_block_forward(q, k, v, jnp.asarray(pos_q), jnp.asarray(pos_k),
                                        block_sizes=SMALL, interpret=True)
  want_out, want_lse, *_ = helpers.masked_attention_float64(q, k, v, pos_q, pos_k, np.zeros(q.shape))
  blind = pos_q < 0
  assert np.all(np.asarray(out)[:, blind] == 0.0)
  assert np.all(np.asarray(lse)[:, :, blind] == fa.NEG_INF)
  assert _rel_err(out, want_out) < TOL
  assert _rel_err(np.asarray(lse)[:, :, ~blind], want_lse[:, :, ~blind]) < TOL


def test_two_blocks_combined_through_lse_equal_one():
  """Ring use: forward per key block, combine by lse; backward per block with the final lse
  and delta; the dq shares add up, dk/dv are per block."""
  rng, (q, k, v, dout) = _inputs(("flash", "blocks"), 2, 48, 96, 2, 16)
  pos_q, pos_k = _positions(rng, "random", 48, 96)
  halves = (slice(0, 40), slice(40, 96))
  outs, lses = [], []
  for h in halves:
    o, lse = fa.attention_block_forward(q, k[:, h], v[:, h], jnp.asarray(pos_q),
                                        jnp.asarray(pos_k[h]), block_sizes=SMALL, interpret=True)
    outs.append(np.asarray(o, np.float64))
    lses.append(np.asarray(lse, np.float64))
  lse = np.logaddexp(*lses)
  weights = [np.exp(l - lse).transpose(0, 2, 1)[..., None] for l in lses]
  out = outs[0] * weights[0] + outs[1] * weights[1]
  want_out, want_lse, want_dq, want_dk, want_dv = helpers.masked_attention_float64(q, k, v, pos_q, pos_k, dout)
  assert _rel_err(out, want_out) < TOL and _rel_err(lse, want_lse) < TOL
  delta = np.einsum("bqnh,bqnh->bnq", np.asarray(dout, np.float64), out)
  dq = 0.0
  for h in halves:
    dq_h, dk_h, dv_h = fa.attention_block_backward(
        q, k[:, h], v[:, h], jnp.asarray(pos_q), jnp.asarray(pos_k[h]), dout,
        jnp.asarray(lse, jnp.float32), jnp.asarray(delta, jnp.float32), block_sizes=SMALL,
        interpret=True)
    dq = dq + np.asarray(dq_h, np.float64)
    assert _rel_err(dk_h, want_dk[:, h]) < TOL and _rel_err(dv_h, want_dv[:, h]) < TOL
  assert _rel_err(dq, want_dq) < TOL


@pytest.mark.parametrize("name", ["_fwd_kernel", "_dkdv_kernel", "_dq_kernel"])
def test_unwritten_tile_is_caught(monkeypatch, name):
  monkeypatch.setattr(fa, name, helpers.skip_one_program(getattr(fa, name), fa, (0, 1, 0)))
  rng, (q, k, v, dout) = _inputs(("flash", "poison"), 1, 64, 64, 2, 16)
  with pytest.raises(AssertionError, match="non-finite"):
    _check_attention(q, k, v, dout, np.arange(64), np.arange(64), SMALL)


def test_bad_shapes_error():
  q = jnp.zeros((1, 8, 2, 16))
  with pytest.raises(ValueError, match="share batch, heads and head size"):
    fa.flash_attention(q, jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 4, 16)), jnp.arange(8),
                       jnp.arange(8))
  with pytest.raises(ValueError, match="positions"):
    fa.flash_attention(q, q, q, jnp.arange(7), jnp.arange(8))


def test_lowers_for_cuda():
  sd = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)

  def fwd_bwd(q, k, v, pos_q, pos_k, dout):
    out, vjp = jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, pos_q, pos_k), q, k, v)
    return out, vjp(dout)

  text = jax.jit(fwd_bwd).trace(
      sd((1, 1000, 2, 128)), sd((1, 2000, 2, 128)), sd((1, 2000, 2, 128)), sd((1000,), jnp.int32),
      sd((2000,), jnp.int32), sd((1, 1000, 2, 128))).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("flash_attention_fwd", "flash_attention_bwd_dkdv", "flash_attention_bwd_dq"):
    assert name in text
