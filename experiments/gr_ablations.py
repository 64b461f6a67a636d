"""DiffuGR ablations: each writes outputs/ablations/gr_<sweep>.{md,csv,png} and a manifest.

    python experiments/gr_ablations.py --sweep steps        # Recall@1 and latency vs T
    python experiments/gr_ablations.py --sweep kind         # linguistic vs learnt (RQ) DocIDs
    python experiments/gr_ablations.py --sweep decoding     # pseudo-beam vs beam over states vs one-pass
    python experiments/gr_ablations.py --sweep constraint   # constrained vs unconstrained (+ invalid share)
    python experiments/gr_ablations.py --sweep paradigm     # diffusion vs autoregressive, same backbone and budget
    python experiments/gr_ablations.py --sweep views        # training views: queries only, + indexing, + pseudo-queries
    [--config configs/gr_minilm_scifact.yaml] [key=value ...]

All sweeps but `kind` and `views` read one `diffrag gr` run (its retrievers are artefacts:
rerunning reuses them); `kind` and `views` run it per value. Every row carries its 95%
bootstrap interval and its paired difference to BM25 (n, interval, randomization p); the
paradigm sweep adds the paired difference of every diffusion mode to the AR twin, trained
with the same pairs, steps, batch and optimizer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from diffrag import config as config_lib
from diffrag.experiment import stats
from diffrag.experiment.provenance import write_manifest
from diffrag.gr.pipeline import GRConfig, run_gr
from diffrag.report import pyplot, save_figure, write_table

PICK = {
    "steps": lambda r: r["method"].startswith("diffusion_T"),
    "decoding": lambda r: r["method"].startswith(("pseudo_beam", "beam_", "one_pass", "diffusion_T")) and (
        not r["method"].startswith("diffusion_T") or r["method"].endswith("_constrained")),
    "constraint": lambda r: r["method"].startswith("diffusion_T"),
    "paradigm": lambda r: r["method"].startswith(("beam_", "one_pass", "ar_beam", "bm25", "dense")),
}
VIEWS = {"queries": ["train.indexing=false", "train.pseudo_queries=0"],
         "queries+indexing": ["train.indexing=true", "train.pseudo_queries=0"],
         "queries+indexing+pseudo": ["train.indexing=true", "train.pseudo_queries=8"]}
COLUMNS = ("method", "model", "docids", "index_input", "T", "n", "recall@1", "recall@10", "recall@10_ci",
           "recall@100", "mrr@10", "ndcg@10", "ndcg@10_ci", "d_ndcg@10_vs_bm25", "p_ndcg@10", "invalid_%",
           "forward_passes", "ms_per_query", "compile_s", "train_steps", "train_examples_seen", "train_s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=["steps", "kind", "decoding", "constraint", "paradigm", "views"],
                      required=True)
  parser.add_argument("--config", default="configs/gr_minilm_scifact.yaml")
  parser.add_argument("--out", default="outputs/ablations")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  rows, runs = [], []
  values = {"kind": ["linguistic", "rq"], "views": list(VIEWS)}.get(args.sweep, [None])
  for value in values:
    over = list(args.overrides)
    if args.sweep == "kind":
      over += [f"docids.kind={value}", f"out_dir={args.out}/gr_kind_{value}"]
    elif args.sweep == "views":
      over += VIEWS[value] + [f"out_dir={args.out}/gr_views_{value.replace('+', '_')}"]
    cfg = config_lib.load(GRConfig, args.config, over)
    summary = run_gr(cfg)
    runs.append(f"{cfg.out_dir}/manifest.json")
    pick = PICK.get(args.sweep, lambda r, v=value: r["method"] not in ("bm25", "dense") or v == values[0])
    for r in summary["methods"]:
      if pick(r):
        rows.append({**({args.sweep: value} if value else {}), **{c: r.get(c, "") for c in COLUMNS}})
    if args.sweep == "paradigm":
      rows += _paradigm(summary)
  out = Path(args.out)
  print(write_table(rows, out, f"gr_{args.sweep}"))
  write_manifest(out / f"gr_{args.sweep}", config={"sweep": args.sweep, "config": args.config,
                                                   "overrides": args.overrides}, extra={"runs": runs})
  _plot(rows, args.sweep, out / f"gr_{args.sweep}.png")


def _paradigm(summary) -> list[dict]:
  """Every diffusion mode against the AR twin on the same queries (paired)."""
  per = summary["per_query"]
  ar = next((m for m in per if m.startswith("ar_beam")), None)
  out = []
  for m in per:
    if ar is None or m == ar or m in ("bm25", "dense") or m.startswith("diffusion_T"):
      continue
    row = {"method": f"{m} - {ar}", "model": "paired difference", "n": len(per[m]["ndcg@10"])}
    for metric in ("ndcg@10", "recall@10"):
      c = stats.compare(np.asarray(per[m][metric]), np.asarray(per[ar][metric]))
      row[f"d_{metric}_vs_ar"] = stats.fmt_diff(c, scale=100)
      row[f"p_{metric}_vs_ar"] = stats.fmt_p(c["p"])
    out.append(row)
  return out


def _ci(r, name):
  lo, hi = (float(x) for x in r[f"{name}_ci"].strip("[]").split(","))
  return r[name] - lo, hi - r[name]


def _plot(rows, sweep, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 3.6))
  scored = [r for r in rows if r.get("ndcg@10_ci")]
  if sweep in ("steps", "constraint"):
    for suffix, label in (("_constrained", "constrained"), ("", "unconstrained")):
      pts = sorted((r["T"], r["recall@10"], _ci(r, "recall@10"), r["forward_passes"]) for r in scored
                   if r["method"].endswith(suffix) and (suffix or not r["method"].endswith("_constrained")))
      if pts:
        ax.errorbar([p[3] for p in pts], [p[1] for p in pts], yerr=np.array([p[2] for p in pts]).T, fmt="o-",
                    capsize=3, label=f"R@10, {label}")
    ax.set_xlabel("forward passes per query (T, repairs included)")
    ax.set_ylabel("Recall@10 (%), 95% interval")
  else:
    labels = [f"{r['method']} {r.get(sweep, '') or ''} ({r['docids']})" for r in scored]
    err = np.array([_ci(r, "ndcg@10") for r in scored]).T
    ax.barh(range(len(scored)), [r["ndcg@10"] for r in scored], xerr=err, capsize=2, label="nDCG@10")
    ax.set_yticks(range(len(scored)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("nDCG@10 (%), 95% interval")
  save_figure(fig, path, legend_size=7)


if __name__ == "__main__":
  main()
