"""Where the gate kernels' time goes: their tiles streamed alone, an ablation, the kernels (GPU).

  PYTHONPATH=. python experiments/probe_tile_bandwidth.py [--length 8192] [--channels 4096]
      [--chunk 128] [--gates | --gates-only] [--groups 256] [--candidate mr:num_stages_bwd=2 ...]
      [--gate-mixers mr,se,li] [--se-tap-grads kernel] [--out FILE]
      (--dry-run: tiny shapes in interpret mode, to test the script on a CPU)

The blocked gate kernels (pallas_kernels/blocked_conv.py, featurized_conv.py) stream [T, dc]
tiles of row-major [B, L, C] arrays: at dc = 16 channels (the group width of 256 groups at
D = 4096, the tile the heuristics pick at evo2-1b too) each tile row is 32 bytes. On an H100
they move their bytes at about 0.8-1.2 TB/s. This probe asks whether the access pattern alone
sets that: streaming kernels with the kernels' loop structure (one program per channel tile
and sequence segment, chunks of T rows in a fori_loop, Triton software pipelining) and their
stream counts (the MR backward: 4 streams in, 4 out; the forward: 3 in, 1 out), but only an
elementwise sum between load and store, over
  - row-major [L, C] streams read as [T, dc] tiles (the kernels' layout), dc = 16, 32, 64;
  - channel-major [C, L] streams read as [dc, T] tiles (rows of T contiguous elements),
each against XLA computing the same outputs; then, row-major at dc = 16, the kernels' other
ingredients one by one: J shifted row windows per input (the featurizer's masked loads at
t - j) and chains of T x T products per chunk with an on-chip matrix (the Toeplitz products:
two in the forward, six in the MR backward). Prints (and with --out writes) one markdown
table: wall ms per call (median, synchronised: includes the launch), device ms per call (the
kernels' summed time in a profiler trace) and the GB/s that device time gives for one pass
over the streams (XLA may need several kernels: their count is listed).

With --gates, a second table times the gate kernels themselves at the same shape, as a
rematerialised training step runs them: the MR (blocked, K = 128), SE (featurized, K = 7,
featurizer of 3 taps) and LI (featurized modal kernels, 16 poles, 3 taps) forward calls, and
their backward calls with the gate output for dW_out (SE's includes its featurizer-backward
kernel; LI's forward its state pass and chain, whose states the backward reads), for the
default BlockSizes and each --candidate (tune_mixers syntax): device ms per call and each
kernel's share.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import profile_trace, report  # noqa: E402
from experiments.timing import median_ms  # noqa: E402
from experiments.tune_mixers import candidate_label, mixers_and_candidates  # noqa: E402
from pallas_kernels import blocked_conv as bc  # noqa: E402
from pallas_kernels import featurized_conv as fc  # noqa: E402
from pallas_kernels import modal_conv as mc  # noqa: E402

TARGET_PROGRAMS = 512  # segments along L are doubled until the grid has this many programs
MIN_SEGMENT_CHUNKS = 8


@dataclasses.dataclass(frozen=True)
class Case:
  """One streaming kernel: `streams_in` arrays in, `streams_out` out, [T, dc] or [dc, T]
  tiles, Triton launch parameters."""
  streams_in: int
  streams_out: int
  block_c: int
  chunk: int
  channel_major: bool
  num_warps: int
  num_stages: int
  windows: int = 1  # J: each input also read at rows t - 1 .. t - J + 1 (masked windows)
  dots: int = 0  # chained [T, T] x [T, dc] products per chunk (row-major only)

  @property
  def label(self) -> str:
    layout = "[C, L], [dc, T] tiles" if self.channel_major else "[L, C], [T, dc] tiles"
    extra = (f", {self.windows} windows" if self.windows > 1 else "") + (
        f", {self.dots} T x T products" if self.dots else "")
    return (f"{self.streams_in} in / {self.streams_out} out, {layout}, dc={self.block_c}, "
            f"T={self.chunk}{extra}, warps {self.num_warps}, stages {self.num_stages}")


def _chain_matrix(chunk: int, dtype: jnp.dtype) -> jax.Array:
  """[T, T] lower-triangular ones / T (rows sum to <= 1), the products' on-chip operand."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return jnp.where(rows >= cols, 1.0 / chunk, 0.0).astype(dtype)


