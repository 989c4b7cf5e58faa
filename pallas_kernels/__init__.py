"""GPU kernels for sh2-jax (Pallas), importable on their own: they depend on jax only."""

from pallas_kernels.blocked_conv import (
    BlockSizes,
    blocked_causal_conv,
    gate_conv_gate,
    gate_conv_gate_auto,
    gate_conv_gate_pallas,
    toeplitz_blocks,
    unsupported_reason,
)

__all__ = ["BlockSizes", "blocked_causal_conv", "gate_conv_gate", "gate_conv_gate_auto",
           "gate_conv_gate_pallas", "toeplitz_blocks", "unsupported_reason"]
