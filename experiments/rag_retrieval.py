"""The retrieval ceiling of a RAG config, without a reader: for each retriever (BM25, dense,
hybrid), alone and with parent fusion (chunks also ranked by their whole passage,
`retrieval.parent_fusion`), the share of questions with a gold answer in the top k passages
(k = 1 .. --max-k).

    python experiments/rag_retrieval.py [--config configs/rag_minilm_squad.yaml] [--set squad_v1:train]
                                        [--limit 1000] [--out outputs/ablations] [k=v ...]

Choose retrieval on questions you will not evaluate on: --set defaults to the config's
reader.train_data (the reader's training questions), retrieving from that set's own passages
with the config's chunking, exactly as `diffrag rag` builds its corpus. Writes
<out>/retrieval.{md,csv}: n, a 95% bootstrap interval per cell, and each retriever's paired
difference to dense retrieval on the same questions, and with parent fusion to the same retriever
without it (interval; * significant). `retrieval.rrf_c=...` sets the fusion constant.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from diffrag import config as config_lib
from diffrag.experiment import stats
from diffrag.rag.pipeline import RagConfig, answer_in, build_corpus, load_set, retrieve, sample
from diffrag.report import write_table

RETRIEVERS = ("bm25", "dense", "hybrid")


def hits_at_k(cfg: RagConfig, records, corpus, retriever: str, max_k: int, parent_fusion: bool = False) -> np.ndarray:
  """[Q, max_k] bool: a gold answer is in the top k passages (cumulative over k)."""
  c = dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, retriever=retriever,
                                                             parent_fusion=parent_fusion))
  got = retrieve(c, records, corpus, k=max_k)
  hit = np.array([[answer_in(p["text"], r["answers"]) for p in got[r["id"]]] +
                  [False] * (max_k - len(got[r["id"]])) for r in records])
  return np.logical_or.accumulate(hit, axis=1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/rag_minilm_squad.yaml")
  ap.add_argument("--set", default=None, help="QA set name[:split] (default: the config's reader.train_data)")
  ap.add_argument("--limit", type=int, default=1000)
  ap.add_argument("--max-k", type=int, default=5)
  ap.add_argument("--out", default="outputs/ablations")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  cfg = config_lib.load(RagConfig, args.config, args.overrides)
  name = args.set or cfg.reader.train_data or cfg.data.dataset
  records, info = load_set(cfg, name)
  evals = sample(records, args.limit, cfg.data.seed)
  corpus = build_corpus(cfg, records)
  fusions = (False, True) if cfg.retrieval.chunk_words > 0 else (False,)
  hits = {(r, f): hits_at_k(cfg, evals, corpus, r, args.max_k, f) for f in fusions for r in RETRIEVERS}
  rows = []
  for (retriever, fused), got in hits.items():
    for k in range(1, args.max_k + 1):
      h = 100.0 * got[:, k - 1]
      diff = lambda other: stats.fmt_diff(stats.compare(h, 100.0 * hits[other][:, k - 1]), digits=1)
      rows.append({"set": info["name"], "retriever": retriever + ("+parents" if fused else ""), "k": k,
                   "n": len(evals), "answer_in_top_k_%": stats.fmt_interval(*stats.bootstrap_ci(h), digits=1),
                   "d_vs_dense": "" if (retriever, fused) == ("dense", False) else diff(("dense", False)),
                   "d_vs_chunks_only": diff((retriever, False)) if fused else "",
                   "rrf_c": cfg.retrieval.rrf_c, "chunk_words": cfg.retrieval.chunk_words, "corpus": len(corpus)})
  out = Path(args.out)
  print(write_table(rows, out, "retrieval"))


if __name__ == "__main__":
  main()
