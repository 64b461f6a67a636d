"""TREC run files and the IR metrics of generative retrieval papers.

Run file: one line per (query, document): `qid Q0 docid rank score tag`, ranks from 1.
Qrels: {qid: {docid: relevance}}; a document is relevant when relevance > 0.
Recall@k = |relevant in top k| / |relevant|;  MRR@k = 1 / rank of the first relevant
document within the top k (0 if none); nDCG@k with graded relevance (BEIR's headline);
all averaged over the queries of the qrels (a query with no line in the run scores 0).
`per_query` computes them with ranx, one score per query, for paired comparisons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def write_run(path: str | Path, rankings: dict[str, Sequence[tuple[str, float]]], tag: str = "diffrag") -> None:
  """rankings: qid -> [(docid, score)] best first."""
  lines = []
  for qid, ranked in rankings.items():
    seen = set()
    rank = 0
    for docid, score in ranked:
      if docid in seen:  # a run lists a document once per query
        continue
      seen.add(docid)
      rank += 1
      lines.append(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}")
  Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))


def read_run(path: str | Path) -> dict[str, list[str]]:
  """qid -> docids ordered by rank."""
  rows: dict[str, list[tuple[int, str]]] = {}
  for n, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 6:
      raise ValueError(f"{path}:{n}: a TREC run line has 6 columns (qid Q0 docid rank score tag), got {len(parts)}")
    rows.setdefault(parts[0], []).append((int(parts[3]), parts[2]))
  return {q: [d for _, d in sorted(v)] for q, v in rows.items()}


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
  """BEIR qrels tsv (query-id, corpus-id, score; header line) or TREC qrels (qid 0 docid rel)."""
  qrels: dict[str, dict[str, int]] = {}
  for line in Path(path).read_text().splitlines():
    parts = line.split()
    if not parts or parts[0] in ("query-id", "query_id", "qid"):
      continue
    qid, docid, rel = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
    qrels.setdefault(qid, {})[docid] = int(float(rel))
  return qrels


def evaluate(run: dict[str, list[str]], qrels: dict[str, dict[str, int]],
             cutoffs_recall: Iterable[int] = (1, 10, 100), cutoffs_mrr: Iterable[int] = (10, 100),
             known_docs: set[str] | None = None) -> dict[str, float]:
  """Mean Recall@k and MRR@k over the qrels' queries, plus counts of what could not be scored."""
  out: dict[str, float] = {}
  queries = [q for q, rel in qrels.items() if any(v > 0 for v in rel.values())]
  for k in cutoffs_recall:
    total = 0.0
    for q in queries:
      rel = {d for d, v in qrels[q].items() if v > 0}
      total += len(rel & set(run.get(q, [])[:k])) / len(rel)
    out[f"recall@{k}"] = total / max(len(queries), 1)
  for k in cutoffs_mrr:
    total = 0.0
    for q in queries:
      rel = {d for d, v in qrels[q].items() if v > 0}
      for i, d in enumerate(run.get(q, [])[:k]):
        if d in rel:
          total += 1.0 / (i + 1)
          break
    out[f"mrr@{k}"] = total / max(len(queries), 1)
  out["queries"] = float(len(queries))
  out["queries_missing_from_run"] = float(sum(1 for q in queries if q not in run))
  out["run_queries_without_qrels"] = float(sum(1 for q in run if q not in qrels))
  if known_docs is not None:
    out["unknown_docids_in_run"] = float(sum(1 for ds in run.values() for d in ds if d not in known_docs))
  return out


METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "mrr@100")


def per_query(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], metrics: Sequence[str] = METRICS):
  """(query ids, {metric: [n] scores}) with ranx, in the order of the sorted qrels query ids.

  run: qid -> docids by rank (the order is kept: scores are given by rank); a query the run
  misses, or ranks nothing for, scores 0.
  """
  import ranx  # pylint: disable=import-outside-toplevel
  queries = sorted(q for q, rel in qrels.items() if any(v > 0 for v in rel.values()))
  if not queries:
    raise ValueError("no query in the qrels has a relevant document: nothing to evaluate")
  q = ranx.Qrels({k: {d: int(v) for d, v in qrels[k].items() if v > 0} for k in queries})
  ranked = {k: {d: float(len(ds) - i) for i, d in enumerate(dict.fromkeys(ds))}
            for k, ds in run.items() if k in q.keys() and ds}
  if not ranked:
    return queries, {m: np.zeros(len(queries)) for m in metrics}
  r = ranx.Run(ranked)
  scores = ranx.evaluate(q, r, list(metrics), return_mean=False, make_comparable=True)
  if len(metrics) == 1:
    scores = {metrics[0]: scores}
  order = {k: i for i, k in enumerate(q.keys())}
  idx = np.array([order[k] for k in queries])
  return queries, {m: np.asarray(scores[m], np.float64)[idx] for m in metrics}
