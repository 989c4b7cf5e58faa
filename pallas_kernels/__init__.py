"""GPU kernels for sh2-jax (Pallas), importable on their own: they depend on jax only."""

from pallas_kernels.blocked_conv import blocked_causal_conv, gate_conv_gate, toeplitz_blocks

__all__ = ["blocked_causal_conv", "gate_conv_gate", "toeplitz_blocks"]
