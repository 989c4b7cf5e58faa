"""Hyena-LI gate-conv-gate with the modal filter as a diagonal recurrence: Pallas GPU kernels.

The LI filter of channel c is a sum of N real exponentials (SPEC.md section 2),

    h[c, t] = sum_n R[c, n] p[c, n]^t,   p = exp(log_pole) in (0, 1),  t >= 0,

so the causal convolution y = h * u is the diagonal linear recurrence of order N

    s_t = p * s_(t-1) + u_t  (per mode n),   y_t = sum_n R_n s_t,n.

The operator fuses the gates and the skip:

    u = pre * v,   out = post * (y + dskip * u).

Layout: one program per (batch, tile of `block_c` channels, segment of the sequence). A
segment is walked row by row (a `fori_loop` over chunks of `chunk` rows, the rows of a chunk
unrolled), the [N, block_c] float32 state in registers; every input byte is read once per
pass and every output byte written once. Segments make the grid wide enough for the GPU: a
first pass computes each segment's state from a zero start, a small kernel chains the
[B, S, N, C] segment states (one program per channel tile walks the S segments), and the main
pass starts every segment from its true state. All math is float32 and exact up to rounding
(no p^-t scalings, any decay rate).

Backward (custom_vjp), with g = dout * post:
  - a forward walk recomputes s and y and carries z_t = sum_(j<=t) (t - j) p^(t-j) u_j
    (z_t = p (z_(t-1) + s_(t-1))): dpost = dout * y, dR = sum_t g_t s_t,
    dlog_pole = R sum_t g_t z_t, ddskip = sum_t g_t u_t, and each segment's adjoint at its
    first row from a zero end, sum_tau p^tau g_tau;
  - a chain kernel carries the adjoints from the right;
  - a reverse walk runs the adjoint a_t = p a_(t+1) + g_t: du = sum_n R_n a_t + dskip g,
    dpre = du v, dv = du pre.
The forward saves the segment-start states of s and z ([B, S, N, C], small), under the
checkpoint name SEGMENT_STATES, which the model's save_dots remat policies keep.

`gate_conv_gate_auto` picks the kernel on GPU and the plain-JAX reference (`gate_conv_gate`,
a chunked scan) elsewhere or for unsupported shapes. `featurized_gate_conv_gate_pallas` takes
the featurizer's inputs instead and featurizes each chunk's rows inside the same kernels; its
backward walks also apply the featurizer's transpose, dz[t] = sum_j w_j df[t + j], and reduce
the tap gradients, so no df stream reaches memory: the reverse walk keeps the last J - 1 rows
of dpre and dv and first steps back over the J - 1 rows past its segment (its adjoint window
is shifted by J - 1 rows, and the forward walk's segment adjoint with it), the forward walk
writes row t of dz_post once dpost[t + J - 1] is known and continues J - 1 rows past its
segment from the exact state there. `featurized_gate_conv_gate_proj_pallas` also applies the
output projection, its backward recomputing the segment-start states and taking the output
for dW_out from the backward's forward walk (no forward kernel in a rematerialised block).
This module depends on jax and pallas_kernels.output_projection only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import output_projection

logger = logging.getLogger(__name__)

# Defaults tuned on an H100 (bf16, B=1, C=4096, L=8K fwd+bwd; experiments/results/
# modal_conv_nvidia_h100_80gb_hbm3.md): chunk 8 beat 16 and 32, block_c 32 beat 16/64/128,
# one warp beat 2 and 4 (9x and 15x slower; measured, not profiled), 1024 programs beat
# 2048/4096/8192 (the sweep stopped at its edge: fewer programs are untried; chunk 4 is within
# noise for the module, faster for the backward's forward walk alone: DEFAULT_CHUNK_BWD_FORWARD).
# Chunk 4 halves the kernels' Triton compile (the coalescing pass grows with the square of the
# unrolled rows) but costs the module 0.8-5.3% of its run time (tune_mixers_nvidia_h100_80gb_
# hbm3.md, seventh run); the rotated chunk loop (_walk) halves it at no run-time cost.
DEFAULT_CHUNK = 8  # rows unrolled per loop iteration
# The backward's forward walk (modal_conv_bwd_forward) with 4-row chunks: 0.279 -> 0.250 ms on an
# H100 at C = 1920, L = 8K, where 4-row chunks slow the other kernels (bwd_reverse 0.136 ->
# 0.156; experiments/results/probe_tile_bandwidth_nvidia_h100_80gb_hbm3.md).
DEFAULT_CHUNK_BWD_FORWARD = 4
DEFAULT_BLOCK_C = 32
DEFAULT_NUM_WARPS = 1
DEFAULT_NUM_STAGES = 3
TARGET_PROGRAMS = 1024  # segment heuristic: split L until the grid has this many programs
MIN_SEGMENT_CHUNKS = 8  # segment heuristic: fewest chunks per program
MAX_ORDER = 64  # modes per channel the kernels take (padded to a power of two)
MAX_FEATURIZER_TAPS = 8  # featurizer taps the featurized kernels take (rows loaded before a chunk)
PAD_LOG_POLE = -1.0  # log pole of the padding modes (residue 0): bounded, harmless
# Checkpoint name of the segment-start states ([B, S, N, C] float32 s and z) that the forward
# saves for the backward: a remat policy that saves it spares the backward the state pass.
SEGMENT_STATES = "modal_conv_segment_states"


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and launch parameters of the modal-recurrence kernels.

  Every field left None is picked per call by the heuristic given here.

  Attributes:
    chunk: rows per loop iteration (unrolled), a power of two. None: DEFAULT_CHUNK.
    block_c: channels per program, a power of two dividing C. None: DEFAULT_BLOCK_C, halved
      while it does not divide C.
    segment_chunks: chunks per program along the sequence (every program walks
      chunk * segment_chunks rows; L is padded to a multiple of that). None: halved from the
      whole sequence while the grid has fewer than TARGET_PROGRAMS programs and a segment
      keeps >= MIN_SEGMENT_CHUNKS chunks.
    num_warps: Triton warps per program (all kernels). None: DEFAULT_NUM_WARPS.
    num_stages: software-pipelining depth of the chunk loops. None: DEFAULT_NUM_STAGES.
    chunk_bwd_forward: rows per loop iteration of the backward's forward walk
      (`modal_conv_bwd_forward`), a power of two dividing the segment's chunk * segment_chunks
      rows (the segments stay those of the other kernels). None: min(chunk,
      DEFAULT_CHUNK_BWD_FORWARD).
  """
  chunk: int | None = None
  block_c: int | None = None
  segment_chunks: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  chunk_bwd_forward: int | None = None

  @classmethod
  def get_default(cls) -> BlockSizes:
    return cls()


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def unsupported_reason(shape_BLC: tuple[int, ...], shape_CN: tuple[int, ...],
                       block_sizes: BlockSizes | None = None) -> str | None:
  """Why the Pallas kernels cannot take these shapes, or None when they can.

  Args:
    shape_BLC: shape of the gates and v, [B, L, C].
    shape_CN: shape of the log poles and residues, [C, N].
    block_sizes: requested tiles (None: defaults).

  Returns:
    A sentence giving the value, the constraint and the fix; None if supported.
  """
  block_sizes = block_sizes or BlockSizes.get_default()
  if len(shape_BLC) != 3 or len(shape_CN) != 2:
    return f"expected gates of rank 3 and poles of rank 2, got {shape_BLC} and {shape_CN}"
  channels = shape_BLC[2]
  if shape_CN[0] != channels:
    return f"poles for {shape_CN[0]} channels, gates have {channels}"
  if shape_CN[1] > MAX_ORDER:
    return f"modal order {shape_CN[1]} must be <= {MAX_ORDER}"
  if block_sizes.chunk is not None and not _is_pow2(block_sizes.chunk):
    return f"chunk {block_sizes.chunk} must be a power of two"
  block_c = _pick_block_c(channels, block_sizes)
  if not _is_pow2(block_c) or channels % block_c:
    return (f"block_c {block_c} must be a power of two dividing the channels {channels}; "
            "use the reference")
  if block_sizes.segment_chunks is not None and block_sizes.segment_chunks < 1:
    return f"segment_chunks {block_sizes.segment_chunks} must be >= 1"
  walk_chunk = block_sizes.chunk_bwd_forward
  if walk_chunk is not None:
    resolved = _resolve(block_sizes, tuple(shape_BLC))
    segment_rows = resolved.chunk * resolved.segment_chunks
    if not _is_pow2(walk_chunk) or segment_rows % walk_chunk:
      return (f"chunk_bwd_forward {walk_chunk} must be a power of two dividing the segment's "
              f"{segment_rows} rows (chunk * segment_chunks); leave it None for the default")
  return None


