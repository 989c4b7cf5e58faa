"""`sh2 bench profile-train`: kernel kinds from optimized HLO, attribution to model parts and passes."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_train, profile_trace, profile_train

_STACK = "jit(step)/jvp(StripedHyena2)/StripedHyena2._stack"
_BACK = ("jit(step)/transpose(jvp(StripedHyena2))/StripedHyena2._stack/jvp(StripedHyena2)/"
         "StripedHyena2._stack/checkpoint")
GPU_HLO = f"""
HloModule jit_step, entry_computation_layout={{(f32[4]{{0}})->f32[4]{{0}}}}

%fused_computation.3 (p0: bf16[8,4]) -> bf16[8,4] {{
  %p0 = bf16[8,4]{{1,0}} parameter(0)
  ROOT %mul.1 = bf16[8,4]{{1,0}} multiply(%p0, %p0), metadata={{op_name="{_BACK}/block_2/mixer/mul"}}
}}

ENTRY %main (p: f32[4]) -> f32[4] {{
  %custom-call.12 = (bf16[8192,5760]{{1,0}}, s8[4194304]{{0}}) custom-call(bf16[8192,1920]{{1,0}} %a, bf16[1920,5760]{{1,0}} %b), custom_call_target="__cublas$gemm", metadata={{op_name="{_STACK}/block_0/mixer/dot_general" source_file="hyena.py" source_line=3}}, backend_config={{"gemm_backend_config":{{}}}}
  %fusion.3 = bf16[8,4]{{1,0}} fusion(%a), kind=kLoop, calls=%fused_computation.3, metadata={{op_name="{_BACK}/rematted_computation/block_2/mixer/mul"}}
  %custom-call.7 = bf16[1,8192,1920]{{2,1,0}} custom-call(%a, %b), custom_call_target="__gpu$xla.gpu.triton", metadata={{op_name="{_STACK}/block_1/mixer/jit(gate_conv_gate)/pallas_call"}}
  %custom-call.9 = (bf16[1,8192,16,128]{{3,2,1,0}}, f32[1,16,8192]{{2,1,0}}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={{op_name="{_STACK}/block_3/mixer/dot_product_attention"}}
  %gemm_fusion.2 = bf16[8192,5120]{{1,0}} fusion(%x, %w), kind=kCustom, calls=%gemm_computation, metadata={{op_name="{_BACK}/block_0/mlp/dot_general"}}, backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm"}}}}
  %loop_add_fusion = f32[1920]{{0}} fusion(%g), kind=kLoop, calls=%add_computation, metadata={{op_name="jit(step)/mul"}}
  %copy.4 = f32[8192,1920]{{1,0}} copy(%x), metadata={{op_name="{_BACK}/block_1/pre_norm/mul"}}
  %input_reduce_fusion = f32[8192]{{0}} fusion(%x), kind=kInput, calls=%reduce_computation, metadata={{op_name="{_STACK}/final_norm/reduce_sum"}}
  ROOT %tuple.1 = (f32[4]{{0}}) tuple(%p)
}}
"""


def test_parse_hlo_kinds_and_names():
  ops = profile_train.parse_hlo(GPU_HLO)
  kinds = {name: op.kind for name, op in ops.items()}
  assert kinds["custom-call.12"] == "GEMM"
  assert kinds["gemm_fusion.2"] == "GEMM"
  assert kinds["custom-call.7"] == "Pallas kernels"
  assert kinds["custom-call.9"] == "cuDNN attention"
  assert kinds["fusion.3"] == "other fusions"
  assert kinds["loop_add_fusion"] == "other fusions"
  assert kinds["input_reduce_fusion"] == "other fusions"
  assert kinds["copy.4"] == "copies"
  assert kinds["mul.1"] == "other"
  assert ops["custom-call.12"].shape == "(bf16[8192,5760]{1,0}, s8[4194304]{0})"
  assert ops["custom-call.7"].op_name.endswith("block_1/mixer/jit(gate_conv_gate)/pallas_call")
  assert ops["tuple.1"].op_name == ""


def test_attribute_parts_passes_and_kinds():
  ops = profile_train.parse_hlo(GPU_HLO)
  layers = ("SE", "MR", "LI", "MHA")
  ns = {"custom-call.12": 2e6, "fusion.3": 4e6, "custom-call.7": 6e6, "custom-call.9": 8e6,
        "gemm_fusion.2": 10e6, "loop_add_fusion": 12e6, "copy.4": 14e6, "input_reduce_fusion": 16e6,
        "memset.1": 18e6}
  got = profile_train.attribute(ns, ops, layers, steps=2)
  assert got == {("SE mixer", "forward", "GEMM"): 1.0,
                 ("LI mixer", "recompute", "other fusions"): 2.0,
                 ("MR mixer", "forward", "Pallas kernels"): 3.0,
                 ("MHA mixer", "forward", "cuDNN attention"): 4.0,
                 ("MLP", "backward", "GEMM"): 5.0,
                 ("loss, clipping, AdamW", "loss and update", "other fusions"): 6.0,
                 ("norms", "backward", "copies"): 7.0,
                 ("embedding, final norm, logits", "forward", "other fusions"): 8.0,
                 ("unattributed", "loss and update", "other"): 9.0}
  table = "\n".join(profile_train.markdown_table(
      "m", bench_train.variants("tiny")[0][1], 64, 50.0, got))
  all_row = next(line for line in table.splitlines() if line.startswith("| **all**"))
  assert "| 45.00 |" in all_row  # 1 + 2 + ... + 9 ms


def test_every_kernel_of_a_real_step_is_attributed():
  """The tiny model's compiled train step (CPU): every block's mixer and MLP is found, with the
  right kind for its layer, in the forward, the remat recompute and the backward."""
  model = bench_train.variants("tiny", "save_dots")[0][1]
  step, state, windows = bench_train.build_step(model, 64, 1)
  ops = profile_train.parse_hlo(step.lower(state, windows[0]).compile().as_text())
  parts = collections.Counter((profile_train.model_part(op.op_name, model.layers),
                               profile_train.model_pass(op.op_name)) for op in ops.values() if op.op_name)
  for kind in set(model.layers):
    for model_pass in ("forward", "recompute", "backward"):
      assert parts[(f"{kind} mixer", model_pass)] > 0, (kind, model_pass)
  assert parts[("MLP", "backward")] > 0 and parts[("loss, clipping, AdamW", "loss and update")] > 0
  names = [op.op_name for op in ops.values()]
  assert not [n for n in names if re.search(r"block_\d+/mixer", n)
              and profile_train.model_part(n, model.layers) == "loss, clipping, AdamW"]


def test_profile_train_writes_both_tables(tmp_path):
  out = tmp_path / "profile.md"
  assert profile_train.main(["--preset", "tiny", "--lengths", "64", "--iters", "1", "--top", "5",
                             "--set", "d_model=64", "--out", str(out)]) == 0
  text = out.read_text()
  assert "### tiny (SH2: 1 MHA of 4), L=64" in text and "### tiny shape, all MHA, L=64" in text
  sh2_table = text.split("### tiny shape, all MHA")[0]
  for part in ("SE mixer", "MR mixer", "LI mixer", "MHA mixer", "MLP", "loss, clipping, AdamW"):
    assert f"| {part} |" in sh2_table
  assert jnp.isfinite(float(re.search(r"device busy ([\d.]+) ms", text).group(1)))
  assert "Costliest 5 mixer kernels, tiny (SH2: 1 MHA of 4), L=64" in text
  assert len(re.findall(r"^\| (SE|MR|LI|MHA) mixer \| (forward|recompute|backward) \|", sh2_table, re.M)) == 5


def test_pair_summary_bound():
  sh2 = (100.0, {("SE mixer", "forward", "GEMM"): 10.0, ("SE mixer", "backward", "Pallas kernels"): 4.0,
                 ("LI mixer", "forward", "other fusions"): 6.0, ("MHA mixer", "forward", "cuDNN attention"): 5.0,
                 ("MLP", "forward", "GEMM"): 55.0})
  mha = (130.0, {("MHA mixer", "forward", "cuDNN attention"): 40.0, ("MHA mixer", "forward", "GEMM"): 15.0,
                 ("MLP", "forward", "GEMM"): 55.0})
  text = "\n".join(profile_train.pair_summary(sh2, mha))
  assert "1.300 by wall time, 1.375 by device busy time" in text  # 130/100, 110/80
  assert "Hyena mixers: 20.0 ms per step, of which GEMMs 10.0 and the rest (Pallas kernels, fusions, copies) 10.0" in text
  assert "5.0 ms in SH2, 55.0 in the all-MHA model (cuDNN attention 40.0)" in text
  assert "55.0 ms in SH2, 55.0 in the all-MHA model" in text
  assert "would be 1.571 (device busy time)" in text  # 110 / (80 - 10)


def test_idle_before_counts_gaps_once_across_streams():
  # Kernel a runs 0-10, b overlaps it on another stream (5-20), c starts after a 5 ns gap,
  # d after a 30 ns gap; a kernel inside a running one (e) adds nothing.
  events = [(0, 10, "a"), (5, 15, "b"), (25, 5, "c"), (26, 2, "e"), (60, 1, "d"), (61, 1, "d")]
  assert profile_trace.idle_before(events) == {"c": 5, "d": 30}


def test_top_kernels_sums_layers_and_ranks():
  stack = "jit(step)/jvp(StripedHyena2)/StripedHyena2._stack"
  ops = {f"f{i}": profile_train.HloOp("other fusions", f"{stack}/block_{i}/mixer/conv/add", "f32[4,8]{1,0}")
         for i in range(3)}
  ops["k0"] = profile_train.HloOp("Pallas kernels", f"{stack}/block_0/mixer/pallas_call", "(bf16[4]{0}, f32[2]{0})")
  ops["m0"] = profile_train.HloOp("GEMM", f"{stack}/block_0/mlp/dot_general")
  ns = {"f0": 1e6, "f1": 2e6, "f2": 3.5e6, "k0": 4e6, "m0": 100e6}
  lines = profile_train.top_kernels(ns, ops, ("SE", "SE", "MR"), 1, {"SE mixer", "MR mixer"}, 2)
  assert lines[2] == "| SE mixer | forward | Pallas kernels | 4.00 | 1 | `pallas_call` | `(bf16[4], f32[2])` |"
  assert lines[3] == "| MR mixer | forward | other fusions | 3.50 | 1 | `conv/add` | `f32[4,8]` |"
  assert len(lines) == 5  # header, rule, 2 rows, blank; the MLP GEMM is not a mixer kernel
  lines = profile_train.top_kernels(ns, ops, ("SE", "SE", "SE"), 1, {"SE mixer"}, 5)
  assert "| SE mixer | forward | other fusions | 6.50 | 3 | `conv/add` | `f32[4,8]` |" in lines


def test_bench_train_rounds_alternate_and_report_the_median_ratio(tmp_path, monkeypatch):
  """--rounds 3: both models timed in alternating windows (one build each), the step ms is the
  median window, the ratio row the median of the per-round ratios, listed under the table;
  each row has pipelined and synchronised step ms and tokens/s from the pipelined one."""
  built = []
  real_build = bench_train.build_step
  monkeypatch.setattr(bench_train, "build_step", lambda *a: built.append(a[1]) or real_build(*a))
  out = tmp_path / "train.md"
  assert bench_train.main(["--preset", "tiny", "--lengths", "64", "--iters", "2", "--rounds", "3",
                           "--out", str(out)]) == 0
  assert built == [64, 64]
  text = out.read_text()
  per_round = re.search(r"^L=64: SH2 / all-MHA per round ([\d., ]+) \(median ([\d.]+)\); "
                        r"step-ms windows ([\d.]+)-([\d.]+), ([\d.]+)-([\d.]+)", text, re.M)
  ratios = [float(x) for x in per_round.group(1).split(", ")]
  assert len(ratios) == 3 and abs(float(per_round.group(2)) - sorted(ratios)[1]) < 1e-3
  ratio = float(re.search(r"^\| 64 \| ([\d.]+) \|", text, re.M).group(1))
  assert abs(ratio - sorted(ratios)[1]) < 0.006
  rows = re.findall(r"^\| (tiny[^|]*) \| 64 \| ([\d.]+) \|", text, re.M)
  for (_, ms), lo, hi in zip(rows, per_round.group(3, 5), per_round.group(4, 6)):
    assert float(lo) - 0.05 <= float(ms) <= float(hi) + 0.05
  # both rows: pipelined and synchronised step ms, tokens/s from the pipelined one, and the
  # synchronised ratio from the rows
  full = re.findall(r"^\| (tiny[^|]*) \| 64 \| ([\d.]+) \| ([\d.]+) \| (\d+) \| — \| ([\d.]+) \|$",
                    text, re.M)
  assert [r[0] for r in full] == ["tiny (SH2: 1 MHA of 4)", "tiny shape, all MHA"]
  for _, ms, _, tokens, _ in full:
    assert abs(int(tokens) - 64 / (float(ms) / 1e3)) <= 0.01 * int(tokens) + 1
  synced, memory = re.search(r"^\| 64 \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| >= 1.3 \|$", text,
                             re.M).groups()
  assert abs(float(synced) - float(full[1][2]) / float(full[0][2])) < 0.02
  # GiB printed to 2 decimals: the tiny model's ~0.02-0.05 GiB make the ratio coarse
  assert abs(float(memory) - float(full[0][4]) / float(full[1][4])) < 0.35
  assert "the median of 3 such windows alternating" in text
  with pytest.raises(SystemExit):
    bench_train.main(["--preset", "tiny", "--rounds", "0"])


def test_step_memory_holds_the_state_and_grows_with_the_window():
  """step_memory_bytes of the tiny SH2 train step: at least the train state's own bytes
  (params and both Adam moments, float32), and more at a 4x longer window (the activations);
  the step still runs after it."""
  model = bench_train.variants("tiny", "save_dots")[0][1]
  memory = {}
  for length in (64, 256):
    step, state, windows = bench_train.build_step(model, length, 1)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    memory[length] = bench_train.step_memory_bytes(step, state, windows[0])
    assert memory[length] >= state_bytes + windows[0].nbytes, (memory[length], state_bytes)
  assert memory[256] > memory[64] + 3 * (memory[64] - state_bytes) // 2, memory
  state, metrics = step(state, windows[0])
  assert np.isfinite(float(metrics["loss"]))


def test_bench_train_compare_times_a_variant_after_sh2(tmp_path, monkeypatch):
  """--models sh2 --set KEY=VALUE --compare KEY=VALUE (one round: each model timed in turn,
  the default path): SH2 and SH2 with the compared settings (--set applies to both; rows named
  with the settings), each built once; the variant's tokens/s over SH2's from the two rows; no
  SH2 / all-MHA row without MHA; --compare without sh2 and a model outside the pair are
  refused. (With --rounds the per-round line is the pair's, tested above.)"""
  built = []
  real_build = bench_train.build_step
  monkeypatch.setattr(bench_train, "build_step", lambda *a: built.append(a[0]) or real_build(*a))
  out = tmp_path / "train.md"
  assert bench_train.main(["--preset", "tiny", "--lengths", "64", "--iters", "2",
                           "--models", "sh2", "--set", "model.mlp_slices=2",
                           "--compare", "li_method=fft", "--compare", "remat_policy=full",
                           "--out", str(out)]) == 0
  assert [(m.li_method, m.remat_policy, m.mlp_slices) for m in built] == [
      ("auto", "save_dots", 2), ("fft", "full", 2)]
  text = out.read_text()
  rows = re.findall(r"^\| (tiny[^|]*) \| 64 \| ([\d.]+) \| [\d.]+ \| (\d+) \|", text, re.M)
  assert [r[0] for r in rows] == [
      "tiny (SH2: 1 MHA of 4), model.mlp_slices=2",
      "tiny (SH2: 1 MHA of 4), li_method=fft, remat_policy=full, model.mlp_slices=2"]
  ratio = re.search(r"^L=64: SH2 with li_method=fft, remat_policy=full / SH2 tokens/s: "
                    r"([\d.]+) \(one window each\)$", text, re.M).group(1)
  variant_tokens, sh2_tokens = int(rows[1][2]), int(rows[0][2])
  from_rows = variant_tokens / sh2_tokens
  # tokens/s are printed as integers (each off by <= 0.5), the ratio to 3 decimals
  rounding = from_rows * (0.5 / variant_tokens + 0.5 / sh2_tokens) + 5e-4
  assert abs(float(ratio) - from_rows) <= rounding + 1e-9
  assert not re.search(r"^\| 64 \| [\d.]+ \|", text, re.M)  # no SH2 / all-MHA row without MHA
  with pytest.raises(SystemExit):
    bench_train.main(["--preset", "tiny", "--models", "mha", "--compare", "li_method=fft"])
  with pytest.raises(SystemExit):
    bench_train.main(["--preset", "tiny", "--models", "gpt"])
