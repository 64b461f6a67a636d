"""Dry run of the NQ320K / MS MARCO data path on a synthetic corpus of the same size.

    python experiments/gr_dry_run.py --size nq320k      # 109k documents with titles (TSV export layout)
    python experiments/gr_dry_run.py --size msmarco     # 320k title-less passages (MS MARCO document subset)

Writes a synthetic TSV export (corpus.tsv / collection.tsv, queries.{train,dev}.tsv,
qrels.{train,dev}.tsv) of the paper-scale size under --work, with Zipf-distributed words,
then runs `diffrag gr` with the shipped GPU config on the CPU: MiniLM instead of the 7B
backbone, a few training steps, a few dozen evaluation queries, constrained decoding and
one-pass top-100 over every DocID. What it checks is the plumbing at scale (reading,
DocIDs, the index, decoding memory), not retrieval quality. Writes <work>/out/gr.md and
the manifest, and prints the wall time of each stage.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffrag import config as config_lib
from diffrag.gr.pipeline import GRConfig, run_gr

SIZES = {"nq320k": ("configs/gr_dream7b_nq320k.yaml", 109_739, True, "corpus.tsv"),
         "msmarco": ("configs/gr_dream7b_msmarco.yaml", 320_000, False, "collection.tsv")}


def synthetic_export(folder: Path, n_docs: int, titles: bool, corpus_file: str, seed: int = 0,
                     train_queries: int = 2000, dev_queries: int = 64) -> None:
  """A TSV export: Zipf words, documents of 40-120 words, queries drawn from their document."""
  rng = np.random.default_rng(seed)
  vocab = np.array([f"w{i}" for i in range(50_000)])
  words = lambda n: vocab[np.minimum(rng.zipf(1.3, n), len(vocab)) - 1]
  folder.mkdir(parents=True, exist_ok=True)
  texts = []
  with open(folder / corpus_file, "w") as f:
    for i in range(n_docs):
      text = " ".join(words(int(rng.integers(40, 120))))
      texts.append(text)
      f.write(f"d{i}\t{' '.join(words(int(rng.integers(2, 8)))) + f' {i}'}\t{text}\n" if titles else f"d{i}\t{text}\n")
  for split, n in (("train", train_queries), ("dev", dev_queries)):
    docs = rng.choice(n_docs, n, replace=False)
    with open(folder / f"queries.{split}.tsv", "w") as q, open(folder / f"qrels.{split}.tsv", "w") as r:
      for j, d in enumerate(docs):
        toks = texts[d].split()
        start = int(rng.integers(0, max(1, len(toks) - 8)))
        q.write(f"{split}{j}\t{' '.join(toks[start:start + 8])}\n")
        r.write(f"{split}{j}\t0\td{d}\t1\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), required=True)
  parser.add_argument("--work", default="outputs/dry_run")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  config, n_docs, titles, corpus_file = SIZES[args.size]
  work = Path(args.work) / args.size
  t0 = time.perf_counter()
  if not (work / "data" / args.size / corpus_file).exists():
    synthetic_export(work / "data" / args.size, n_docs, titles, corpus_file)
  print(f"synthetic {args.size} export ({n_docs} documents): {time.perf_counter() - t0:.0f} s")
  over = [f"data.data_dir={work / 'data'}", "model.checkpoint=null", "model.dtype=float32", "model.lora_rank=0",
          "docids.max_tokens=16", "train.steps=4", "train.batch_size=8", "train.query_tokens=32",
          "train.ar_steps=0", "train.pseudo_queries=1", f"train.store={work / 'artefacts'}", "data.limit=32",
          "decode.steps=[4]", "decode.beam=0", "decode.one_pass=100", "decode.batch_size=8",
          f"cache_dir={work / 'cache'}", f"out_dir={work / 'out'}"] + list(args.overrides)
  t0 = time.perf_counter()
  summary = run_gr(config_lib.load(GRConfig, config, over))
  print(summary["table"])
  print(f"dry run of {config} at {n_docs} documents: {time.perf_counter() - t0:.0f} s; counts {summary['counts']}")


if __name__ == "__main__":
  main()
