"""Context parallelism: the primitives equal one device, values and gradients.

p2p halo exchange, convolutions and gate-conv-gates (u exchange and the fused path), the
all-to-all switch for MR/LI, the zigzag layout of each, and ring / all-gather attention (with
and without zigzag, several tiles per block; with zigzag also through the Pallas flash-attention
blocks in interpret mode; on 2 devices ring and all-gather through the cuDNN pair path with cuDNN's
contract in float32), on 8 fake CPU devices and (one case of each primitive, on the project's
4-axis mesh) on 2; the tiled attention
on one device; causality; error messages. The multi-device cases run in one fresh process (the
device count must be set before jax initialises; this pytest process already has one device),
which prints JSON.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

TOLERANCE = 1e-5  # max |cp - single| / max |single|, float32

CP_SCRIPT = r"""
import json, sys, time
START = time.time()
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from sh2_jax.ops import conv, hyena
from sh2_jax.config import MeshConfig
from sh2_jax.parallel import context as cp, context_attention as cp_attention, mesh as mesh_lib
cp_attention.TILE = 4  # several tiles per block even at these lengths: exercises the tiling

AXIS = "context"
rng = np.random.default_rng(0)
out = {}


def rand(*shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def value_and_grads(fn, args, cot):
  # Output and the vjp of the cotangent wrt every argument, in one compiled call.
  @jax.jit
  def run(args, cot):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(cot)
  return run(args, cot)


def compare(name, cp_fn, ref_fn, args):
  cot = rand(*jax.eval_shape(ref_fn, *args).shape)
  y, g = value_and_grads(cp_fn, args, cot)
  y0, g0 = value_and_grads(ref_fn, args, cot)
  out[name] = max([rel_err(y, y0)] + [rel_err(a, b) for a, b in zip(g, g0)])


def halo_reference(x, halo, n):
  b, l, c = x.shape
  blocks = x.reshape(b, n, l // n, c)
  tails = jnp.pad(blocks[:, :-1, l // n - halo:], ((0, 0), (1, 0), (0, 0), (0, 0)))
  return jnp.concatenate([tails, blocks], axis=2).reshape(b, -1, c)


def errors(n, mesh):
  msgs = {}
  try:  # K-1 > local length, inside the shard_map (bypassing the wrapper's length check)
    jax.shard_map(lambda x, h: cp.cp_causal_conv_p2p(x, h, AXIS), mesh=mesh,
                  in_specs=(jax.P(None, AXIS, None), jax.P()), out_specs=jax.P(None, AXIS, None))(
                      rand(1, 4 * n, 4), rand(4, 7))
  except ValueError as e:
    msgs["halo"] = str(e)
  try:
    cp.context_parallel_causal_conv(rand(1, 4 * n + 1, 4), rand(4, 3), mesh)
  except ValueError as e:
    msgs["indivisible"] = str(e)
  try:
    cp.context_parallel_causal_conv(rand(1, 4 * n, 4), rand(4, 7), mesh)
  except ValueError as e:
    msgs["short"] = str(e)
  try:
    cp.context_parallel_gate_conv_gate(*(rand(1, 2 * n, 3 * n),) * 3, rand(3, 5), None, mesh,
                                       strategy="a2a")
  except ValueError as e:
    msgs["groups"] = str(e)
  return msgs


memory = {}
out["attention_memory"] = memory


def zigzag_and_attention(n, mesh):
  # Zigzag layout (rank r holds chunks r, 2N-1-r), the fused p2p path and attention, all as
  # functions of natural-order inputs: permute in, run sharded, permute back.
  seq = jax.P(None, AXIS, None)
  b, c, l = 2, 16, 64
  order = cp.zigzag_order(l, n)
  inverse = np.argsort(order)

  def sharded(body, num_seq, zigzag, rank=3, check_vma=True):  # Pallas kernels: check_vma=False
    spec = jax.P(None, AXIS, *([None] * (rank - 2)))
    def fn(*args):
      seq_args = [a[:, order] if zigzag else a for a in args[:num_seq]]
      y = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * num_seq + (jax.P(),) * (len(args) - num_seq),
                        out_specs=spec, check_vma=check_vma)(*seq_args, *args[num_seq:])
      return y[:, inverse] if zigzag else y
    return fn

  gates = (rand(b, l, c), rand(b, l, c), rand(b, l, c))
  for zz in (True, False):
    tag = "_zigzag" if zz else ""
    if zz:
      compare(f"conv_p2p_K4{tag}/{n}",
              sharded(lambda x, h: cp.cp_causal_conv_p2p(x, h, AXIS, "direct", zigzag=True), 1, True),
              lambda x, h: conv.causal_conv(x, h, method="direct"), (rand(b, l, c), rand(4, 4)))
      compare(f"gcg_p2p{tag}/{n}",
              sharded(lambda *a: cp.cp_gate_conv_gate_p2p(*a, AXIS, "direct", zigzag=True), 3, True),
              lambda *a: hyena.gate_conv_gate(*a, method="direct"), gates + (rand(4, 4), rand(c)))
      compare(f"gcg_a2a{tag}/{n}",
              sharded(lambda *a: cp.cp_gate_conv_gate_a2a(*a, AXIS, "auto", zigzag=True), 3, True),
              lambda *a: hyena.gate_conv_gate(*a), gates + (rand(8, 16), rand(c)))
      li_args = gates + (-jnp.exp(rand(c, 4)), rand(c, 4), rand(c))
      compare(f"li_a2a{tag}/{n}",
              sharded(lambda *a: cp.cp_li_gate_conv_gate_a2a(*a, AXIS, "fft", zigzag=True), 3, True),
              lambda *a: hyena.li_gate_conv_gate(*a, method="fft"), li_args)
      # the fused modal kernel (interpret mode): post, pre, v cross the axis, gates in the kernel
      compare(f"li_a2a_pallas{tag}/{n}",
              sharded(lambda *a: cp.cp_li_gate_conv_gate_a2a(*a, AXIS, "pallas", zigzag=True), 3,
                      True, check_vma=False),
              lambda *a: hyena.li_gate_conv_gate(*a, method="fft"), li_args)
    compare(f"gcg_p2p_fused_blocked{tag}/{n}",
            sharded(lambda *a: cp.cp_gate_conv_gate_p2p(*a, AXIS, "blocked", chunk=8,
                                                       zigzag=zz), 3, zz),
            lambda *a: hyena.gate_conv_gate(*a, method="blocked", chunk=8),
            gates + (rand(4, 3), rand(c)))
    # Attention: q, k, v [B, L, N, H]; positions are the stored tokens' true positions.
    heads, head_dim = 2, 8
    qkv = tuple(rand(b, l, heads, head_dim) for _ in range(3))
    pos = jnp.asarray(order if zz else np.arange(l), jnp.int32)
    natural = jnp.arange(l, dtype=jnp.int32)
    # The Pallas flash-attention blocks (interpret mode) only with zigzag: they are slow here.
    for strategy, kernel in [("ring", "xla"), ("allgather", "xla")] + (
        [("ring", "pallas"), ("allgather", "pallas")] if zz else []):
      def attn(q, k, v, strategy=strategy, kernel=kernel):
        # the Pallas cases skip the kernels' sort: each zigzag rank's positions ascend
        body = lambda q, k, v, p: cp_attention.context_attention(q, k, v, p, AXIS, strategy,
                                                                 local_sorted=kernel == "pallas")
        spec = jax.P(None, AXIS, None, None)
        q, k, v = ((x[:, order] if zz else x) for x in (q, k, v))
        y = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3 + (jax.P(AXIS),),
                          out_specs=spec, check_vma=False)(q, k, v, pos)
        return y[:, inverse] if zz else y
      cp_attention.KERNEL = kernel
      compare(f"attention_{strategy}{'_pallas' if kernel == 'pallas' else ''}{tag}/{n}", attn,
              lambda q, k, v: cp_attention.masked_attention_reference(q, k, v, natural, natural),
              qkv)
      cp_attention.KERNEL = "auto"
  # Memory per device of attention fwd+bwd at L = 64K over 8 shards (compiled, nothing run):
  # the ring holds one K/V block in flight, all-gather holds the whole K/V and dK/dV.
  cp_attention.TILE = 512
  spec4 = jax.P(None, AXIS, None, None)
  x = jax.ShapeDtypeStruct((1, 65536, 2, 64), jnp.float32)
  p = jax.ShapeDtypeStruct((65536,), jnp.int32)
  for strategy in ("ring", "allgather"):
    f = jax.shard_map(lambda q, k, v, pos: cp_attention.context_attention(q, k, v, pos, AXIS, strategy),
                      mesh=mesh, in_specs=(spec4,) * 3 + (jax.P(AXIS),), out_specs=spec4)
    grad = jax.jit(jax.grad(lambda q, k, v, pos: jnp.sum(f(q, k, v, pos) ** 2), argnums=(0, 1, 2)))
    memory[strategy] = grad.lower(x, x, x, p).compile().memory_analysis().temp_size_in_bytes
  cp_attention.TILE = 4
  # One device, several tiles (skipped and partly masked ones), random positions.
  perm = jnp.asarray(rng.permutation(l), jnp.int32)
  compare(f"attention_tiled_one_device/{n}",
          lambda q, k, v: cp_attention.masked_attention(q, k, v, perm, perm),
          lambda q, k, v: cp_attention.masked_attention_reference(q, k, v, perm, perm), qkv)


def attention_cudnn_contract(n, mesh):
  # Ring and all-gather attention through the cuDNN pair path with cuDNN's two calls replaced
  # by their float32 contract (tests/helpers.py; cuDNN needs a GPU): zigzag, contiguous and an
  # irregular (sorted random) layout.
  from tests import helpers
  from sh2_jax.parallel import cudnn_blocks
  saved = (cudnn_blocks.block_forward, cudnn_blocks.block_backward, cudnn_blocks.unsupported_reason)
  cudnn_blocks.block_forward = helpers.cudnn_contract_forward
  cudnn_blocks.block_backward = helpers.cudnn_contract_backward
  cudnn_blocks.unsupported_reason = lambda dtype, head_dim: None
  cp_attention.KERNEL = "cudnn"
  b, l, heads, head_dim = 2, 32, 2, 8
  qkv = tuple(rand(b, l, heads, head_dim) for _ in range(3))
  spec = jax.P(None, AXIS, None, None)
  irregular = np.sort(rng.permutation(l).reshape(n, -1), axis=1).reshape(-1)
  for strategy in ("ring", "allgather"):
    body = lambda q, k, v, p, strategy=strategy: cp_attention.context_attention(
        q, k, v, p, AXIS, strategy, local_sorted=True)
    for tag, pos in [("zigzag", cp.zigzag_order(l, n)), ("contiguous", np.arange(l)),
                     ("irregular", irregular)]:
      pos = jnp.asarray(pos, jnp.int32)  # positions of the stored tokens (q, k, v as stored)
      sharded = lambda q, k, v, pos=pos, body=body: jax.shard_map(
          body, mesh=mesh, in_specs=(spec,) * 3 + (jax.P(AXIS),), out_specs=spec,
          check_vma=False)(q, k, v, pos)
      compare(f"attention_{strategy}_cudnn_contract_{tag}/{n}", sharded,
              lambda q, k, v, pos=pos: cp_attention.masked_attention_reference(q, k, v, pos, pos),
              qkv)
  cp_attention.KERNEL = "auto"
  cudnn_blocks.block_forward, cudnn_blocks.block_backward, cudnn_blocks.unsupported_reason = saved


def sliced_mlp_collectives(mesh):
  # Collectives in the compiled forward+backward of the sliced MLP (8 strided token slices)
  # with the sequence sharded over the context axis: only the weight gradients' all-reduce.
  import re
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sh2_jax.ops.mlp import sliced_gated_mlp
  x = jax.device_put(rand(1, 64 * mesh.shape[AXIS], 16), NamedSharding(mesh, P(None, AXIS, None)))
  ws = (rand(16, 24), rand(16, 24), rand(24, 16))
  loss = lambda x, *ws: jnp.sum(sliced_gated_mlp(x, *ws, jax.nn.silu, jnp.float32, 8) ** 2)
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(x, *ws).compile().as_text()
  return sorted(set(re.findall(r"(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(?:-start)?\(", hlo)))


for n in [int(a) for a in sys.argv[2].split(",")]:
  if n == 2:  # the project's 4-axis mesh (data, fsdp, tensor of size 1)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, context=n), jax.devices()[:n])
  else:
    mesh = jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])
  b, c, l = 2, 16, 64
  x = rand(b, l, c)
  compare(f"halo/{n}", lambda x: cp.context_parallel_halo_exchange(x, 5, mesh),
          lambda x: halo_reference(x, 5, n), (x,))
  # On 2 devices (the project's mesh) one case of each primitive: the 8-device pass covers the
  # filter lengths, group counts and strategies.
  full = n == 8
  conv_cases = [(3, 16, l, "direct"), (7, 4, l, "auto"), (128, 2, 128 * n, "auto")]
  for k, groups, length, method in conv_cases if full else conv_cases[1:2]:
    xk = rand(b, length, c if k < 128 else 4)
    compare(f"conv_p2p_K{k}/{n}",
            lambda x, h: cp.context_parallel_causal_conv(x, h, mesh, method=method),
            lambda x, h: conv.causal_conv(x, h, method=method), (xk, rand(groups, k)))
  gates = (rand(b, l, c), rand(b, l, c), rand(b, l, c))
  gcg_cases = [("p2p", 7, 4), ("a2a", 7, 8), ("a2a", 128, 16), ("a2a", 3, 1)]
  for strategy, k, groups in gcg_cases if full else gcg_cases[0:3:2]:
    for skip in (True, False) if full else (True,):
      args = gates + (rand(groups, k),) + ((rand(c),) if skip else ())
      name = f"gcg_{strategy}_K{k}_G{groups}{'_skip' if skip else ''}/{n}"
      compare(name,
              lambda *a: cp.context_parallel_gate_conv_gate(*a[:4], a[4] if len(a) > 4 else None,
                                                            mesh, strategy=strategy),
              lambda *a: hyena.gate_conv_gate(*a[:4], a[4] if len(a) > 4 else None), args)
  li_args = gates + (-jnp.exp(rand(c, 4)), rand(c, 4), rand(c))
  compare(f"li_a2a/{n}",
          lambda *a: cp.context_parallel_li_gate_conv_gate(*a, mesh, method="fft"),
          lambda *a: hyena.li_gate_conv_gate(*a, method="fft"), li_args)
  out[f"errors/{n}"] = errors(n, mesh)
  out[f"mlp_slice_collectives/{n}"] = sliced_mlp_collectives(mesh)
  if full:
    # Causality under CP: perturb one position; earlier outputs must not move.
    t = l // 2 + 1
    bumped = tuple(g.at[:, t].add(3.0) for g in gates)
    h_causal = rand(4, 7)
    for name, fn in [
        ("p2p", lambda post, pre, v: cp.context_parallel_gate_conv_gate(post, pre, v, h_causal,
                                                                        li_args[5], mesh)),
        ("li", lambda *g: cp.context_parallel_li_gate_conv_gate(*g, *li_args[3:], mesh, method="fft"))]:
      fn = jax.jit(fn)  # eager shard_map dispatches op by op: slow
      before, after = fn(*gates), fn(*bumped)
      out[f"causal_{name}/{n}"] = [float(jnp.max(jnp.abs(after - before)[:, :t])),
                                   float(jnp.max(jnp.abs(after - before)[:, t:]))]
    zigzag_and_attention(n, mesh)
  else:
    attention_cudnn_contract(n, mesh)
  out[f"seconds/{n}"] = time.time() - START
