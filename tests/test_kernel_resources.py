"""experiments/kernel_resources.py: the occupancy arithmetic, the resource-usage parser and the
capture of the Hyena kernels' Triton IR when lowering for CUDA on a CPU (the compile step needs
the triton wheel and is not run here)."""

import dataclasses

import pytest

from experiments import kernel_resources as kr
from experiments import tune_mixers
from pallas_kernels import blocked_conv as bc
from pallas_kernels import featurized_conv as fc
from sh2_jax.config import ModelConfig


@pytest.mark.parametrize("registers,shared,warps,want", [
    (255, 83072, 4, (2, "registers+shared")),  # 8192 registers a warp: 2 blocks; 82 KiB: 2
    (90, 58496, 4, (3, "shared")),  # 96 x 32 = 3072 a warp: 5 blocks by registers
    (255, 0, 1, (8, "registers")),
    (32, 0, 1, (32, "blocks")),  # 1024 a warp: 64 by registers, capped at 32 blocks
    (64, 0, 32, (1, "registers")),  # 2048 a warp x 32 warps: the whole register file
])
def test_occupancy_against_hand_counts(registers, shared, warps, want):
  assert kr.occupancy(registers, shared, warps) == want


def test_parse_resource_usage_reads_the_first_function():
  text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function kernel:\n  REG:255 STACK:16 SHARED:0 "
          "LOCAL:0 CONSTANT[0]:564 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
  assert kr.parse_resource_usage(text) == {"registers": 255, "stack": 16, "shared": 0}
  with pytest.raises(ValueError, match="no REG: field"):
    kr.parse_resource_usage("Resource usage:\n")


def test_mixer_kernels_capture_every_kernel_with_its_launch():
  """SE and LI at a small shape: the kernels of forward + backward under save_dots remat, in
  lowering order, with grids and warps/stages as the BlockSizes resolve them; a candidate's
  fields reach the launch."""
  config = ModelConfig(d_model=64, num_heads=2, se_groups=4, layout="SE LI", dtype="bfloat16",
                       remat=True)
  se = kr.mixer_kernels("se", config, 256)
  assert [k.name for k in se] == ["featurized_gate_conv_gate_fwd", "featurized_gate_conv_gate_bwd",
                                  "featurizer_bwd"]
  assert all(k.ttir.startswith("module") and "tt.func" in k.ttir for k in se)
  resolved = kr.MIXERS["se"][1]()
  fwd, bwd = se[0], se[1]
  assert (fwd.num_warps, fwd.num_stages) == (4, fc.FUSED_FWD_STAGES)
  assert (bwd.num_warps, bwd.num_stages) == (4, fc.FUSED_HALO_BWD_STAGES)
  assert fwd.grid[1] == 64 // 16 and bwd.grid[1] == 64 // 16, (fwd.grid, bwd.grid, resolved)
  li = kr.mixer_kernels("li", config, 256)
  assert [k.name for k in li] == ["modal_conv_states", "modal_conv_chain", "modal_conv_fwd",
                                  "modal_conv_bwd_forward", "modal_conv_chain_reverse",
                                  "modal_conv_bwd_reverse"]
  mixer, candidate = tune_mixers.parse_candidate("se:num_stages_bwd=2,num_warps_bwd=8")
  assert mixer == "se" and candidate == bc.BlockSizes(num_stages_bwd=2, num_warps_bwd=8)
  bwd = kr.mixer_kernels("se", config, 256, candidate)[1]
  assert (bwd.num_warps, bwd.num_stages) == (8, 2)


def test_table_rows_count_waves_from_the_grid():
  kernel = kr.Kernel("k", (1, 120, 4), 4, 3, "module {}")
  rows = kr.table_rows("se", "defaults", [kernel],
                       resources=lambda k: {"registers": 255, "stack": 16, "shared": 83072})
  assert rows == ["| se | defaults | k | 480 | 4 | 3 | 255 | 16 | 81.1 | 2 (registers+shared) | 1.82 "
                  "| - |"]
  limits = dataclasses.replace(kr.H100, sms=240)
  timed = {"registers": 255, "stack": 0, "shared": 0, "compile_ms": 1234}
  assert kr.table_rows("se", "d", [kernel], lambda k: timed,
                       limits)[0].endswith("| 2 (registers) | 1.00 | 1.2 |")


