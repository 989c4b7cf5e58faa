"""Relative differences for the benchmarks' and checks' correctness columns (host, float64)."""

from __future__ import annotations

from typing import Any

import numpy as np


def max_rel_diff(actual: Any, expected: Any) -> float:
  """max |actual - expected| / max |expected|."""
  a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def norm_rel_diff(actual: Any, expected: Any) -> float:
  """||actual - expected|| / ||expected|| (Frobenius)."""
  a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))