def _outputs(unshifted: list[jax.Array], total: jax.Array, streams_out: int,
             dtype: jnp.dtype) -> list[jax.Array]:
  """out_k = 2 in_k + total (float32), in the I/O dtype."""
  return [(2 * unshifted[k % len(unshifted)].astype(jnp.float32) + total).astype(dtype)
          for k in range(streams_out)]


def _stream_kernel(*refs, streams_in: int, chunk: int, segment_chunks: int,
                   channel_major: bool, windows: int, dots: int, interpret: bool) -> None:
  in_refs, out_refs = refs[:streams_in], refs[streams_in:]
  io_dtype = out_refs[0].dtype
  first = pl.program_id(1) * segment_chunks
  matrix = _chain_matrix(chunk, io_dtype) if dots else None

  def body(step, carry):
    n = first + step
    rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    if channel_major:
      tiles, shifted = [ref[:, rows] for ref in in_refs], []
    else:  # the fused kernel's own loads: row t, then masked windows at t - j
      loads = [fc._shifted_rows(ref, n, chunk, windows, not interpret) for ref in in_refs]
      tiles, shifted = [load[0] for load in loads], [w for load in loads for w in load[1:]]
    total = sum(t.astype(jnp.float32) for t in tiles + shifted)
    acc = total
    for _ in range(dots):
      acc = jnp.dot(matrix, acc.astype(io_dtype), preferred_element_type=jnp.float32) + total
    for ref, value in zip(out_refs, _outputs(tiles, acc, len(out_refs), io_dtype)):
      if channel_major:
        ref[:, rows] = value
      else:
        ref[rows, :] = value
    return carry

  jax.lax.fori_loop(0, segment_chunks, body, 0)


def segments_for(case: Case, length: int, channels: int) -> int:
  """Programs along L: doubled while the grid is under TARGET_PROGRAMS and each segment keeps
  at least MIN_SEGMENT_CHUNKS chunks (the gate kernels' heuristic)."""
  tiles, num_chunks, segments = channels // case.block_c, length // case.chunk, 1
  while (tiles * segments < TARGET_PROGRAMS and num_chunks % (2 * segments) == 0
         and num_chunks // (2 * segments) >= MIN_SEGMENT_CHUNKS):
    segments *= 2
  return segments


def stream(case: Case, arrays: list[jax.Array], interpret: bool = False) -> list[jax.Array]:
  """The Pallas streaming kernel over `arrays` ([L, C], or [C, L] when channel_major)."""
  length, channels = arrays[0].shape[::-1] if case.channel_major else arrays[0].shape
  if length % case.chunk or channels % case.block_c:
    raise ValueError(f"length {length} must be a multiple of T={case.chunk} and channels "
                     f"{channels} of dc={case.block_c}")
  if case.channel_major and (case.windows > 1 or case.dots):
    raise ValueError("windows and products are probed in the row-major layout only")
  segments = segments_for(case, length, channels)
  if case.channel_major:
    spec = pl.BlockSpec((case.block_c, length), lambda c, s: (c, 0))
  else:
    spec = pl.BlockSpec((length, case.block_c), lambda c, s: (0, c))
  kernel = functools.partial(_stream_kernel, streams_in=case.streams_in, chunk=case.chunk,
                             segment_chunks=length // case.chunk // segments,
                             channel_major=case.channel_major, windows=case.windows,
                             dots=case.dots, interpret=interpret)
  out_shape = [jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype)] * case.streams_out
  return pl.pallas_call(
      kernel, grid=(channels // case.block_c, segments), in_specs=[spec] * case.streams_in,
      out_specs=[spec] * case.streams_out, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=case.num_warps,
                                           num_stages=case.num_stages),
      interpret=interpret, name="probe_stream")(*arrays)