def test_loop_loads_counts_the_first_loop_body_only():
  """Async copies and plain loads between the first scf.for and its closing brace (a nested
  loop's included), a plain load whose value the loop yields counted as loaded ahead; loads
  before and after the loop are not counted; no loop: (0, 0, 0)."""
  ttgir = """    %1 = tt.load %0 : tensor<16x!tt.ptr<f32>>
    %2 = ttg.async_copy_global_to_local %0, %a : tensor<64x16x!tt.ptr<bf16>>
    %3:2 = scf.for %i = %c0 to %c8 step %c1 iter_args(%x = %1, %w = %1) -> (tensor<16xf32>) {
      %4 = tt.load %p : tensor<64x16x!tt.ptr<bf16>>
      %post_next = tt.load %p, %m, %other : tensor<16x!tt.ptr<f32>>
      %5 = ttg.async_copy_global_to_local %q, %b : tensor<64x16x!tt.ptr<bf16>>
      %6 = scf.for %j = %c0 to %c2 step %c1 iter_args(%y = %x) -> (tensor<16xf32>) {
        %7 = tt.load %r, %m, %other : tensor<16x!tt.ptr<f32>>
        scf.yield %7 : tensor<16xf32>
      } loc(#loc1)
      %8 = ttg.async_copy_global_to_local %s, %c : tensor<16x!tt.ptr<f32>>
      tt.store %t, %4 : tensor<64x16x!tt.ptr<bf16>>
      scf.yield %6, %post_next : tensor<16xf32>, tensor<16xf32>
    } loc(#loc2)
    %9 = tt.load %u : tensor<16x!tt.ptr<f32>>
"""
  assert kr.loop_loads(ttgir) == (2, 1, 2)
  assert kr.loop_loads("    %1 = tt.load %0 : tensor<16x!tt.ptr<f32>>\n") == (0, 0, 0)
  kernel = kr.Kernel("k", (2,), 1, 3, "module {}")
  found = {"registers": 32, "stack": 0, "shared": 0, "compile_ms": 500, "loop_loads": (12, 3, 3)}
  assert kr.table_rows("se", "d", [kernel], lambda k: found)[0].endswith("| 0.5 | 12 / 3 / 3 |")


def test_gate_forwards_load_the_output_gate_a_chunk_ahead():
  """In the Triton IR Pallas emits (before Triton's pipeliner, which prefetches only the loads
  feeding a product), SE's forward carries its post stream's J = 3 windows and MR's its post
  tile to the next chunk: their values are in the chunk loop's yield."""
  config = ModelConfig(d_model=64, num_heads=2, se_groups=4, mr_groups=4, layout="SE MR",
                       dtype="bfloat16", remat=True)
  se_fwd = kr.mixer_kernels("se", config, 256)[0]
  mr_fwd = kr.mixer_kernels("mr", config, 256)[0]
  assert (se_fwd.name, mr_fwd.name) == ("featurized_gate_conv_gate_fwd", "gate_conv_gate_fwd")
  assert kr.loop_loads(se_fwd.ttir)[1] == 3
  assert kr.loop_loads(mr_fwd.ttir)[1] == 1


def test_li_walks_carry_every_loaded_row_to_the_next_step():
  """LI's walks load chunk s while they process chunk s - 1: every row they load (8 rows and
  the featurizer's 2 before them, per featurized stream) is yielded as loaded, not read in the
  step that loads it (a select on a loaded row made that step wait for its loads first)."""
  config = ModelConfig(d_model=64, num_heads=2, layout="LI", dtype="bfloat16", remat=True)
  kernels = {k.name: k for k in kr.mixer_kernels("li", config, 256)}
  assert kr.loop_loads(kernels["modal_conv_states"].ttir)[1] == 2 * 10  # pre, v
  assert kr.loop_loads(kernels["modal_conv_fwd"].ttir)[1] == 3 * 10  # post, pre, v


def test_slowest_pass_reads_mlir_timing_reports():
  """The slowest pass over every report (the compiler prints one per pipeline), Total and Rest
  lines skipped; a row then names it with its share of the compile."""
  report = ("===---===\n  Total Execution Time: 34.9780 seconds\n\n  ----Wall Time----  ----Name----\n"
            "    0.0288 (  0.1%)  ConvertTritonToTritonGPU\n   34.3952 ( 98.3%)  TritonGPUCoalesce\n"
            "    0.0220 (  0.1%)    CanonicalizerPass\n   34.9780 (100.0%)  Total\n"
            "===---===\n    0.0817 ( 39.0%)  Rest\n    0.0338 ( 16.1%)  ConvertTritonGPUToLLVM\n"
            "    0.2091 (100.0%)  Total\n")
  assert kr.slowest_pass(report) == ("TritonGPUCoalesce", 34.3952)
  with pytest.raises(ValueError, match="no pass timings"):
    kr.slowest_pass("  Total Execution Time: 1.0 seconds\n    1.0000 (100.0%)  Total\n")
  kernel = kr.Kernel("k", (2,), 1, 3, "module {}")
  found = {"registers": 32, "stack": 0, "shared": 0, "compile_ms": 40000,
           "slowest_pass": ("TritonGPUCoalesce", 34.3952)}
  assert kr.table_rows("li", "d", [kernel], lambda k: found)[0].endswith(
      "| 40.0 | TritonGPUCoalesce (86%) |")
