"""SPREAD ablations called for by the paper's open questions (../shared/specs/spread.md section 6).

    python experiments/spread_ablations.py --sweep alpha      [--config configs/rag_minilm_squad.yaml] [k=v ...]
    python experiments/spread_ablations.py --sweep confidence | layer | steps | block | pooling

Each sweep runs `diffrag rag` once per value (the reader is trained once and reused: its
checkpoint folder is shared), then writes outputs/ablations/<sweep>.{md,csv,png}: precision,
F1 and RSD of the baseline and of SPREAD (alpha from --alpha) per value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffrag import config as config_lib
from diffrag.rag.pipeline import RagConfig, run_rag
from diffrag.report import pyplot, save_figure, write_table

SWEEPS = {
    "alpha": ("spread.alphas", [[0.1, 0.3, 0.5, 0.7, 1.0]]),
    "confidence": ("generation.confidence", ["prob", "margin", "entropy"]),
    "layer": ("spread.hidden_layer", [-1, 0, 2, 4]),
    "steps": ("generation.steps", [2, 4, 8, 16]),
    "block": ("generation.block_length", [16, 8, 4]),
    "pooling": ("spread.pooling", ["mean", "max_token"]),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), required=True)
  parser.add_argument("--config", default="configs/rag_minilm_squad.yaml")
  parser.add_argument("--alpha", type=float, default=0.5, help="SPREAD alpha for the non-alpha sweeps")
  parser.add_argument("--out", default="outputs/ablations")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  key, values = SWEEPS[args.sweep]
  rows = []
  for value in values:
    over = list(args.overrides) + [f"{key}={value}", f"out_dir={args.out}/{args.sweep}/{value}"]
    if args.sweep != "alpha":
      over.append(f"spread.alphas=[{args.alpha}]")
    cfg = config_lib.load(RagConfig, args.config, over)
    for r in run_rag(cfg)["methods"]:
      rows.append({args.sweep: value if args.sweep != "alpha" else r["alpha"], "method": r["method"],
                   "precision": r["precision"], "f1": r["f1"], "em": r["em"], "rsd": r["rsd"],
                   "answer_words": r["answer_words"], "seconds": r["seconds"]})
    if args.sweep == "alpha":
      break  # one run holds every alpha
  out = Path(args.out)
  print(write_table(rows, out, args.sweep))
  _plot(rows, args.sweep, out / f"{args.sweep}.png")


def _plot(rows, sweep, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for method in dict.fromkeys(r["method"] if sweep != "alpha" else "all" for r in rows):
    pts = [r for r in rows if sweep == "alpha" or r["method"] == method]
    xs = [str(r[sweep]) for r in pts]
    ax.plot(xs, [r["precision"] for r in pts], "o-", label=f"{method} precision")
    ax.plot(xs, [r["f1"] for r in pts], "s--", label=f"{method} F1")
  ax.set_xlabel(sweep)
  ax.set_ylabel("%")
  save_figure(fig, path)


if __name__ == "__main__":
  main()