def _pick_block_c(channels: int, block_sizes: BlockSizes) -> int:
  if block_sizes.block_c is not None:
    return block_sizes.block_c
  block_c = DEFAULT_BLOCK_C
  while block_c > 1 and channels % block_c:
    block_c //= 2
  return block_c


def _resolve(block_sizes: BlockSizes | None, shape_BLC: tuple[int, ...]) -> BlockSizes:
  """Fills every None field of block_sizes by its heuristic (see BlockSizes)."""
  block_sizes = block_sizes or BlockSizes.get_default()
  batch, length, channels = shape_BLC
  chunk = block_sizes.chunk or DEFAULT_CHUNK
  block_c = _pick_block_c(channels, block_sizes)
  num_chunks = -(-length // chunk)
  segment_chunks = block_sizes.segment_chunks
  if segment_chunks is None:
    programs = batch * channels // block_c
    segment_chunks = _next_pow2(num_chunks)
    while (programs * -(-num_chunks // segment_chunks) < TARGET_PROGRAMS
           and segment_chunks // 2 >= MIN_SEGMENT_CHUNKS):
      segment_chunks //= 2
  segment_chunks = min(segment_chunks, num_chunks)
  return BlockSizes(chunk=chunk, block_c=block_c, segment_chunks=segment_chunks,
                    num_warps=block_sizes.num_warps or DEFAULT_NUM_WARPS,
                    num_stages=block_sizes.num_stages or DEFAULT_NUM_STAGES,
                    chunk_bwd_forward=(block_sizes.chunk_bwd_forward
                                       or min(chunk, DEFAULT_CHUNK_BWD_FORWARD)))


def _walk_sizes(bs: BlockSizes) -> BlockSizes:
  """bs with the backward's forward walk's chunk: the same segments, cut into
  chunk_bwd_forward-row chunks."""
  segment_rows = bs.chunk * bs.segment_chunks
  return dataclasses.replace(bs, chunk=bs.chunk_bwd_forward,
                             segment_chunks=segment_rows // bs.chunk_bwd_forward)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs of per-channel parameters are [N, dc] (modes on rows), sequence refs are the
# batch row's whole padded [Lp, dc] column tile; a program walks its segment's rows.
# ---------------------------------------------------------------------------------------------


class _WalkParts(NamedTuple):
  """The pieces of a chunk walk over this program's segment (see _walk)."""
  taps: tuple  # one entry per ref: None or that ref's featurizer taps
  halo: int  # max J - 1: the rows before a chunk that its featurized rows need
  chunk_base: Callable[[jax.Array], jax.Array]  # step -> first row of the step's chunk
  load: Callable[[jax.Array], tuple]  # step -> rows[k][i] as loaded (clamped to the segment)
  prepare: Callable[[tuple, jax.Array], tuple[tuple, tuple]]  # (loaded, base) -> (rows, raw)


def _walk_parts(refs, chunk: int, segment_chunks: int, reverse: bool, taps=None) -> _WalkParts:
  """Row addressing, loads and featurizing of _walk's chunks, apart from its loop."""
  first_row = pl.program_id(2) * segment_chunks * chunk
  taps = taps or (None,) * len(refs)
  halo = max([len(t) - 1 for t in taps if t] + [0])

  def chunk_base(step):
    index = segment_chunks - 1 - step if reverse else step
    return first_row + index * chunk

  # Loads only: nothing may read a loaded row in the step that loads it, or that step waits
  # for the load before processing the previous chunk (a row before the array start loads row
  # 0 here; prepare zeroes it).
  def load(step):
    base = chunk_base(jnp.minimum(step, segment_chunks - 1))
    return tuple(tuple(ref[pl.ds(jnp.maximum(base + i, 0) if i < 0 else base + i, 1), :]
                       for i in range(-halo if ref_taps else 0, chunk))
                 for ref, ref_taps in zip(refs, taps))

  def prepare(loaded, base):
    raw = tuple(
        tuple(jnp.where(base + i >= 0, r.astype(jnp.float32), 0.0) if i < 0
              else r.astype(jnp.float32) for i, r in zip(range(-halo if ref_taps else 0, chunk),
                                                         ref_rows))
        for ref_rows, ref_taps in zip(loaded, taps))
    rows = tuple(ref_rows if not ref_taps else _featurize_rows(ref_rows, ref_taps, halo, chunk)
                 for ref_rows, ref_taps in zip(raw, taps))
    return rows, raw

  return _WalkParts(taps, halo, chunk_base, load, prepare)


def _walk(refs, chunk: int, segment_chunks: int, reverse: bool, process, init, taps=None,
          with_raw: bool = False):
  """Runs `process(carry, base, rows)` over this program's segment, chunk by chunk (last
  chunk first if `reverse`); rows[k][i] is row base + i of refs[k], float32 [1, dc]. The next
  chunk's rows are loaded before the current chunk is processed (software prefetch: the loads
  are in flight during the chunk's arithmetic).

  taps: None, or one entry per ref: None, or the J featurizer taps ([1, dc] float32 each) of
  that ref, whose rows are then featurized, sum_j taps[j] * ref[t - j] (rows before 0 zero):
  each chunk also loads the J - 1 rows before it.
  with_raw: call `process(carry, base, rows, raw)`, raw[k] the float32 rows base - halo ...
  base + chunk - 1 of refs[k] as loaded (before featurizing; halo = max J - 1).
  """
  parts = _walk_parts(refs, chunk, segment_chunks, reverse, taps)

  def run(state, loaded, step):
    base = parts.chunk_base(step)
    rows, raw = parts.prepare(loaded, base)
    if with_raw:
      return process(state, base, rows, raw)
    return process(state, base, rows)

  # Step s loads chunk s and processes chunk s - 1 (loaded by step s - 1), so every row load
  # appears once in the kernel, with no copy of the loads before the loop, and the chunk's
  # arithmetic sits in a branch. Both cut Triton's compile (its coalescing pass, which walks
  # the dependence slice of every memory op): 220 -> 63 s for LI's kernels on the CPU proxy
  # (kernel_resources_evo2_1b_sm90.md), the module's 14 -> 7-8 s on an H100 at the same run
  # time within 1% (modal_conv_nvidia_h100_80gb_hbm3.md; experiments/ab_li_walk.py).
  def body(step, carry):
    state, loaded = carry
    next_loaded = parts.load(step)
    state = jax.lax.cond(step > 0, lambda: run(state, loaded, step - 1), lambda: state)
    return state, next_loaded

  zero_rows = tuple((jnp.zeros((1, ref.shape[-1]), ref.dtype),) * (parts.halo * bool(ref_taps)
                                                                     + chunk)
                    for ref, ref_taps in zip(refs, parts.taps))
  return jax.lax.fori_loop(0, segment_chunks + 1, body, (init, zero_rows))[0]


def _row_in_range(ref, row):
  """Row `row` of ref as [1, dc] float32, zero where row < 0 or row >= the ref's rows (the
  rows a segment's backward reads past its end: the next segment's, none after the last)."""
  num_rows = ref.shape[0]
  value = ref[pl.ds(jnp.clip(row, 0, num_rows - 1), 1), :].astype(jnp.float32)
  return jnp.where((row >= 0) & (row < num_rows), value, jnp.zeros_like(value))


def _featurize_rows(raw, taps, halo: int, count: int) -> tuple:
  """Featurized rows i < count, sum_j taps[j] * raw[halo + i - j], from raw rows that start
  `halo` rows before the first output row."""
  return tuple(sum(w_1C * raw[halo + i - j] for j, w_1C in enumerate(taps)) for i in range(count))


def _rows_after(refs, taps, row, halo: int) -> list:
  """Rows row ... row + halo - 1 of each ref (featurized where it has taps, from the halo rows
  before them), float32 and zero outside the array: the rows after a segment's end that its
  backward reads (the featurizer's transpose looks J - 1 rows ahead)."""
  raw = [tuple(_row_in_range(ref, row + i) for i in range(-halo if ref_taps else 0, halo))
         for ref, ref_taps in zip(refs, taps)]
  return [_featurize_rows(ref_raw, ref_taps, halo, halo) if ref_taps else ref_raw
          for ref_raw, ref_taps in zip(raw, taps)]


def _store_row_from(ref, row, value_1C, first_row):
  """ref[row] = value where row >= first_row (a masked store: rows before it are another
  program's)."""
  mask = jnp.broadcast_to(row >= first_row, value_1C.shape)
  plgpu.store(ref.at[pl.ds(jnp.maximum(row, 0), 1), :], value_1C.astype(ref.dtype), mask=mask)


def _stream_taps(wf_ref, num_taps: int):
  """(post, pre, v) featurizer taps from wf_ref [4 Jp, dc] (rows s Jp + j), each a list of
  num_taps [1, dc] float32 rows; None when num_taps is 0 (inputs are already featurized)."""
  if not num_taps:
    return None
  rows_per_stream = wf_ref.shape[0] // 4
  return tuple([wf_ref[pl.ds(s * rows_per_stream + j, 1), :].astype(jnp.float32)
                for j in range(num_taps)] for s in range(3))


def _states_kernel(wf_ref, p_ref, pre_ref, v_ref, s_ref, z_ref, *, chunk: int, segment_chunks: int,
                   num_taps: int):
  """Segment-local final states from a zero start: s (and z if z_ref is given)."""
  p_NC = p_ref[...]
  taps = _stream_taps(wf_ref, num_taps)

  def process(carry, base, rows):
    s_NC, z_NC = carry
    for pre_1C, v_1C in zip(*rows):
      if z_ref is not None:
        z_NC = p_NC * (z_NC + s_NC)
      s_NC = p_NC * s_NC + pre_1C * v_1C
    return s_NC, z_NC

  zeros = jnp.zeros_like(p_NC)
  s_NC, z_NC = _walk((pre_ref, v_ref), chunk, segment_chunks, False, process, (zeros, zeros),
                     taps and taps[1:])
  s_ref[...] = s_NC
  if z_ref is not None:
    z_ref[...] = z_NC


def _fwd_kernel(wf_ref, p_ref, r_ref, dskip_ref, s0_ref, post_ref, pre_ref, v_ref, out_ref, *,
                chunk: int, segment_chunks: int, num_taps: int):
  taps = _stream_taps(wf_ref, num_taps)
  p_NC = p_ref[...]
  r_NC = r_ref[...]
  dskip_1C = dskip_ref[...]

  def process(s_NC, base, rows):
    for i, (post_1C, pre_1C, v_1C) in enumerate(zip(*rows)):
      u_1C = pre_1C * v_1C
      s_NC = p_NC * s_NC + u_1C
      y_1C = jnp.sum(r_NC * s_NC, axis=0, keepdims=True) + dskip_1C * u_1C
      out_ref[pl.ds(base + i, 1), :] = (post_1C * y_1C).astype(out_ref.dtype)
    return s_NC

  _walk((post_ref, pre_ref, v_ref), chunk, segment_chunks, False, process, s0_ref[...], taps)


def _bwd_forward_kernel(wf_ref, lp_ref, p_ref, r_ref, dskip_ref, s0_ref, z0_ref, post_ref, pre_ref,
                        v_ref, dout_ref, dpost_ref, dr_ref, dz_ref, ddskip_ref, a_ref, *extra_refs,
                        chunk: int, segment_chunks: int, num_taps: int, with_output: bool = False):
  """Forward walk of the backward: dpost and the per-program partial parameter gradients, and
  the forward's output post * y into extra_refs[0] when with_output (output_projection).

  With featurizer taps (num_taps = J > 0) the inputs are the featurizer's, and the walk also
  applies the featurizer's transpose to dpost: dpost_ref receives the gradient of z_post,
  sum_j w[j] dpost[t + j] (row t written once row t + J - 1 is known; the J - 1 rows after the
  segment come from a short walk past its end from the exact state there), and extra_refs[-1]
  [Jp, dc] the tap-gradient partials sum_t dpost[t] z_post[t - j]. The reverse adjoint's
  partial a_ref then starts J - 1 rows into the segment and ends J - 1 rows past it (see
  _bwd_reverse_kernel).
  """
  taps = _stream_taps(wf_ref, num_taps)
  halo = max(num_taps - 1, 0)
  out_refs = extra_refs[:int(with_output)]
  lp_NC = lp_ref[...]
  p_NC = p_ref[...]
  r_NC = r_ref[...]
  dskip_1C = dskip_ref[...]
  first_row = pl.program_id(2) * segment_chunks * chunk
  end_row = first_row + segment_chunks * chunk

  def decay_from(row):
    # p^tau at `row`, tau its offset past the adjoint window's start (first_row + halo); the
    # rows before that start weigh 0 (see `live`). Exact rather than a long product of p.
    return jnp.exp(lp_NC * jnp.maximum(row - first_row - halo, 0).astype(jnp.float32))

  def accumulate_adjoint(a_NC, pw_NC, g_1C, row, may_precede: bool = True):
    # may_precede: whether `row` can lie before the window's start (statically false for a
    # chunk's rows from the halo-th on): only those rows pay for the selects.
    if not (halo and may_precede):
      return a_NC + pw_NC * g_1C, pw_NC * p_NC
    live = row - first_row >= halo
    return a_NC + jnp.where(live, pw_NC, 0.0) * g_1C, jnp.where(live, pw_NC * p_NC, pw_NC)

  def transpose_post(history, dpost_1C, row):
    """Writes z_post's gradient at row - halo; returns the history of the last halo dposts."""
    window = history + (dpost_1C,)
    _store_row_from(dpost_ref, row - halo, sum(w * d for w, d in zip(taps[0], window)), first_row)
    return window[1:]

  def process(carry, base, rows, raw=None):
    s_NC, z_NC, dr_NC, dz_NC, dd_1C, a_NC, history, dw = carry
    pw_NC = decay_from(base)
    for i, (post_1C, pre_1C, v_1C, dout_1C) in enumerate(zip(*rows)):
      u_1C = pre_1C * v_1C
      g_1C = dout_1C * post_1C
      z_NC = p_NC * (z_NC + s_NC)
      s_NC = p_NC * s_NC + u_1C
      y_1C = jnp.sum(r_NC * s_NC, axis=0, keepdims=True) + dskip_1C * u_1C
      dpost_1C = dout_1C * y_1C
      if taps:
        history = transpose_post(history, dpost_1C, base + i)
        dw = tuple(dw[j] + dpost_1C * raw[0][halo + i - j] for j in range(num_taps))
      else:
        dpost_ref[pl.ds(base + i, 1), :] = dpost_1C.astype(dpost_ref.dtype)
      for ref in out_refs:
        ref[pl.ds(base + i, 1), :] = (post_1C * y_1C).astype(ref.dtype)
      dr_NC = dr_NC + g_1C * s_NC
      dz_NC = dz_NC + g_1C * z_NC
      dd_1C = dd_1C + g_1C * u_1C
      a_NC, pw_NC = accumulate_adjoint(a_NC, pw_NC, g_1C, base + i, may_precede=i < halo)
    return s_NC, z_NC, dr_NC, dz_NC, dd_1C, a_NC, history, dw

  zeros = jnp.zeros_like(p_NC)
  zeros_1C = jnp.zeros_like(dskip_1C)
  init = (s0_ref[...], z0_ref[...], zeros, zeros, zeros_1C, zeros, (zeros_1C,) * halo,
          (zeros_1C,) * num_taps)
  refs = (post_ref, pre_ref, v_ref, dout_ref)
  s_NC, _, dr_NC, dz_NC, dd_1C, a_NC, history, dw = _walk(
      refs, chunk, segment_chunks, False, process, init, taps and taps + (None,),
      with_raw=bool(taps))
  if taps:
    # Past the segment's end: dpost of its J - 1 next rows for the transpose, and their part
    # of the shifted adjoint window.
    rows = _rows_after(refs, taps + (None,), end_row, halo)
    pw_NC = decay_from(end_row)
    for i, (post_1C, pre_1C, v_1C, dout_1C) in enumerate(zip(*rows)):
      u_1C = pre_1C * v_1C
      g_1C = dout_1C * post_1C
      s_NC = p_NC * s_NC + u_1C
      y_1C = jnp.sum(r_NC * s_NC, axis=0, keepdims=True) + dskip_1C * u_1C
      history = transpose_post(history, dout_1C * y_1C, end_row + i)
      a_NC, pw_NC = accumulate_adjoint(a_NC, pw_NC, g_1C, end_row + i)
    _store_tap_grads(extra_refs[-1], 0, dw)
  dr_ref[...] = dr_NC
  dz_ref[...] = dz_NC
  ddskip_ref[...] = dd_1C
  a_ref[...] = a_NC


def _store_tap_grads(ref, first: int, dw):
  """ref[first + j] = dw[j] for the J taps, zero for the padding rows up to first + Jp."""
  taps_pad = _next_pow2(len(dw))
  for j in range(taps_pad):
    ref[pl.ds(first + j, 1), :] = dw[j] if j < len(dw) else jnp.zeros_like(dw[0])


def _bwd_reverse_kernel(wf_ref, p_ref, r_ref, dskip_ref, a0_ref, post_ref, pre_ref, v_ref, dout_ref,
                        dpre_ref, dv_ref, *dw_refs, chunk: int, segment_chunks: int, num_taps: int):
  """Reverse walk of the backward: the adjoint recurrence, dpre and dv.

  With featurizer taps (num_taps = J > 0) dpre_ref and dv_ref receive the gradients of z_pre
  and z_v, sum_j w[j] d[t + j] (the last J - 1 dpre / dv rows carried), and dw_refs[0]
  [2 Jp, dc] the tap-gradient partials of pre (rows j) and v (rows Jp + j). a0 is then the
  adjoint J - 1 rows past the segment's end: the walk first steps back over those rows (the
  next segment's, read only) to have their dpre and dv.
  """
  taps = _stream_taps(wf_ref, num_taps)
  halo = max(num_taps - 1, 0)
  p_NC = p_ref[...]
  r_NC = r_ref[...]
  dskip_1C = dskip_ref[...]
  end_row = (pl.program_id(2) + 1) * segment_chunks * chunk

  def adjoint_row(a_NC, post_1C, dout_1C):
    g_1C = dout_1C * post_1C
    a_NC = p_NC * a_NC + g_1C
    return a_NC, jnp.sum(r_NC * a_NC, axis=0, keepdims=True) + dskip_1C * g_1C

  def process(carry, base, rows, raw=None):
    a_NC, next_pre, next_v, dw = carry
    for i in reversed(range(chunk)):
      post_1C, pre_1C, v_1C, dout_1C = (ref_rows[i] for ref_rows in rows)
      a_NC, du_1C = adjoint_row(a_NC, post_1C, dout_1C)
      dpre_1C, dv_1C = du_1C * v_1C, du_1C * pre_1C
      if taps:
        next_pre, next_v = (dpre_1C,) + next_pre, (dv_1C,) + next_v
        dpre_1C = sum(w * d for w, d in zip(taps[1], next_pre))
        dv_1C = sum(w * d for w, d in zip(taps[2], next_v))
        dw = tuple(dw[j] + next_pre[0] * raw[1][halo + i - j] for j in range(num_taps)) + tuple(
            dw[num_taps + j] + next_v[0] * raw[2][halo + i - j] for j in range(num_taps))
        next_pre, next_v = next_pre[:halo], next_v[:halo]
      dpre_ref[pl.ds(base + i, 1), :] = dpre_1C.astype(dpre_ref.dtype)
      dv_ref[pl.ds(base + i, 1), :] = dv_1C.astype(dv_ref.dtype)
    return a_NC, next_pre, next_v, dw

  a_NC = a0_ref[...]
  refs = (post_ref, pre_ref, v_ref, dout_ref)
  next_pre, next_v = (), ()
  if taps:
    rows = _rows_after(refs, taps + (None,), end_row, halo)
    for i in reversed(range(halo)):
      post_1C, pre_1C, v_1C, dout_1C = (ref_rows[i] for ref_rows in rows)
      a_NC, du_1C = adjoint_row(a_NC, post_1C, dout_1C)
      next_pre, next_v = (du_1C * v_1C,) + next_pre, (du_1C * pre_1C,) + next_v
  zeros_1C = jnp.zeros_like(dskip_1C)
  _, _, _, dw = _walk(refs, chunk, segment_chunks, True, process,
                      (a_NC, next_pre, next_v, (zeros_1C,) * (2 * num_taps)),
                      taps and taps + (None,), with_raw=bool(taps))
  if taps:
    _store_tap_grads(dw_refs[0], 0, dw[:num_taps])
    _store_tap_grads(dw_refs[0], _next_pow2(num_taps), dw[num_taps:])


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------------------------


def _specs(batch: int, padded_len: int, channels: int, order: int, bs: BlockSizes):
  segments = padded_len // (bs.chunk * bs.segment_chunks)
  grid = (batch, channels // bs.block_c, segments)
  tile = pl.BlockSpec((None, padded_len, bs.block_c), lambda b, c, s: (b, 0, c))
  param = pl.BlockSpec((order, bs.block_c), lambda b, c, s: (0, c))
  skip = pl.BlockSpec((1, bs.block_c), lambda b, c, s: (0, c))
  state = pl.BlockSpec((None, None, order, bs.block_c), lambda b, c, s: (b, s, 0, c))
  row = pl.BlockSpec((None, None, 1, bs.block_c), lambda b, c, s: (b, s, 0, c))
  return grid, segments, tile, param, skip, state, row


def _taps_spec(wf, bs: BlockSizes):
  return pl.BlockSpec((wf.shape[0], bs.block_c), lambda b, c, s: (0, c))


def _call(kernel, name, bs, grid, in_specs, out_specs, out_shape, interpret, num_taps, wf, *args):
  """pallas_call of one kernel; its first input is always the featurizer taps `wf` (read only
  when num_taps > 0)."""
  kernel = functools.partial(kernel, chunk=bs.chunk, segment_chunks=bs.segment_chunks,
                             num_taps=num_taps)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[_taps_spec(wf, bs)] + list(in_specs),
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name=name,
  )(wf, *args)


def _stack_taps(w_feat_S3: tuple | None, channels: int) -> tuple[jax.Array, int]:
  """(wf [4 Jp, C] float32 with rows s Jp + j = tap j of stream s, J) from the (post, pre, v)
  taps [C, J] each; None: a [4, C] zero placeholder and J = 0 (inputs already featurized)."""
  if w_feat_S3 is None:
    return jnp.zeros((4, channels), jnp.float32), 0
  num_taps = w_feat_S3[0].shape[1]
  taps_pad = _next_pow2(num_taps)
  streams = [jnp.pad(w.astype(jnp.float32).T, ((0, taps_pad - num_taps), (0, 0))) for w in w_feat_S3]
  return jnp.concatenate(streams + [jnp.zeros_like(streams[0])]), num_taps


def _segment_states(p_NC, pre, v, bs, interpret, with_z, wf, num_taps):
  batch, padded_len, channels = v.shape
  order = p_NC.shape[0]
  grid, segments, tile, param, _, state, _ = _specs(batch, padded_len, channels, order, bs)
  shape = jax.ShapeDtypeStruct((batch, segments, order, channels), jnp.float32)
  kernel = _states_kernel
  if not with_z:
    kernel = lambda w, p, pr, vv, s, **kw: _states_kernel(w, p, pr, vv, s, None, **kw)  # noqa: E731
  out = _call(kernel, "modal_conv_states", bs, grid, [param, tile, tile],
              (state, state) if with_z else state, (shape, shape) if with_z else shape,
              interpret, num_taps, wf, p_NC, pre, v)
  return out if with_z else (out, None)


# Segments a chain kernel walks unrolled (all loads issued up front); more run in a fori_loop.
MAX_UNROLLED_SEGMENTS = 64


def _segment_loop(segments: int, reverse: bool, body, init):
  """body(k, carry) -> carry over the segments k (last first if reverse): unrolled up to
  MAX_UNROLLED_SEGMENTS, else a fori_loop."""
  index = (lambda step: segments - 1 - step) if reverse else (lambda step: step)
  if segments <= MAX_UNROLLED_SEGMENTS:
    carry = init
    for step in range(segments):
      carry = body(index(step), carry)
    return carry
  return jax.lax.fori_loop(0, segments, lambda step, carry: body(index(step), carry), init)


def _chain_forward_kernel(p_ref, lsp_ref, s_hat_ref, *refs, segments: int):
  """Segment-start states of one channel tile from the segment-local final ones, in segment
  order: refs are (z_hat, s0, z0) or (s0,); state refs are [S N, dc] (segment k's rows k N ...)."""
  z_hat_ref, s0_ref, z0_ref = refs if len(refs) == 3 else (None, refs[0], None)
  p_NC = p_ref[...]
  lsp_NC = lsp_ref[...]
  order = p_NC.shape[0]

  def body(k, carry):
    s_NC, z_NC = carry
    rows = pl.ds(k * order, order)
    s0_ref[rows, :] = s_NC
    if z_hat_ref is not None:
      z0_ref[rows, :] = z_NC
      z_NC = p_NC * z_NC + lsp_NC * s_NC + z_hat_ref[rows, :]
    return p_NC * s_NC + s_hat_ref[rows, :], z_NC

  zeros = jnp.zeros_like(p_NC)
  _segment_loop(segments, False, body, (zeros, zeros))


def _chain_reverse_kernel(p_ref, a_hat_ref, c_ref, *, segments: int):
  """Adjoint entering each segment of one channel tile from the right, last segment first."""
  p_NC = p_ref[...]
  order = p_NC.shape[0]

  def body(k, c_NC):
    rows = pl.ds(k * order, order)
    c_ref[rows, :] = c_NC
    return p_NC * c_NC + a_hat_ref[rows, :]

  _segment_loop(segments, True, body, jnp.zeros_like(p_NC))


def _chain_call(kernel, name: str, params: tuple, states: tuple, num_outputs: int, block_c: int,
                interpret: bool) -> tuple:
  """pallas_call of a chain kernel: one program per (batch, channel tile) walks the S segments.
  params are [N, C]; states and outputs [B, S, N, C] float32 (passed as [B, S N, C])."""
  batch, segments, order, channels = states[0].shape
  param = pl.BlockSpec((order, block_c), lambda b, c: (0, c))
  chain = pl.BlockSpec((None, segments * order, block_c), lambda b, c: (b, 0, c))
  flat = jax.ShapeDtypeStruct((batch, segments * order, channels), jnp.float32)
  outs = pl.pallas_call(
      functools.partial(kernel, segments=segments),
      grid=(batch, channels // block_c),
      in_specs=[param] * len(params) + [chain] * len(states),
      out_specs=[chain] * num_outputs,
      out_shape=[flat] * num_outputs,
      compiler_params=plgpu.CompilerParams(num_warps=DEFAULT_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name=name,
  )(*params, *(x.reshape(flat.shape) for x in states))
  return tuple(out.reshape(states[0].shape) for out in outs)


def _chain_forward(s_hat_BSNC, z_hat_BSNC, p_seg_NC, block_c: int, interpret: bool):
  """Segment-start states from segment-local final ones: s0_(k+1) = P s0_k + s_hat_k,
  z0_(k+1) = P z0_k + Ls P s0_k + z_hat_k (P = p^Ls, Ls rows per segment), s0_0 = z0_0 = 0;
  z0 is None when z_hat is.

  One small kernel walks the S segments per channel tile (unrolled up to
  MAX_UNROLLED_SEGMENTS): an XLA associative scan over S = 32 [N, C] states launched a dozen
  concatenates, slices and products, 0.38 ms a step over 7 LI layers at evo2-1b, L = 8K (H200
  profile, 2026-12-06).
  """
  p_seg, ls_p = p_seg_NC
  if z_hat_BSNC is None:
    (s0,) = _chain_call(_chain_forward_kernel, "modal_conv_chain", (p_seg, ls_p), (s_hat_BSNC,),
                        1, block_c, interpret)
    return s0, None
  return _chain_call(_chain_forward_kernel, "modal_conv_chain", (p_seg, ls_p),
                     (s_hat_BSNC, z_hat_BSNC), 2, block_c, interpret)


def _chain_reverse(a_hat_BSNC, p_seg_NC, block_c: int, interpret: bool):
  """Adjoint entering each segment from the right: c_k = a_hat_(k+1) + P c_(k+1), c_last = 0
  (one kernel, as in _chain_forward)."""
  (c,) = _chain_call(_chain_reverse_kernel, "modal_conv_chain_reverse", (p_seg_NC,),
                     (a_hat_BSNC,), 1, block_c, interpret)
  return c


def _prepare(log_poles_CN, residues_CN, dskip_C, bs, padded_len):
  """[N', C] float32 log poles, poles, residues (N' = N padded to a power of two), the
  [1, C] skip, and the per-segment decay P = p^Ls with Ls P."""
  order = log_poles_CN.shape[1]
  pad = _next_pow2(order) - order
  lp = jnp.pad(log_poles_CN.astype(jnp.float32), ((0, 0), (0, pad)),
               constant_values=PAD_LOG_POLE).T
  r = jnp.pad(residues_CN.astype(jnp.float32), ((0, 0), (0, pad))).T
  seg_len = bs.chunk * bs.segment_chunks
  p_seg = jnp.exp(lp * seg_len)
  return lp, jnp.exp(lp), r, dskip_C.astype(jnp.float32)[None, :], (p_seg, seg_len * p_seg)


def _pad_rows(x_BLC: jax.Array, padded_len: int) -> jax.Array:
  pad = padded_len - x_BLC.shape[1]
  return jnp.pad(x_BLC, ((0, 0), (0, pad), (0, 0))) if pad else x_BLC


def _padded_len(length: int, bs: BlockSizes) -> int:
  seg_len = bs.chunk * bs.segment_chunks
  return -(-length // seg_len) * seg_len


def _fwd_impl(post, pre, v, log_poles_CN, residues_CN, dskip_C, bs, interpret, with_z,
              w_feat_S3=None):
  """Output [B, L, C] and the saved segment-start states; with w_feat_S3 ((post, pre, v) taps
  [C, J] each) the three inputs are the featurizer's inputs, featurized inside the kernels."""
  batch, length, channels = v.shape
  padded_len = _padded_len(length, bs)
  pad = functools.partial(_pad_rows, padded_len=padded_len)
  post_p, pre_p, v_p = pad(post), pad(pre), pad(v)
  wf, num_taps = _stack_taps(w_feat_S3, channels)
  _, p_NC, r_NC, dskip_1C, p_seg = _prepare(log_poles_CN, residues_CN, dskip_C, bs, padded_len)
  s_hat, z_hat = _segment_states(p_NC, pre_p, v_p, bs, interpret, with_z, wf, num_taps)
  s0, z0 = _chain_forward(s_hat, z_hat, p_seg, bs.block_c, interpret)
  grid, _, tile, param, skip, state, _ = _specs(batch, padded_len, channels, p_NC.shape[0], bs)
  out = _call(_fwd_kernel, "modal_conv_fwd", bs, grid, [param, param, skip, state, tile, tile,
                                                          tile], tile,
              jax.ShapeDtypeStruct(v_p.shape, v.dtype), interpret, num_taps, wf,
              p_NC, r_NC, dskip_1C, s0, post_p, pre_p, v_p)
  return out[:, :length], (s0, z0)


def _bwd_impl(bs, interpret, post, pre, v, log_poles_CN, residues_CN, dskip_C, s0, z0, dout,
              w_feat_S3=None, with_output=False):
  """Gradients of the kernels' (post, pre, v) inputs, then with w_feat_S3 (the inputs are the
  featurizer's) the (post, pre, v) tap gradients [C, J], then log poles, residues, dskip, then
  (with_output) the forward's output [B, Lp, C]. The featurizer's transpose and tap gradients
  are computed by the two backward walks themselves (no df stream reaches memory). s0 and z0
  are the forward's segment-start states [B, S, N', C]."""
  batch, length, channels = v.shape
  order = log_poles_CN.shape[1]
  padded_len = _padded_len(length, bs)
  pad = functools.partial(_pad_rows, padded_len=padded_len)
  post_p, pre_p, v_p, dout_p = pad(post), pad(pre), pad(v), pad(dout.astype(v.dtype))
  wf, num_taps = _stack_taps(w_feat_S3, channels)
  lp_NC, p_NC, r_NC, dskip_1C, p_seg = _prepare(log_poles_CN, residues_CN, dskip_C, bs,
                                                padded_len)
  grid, segments, tile, param, skip, state, row = _specs(batch, padded_len, channels,
                                                         p_NC.shape[0], bs)
  state_shape = jax.ShapeDtypeStruct((batch, segments) + p_NC.shape, jnp.float32)

  def tap_grads(streams: int):
    rows = streams * _next_pow2(num_taps)
    spec = pl.BlockSpec((None, None, rows, bs.block_c), lambda b, c, s: (b, s, 0, c))
    return ((spec,), (jax.ShapeDtypeStruct((batch, segments, rows, channels), jnp.float32),)
            ) if num_taps else ((), ())

  fwd_tap_spec, fwd_tap_shape = tap_grads(1)
  out_specs = (tile, state, state, row, state) + (tile,) * with_output + fwd_tap_spec
  out_shapes = ((jax.ShapeDtypeStruct(post_p.shape, post.dtype), state_shape, state_shape,
                 jax.ShapeDtypeStruct((batch, segments, 1, channels), jnp.float32), state_shape)
                + (jax.ShapeDtypeStruct(v_p.shape, v.dtype),) * with_output + fwd_tap_shape)
  dpost, dr, dz, ddskip, a_hat, *rest = _call(
      functools.partial(_bwd_forward_kernel, with_output=with_output), "modal_conv_bwd_forward",
      _walk_sizes(bs), grid, [param, param, param, skip, state, state, tile, tile, tile, tile],
      out_specs, out_shapes, interpret, num_taps, wf, lp_NC, p_NC, r_NC, dskip_1C, s0, z0,
      post_p, pre_p, v_p, dout_p)
  out, dw_post = rest[:int(with_output)], rest[int(with_output):]
  a0 = _chain_reverse(a_hat, p_seg[0], bs.block_c, interpret)
  rev_tap_spec, rev_tap_shape = tap_grads(2)
  dpre, dv, *dw_pre_v = _call(
      _bwd_reverse_kernel, "modal_conv_bwd_reverse", bs, grid,
      [param, param, skip, state, tile, tile, tile, tile], (tile, tile) + rev_tap_spec,
      (jax.ShapeDtypeStruct(pre_p.shape, pre.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype))
      + rev_tap_shape, interpret, num_taps, wf, p_NC, r_NC, dskip_1C, a0, post_p, pre_p, v_p,
      dout_p)
  taps = ()
  if num_taps:
    taps_pad = _next_pow2(num_taps)
    dw_rows = jnp.concatenate([dw_post[0], dw_pre_v[0]], axis=2).sum((0, 1))  # [3 Jp, C]
    taps = (tuple(dw_rows[k * taps_pad:k * taps_pad + num_taps].T.astype(w.dtype)
                  for k, w in enumerate(w_feat_S3)),)
  dr_CN = dr.sum((0, 1)).T[:, :order]
  dlp_CN = (r_NC * dz.sum((0, 1))).T[:, :order]
  return ((dpost, dpre, dv),) + taps + (dlp_CN.astype(log_poles_CN.dtype),
                                        dr_CN.astype(residues_CN.dtype),
                                        ddskip.sum((0, 1, 2)).astype(dskip_C.dtype)) + tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _modal_gcg(post, pre, v, log_poles_CN, residues_CN, dskip_C, bs, interpret):
  return _fwd_impl(post, pre, v, log_poles_CN, residues_CN, dskip_C, bs, interpret, False)[0]


def _named_states(s0, z0):
  """The segment-start states a forward saves for its backward, named SEGMENT_STATES."""
  return checkpoint_name(s0, SEGMENT_STATES), checkpoint_name(z0, SEGMENT_STATES)


def _modal_gcg_fwd(post, pre, v, log_poles_CN, residues_CN, dskip_C, bs, interpret):
  out, states = _fwd_impl(post, pre, v, log_poles_CN, residues_CN, dskip_C, bs, interpret, True)
  return out, (post, pre, v, log_poles_CN, residues_CN, dskip_C, *_named_states(*states))


def _modal_gcg_bwd(bs, interpret, residuals, dout):
  post, pre, v = residuals[:3]
  length = v.shape[1]
  streams, dlp, dr, ddskip = _bwd_impl(bs, interpret, *residuals, dout)
  return tuple(d[:, :length] for d in streams) + (dlp, dr, ddskip)


_modal_gcg.defvjp(_modal_gcg_fwd, _modal_gcg_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _modal_fgcg(z_post, z_pre, z_v, w_post, w_pre, w_v, log_poles_CN, residues_CN, dskip_C, bs,
                interpret):
  return _fwd_impl(z_post, z_pre, z_v, log_poles_CN, residues_CN, dskip_C, bs, interpret, False,
                   (w_post, w_pre, w_v))[0]


def _modal_fgcg_fwd(z_post, z_pre, z_v, w_post, w_pre, w_v, log_poles_CN, residues_CN, dskip_C,
                    bs, interpret):
  out, states = _fwd_impl(z_post, z_pre, z_v, log_poles_CN, residues_CN, dskip_C, bs, interpret,
                          True, (w_post, w_pre, w_v))
  return out, (z_post, z_pre, z_v, w_post, w_pre, w_v, log_poles_CN, residues_CN, dskip_C,
               *_named_states(*states))


def _modal_fgcg_bwd(bs, interpret, residuals, dout):
  return _modal_fgcg_bwd_impl(bs, interpret, residuals, dout)


def _modal_fgcg_bwd_impl(bs, interpret, residuals, dout, with_output=False):
  """The nine input gradients, then (with_output) the forward's output [B, L, C]."""
  z_post, z_pre, z_v, w_post, w_pre, w_v, log_poles_CN, residues_CN, dskip_C, s0, z0 = residuals
  length = z_v.shape[1]
  dz, dw, dlp, dr, ddskip, *out = _bwd_impl(bs, interpret, z_post, z_pre, z_v, log_poles_CN,
                                            residues_CN, dskip_C, s0, z0, dout,
                                            (w_post, w_pre, w_v), with_output)
  return (tuple(d[:, :length] for d in dz) + dw + (dlp, dr, ddskip)
          + tuple(y[:, :length] for y in out))


_modal_fgcg.defvjp(_modal_fgcg_fwd, _modal_fgcg_bwd)


def _modal_fgcg_projected_fwd(bs, interpret, operands):
  return _modal_fgcg_fwd(*operands, bs, interpret)


def _modal_fgcg_projected_bwd(bs, interpret, residuals, dy):
  # A rematerialised block whose policy saves SEGMENT_STATES reruns none of the forward's
  # kernels (the output for dW_out comes from the backward's forward walk); one that does not
  # reruns the state pass and its chain to get them.
  *grads, y = _modal_fgcg_bwd_impl(bs, interpret, residuals, dy, with_output=True)
  return y, tuple(grads)


def featurized_unsupported_reason(shape_BLC: tuple[int, ...], shape_CJ: tuple[int, ...],
                                  shape_CN: tuple[int, ...],
                                  block_sizes: BlockSizes | None = None) -> str | None:
  """Why featurized_gate_conv_gate_pallas cannot take these shapes, or None when it can
  (unsupported_reason's conditions, plus the featurizer taps [C, J])."""
  reason = unsupported_reason(shape_BLC, shape_CN, block_sizes)
  if reason:
    return reason
  if len(shape_CJ) != 2 or shape_CJ[0] != shape_BLC[2]:
    return f"featurizer taps {shape_CJ} must be [C, J] for C = {shape_BLC[2]} channels"
  if not 1 <= shape_CJ[1] <= MAX_FEATURIZER_TAPS:
    return f"featurizer of {shape_CJ[1]} taps: the kernels take 1 to {MAX_FEATURIZER_TAPS}"
  return None


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def featurized_gate_conv_gate_pallas(z_post_BLC: jax.Array, z_pre_BLC: jax.Array,
                                     z_v_BLC: jax.Array, w_post_CJ: jax.Array, w_pre_CJ: jax.Array,
                                     w_v_CJ: jax.Array, log_poles_CN: jax.Array,
                                     residues_CN: jax.Array, dskip_C: jax.Array, *,
                                     block_sizes: BlockSizes | None = None,
                                     interpret: bool = False) -> jax.Array:
  """Hyena-LI from the featurizer's inputs: gate_conv_gate_pallas(f(z_post), f(z_pre), f(z_v))
  with f(z)[t] = sum_j w[:, j] z[t - j] (causal, w[:, 0] on the current token), the featurizer
  computed inside the kernels from each chunk's rows and the J - 1 before them, so the
  featurized streams never reach memory. Gradients (custom_vjp) for all nine inputs; the
  featurizer's transpose and tap gradients are computed inside the two backward walks.

  Args:
    z_post_BLC, z_pre_BLC, z_v_BLC: [B, L, C] featurizer inputs (the in-projection's streams).
    w_post_CJ, w_pre_CJ, w_v_CJ: [C, J] featurizer taps of each stream.
    log_poles_CN, residues_CN, dskip_C: as in gate_conv_gate_pallas (dskip required).
    block_sizes, interpret: as in gate_conv_gate_pallas.

  Returns:
    [B, L, C] in z_v's dtype.

  Raises:
    ValueError: shapes the kernels do not take (see `featurized_unsupported_reason`).
  """
  resolved = _featurized_checked(z_post_BLC, z_pre_BLC, z_v_BLC, w_post_CJ, w_pre_CJ, w_v_CJ,
                                 log_poles_CN, dskip_C, block_sizes)
  return _modal_fgcg(z_post_BLC, z_pre_BLC, z_v_BLC, w_post_CJ, w_pre_CJ, w_v_CJ, log_poles_CN,
                     residues_CN, dskip_C, resolved, interpret)


def _featurized_checked(z_post_BLC, z_pre_BLC, z_v_BLC, w_post_CJ, w_pre_CJ, w_v_CJ, log_poles_CN,
                        dskip_C, block_sizes) -> BlockSizes:
  """Resolved block sizes after checking the featurized kernels' shapes (ValueError otherwise)."""
  if not z_post_BLC.shape == z_pre_BLC.shape == z_v_BLC.shape:
    raise ValueError(f"the three streams must share one shape, got {z_post_BLC.shape}, "
                     f"{z_pre_BLC.shape}, {z_v_BLC.shape}")
  if not w_post_CJ.shape == w_pre_CJ.shape == w_v_CJ.shape:
    raise ValueError(f"the three streams' taps must share one shape, got {w_post_CJ.shape}, "
                     f"{w_pre_CJ.shape}, {w_v_CJ.shape}")
  reason = featurized_unsupported_reason(z_v_BLC.shape, w_v_CJ.shape, log_poles_CN.shape,
                                         block_sizes)
  if reason:
    raise ValueError(reason)
  if dskip_C.shape != (z_v_BLC.shape[2],):
    raise ValueError(f"dskip shape {dskip_C.shape} must be ({z_v_BLC.shape[2]},)")
  return _resolve(block_sizes, z_v_BLC.shape)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def featurized_gate_conv_gate_proj_pallas(z_post_BLC: jax.Array, z_pre_BLC: jax.Array,
                                          z_v_BLC: jax.Array, w_post_CJ: jax.Array,
                                          w_pre_CJ: jax.Array, w_v_CJ: jax.Array,
                                          log_poles_CN: jax.Array, residues_CN: jax.Array,
                                          dskip_C: jax.Array, w_out_CE: jax.Array, *,
                                          block_sizes: BlockSizes | None = None,
                                          interpret: bool = False) -> jax.Array:
  """featurized_gate_conv_gate_pallas(...) @ w_out, whose backward takes the gate output for
  dW_out from the backward's forward walk (output_projection.project_output): a
  rematerialised block reruns only the segment-state pass, not the main forward kernel.
  Arguments as featurized_gate_conv_gate_pallas, plus w_out_CE [C, E].

  Returns:
    [B, L, E] in z_v's dtype. Gradients for the nine kernel inputs and w_out.
  """
  resolved = _featurized_checked(z_post_BLC, z_pre_BLC, z_v_BLC, w_post_CJ, w_pre_CJ, w_v_CJ,
                                 log_poles_CN, dskip_C, block_sizes)
  if w_out_CE.ndim != 2 or w_out_CE.shape[0] != z_v_BLC.shape[2]:
    raise ValueError(f"w_out shape {w_out_CE.shape} must be ({z_v_BLC.shape[2]}, E)")
  return output_projection.project_output(
      functools.partial(_modal_fgcg_projected_fwd, resolved, interpret),
      functools.partial(_modal_fgcg_projected_bwd, resolved, interpret),
      (z_post_BLC, z_pre_BLC, z_v_BLC, w_post_CJ, w_pre_CJ, w_v_CJ, log_poles_CN, residues_CN,
       dskip_C), w_out_CE)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gate_conv_gate_pallas(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                          log_poles_CN: jax.Array, residues_CN: jax.Array,
                          dskip_C: jax.Array | None = None, *,
                          block_sizes: BlockSizes | None = None,
                          interpret: bool = False) -> jax.Array:
  """Hyena-LI gate-conv-gate by the modal-recurrence Pallas (Triton) kernels, differentiable.

  out = post_gate * (conv(u, h) + dskip * u), u = pre_gate * v, with the modal filter
  h[c, t] = sum_n R[c, n] exp(log_pole[c, n] t) (h[:, 0] on the current token; causal);
  float32 math. Gradients (custom_vjp) for all six inputs come from the backward kernels.

  Args:
    post_gate_BLC, pre_gate_BLC, v_BLC: [B, L, C], bf16 or float32, any L (padded inside).
    log_poles_CN: [C, N] log of the real poles (negative for a decaying filter).
    residues_CN: [C, N] residues.
    dskip_C: [C] skip weights, or None.
    block_sizes: tiles and launch parameters; None: BlockSizes.get_default().
    interpret: run the kernels in Pallas interpret mode (CPU), for tests.

  Returns:
    [B, L, C] in v's dtype.

  Raises:
    ValueError: shapes the kernels do not take (see `unsupported_reason`).
  """
  if not pre_gate_BLC.shape == post_gate_BLC.shape == v_BLC.shape:
    raise ValueError(f"gates and v must share one shape, got {post_gate_BLC.shape}, "
                     f"{pre_gate_BLC.shape}, {v_BLC.shape}")
  if log_poles_CN.shape != residues_CN.shape:
    raise ValueError(f"log poles {log_poles_CN.shape} and residues {residues_CN.shape} must "
                     "share one shape")
  reason = unsupported_reason(v_BLC.shape, log_poles_CN.shape, block_sizes)
  if reason:
    raise ValueError(reason)
  channels = v_BLC.shape[2]
  if dskip_C is None:
    dskip_C = jnp.zeros((channels,), jnp.float32)
  elif dskip_C.shape != (channels,):
    raise ValueError(f"dskip shape {dskip_C.shape} must be ({channels},)")
  resolved = _resolve(block_sizes, v_BLC.shape)
  return _modal_gcg(post_gate_BLC, pre_gate_BLC, v_BLC, log_poles_CN, residues_CN, dskip_C,
                    resolved, interpret)


def gate_conv_gate_auto(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                        log_poles_CN: jax.Array, residues_CN: jax.Array,
                        dskip_C: jax.Array | None = None, *,
                        block_sizes: BlockSizes | None = None) -> jax.Array:
  """The Pallas kernels on GPU, else the plain-JAX reference `gate_conv_gate` (same result)."""
  backend = jax.default_backend()
  reason = None if backend == "gpu" else f"backend {backend!r} is not a GPU"
  reason = reason or unsupported_reason(v_BLC.shape, log_poles_CN.shape, block_sizes)
  if reason:
    logger.debug("modal gate_conv_gate_auto: plain-JAX reference (%s)", reason)
    return gate_conv_gate(post_gate_BLC, pre_gate_BLC, v_BLC, log_poles_CN, residues_CN,
                          dskip_C)
  return gate_conv_gate_pallas(post_gate_BLC, pre_gate_BLC, v_BLC, log_poles_CN, residues_CN,
                               dskip_C, block_sizes=block_sizes)


# ---------------------------------------------------------------------------------------------
# Plain-JAX reference: the same recurrence as a chunked scan (autodiff gradients).
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("chunk",))
def gate_conv_gate(post_gate_BLC: jax.Array, pre_gate_BLC: jax.Array, v_BLC: jax.Array,
                   log_poles_CN: jax.Array, residues_CN: jax.Array,
                   dskip_C: jax.Array | None = None, chunk: int = 64) -> jax.Array:
  """post * (conv(u, h_modal) + dskip * u), u = pre * v, by a scan over chunks of `chunk` rows
  (exact Toeplitz inside a chunk, the N-mode state between chunks); float32 math.

  Returns:
    [B, L, C] in v's dtype.
  """
  batch, length, channels = v_BLC.shape
  hi = jax.lax.Precision.HIGHEST
  lp = log_poles_CN.astype(jnp.float32)
  r = residues_CN.astype(jnp.float32)
  u = pre_gate_BLC.astype(jnp.float32) * v_BLC.astype(jnp.float32)
  chunk = min(chunk, length)
  padded = -(-length // chunk) * chunk
  u_p = jnp.pad(u, ((0, 0), (0, padded - length), (0, 0)))
  u_KBTC = jnp.moveaxis(u_p.reshape(batch, padded // chunk, chunk, channels), 1, 0)
  offsets = jnp.arange(chunk, dtype=jnp.float32)
  lag = offsets[:, None] - offsets[None, :]
  decay_CNTT = jnp.exp(lp[:, :, None, None] * jnp.maximum(lag, 0.0))
  toeplitz_CTT = jnp.where(lag >= 0, jnp.einsum("cn,cnij->cij", r, decay_CNTT, precision=hi),
                           0.0)
  readout_CTN = r[:, None, :] * jnp.exp(lp[:, None, :] * (offsets[None, :, None] + 1.0))
  in_decay_CNT = jnp.exp(lp[:, :, None] * (chunk - 1.0 - offsets))
  chunk_decay_CN = jnp.exp(lp * chunk)

  def step(state_BCN, u_BTC):
    y = jnp.einsum("cij,bjc->bic", toeplitz_CTT, u_BTC, precision=hi)
    y = y + jnp.einsum("ctn,bcn->btc", readout_CTN, state_BCN, precision=hi)
    state_BCN = chunk_decay_CN * state_BCN + jnp.einsum("cnt,btc->bcn", in_decay_CNT, u_BTC,
                                                        precision=hi)
    return state_BCN, y

  state0 = jnp.zeros((batch, channels, lp.shape[-1]), jnp.float32)
  _, y_KBTC = jax.lax.scan(step, state0, u_KBTC)
  y = jnp.moveaxis(y_KBTC, 0, 1).reshape(batch, padded, channels)[:, :length]
  if dskip_C is not None:
    y = y + dskip_C.astype(jnp.float32) * u
  return (post_gate_BLC.astype(jnp.float32) * y).astype(v_BLC.dtype)
