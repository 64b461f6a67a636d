"""Where a RAG run's answers go wrong: each prediction of a finished `diffrag rag` run sorted into
one of `metrics.ERROR_KINDS` (answer not in the prompt, exact, overlap, empty, another span of
the answer's passage, a span of another passage, not a span of the prompt), per set and method.

    python experiments/rag_errors.py OUT_DIR [--data-dir ../shared/data]

The run's own config (its manifest.json) rebuilds the corpus, so each prediction is checked
against the passages that were in its prompt. Writes OUT_DIR/errors.{md,csv}: per set and method,
n, the count and share of each kind, and the F1 over the questions whose answer was in the prompt
(reading alone, the retrieval ceiling set aside) with its 95% bootstrap interval.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from diffrag import config as config_lib
from diffrag.experiment import stats
from diffrag.rag import metrics as M
from diffrag.rag.pipeline import RagConfig, build_corpus, load_set
from diffrag.report import write_table


def error_rows(cfg: RagConfig, preds: list[dict]) -> list[dict]:
  """One row per (set, method): counts and shares of each error kind, and F1 where the answer
  was in the prompt."""
  rows = []
  for set_name in dict.fromkeys(p["dataset"] for p in preds):
    records, _ = load_set(cfg, set_name)
    corpus = build_corpus(cfg, records)
    text = {pid: corpus.document(j) for j, pid in enumerate(corpus.ids)}
    for method in dict.fromkeys(p["method"] for p in preds if p["dataset"] == set_name):
      got = [p for p in preds if p["dataset"] == set_name and p["method"] == method]
      kinds = collections.Counter(M.error_kind(p["prediction"], p["answers"], [text[i] for i in p["passage_ids"]],
                                               p["answer_in_prompt"]) for p in got)
      f1_in = np.array([100.0 * M.qa_scores(p["prediction"], p["answers"])["f1"] for p in got if p["answer_in_prompt"]])
      row = {"set": set_name, "method": method, "n": len(got), "answer_in_prompt": len(f1_in),
             "f1_where_in_prompt": stats.fmt_interval(*stats.bootstrap_ci(f1_in), digits=1) if len(f1_in) else ""}
      for kind in M.ERROR_KINDS:
        row[kind] = f"{kinds[kind]} ({100.0 * kinds[kind] / len(got):.1f}%)"
      rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("out_dir", help="a finished `diffrag rag` run (predictions.jsonl, manifest.json)")
  ap.add_argument("--data-dir", default=None, help="where the run's data sets are now (default: as it recorded)")
  args = ap.parse_args(argv)
  out = Path(args.out_dir)
  cfg = config_lib.of_run(RagConfig, out)
  if args.data_dir:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=args.data_dir))
  path = out / "predictions.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {out} is not the out_dir of a `diffrag rag` run")
  preds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  print(write_table(error_rows(cfg, preds), out, "errors"))


if __name__ == "__main__":
  main()
