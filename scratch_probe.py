"""Scratch (removed before commit): the SE f32 path's weight casts with and without the barrier."""
import os, sys
sys.path.insert(0, ".")
from experiments import profile_trace as pt  # sets XLA_FLAGS
import jax
from sh2_jax.ops import hyena
from sh2_jax.config import ModelConfig

config = ModelConfig(d_model=4096, num_heads=32, se_groups=256, mr_groups=256, layout="SE MR LI MHA",
                     dtype="bfloat16", param_dtype="float32", mr_filter_len=128, train_len=8192)
print("== with barrier")
pt.profile("se", 4096, config, 5, 12, None)

def fwd_plain(x_BLD, w_DE, w_dtype):
  w_view = w_DE.astype(x_BLD.dtype)
  return x_BLD @ w_view, (x_BLD, w_view)

hyena._matmul_cast.defvjp(fwd_plain, hyena._matmul_cast_bwd)
print("== without barrier")
pt.profile("se", 4096, config, 5, 12, None)
