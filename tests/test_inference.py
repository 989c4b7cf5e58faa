"""Recurrent inference (sh2_jax.inference): prefill + single-token decode equals the parallel
forward for every mixer and the whole model; the stateful pieces against float64 numpy loops;
sampling against numpy masks; scoring against the log-softmax of the forward; the golden
vortex decode logits."""

import pathlib

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from tests.helpers import np_causal_conv, seeded_rng
from sh2_jax import inference as inf
from sh2_jax.config import ModelConfig
from sh2_jax.convert import evo2
from sh2_jax.inference import engine, recurrent, scoring
from sh2_jax.inference.sampling import SamplingConfig, filter_logits
from sh2_jax.model import StripedHyena2, abstract_params

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"
SMALL = dict(d_model=32, num_heads=2, se_groups=4, mr_groups=4, mr_filter_len=16, li_order=4,
             train_len=64, mlp_activation="evo2", mr_decay=True)
TOL = 2e-5  # float32: max |error| / max |logit|; bf16 is judged against bf16's own error below


def random_params(config: ModelConfig, seed: int, scale: float = 0.3) -> dict:
  """O(scale) random values for every leaf (numpy: nothing to compile), so every filter tap,
  pole, skip and bias matters; norm scales around 1, LI poles around the init."""
  rng = np.random.default_rng(seed)
  base = {"scale": 1.0, "pole_p": -1.0, "pole_gamma": float(np.log(0.05))}

  def make(path, x):
    name = getattr(path[-1], "key", "")
    return jnp.asarray(base.get(name, 0.0) + scale * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(make, nn.meta.unbox(abstract_params(config)))


def decode_logits(params, config, tokens, prompt_len, chunk=0):
  """Logits at every position from prefill(prompt), then `chunk` tokens in one `extend` that
  continues the state (a later prefill chunk), then one `step` per remaining token."""
  logits, state = inf.prefill(params, config, jnp.asarray(tokens[:, :prompt_len]), tokens.shape[1])
  out = [np.asarray(logits)]
  if chunk:
    logits, state = inf.extend(params, config, state, jnp.asarray(tokens[:, prompt_len:prompt_len + chunk]))
    out.append(np.asarray(logits))
  for t in range(prompt_len + chunk, tokens.shape[1]):
    step_logits, state = inf.step(params, config, state, jnp.asarray(tokens[:, t]))
    out.append(np.asarray(step_logits)[:, None])
  return np.concatenate(out, axis=1), state


def forward(params, config, tokens):
  """The parallel (training) forward, StripedHyena2.apply, jitted."""
  return np.asarray(jax.jit(lambda p, x: StripedHyena2(config).apply({"params": p}, x))(
      params, jnp.asarray(tokens)))


def assert_logits_close(actual, expected, what, tol=TOL):
  scale = float(np.max(np.abs(expected)))
  err = float(np.max(np.abs(actual - expected)))
  assert err <= tol * scale, f"{what}: max error {err:.3g} vs logit range {scale:.3g}"


@pytest.mark.parametrize("layout,prompt_len", [
    ("SE", 3),    # 7 taps: the prompt is shorter than the filter
    ("MR", 5),    # 16 taps
    ("LI", 1),
    ("MHA", 2),
])
def test_each_mixer_prefill_plus_decode_equals_parallel(layout, prompt_len):
  """Prefill (shorter than the filter), a 20-token chunk continuing the state (longer than the
  filter: the chunked-prefill path), then single steps, equal the parallel forward (float32)."""
  config = ModelConfig(layout=layout, dtype="float32", **SMALL)
  params = random_params(config, seed=len(layout))
  tokens = seeded_rng("mixer", layout).integers(0, 256, (2, 30))
  expected = forward(params, config, tokens)
  got, state = decode_logits(params, config, tokens, prompt_len, chunk=20)
  assert int(state.pos) == tokens.shape[1]
  assert_logits_close(got, expected, f"{layout}, prompt {prompt_len}")


def test_whole_model_prefill_decode_float32_and_bfloat16():
  """float32: tight. bf16: the decode path (which rounds other intermediates to bf16 than the
  parallel path does) is no further from the float32 forward than the bf16 parallel forward is,
  up to a factor 2 (both ~10% of the logit range on this unit-gain random model)."""
  config = ModelConfig(layout="SE MR LI MHA", dtype="float32", **SMALL)
  params = random_params(config, seed=7)
  tokens = seeded_rng("model").integers(0, 256, (3, 24))
  expected = forward(params, config, tokens)
  got, _ = decode_logits(params, config, tokens, 4)
  assert_logits_close(got, expected, "float32 prefill 4 + decode")
  bf16 = dataclasses.replace(config, dtype="bfloat16")
  parallel_err = np.max(np.abs(forward(params, bf16, tokens) - expected))
  got, _ = decode_logits(params, bf16, tokens, 4)
  decode_err = np.max(np.abs(got - expected))
  assert decode_err <= 2 * parallel_err, (decode_err, parallel_err)


def np_modal_state(u_BTC, log_poles_CN, s0=None):
  poles = np.exp(log_poles_CN.astype(np.float64))
  s = np.zeros((u_BTC.shape[0],) + poles.shape) if s0 is None else s0.astype(np.float64)
  for t in range(u_BTC.shape[1]):
    s = poles * s + u_BTC[:, t, :, None]
  return s


def test_li_prefill_state_and_readout_match_float64_loop():
  rng = seeded_rng("li state")
  u = rng.standard_normal((2, 300, 6)).astype(np.float32)
  log_poles = -np.exp(rng.uniform(np.log(5e-3), np.log(0.7), (6, 4))).astype(np.float32)
  residues = rng.standard_normal((6, 4)).astype(np.float32)
  s0 = rng.standard_normal((2, 6, 4)).astype(np.float32)
  expected = np_modal_state(u.astype(np.float64), log_poles, s0)
  for chunk in (64, 256, 1000):  # 300 = 4 x 64 + 44: front padding; one chunk; > length
    got = np.asarray(recurrent.modal_state(jnp.asarray(u), jnp.asarray(log_poles), jnp.asarray(s0), chunk))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # readout of the carried state over the next 50 positions: y[t] = sum_n R pole^(t+1) s
  poles = np.exp(log_poles.astype(np.float64))
  t = np.arange(50)
  expected_y = np.einsum("cn,bcn,cnt->btc", residues, s0, poles[:, :, None] ** (t + 1))
  got_y = np.asarray(recurrent.modal_state_readout(jnp.asarray(s0), jnp.asarray(log_poles),
                                                   jnp.asarray(residues), 50))
  np.testing.assert_allclose(got_y, expected_y, rtol=1e-4, atol=1e-5 * np.abs(expected_y).max())


@pytest.mark.parametrize("length", [1, 5, 40])
def test_fir_extend_equals_convolution_of_the_whole_history(length):
  rng = seeded_rng("fir", length)
  history = rng.standard_normal((2, 9 + length, 8))
  h = rng.standard_normal((2, 10))
  cache = history[:, 9 - 9:9]  # the K - 1 = 9 rows before the new ones
  got = recurrent.fir_extend(jnp.asarray(history[:, 9:], jnp.float32), jnp.asarray(cache, jnp.float32),
                             jnp.asarray(h, jnp.float32))
  expected = np_causal_conv(history, h)[:, 9:]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_cached_attention_blocks_and_mask_match_numpy():
  """5 queries a block, keys in online-softmax blocks of 6 over 20 slots."""
  rng = seeded_rng("attn")
  q = rng.standard_normal((2, 13, 2, 8))
  k, v = rng.standard_normal((2, 2, 20, 2, 8))
  def attend(k, v, pos):
    k_cache, v_cache = (np.swapaxes(a, 1, 2).astype(np.float32) for a in (k, v))  # [B, N, S, H]
    out, k_back, v_back = recurrent.cached_attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(pos),
        block=5, key_block=6)
    np.testing.assert_array_equal(np.asarray(k_back), k_cache)  # threaded through unchanged
    np.testing.assert_array_equal(np.asarray(v_back), v_cache)
    return np.asarray(out)
  # up to slot 19: the last key block (18..23) is clamped to 14..19 and must not count 14..17 twice
  positions = np.arange(7, 20)
  np.testing.assert_allclose(attend(k, v, positions), np_attention(q, k, v, positions), rtol=1e-5, atol=1e-5)
  # up to slot 11: blocks past the last position are never read (NaN there cannot leak)
  positions = np.arange(0, 13) * 11 // 12
  k_nan, v_nan = k.copy(), v.copy()
  k_nan[:, 12:], v_nan[:, 12:] = np.nan, np.nan
  np.testing.assert_allclose(attend(k_nan, v_nan, positions), np_attention(q, k, v, positions),
                             rtol=1e-5, atol=1e-5)


