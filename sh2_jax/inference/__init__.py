"""Inference over the plain params pytree: recurrent caches, prefill, decode, sampling, scoring.

Pure functions (no Linen modules); the parameter tree is the one `StripedHyena2.init` makes.
"""

from sh2_jax.inference.cache import AttentionCache, DecodeState, HyenaCache, init_state
from sh2_jax.inference.engine import extend, prefill, step
from sh2_jax.inference.sampling import SamplingConfig, generate, sample_logits
from sh2_jax.inference.scoring import score, score_in_chunks, score_sequences

__all__ = ["AttentionCache", "DecodeState", "HyenaCache", "init_state", "extend", "prefill",
           "step", "SamplingConfig", "generate", "sample_logits", "score", "score_in_chunks",
           "score_sequences"]
