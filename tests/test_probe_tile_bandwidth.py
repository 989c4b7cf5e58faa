"""experiments/probe_tile_bandwidth.py: the streaming kernels equal their XLA fusion (interpret
mode, both layouts, fresh random inputs), lower for CUDA at the probe's GPU shape, and the
dry run writes its table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import probe_tile_bandwidth as probe
from pallas_kernels import modal_conv as mc


def _reference(arrays, streams_out, windows, dots, chunk):
  """float64: total = sum_i sum_{j < J} a_i[t - j] (0 before row 0), then `dots` times
  acc = M @ acc + total per chunk (M lower-triangular ones / T); out_k = 2 a_k + acc."""
  arrays = [np.asarray(a, np.float64) for a in arrays]
  total = sum(np.concatenate([np.zeros((j, a.shape[1])), a[:a.shape[0] - j]])
              for a in arrays for j in range(windows))
  matrix = np.tril(np.ones((chunk, chunk))) / chunk
  acc = total
  for _ in range(dots):
    acc = np.concatenate([matrix @ acc[i:i + chunk] for i in range(0, len(acc), chunk)]) + total
  return [2 * arrays[k % len(arrays)] + acc for k in range(streams_out)]


@pytest.mark.parametrize("channel_major,windows,dots", [(False, 1, 0), (True, 1, 0),
                                                        (False, 3, 0), (False, 1, 2),
                                                        (False, 3, 2)])
@pytest.mark.parametrize("streams_in,streams_out", [(4, 4), (3, 1)])
def test_stream_matches_numpy(channel_major, windows, dots, streams_in, streams_out):
  """Fresh random float32 inputs, L = 128 over T = 16 chunks (8 of them: the windows cross
  chunk and segment boundaries and start before row 0)."""
  rng = np.random.default_rng(streams_in + 10 * channel_major + 100 * windows + 1000 * dots)
  length, channels, chunk = 128, 64, 16
  arrays = [rng.standard_normal((length, channels)).astype(np.float32) for _ in range(streams_in)]
  case = probe.Case(streams_in, streams_out, 16, chunk, channel_major, 4, 2, windows, dots)
  inputs = [jnp.asarray(a.T if channel_major else a) for a in arrays]
  with jax.default_matmul_precision("highest"):
    got = probe.stream(case, inputs, interpret=True)
  want = _reference(arrays, streams_out, windows, dots, chunk)
  assert len(got) == streams_out
  for out, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(out).T if channel_major else np.asarray(out), w,
                               rtol=1e-5, atol=1e-4)


def test_lowers_for_cuda_at_the_gpu_shape():
  for case in probe.cases():
    shape = (4096, 8192) if case.channel_major else (8192, 4096)
    arrays = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * case.streams_in
    text = jax.jit(lambda *a, c=case: probe.stream(c, list(a))).trace(*arrays).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("probe_stream") >= 1, case.label


def test_dry_run_writes_table(tmp_path):
  out = tmp_path / "probe.md"
  probe.main(["--dry-run", "--out", str(out)])
  text = out.read_text()
  assert "| 4 in / 4 out, [C, L], [dc, T] tiles, dc=16" in text
  assert text.count("\n| ") == 1 + 2 + len(probe.cases((16, 32), 16))  # header, XLA, kernels


def test_rejects_untiled_shapes():
  case = probe.Case(3, 1, 16, 32, False, 4, 2)
  with pytest.raises(ValueError, match="multiple of T=32"):
    probe.stream(case, [jnp.zeros((40, 32))] * 3, interpret=True)
  with pytest.raises(ValueError, match="row-major layout only"):
    probe.stream(probe.Case(3, 1, 16, 32, True, 4, 2, windows=3), [jnp.zeros((32, 64))] * 3,
                 interpret=True)


def test_dry_run_times_the_gate_kernels(tmp_path):
  """--gates: the MR, SE and LI forward and backward calls run (interpret mode) for the
  defaults and each candidate; an unknown mixer is refused."""
  out = tmp_path / "gates.md"
  probe.main(["--dry-run", "--gates-only", "--candidate", "li:chunk=4", "--se-tap-grads",
              "kernel", "--out", str(out)])
  gate_lines = [line for line in out.read_text().splitlines()
                if line.startswith(("| MR ", "| SE ", "| LI "))]
  assert [line.split(" | ")[:2] for line in gate_lines[:-1]] == [
      ["| MR forward", "defaults"], ["| MR backward", "defaults"], ["| SE forward", "defaults"],
      ["| SE backward", "defaults"], ["| LI forward", "defaults"], ["| LI backward", "defaults"],
      ["| LI forward", "chunk=4"], ["| LI backward", "chunk=4"]]
  assert gate_lines[-1].startswith("| SE backward | tap_grads=kernel (outputs within ")
  assert "| case |" not in out.read_text()  # --gates-only: no streaming table
  with pytest.raises(SystemExit):
    probe.main(["--dry-run", "--gates", "--candidate", "xx:chunk=4"])
  with pytest.raises(SystemExit):
    probe.main(["--dry-run", "--gates", "--se-tap-grads", "fast"])
  with pytest.raises(SystemExit):
    probe.main(["--dry-run", "--gates", "--gate-mixers", "se,xx"])


def test_dry_run_times_se_layouts(tmp_path):
  """--se-layouts: SE's kernels on z permuted into another column order run, their outputs
  checked against the blocked layout's (permuted back) inside the probe; unknown ones refused."""
  out = tmp_path / "layouts.md"
  probe.main(["--dry-run", "--gates-only", "--gate-mixers", "se", "--se-layouts", "interleaved",
              "--out", str(out)])
  rows = [line.split(" | ")[:2] for line in out.read_text().splitlines() if line.startswith("| SE ")]
  assert [name for name, _ in rows] == ["| SE forward", "| SE backward"] * 2
  assert all(label.startswith("layout=interleaved, block_c=16 (outputs within ")
             for _, label in rows[2:])
  with pytest.raises(SystemExit):
    probe.main(["--dry-run", "--gates-only", "--se-layouts", "diagonal"])


def test_relative_gap_is_the_worst_outputs():
  a = jnp.ones((4, 4))
  assert probe.relative_gap((a, 2 * a), (a, 2 * a)) == 0.0
  assert probe.relative_gap((a, 2.2 * a), (a, 2 * a)) == pytest.approx(0.1, rel=1e-5)


def test_li_gate_calls_compute_the_operator():
  """The LI rows time the real operator: its backward call's gradients equal jax.vjp of the
  featurized kernel at the same inputs (interpret mode, float32)."""
  fwd, bwd, operands, bwd_args = probe.gate_calls("li", None, 64, 32, 2, jnp.float32,
                                                  interpret=True)
  out, residuals = fwd(operands)
  grads = bwd(bwd_args)
  dout = bwd_args[-1]
  kernel = functools.partial(mc.featurized_gate_conv_gate_pallas, interpret=True)
  want_out, vjp = jax.vjp(kernel, *operands)
  want = vjp(dout)
  np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
  for got, expected in zip(grads[:len(want)], want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # the gate output, recomputed by the backward's forward walk in its own chunks (4 rows, the
  # forward's 8): float32 sums in another order
  np.testing.assert_allclose(grads[-1], want_out, rtol=1e-5, atol=1e-5)