def np_attention(q, k, v, positions):
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.arange(k.shape[1])[None, None, None] <= positions[None, None, :, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def np_filter(logits, temperature, top_k, top_p):
  x = logits.astype(np.float64) / (temperature or 1.0)
  out = np.full_like(x, -np.inf)
  for b in range(x.shape[0]):
    order = np.argsort(-x[b], kind="stable")
    keep = order[:top_k] if top_k else order
    if top_p < 1.0:
      kept = x[b, keep]
      probs = np.exp(kept - kept.max())
      probs /= probs.sum()
      cum = np.cumsum(probs)
      n = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
      keep = keep[:n]
    out[b, keep] = x[b, keep]
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 40, 0.5),
                                                     (1.0, 0, 1.0)])
def test_sampling_masks_match_numpy(temperature, top_k, top_p):
  logits = seeded_rng("mask", top_k, top_p).standard_normal((4, 300)).astype(np.float32) * 3
  config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, vocab_limit=256)
  got = np.asarray(filter_logits(jnp.asarray(logits), config))
  expected = np_filter(logits[:, :256], temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
  np.testing.assert_allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)
  draws = inf.sample_logits(jnp.asarray(logits), jax.random.key(3), config)
  assert np.all(np.isfinite(expected[np.arange(4), np.asarray(draws)]))  # never a masked token


