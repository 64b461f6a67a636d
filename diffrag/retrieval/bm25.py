"""BM25 (the `bm25s` package, English stop words, Snowball stemming)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from diffrag.retrieval.corpus import Corpus


class BM25Retriever:
  """Lexical retrieval over a Corpus; search returns corpus indices and BM25 scores."""

  def __init__(self, corpus: Corpus, k1: float = 1.5, b: float = 0.75):
    import bm25s  # pylint: disable=import-outside-toplevel
    import Stemmer  # pylint: disable=import-outside-toplevel
    self.corpus = corpus
    self._stemmer = Stemmer.Stemmer("english")
    self._bm25s = bm25s
    tokens = bm25s.tokenize([corpus.document(i) for i in range(len(corpus))], stopwords="en",
                            stemmer=self._stemmer, show_progress=False)
    self.index = bm25s.BM25(k1=k1, b=b)
    self.index.index(tokens, show_progress=False)

  def search(self, queries: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k] int, scores [Q, k] float), best first. k is capped at the corpus size."""
    if any(not q.strip() for q in queries):
      raise ValueError("empty query: every query needs text")
    k = min(k, len(self.corpus))
    tokens = self._bm25s.tokenize(list(queries), stopwords="en", stemmer=self._stemmer, show_progress=False)
    idx, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(idx), np.asarray(scores)
