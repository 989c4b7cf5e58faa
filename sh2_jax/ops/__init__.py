"""Pure functions on arrays: no parameters, no Flax."""