def test_alphabet_restricts_draws():
  logits = seeded_rng("alphabet").standard_normal((64, 512)).astype(np.float32)
  draws = inf.sample_logits(jnp.asarray(logits), jax.random.key(1), SamplingConfig(alphabet=b"ACGT"))
  assert set(np.asarray(draws).tolist()) <= set(b"ACGT")
  greedy = inf.sample_logits(jnp.asarray(logits), jax.random.key(1),
                             SamplingConfig(temperature=0.0, alphabet=b"ACGT"))
  acgt = np.frombuffer(b"ACGT", np.uint8)
  np.testing.assert_array_equal(np.asarray(greedy), acgt[logits[:, acgt].argmax(-1)])


def test_top_k_1_is_argmax_and_greedy():
  logits = seeded_rng("argmax").standard_normal((8, 512)).astype(np.float32)
  for config in (SamplingConfig(top_k=1), SamplingConfig(temperature=0.0)):
    got = inf.sample_logits(jnp.asarray(logits), jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(got), logits[:, :256].argmax(-1))


@pytest.fixture(scope="module")
def small_model():
  config = ModelConfig(layout="SE LI MHA", dtype="float32", **SMALL)
  return config, random_params(config, seed=11, scale=0.1)


def test_generate_seed_segments_greedy_and_stop(small_model):
  config, params = small_model
  prompt = np.tile(np.frombuffer(b"ACGTTGCA", np.uint8).astype(np.int32), (3, 1))
  sampling = SamplingConfig(temperature=1.0, top_k=4)
  a = inf.generate(params, config, prompt, 12, sampling, seed=5)
  b = inf.generate(params, config, prompt, 12, sampling, seed=5, segment=5)
  c = inf.generate(params, config, prompt, 12, sampling, seed=6)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])  # same seed, any segmentation
  assert not np.array_equal(a["tokens"], c["tokens"])
  assert np.all(a["lengths"] == 12) and np.all(a["tokens"] < 256)
  # greedy: each generated token is the argmax of the parallel forward over what precedes it
  greedy = inf.generate(params, config, prompt, 6, SamplingConfig(temperature=0.0))
  seq = np.concatenate([prompt, greedy["tokens"]], axis=1)
  np.testing.assert_array_equal(forward(params, config, seq)[:, 7:-1, :256].argmax(-1), greedy["tokens"])
  # stop bytes: each sequence ends before its first stop byte; zeros after it
  stop = int(a["tokens"][0, 3])
  s = inf.generate(params, config, prompt, 12, sampling, seed=5, stop_tokens=[stop])
  for row, length in zip(a["tokens"], s["lengths"]):
    hits = np.flatnonzero(row == stop)
    assert length == (hits[0] if hits.size else 12)
  assert s["lengths"][0] == 3 and np.all(s["tokens"][0, 3:] == 0)
  np.testing.assert_array_equal(s["tokens"][0, :3], a["tokens"][0, :3])