def xla_stream(arrays: list[jax.Array], streams_out: int, windows: int = 1, dots: int = 0,
               chunk: int = 128) -> list[jax.Array]:
  """The same outputs by XLA, from row-major [L, C] arrays."""
  f32 = jnp.float32
  total = sum(jnp.pad(a, ((j, 0), (0, 0)))[:a.shape[0]].astype(f32)
              for a in arrays for j in range(windows))
  acc = total
  if dots:
    matrix = _chain_matrix(chunk, arrays[0].dtype)
    length, channels = total.shape
    for _ in range(dots):
      acc = jnp.einsum("ts,nsc->ntc", matrix,
                       acc.astype(arrays[0].dtype).reshape(length // chunk, chunk, channels),
                       preferred_element_type=f32).reshape(length, channels) + total
  return _outputs(arrays, acc, streams_out, arrays[0].dtype)


def cases(block_cs: tuple[int, ...] = (16, 32, 64), chunk: int = 128) -> list[Case]:
  """The MR backward's and forward's stream counts in both layouts and each tile width, then
  the ablation ladder at dc = 16, row-major: windows, products, both."""
  out = []
  for streams_in, streams_out, warps, stages in ((4, 4, 8, 3), (3, 1, 4, 4)):
    for channel_major in (False, True):
      for block_c in block_cs:
        out.append(Case(streams_in, streams_out, block_c, chunk, channel_major, warps, stages))
  for streams_in, streams_out, warps, stages, windows, dots in (
      (3, 1, 4, 4, 3, 0), (3, 1, 4, 4, 1, 2), (3, 1, 4, 4, 3, 2),
      (4, 4, 8, 3, 1, 6), (4, 4, 8, 3, 3, 6)):
    out.append(Case(streams_in, streams_out, block_cs[0], chunk, False, warps, stages, windows,
                    dots))
  return out


def kernel_ms(fn: Callable[[Any], Any], arrays: Any, iters: int) -> list[float]:
  """Device ms per call of each kernel fn(arrays) launches, in launch order, from a profiler
  trace of `iters` calls after one warm-up."""
  jax.block_until_ready(fn(arrays))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(iters):
        jax.block_until_ready(fn(arrays))
    events, _ = profile_trace.kernel_events(trace_dir)
  events.sort()
  per_call = max(len(events) // iters, 1)
  return [sum(events[call * per_call + k][1] for call in range(iters)) / iters / 1e6
          for k in range(per_call) if len(events) >= per_call * iters]


def device_ms(fn: Callable[[Any], Any], arrays: list[jax.Array], iters: int
              ) -> tuple[float, float]:
  """(device ms per call, kernels per call) of fn(arrays) (see kernel_ms)."""
  kernels = kernel_ms(fn, arrays, iters)
  return sum(kernels), len(kernels)


def gate_calls(mixer: str, block_sizes: bc.BlockSizes | mc.BlockSizes | None, length: int,
               channels: int, groups: int, dtype: jnp.dtype, interpret: bool = False,
               tap_grads: str = "xla", layout: str = "blocked"
               ) -> tuple[Callable[[tuple], Any], Callable[[tuple], Any], tuple, tuple]:
  """(forward fn, backward fn, args of each) of one gate kernel pair as a rematerialised
  step runs it: the forward kernels, then the backward call that also writes the gate output
  for dW_out (output_projection), from the forward's residuals; the backward's args are the
  residuals then the output's cotangent. tap_grads: where SE's backward reduces the
  featurizer-tap gradient (featurized_conv.TAP_GRADS); layout: SE's z column order
  (featurized_conv.LAYOUTS: the same values as "blocked", its columns permuted by
  `layout_permutation`)."""
  keys = jax.random.split(jax.random.key(1), 6)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)  # noqa: E731
  dout = normal(keys[0], (1, length, channels))
  dskip = jax.random.normal(keys[1], (channels,), jnp.float32)
  if mixer == "li":
    streams = tuple(normal(k, (1, length, channels)) for k in keys[2:5])
    taps = tuple(jax.random.uniform(jax.random.fold_in(keys[5], s), (channels, 3), jnp.float32,
                                    -1.0, 1.0) for s in range(3))
    log_poles = -jnp.exp(jax.random.uniform(jax.random.fold_in(keys[5], 3), (channels, 16),
                                            jnp.float32, jnp.log(1e-3), jnp.log(6.0)))
    residues = 0.3 * jax.random.normal(jax.random.fold_in(keys[5], 4), (channels, 16))
    operands = (*streams, *taps, log_poles, residues, dskip)
    resolved = mc._featurized_checked(*operands[:7], dskip, block_sizes)
    fwd = jax.jit(lambda ops: mc._modal_fgcg_fwd(*ops, resolved, interpret))
    residuals = fwd(operands)[1]
    bwd = jax.jit(lambda ops: mc._modal_fgcg_bwd_impl(resolved, interpret, ops[:-1], ops[-1],
                                                      with_output=True))
    return fwd, bwd, operands, (*residuals, dout)
  if mixer == "mr":
    h = jax.random.normal(keys[2], (groups, 128), jnp.float32) / 11.0
    streams = tuple(normal(k, (1, length, channels)) for k in keys[3:6])
    _, resolved = bc._checked(*streams, h, dskip, block_sizes)
    operands = (*streams, h, dskip)
    fwd = jax.jit(lambda ops: bc._gcg_fwd_impl(*ops, resolved, interpret))
    bwd = jax.jit(lambda ops: bc._gcg_bwd_impl(resolved, interpret, ops[:-1], ops[-1],
                                               with_output=True))
    return fwd, bwd, operands, operands + (dout,)
  z = normal(keys[2], (1, length, 3 * channels))
  w_feat = jax.random.normal(keys[3], (3 * channels, 3), jnp.float32) / 2.0
  h = jax.random.normal(keys[4], (groups, 7), jnp.float32) / 3.0
  perm = layout_permutation(layout, channels)
  z, w_feat = z[..., perm], w_feat[perm]
  _, resolved = fc._checked(z, w_feat, h, dskip, block_sizes, tap_grads, layout)
  operands = (z, w_feat, h, dskip)
  fwd = jax.jit(lambda ops: fc._fwd_impl(*ops, resolved, interpret, layout))
  bwd = jax.jit(lambda ops: fc._fgcg_bwd_impl(resolved, interpret, tap_grads, layout,
                                              ops[:-1], ops[-1], with_output=True))
  return fwd, bwd, operands, operands + (dout,)


def layout_permutation(layout: str, channels: int) -> np.ndarray:
  """Columns of z in `layout` as indices into the blocked [post | pre | v] columns."""
  blocked = np.arange(3 * channels).reshape(3, channels)
  if layout == "interleaved":
    return blocked.T.reshape(-1)
  return blocked.reshape(-1)


def relative_gap(got: tuple[jax.Array, ...], want: tuple[jax.Array, ...]) -> float:
  """The largest ||got_i - want_i|| / ||want_i|| over paired outputs (float32 norms)."""
  gaps = []
  for g, w in zip(got, want, strict=True):
    g, w = g.astype(jnp.float32), w.astype(jnp.float32)
    gaps.append(float(jnp.linalg.norm(g - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30)))
  return max(gaps)


def checked_gap(got: tuple[jax.Array, ...], want: tuple[jax.Array, ...], tolerance: float,
                what: str) -> float:
  """relative_gap(got, want), or AssertionError naming `what` when it is over `tolerance` or
  not finite (e.g. a race or an unwritten tile in the kernel that computed `got`)."""
  gap = relative_gap(got, want)
  if not gap <= tolerance:
    raise AssertionError(f"{what}: outputs differ from the defaults' by {gap:.2e} (relative), "
                         f"over {tolerance}")
  return gap


LAYOUT_BLOCK_SIZES = bc.BlockSizes(block_c=16)  # --se-layouts: one group's channels a program
SE_TAP_GRADS_TOLERANCE = 2e-2  # a tap_grads variant's SE gradients vs the default's (bf16 I/O)


def gate_rows(length: int, channels: int, groups: int, candidates: list[tuple[str, Any]],
              dtype: jnp.dtype = jnp.bfloat16, iters: int = 20, interpret: bool = False,
              se_tap_grads: tuple[str, ...] = (), mixers: tuple[str, ...] = ("mr", "se", "li"),
              se_layouts: tuple[str, ...] = ()
              ) -> list[tuple[str, str, float, list[float]]]:
  """Rows (mixer, candidate label, device ms per call, each kernel's ms) for the `mixers`'
  gate kernels' forward and backward, the defaults first, then each (mixer, BlockSizes), then
  SE's backward with each featurizer-tap-gradient placement in `se_tap_grads`
  (featurized_conv.TAP_GRADS; at the defaults and each SE candidate), whose outputs must equal
  the default's within SE_TAP_GRADS_TOLERANCE (AssertionError otherwise: e.g. a race in the
  kernel), then SE's kernels on z in each of `se_layouts` (featurized_conv.LAYOUTS, at
  LAYOUT_BLOCK_SIZES), checked the same way against the blocked layout's."""
  rows = []
  for mixer, block_sizes in [*((mixer, None) for mixer in mixers), *candidates]:
    label = "defaults" if block_sizes is None else candidate_label(block_sizes)
    fwd, bwd, fwd_args, bwd_args = gate_calls(mixer, block_sizes, length, channels, groups,
                                              dtype, interpret)
    for name, fn, args in (("forward", fwd, fwd_args), ("backward", bwd, bwd_args)):
      kernels = kernel_ms(fn, args, iters)
      rows.append((f"{mixer.upper()} {name}", label, sum(kernels), kernels))
  if se_tap_grads:
    _, bwd, _, bwd_args = gate_calls("se", None, length, channels, groups, dtype, interpret)
    want = bwd(bwd_args)
  se_sizes = [None] + [sizes for mixer, sizes in candidates if mixer == "se"]
  if se_layouts:
    fwd, bwd, fwd_args, bwd_args = gate_calls("se", LAYOUT_BLOCK_SIZES, length, channels,
                                              groups, dtype, interpret)
    want_fwd, want_bwd = fwd(fwd_args), bwd(bwd_args)
  for layout in se_layouts:
    perm = layout_permutation(layout, channels)
    fwd, bwd, fwd_args, bwd_args = gate_calls("se", LAYOUT_BLOCK_SIZES, length, channels, groups,
                                              dtype, interpret, layout=layout)
    dz, dw, *rest = want_bwd
    gap = max(checked_gap(jax.tree.leaves(fwd(fwd_args)), jax.tree.leaves(want_fwd),
                          SE_TAP_GRADS_TOLERANCE, f"SE forward, layout={layout}"),
              checked_gap(bwd(bwd_args), (dz[..., perm], dw[perm], *rest),
                          SE_TAP_GRADS_TOLERANCE, f"SE backward, layout={layout}"))
    for name, fn, args in (("forward", fwd, fwd_args), ("backward", bwd, bwd_args)):
      kernels = kernel_ms(fn, args, iters)
      rows.append((f"SE {name}", f"layout={layout}, {candidate_label(LAYOUT_BLOCK_SIZES)} "
                   f"(outputs within {gap:.1e} of blocked's)", sum(kernels), kernels))
  for tap_grads in se_tap_grads:
    for block_sizes in se_sizes:
      _, bwd, _, bwd_args = gate_calls("se", block_sizes, length, channels, groups, dtype,
                                       interpret, tap_grads=tap_grads)
      label = f"tap_grads={tap_grads}" + (f", {candidate_label(block_sizes)}" if block_sizes
                                          else "")
      gap = checked_gap(bwd(bwd_args), want, SE_TAP_GRADS_TOLERANCE, f"SE backward with {label}")
      kernels = kernel_ms(bwd, bwd_args, iters)
      rows.append(("SE backward", f"{label} (outputs within {gap:.1e} of the defaults')",
                   sum(kernels), kernels))
  return rows


def run(length: int, channels: int, dtype: jnp.dtype = jnp.bfloat16, iters: int = 20,
        interpret: bool = False, block_cs: tuple[int, ...] = (16, 32, 64),
        chunk: int = 128) -> list[tuple[str, int, float, float, float, float]]:
  """Rows (case label, programs, wall ms, device ms, kernels per call, GB/s by device time),
  each kernel checked against xla_stream first; the XLA rows ("XLA, ...") per stream count."""
  keys = jax.random.split(jax.random.key(0), 4)
  row_major = [jax.random.normal(k, (length, channels), jnp.float32).astype(dtype) for k in keys]
  col_major = [a.T for a in row_major]
  itemsize = jnp.dtype(dtype).itemsize
  rows = []

  def row(label: str, programs: int, fn: Callable[[Any], Any], arrays: list[jax.Array],
          streams: int) -> None:
    wall = median_ms(fn, arrays, iters=iters)
    device, kernels = device_ms(fn, arrays, iters)
    gb = streams * length * channels * itemsize / 1e9
    rows.append((label, programs, wall, device, kernels, gb / device * 1e3 if device else 0.0))

  for streams_in, streams_out in ((4, 4), (3, 1)):
    fn = jax.jit(functools.partial(xla_stream, streams_out=streams_out))
    row(f"XLA, {streams_in} in / {streams_out} out, [L, C]", 0, fn, row_major[:streams_in],
        streams_in + streams_out)
  for case in cases(block_cs, chunk):
    arrays = (col_major if case.channel_major else row_major)[:case.streams_in]
    fn = jax.jit(functools.partial(stream, case, interpret=interpret))
    got = fn(arrays)
    want = xla_stream(row_major[:case.streams_in], case.streams_out, case.windows, case.dots,
                      case.chunk)
    for g, w in zip(got, want):
      g = g.T if case.channel_major else g
      if not bool(jnp.allclose(g.astype(jnp.float32), w.astype(jnp.float32), rtol=2e-2,
                               atol=2e-2)):
        raise AssertionError(f"{case.label}: the kernel's output differs from XLA's")
    programs = channels // case.block_c * segments_for(case, length, channels)
    row(case.label, programs, fn, arrays, case.streams_in + case.streams_out)
  return rows


def _kernel_list(kernels: list[float], most: int = 6) -> str:
  """"0.210 + 0.071 + 0.004" in launch order, or the `most` largest of many (interpret mode)."""
  if len(kernels) <= most:
    return " + ".join(f"{k:.3f}" for k in kernels)
  largest = sorted(kernels, reverse=True)[:most]
  return f"largest {most} of {len(kernels)}: " + ", ".join(f"{k:.3f}" for k in largest)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=8192)
  parser.add_argument("--channels", type=int, default=4096)
  parser.add_argument("--chunk", type=int, default=128,
                      help="T, rows per loop step (MR 128, SE 64)")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--gates", action="store_true",
                      help="also time the MR, SE and LI gate kernels at this shape")
  parser.add_argument("--gates-only", action="store_true",
                      help="--gates without the streaming table")
  parser.add_argument("--groups", type=int, default=256, help="filter groups of --gates")
  parser.add_argument("--candidate", action="append", default=[],
                      metavar="MIXER:FIELD=VALUE[,FIELD=VALUE]",
                      help="with --gates, also these BlockSizes (se, mr or li; repeatable)")
  parser.add_argument("--gate-mixers", default="mr,se,li",
                      help="with --gates, the mixers whose default kernels are timed")
  parser.add_argument("--se-tap-grads", default="", metavar="kernel",
                      help="with --gates, also SE's backward with its featurizer-tap gradient "
                      f"reduced there (featurized_conv tap_grads: {', '.join(fc.TAP_GRADS)})")
  parser.add_argument("--se-layouts", default="", metavar="interleaved",
                      help="with --gates, also SE's kernels on z in these column orders "
                      f"({', '.join(fc.LAYOUTS)}) against blocked's, both at block_c = "
                      f"{LAYOUT_BLOCK_SIZES.block_c}")
  parser.add_argument("--out", help="markdown file (default: print only)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes, interpret mode (CPU)")
  args = parser.parse_args(argv)
  _, candidates = mixers_and_candidates(parser, "se,mr,li", args.candidate)
  gate_mixers, _ = mixers_and_candidates(parser, args.gate_mixers, [])
  se_tap_grads = tuple(t for t in args.se_tap_grads.split(",") if t)
  if unknown := sorted(set(se_tap_grads) - set(fc.TAP_GRADS)):
    parser.error(f"--se-tap-grads {','.join(unknown)}: choose from {','.join(fc.TAP_GRADS)}")
  se_layouts = tuple(t for t in args.se_layouts.split(",") if t)
  if unknown := sorted(set(se_layouts) - set(fc.LAYOUTS)):
    parser.error(f"--se-layouts {','.join(unknown)}: choose from {','.join(fc.LAYOUTS)}")
  if args.dry_run:
    length, channels, groups, dtype, iters = 256, 64, 4, jnp.float32, 1
    rows = [] if args.gates_only else run(length, channels, dtype, iters=iters, interpret=True,
                                          block_cs=(16, 32), chunk=16)
  else:
    length, channels, groups, dtype, iters = (args.length, args.channels, args.groups,
                                              jnp.bfloat16, args.iters)
    rows = [] if args.gates_only else run(length, channels, dtype, iters=iters, chunk=args.chunk)
  gate_length = 128 if args.dry_run else length  # interpret mode walks the kernels row by row
  gates = (gate_rows(gate_length, channels, groups, candidates, dtype, iters,
                     interpret=args.dry_run, se_tap_grads=se_tap_grads,
                     mixers=tuple(gate_mixers), se_layouts=se_layouts)
           if args.gates or args.gates_only else [])
  device = jax.devices()[0].device_kind
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [f"# Streaming bandwidth of the gate kernels' tile pattern (L={length}, C={channels})",
           "", f"- device: {device}, jax {jax.__version__}, {stamp}",
           "- command: `PYTHONPATH=. python3 experiments/probe_tile_bandwidth.py "
           + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
           f"- {jnp.dtype(dtype).name} streams; each kernel's outputs checked equal to the XLA "
           f"outputs; {iters} runs; GB/s = bytes of one pass (read + written) / device time"]
  if rows:
    lines += ["", "| case | programs | wall ms | device ms | kernels | GB/s |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {programs or '-'} | {wall:.3f} | {device:.3f} | {kernels:g} | "
              f"{gbs:.0f} |" for label, programs, wall, device, kernels, gbs in rows]
  if gates:
    lines += ["", f"Gate kernels at L={gate_length}, C={channels} ({groups} filter groups; "
              "MR K = 128, SE K = 7 with a 3-tap featurizer, LI 16 poles with a 3-tap "
              "featurizer; backward with the gate output for dW_out):", "",
              "| kernel | BlockSizes | device ms | per kernel (ms, launch order) |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {label} | {total:.3f} | {_kernel_list(kernels)} |"
              for name, label, total, kernels in gates]
  report.emit(lines, args.out)


if __name__ == "__main__":
  main()
