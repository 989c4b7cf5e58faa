"""Training: state, optimizer, jit-compiled steps, the loop and checkpoints."""
