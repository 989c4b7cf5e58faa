"""Order-k Markov byte model: the n-gram baseline a byte-level LM has to beat.

p(x_t | c) = (count(c, x_t) + alpha) / (count(c) + 256 alpha), c = x_{t-k..t-1}: additive
smoothing over all 256 byte values. A context never seen in training has count 0 and therefore
the uniform 1/256 (8 bits). Contexts are integers base 256 (c = sum_j x_{t-k+j} 256^(k-1-j)),
and (context, byte) pairs are c * 256 + x, so counting is one np.unique over int64 ids (k <= 6).
Only positions t >= k are counted and scored (no padding of the first k bytes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

VOCAB = 256
MAX_ORDER = 6  # (context, byte) ids need 8 (k + 1) bits of an int64.


def context_ids(tokens: np.ndarray, order: int) -> np.ndarray:
  """Integer ids of the k bytes before each position t >= k.

  Args:
    tokens: [N] uint8.
    order: k.

  Returns:
    [N - k] int64; entry i is the context of tokens[k + i] (all zeros when k = 0).
  """
  n = tokens.size - order
  ids = np.zeros(max(n, 0), dtype=np.int64)
  for j in range(order):
    ids = ids * VOCAB + tokens[j:j + n]
  return ids


@dataclasses.dataclass(frozen=True)
class MarkovModel:
  """Counts of an order-k byte model.

  Attributes:
    order: k, bytes of context (0 = unigram).
    alpha: additive smoothing per byte value.
    pair_ids: [P] int64 sorted ids context * 256 + byte seen in training.
    pair_counts: [P] int64 their counts.
    context_ids: [C] int64 sorted contexts seen in training.
    context_counts: [C] int64 their counts.
  """
  order: int
  alpha: float
  pair_ids: np.ndarray
  pair_counts: np.ndarray
  context_ids: np.ndarray
  context_counts: np.ndarray

  def log2_probs(self, tokens: np.ndarray) -> np.ndarray:
    """log2 p(x_t | x_{t-k..t-1}) for t = k .. N-1.

    Args:
      tokens: [N] uint8, N > k.

    Returns:
      [N - k] float64.
    """
    tokens = np.asarray(tokens, dtype=np.uint8)
    if tokens.size <= self.order:
      raise ValueError(f"need more than order={self.order} tokens to score, got {tokens.size}")
    ctx = context_ids(tokens, self.order)
    pairs = ctx * VOCAB + tokens[self.order:]
    pair_count = _lookup(self.pair_ids, self.pair_counts, pairs)
    ctx_count = _lookup(self.context_ids, self.context_counts, ctx)
    num = pair_count + self.alpha
    den = ctx_count + VOCAB * self.alpha
    return np.log2(num) - np.log2(den)

  def bits_per_byte(self, tokens: np.ndarray) -> float:
    """Mean -log2 p(x_t | context) over positions t >= k of `tokens` (float64)."""
    return float(-np.mean(self.log2_probs(tokens)))


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
  """values[keys == q] for each q, 0 where q is absent (keys sorted). [Q] int64 -> [Q] float64."""
  if keys.size == 0:
    return np.zeros(query.shape, dtype=np.float64)
  pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
  return np.where(keys[pos] == query, values[pos], 0).astype(np.float64)


def fit_markov(tokens: np.ndarray, order: int, alpha: float = 0.01) -> MarkovModel:
  """Counts an order-k Markov model over the positions t >= k of `tokens`.

  Args:
    tokens: [N] uint8 training stream.
    order: k in [0, 6].
    alpha: additive smoothing (> 0), added to every one of the 256 byte counts.

  Returns:
    The fitted MarkovModel.
  """
  if not 0 <= order <= MAX_ORDER:
    raise ValueError(f"order={order} must be in [0, {MAX_ORDER}]")
  if alpha <= 0:
    raise ValueError(f"alpha={alpha} must be > 0 so unseen bytes keep non-zero probability")
  tokens = np.asarray(tokens, dtype=np.uint8)
  ctx = context_ids(tokens, order)
  pairs = ctx * VOCAB + tokens[order:]
  pair_ids, pair_counts = np.unique(pairs, return_counts=True)
  # A context's count is the sum of its pairs' counts; pair_ids are sorted, so contexts are too.
  context_ids_, first = np.unique(pair_ids // VOCAB, return_index=True)
  context_counts = np.add.reduceat(pair_counts, first) if first.size else first
  return MarkovModel(order, float(alpha), pair_ids, pair_counts.astype(np.int64),
                     context_ids_, context_counts.astype(np.int64))
