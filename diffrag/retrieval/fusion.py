"""Hybrid retrieval: reciprocal rank fusion (RRF) of several retrievers' rankings.

RRF (Cormack, Clarke & Buettcher, 2009) scores a document by its ranks alone,

    score(d) = sum_r 1 / (c + rank_r(d)),   rank_r(d) = 1, 2, ... in retriever r's list,

so BM25 scores and cosine similarities never need a common scale. A document absent from a
list (below its `depth`) adds nothing for that list. c = 60 is the published constant.

A list may rank several documents together: `ParentRetriever` ranks chunks by the passage they
were cut from, and every chunk of the passage at rank r has rank r in that list (shared ranks,
given to the fusion as `ranks`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def reciprocal_rank_fusion(rankings: Sequence[np.ndarray], k: int, c: float = 60.0,
                           ranks: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Fuses per-retriever rankings.

  rankings: R arrays [Q, D_r] of document indices, best first (D_r may differ per retriever;
  an index < 0 is padding and counts for nothing).
  ranks: optional, per list None (rank = position 1, 2, ...) or [Q, D_r] ranks >= 1 (shared ranks).
  Returns (indices [Q, k'], scores [Q, k']), best first, k' = min(k, distinct documents of the
  row with the fewest); ties go to the smaller document index, so the result is deterministic.
  """
  if not rankings:
    raise ValueError("reciprocal_rank_fusion needs at least one ranking")
  q = {len(r) for r in rankings}
  if len(q) != 1:
    raise ValueError(f"every ranking must cover the same queries; got {sorted(q)} rows")
  ranks = list(ranks) if ranks is not None else [None] * len(rankings)
  if len(ranks) != len(rankings):
    raise ValueError(f"{len(ranks)} rank arrays for {len(rankings)} rankings: give one per ranking (None: positions)")
  ranks = [np.broadcast_to(np.arange(1, np.shape(r)[1] + 1), np.shape(r)) if rk is None else np.asarray(rk)
           for r, rk in zip(rankings, ranks)]
  rows_i, rows_s = [], []
  for q, per_query in enumerate(zip(*rankings)):
    idx = np.concatenate([np.asarray(r, np.int64) for r in per_query])
    contrib = np.concatenate([1.0 / (c + rk[q]) for rk in ranks])
    idx, contrib = idx[idx >= 0], contrib[idx >= 0]
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
    ranked = [r.search_ranked(queries, depth) if hasattr(r, "search_ranked") else (r.search(queries, depth)[0], None)
              for r in self.retrievers]
    return reciprocal_rank_fusion([i for i, _ in ranked], min(k, len(self.corpus)), self.c, [rk for _, rk in ranked])


class ParentRetriever:
  """Ranks chunks by the passages they were cut from (`corpus.parents_of`): a retriever over the
  parent passages, each parent's chunks listed at its rank, in their corpus order.

  Fused beside chunk-level retrievers (`HybridRetriever`), it lifts the chunks of a passage that
  matches the question as a whole, e.g. when the question's words fall on both sides of a
  chunk boundary. `search_ranked` gives the shared ranks; `search` the same list with the parent's
  score for every chunk.
  """

  def __init__(self, retriever, corpus, parent: np.ndarray):
    parent = np.asarray(parent, np.int64)
    if parent.shape != (len(corpus),):
      raise ValueError(f"parent must map each of the {len(corpus)} chunks to a passage, got shape {parent.shape}")
    if len(parent) and (parent.min() < 0 or parent.max() >= len(retriever.corpus)):
      raise ValueError(f"parent indices must lie in [0, {len(retriever.corpus)}) (the parent retriever's corpus)")
    self.retriever, self.corpus, self.parent = retriever, corpus, parent
    self.children = [[] for _ in range(len(retriever.corpus))]
    for i, p in enumerate(parent):
      self.children[p].append(i)

  def search_ranked(self, queries: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(chunk indices [Q, k], ranks [Q, k]: the parent's rank, 1 = best), -1 / inf where fewer chunks."""
    idx, ranks, _ = self._search(queries, k)
    return idx, ranks

  def search(self, queries: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(chunk indices [Q, k], the parent's score [Q, k]), best first; -1 / -inf where fewer chunks."""
    idx, _, scores = self._search(queries, k)
    return idx, scores

  def _search(self, queries, k):
    k = min(k, len(self.corpus))
    parents, scores = self.retriever.search(queries, min(k, len(self.retriever.corpus)))
    idx = np.full((len(queries), k), -1, np.int64)
    ranks, out_s = np.full((len(queries), k), np.inf), np.full((len(queries), k), -np.inf)
    for q, (row, srow) in enumerate(zip(parents, scores)):
      chunks = [(i, r + 1, s) for r, (p, s) in enumerate(zip(row, srow)) for i in self.children[p]][:k]
      if chunks:
        idx[q, :len(chunks)], ranks[q, :len(chunks)], out_s[q, :len(chunks)] = zip(*chunks)
    return idx, ranks, out_s