def test_score_equals_sum_of_log_softmax_with_padding(small_model, monkeypatch, caplog):
  config, params = small_model
  rng = seeded_rng("score")
  lengths = np.array([20, 7, 1, 13])
  tokens = rng.integers(0, 256, (4, 20))
  padded = np.where(np.arange(20)[None] < lengths[:, None], tokens, 0)
  got = np.asarray(inf.score(params, config, jnp.asarray(padded), jnp.asarray(lengths)))
  logits = forward(params, config, tokens).astype(np.float64)  # unpadded: other bytes after len
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  expected = np.array([sum(logp[b, t - 1, tokens[b, t]] for t in range(1, n))
                       for b, n in enumerate(lengths)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  # Through the recurrent path in chunks (8 + 8 + 4: the last position of a chunk predicts the
  # first token of the next), and as the fallback when one pass runs out of device memory.
  in_chunks = inf.score_in_chunks(params, config, jnp.asarray(padded), jnp.asarray(lengths), 8)
  np.testing.assert_allclose(np.asarray(in_chunks), expected, rtol=1e-4, atol=1e-3)

  def out_of_memory(*args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

  monkeypatch.setattr(scoring, "score", out_of_memory)
  monkeypatch.setattr(engine, "OOM_RETRY_CHUNKS", (32, 8))
  with caplog.at_level("WARNING"):
    retried = inf.score_sequences(params, config, jnp.asarray(padded), jnp.asarray(lengths))
  assert "scoring (batch 4) of 20 tokens in chunks of 20 ran out of device memory" in caplog.text
  np.testing.assert_array_equal(np.asarray(retried), np.asarray(in_chunks))


def test_golden_prefill_and_decode_reproduce_vortex():
  """Prefill 16 / 6 tokens of the golden model, then teacher-forced single-token steps,
  reproduce vortex's cached logits (shorter prompts, where vortex itself is wrong, README
  sec. 5, are covered against the parallel forward by the per-mixer tests)."""
  vortex_cfg = yaml.safe_load((GOLDEN / "vortex_A_config.yml").read_text())
  io = dict(np.load(GOLDEN / "vortex_A_io.npz"))
  config = evo2.config_from_vortex(vortex_cfg, dtype="float32")
  params = jax.tree.map(jnp.asarray, evo2.vortex_to_params(dict(np.load(GOLDEN / "vortex_A_ckpt_state.npz")),
                                                           config))
  tokens = io["tokens"][:, :40]
  for prompt_len, key in ((16, "step_logits"), (6, "step_logits_p6")):
    got, _ = decode_logits(params, config, tokens, prompt_len)
    assert float(np.max(np.abs(got - io[key]))) < 1e-4, key


def test_prefill_out_of_memory_retries_in_chunks(small_model, monkeypatch, caplog):
  """A one-pass prefill that runs out of device memory is retried in smaller chunks (here the
  device 'fits' 8 tokens a call): logits equal the parallel forward; when nothing fits, a
  one-line PromptError says what to change."""
  config, params = small_model
  tokens = seeded_rng("oom").integers(0, 256, (2, 24))
  expected = forward(params, config, tokens)
  real_extend = engine.extend_jit
  calls = []

  def small_device(params, config, state, tokens_BT, **kwargs):
    calls.append(tokens_BT.shape[1])
    if tokens_BT.shape[1] > fits:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    return real_extend(params, config, state, tokens_BT, **kwargs)

  monkeypatch.setattr(engine, "extend_jit", small_device)
  monkeypatch.setattr(engine, "OOM_RETRY_CHUNKS", (16, 8, 4))
  fits = 8
  with caplog.at_level("WARNING"):
    logits, state = inf.prefill(params, config, jnp.asarray(tokens), 30)
  assert calls == [24, 16, 8, 8, 8]
  assert "ran out of device memory" in caplog.text
  assert int(state.pos) == 24
  assert_logits_close(np.asarray(logits), expected, "prefill retried in chunks of 8")
  with pytest.raises(engine.PromptError, match="does not fit in device memory even in chunks of 4 tokens"):
    fits = 2
    inf.prefill(params, config, jnp.asarray(tokens), 30)
  calls.clear()
  with pytest.raises(jax.errors.JaxRuntimeError):  # explicit one pass: no retry
    inf.prefill(params, config, jnp.asarray(tokens), 30, retry_chunked=False)
  assert calls == [24]


def test_checkpoint_of_the_interleaved_in_proj_layout_is_refused_in_one_line(tmp_path):
  """A model directory whose Hyena in_proj is [D, 3D] (the layout before [D, 3, D]) stops with
  a ModelDirError naming the parameter, both shapes and how to migrate; a shape change from
  another config says so."""
  from sh2_jax.inference import checkpoint as ckpt_lib

  config = ModelConfig(d_model=16, num_heads=2, layout="SE MHA", se_groups=2)
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.meta.unbox(abstract_params(config)))
  params["block_0"]["mixer"]["in_proj"] = np.zeros((16, 48), np.float32)
  ckpt_lib.save_model(str(tmp_path / "old"), config, params)
  with pytest.raises(ckpt_lib.ModelDirError) as info:
    ckpt_lib.load_model(str(tmp_path / "old"))
  message = str(info.value)
  assert "\n" not in message
  assert "block_0.mixer.in_proj is (16, 48) in the checkpoint but (16, 3, 16)" in message
  assert "sh2 convert" in message
  params["block_0"]["mixer"]["in_proj"] = np.zeros((16, 3, 16), np.float32)
  params["block_0"]["mixer"]["filter"] = np.zeros((4, 7), np.float32)
  ckpt_lib.save_model(str(tmp_path / "other"), config, params)
  with pytest.raises(ckpt_lib.ModelDirError, match=r"block_0.mixer.filter is \(4, 7\) in the "
                     r"checkpoint but \(2, 7\) for this config: the checkpoint was written with "
                     r"another model config"):
    ckpt_lib.load_model(str(tmp_path / "other"))