out["seconds"] = time.time() - START
print(json.dumps(out))
"""


def _run_cp_script():
  env = helpers.fake_devices_env(8)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", CP_SCRIPT, root, "8,2"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
  return helpers.once_per_session(tmp_path_factory, "context_parallel", _run_cp_script)


def test_cp_values_and_gradients_match_one_device(cp_results):
  errs = {k: v for k, v in cp_results.items()
          if not k.startswith(("causal", "errors", "seconds", "attention_memory",
                               "mlp_slice"))}
  assert len(errs) == 13 + 14 + 5 + 6  # 8 devices: all, zigzag; 2: one of each, cuDNN pair
  bad = {k: v for k, v in errs.items() if not v <= TOLERANCE}
  assert not bad, bad


def test_cp_is_causal(cp_results):
  keys = [k for k in cp_results if k.startswith("causal")]
  assert sorted(keys) == ["causal_li/8", "causal_p2p/8"], keys
  for key in keys:
    earlier, later = cp_results[key]
    limit = 0.0 if key.startswith("causal_p2p") else 1e-5 * later  # fft: roundoff only
    assert earlier <= limit and later > 0.1, (key, earlier, later)


@pytest.mark.parametrize("n", [8, 2])
def test_sliced_mlp_keeps_the_sequence_sharding(cp_results, n):
  """model.mlp_slices under context parallelism: strided slices of a sequence sharded in
  contiguous blocks stay local (no gather, all-to-all or permute; only the weights' sums)."""
  assert set(cp_results[f"mlp_slice_collectives/{n}"]) <= {"all-reduce"}, cp_results


@pytest.mark.parametrize("n", [8, 2])
def test_cp_error_messages(cp_results, n):
  msgs = cp_results[f"errors/{n}"]
  assert "halo 6 is longer than the local block of 4 rows" in msgs["halo"]
  assert "all-to-all" in msgs["halo"]
  assert f"sequence length {4 * n + 1} cannot be sharded" in msgs["indivisible"]
  assert f"multiples of {n}" in msgs["indivisible"]
  assert f">= (K-1)*N = 6*{n} = {6 * n}" in msgs["short"]
  assert "3 filter groups" in msgs["groups"] or "channels" in msgs["groups"]


def test_ring_attention_memory_is_per_block(cp_results):
  """Per-device temporaries of ring attention (fwd+bwd, 64K tokens over 8 shards) stay well
  below all-gather's, which holds the full-length K, V, dK, dV (128 MiB of them here)."""
  memory = cp_results["attention_memory"]
  assert memory["ring"] * 2 < memory["allgather"], memory
  assert memory["ring"] < 100 * 2**20, memory
