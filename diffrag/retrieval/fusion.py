"""Hybrid retrieval: reciprocal rank fusion (RRF) of several retrievers' rankings.

RRF (Cormack, Clarke & Buettcher, 2009) scores a document by its ranks alone,

    score(d) = sum_r 1 / (c + rank_r(d)),   rank_r(d) = 1, 2, ... in retriever r's list,

so BM25 scores and cosine similarities never need a common scale. A document absent from a
list (below its `depth`) adds nothing for that list. c = 60 is the published constant.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int, c: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
  """Fuses per-retriever rankings.

  rankings: R arrays [Q, D_r] of document indices, best first (D_r may differ per retriever).
  Returns (indices [Q, k'], scores [Q, k']), best first, k' = min(k, distinct documents of the
  row with the fewest); ties go to the smaller document index, so the result is deterministic.
  """
  if not rankings:
    raise ValueError("reciprocal_rank_fusion needs at least one ranking")
  q = {len(r) for r in rankings}
  if len(q) != 1:
    raise ValueError(f"every ranking must cover the same queries; got {sorted(q)} rows")
  rows_i, rows_s = [], []
  for per_query in zip(*rankings):
    idx = np.concatenate([np.asarray(r, np.int64) for r in per_query])
    contrib = np.concatenate([1.0 / (c + np.arange(1, len(r) + 1)) for r in per_query])
    docs, inverse = np.unique(idx, return_inverse=True)
    score = np.zeros(len(docs))
    np.add.at(score, inverse, contrib)
    order = np.lexsort((docs, -score))
    rows_i.append(docs[order])
    rows_s.append(score[order])
  width = min(k, min(len(r) for r in rows_i))
  return np.stack([r[:width] for r in rows_i]), np.stack([s[:width] for s in rows_s])


class HybridRetriever:
  """Reciprocal rank fusion of retrievers over one corpus (e.g. BM25 + dense MiniLM).

  Each retriever is searched to `depth` (or k, if larger); `search` has the signature every
  retriever here has, so a hybrid can be used wherever BM25 or dense retrieval is.
  """

  def __init__(self, retrievers: Sequence, c: float = 60.0, depth: int = 100):
    if not retrievers:
      raise ValueError("HybridRetriever needs at least one retriever")
    sizes = {len(r.corpus) for r in retrievers}
    if len(sizes) != 1:
      raise ValueError(f"the fused retrievers index corpora of different sizes {sorted(sizes)}; fuse retrievers of "
                       "one corpus")
    self.retrievers, self.c, self.depth = list(retrievers), c, depth
    self.corpus = self.retrievers[0].corpus

  def search(self, queries: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], RRF scores [Q, k]), best first."""
    depth = min(max(k, self.depth), len(self.corpus))
    rankings = [r.search(queries, depth)[0] for r in self.retrievers]
    return reciprocal_rank_fusion(rankings, min(k, len(self.corpus)), self.c)
