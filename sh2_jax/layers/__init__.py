"""Flax Linen modules: declare parameters with logical axes and call the pure ops."""
