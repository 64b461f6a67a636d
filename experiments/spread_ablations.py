"""SPREAD ablations called for by the paper's open questions (../shared/specs/spread.md section 6).

    python experiments/spread_ablations.py --sweep alpha      [--config configs/rag_minilm_squad.yaml] [k=v ...]
    python experiments/spread_ablations.py --sweep confidence | layer | steps | block | pooling
    python experiments/spread_ablations.py --sweep decoding   [--config configs/rag_minilm_squad_long.yaml]

Each sweep runs `diffrag rag` once per value; the reader is an artefact keyed by what made
it, so every run of a sweep reuses the same trained reader (the sweep values only change
decoding). Writes outputs/ablations/<sweep>.{md,csv,png} and a manifest: per data set and
value, precision, F1, copy rate and RSD of the baseline and of SPREAD (alpha from --alpha),
each SPREAD row with its paired difference to the baseline on the same questions (95%
bootstrap interval, randomization p-value, n).

`--sweep decoding` measures Fast-dLLM's parallel decoding on the trained reader instead: the
baseline sampler only, exact (one token per step, no cache) against confidence-threshold
commits (0.9, 0.7, 0.5) and prefix / dual KV caches. Every setting is paired with the exact
sampler on the same questions (d_f1, d_em with interval, p, n), with generated tokens per
second (compilation excluded), its ratio to exact, and the mean number of forward passes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffrag import config as config_lib
from diffrag.experiment.provenance import write_manifest
from diffrag.rag import parallel
from diffrag.rag.pipeline import RagConfig, ci_errors, run_rag
from diffrag.report import pyplot, save_figure, write_table

SWEEPS = {
    "alpha": ("spread.alphas", [[0.1, 0.3, 0.5, 0.7, 1.0]]),
    "confidence": ("generation.confidence", ["prob", "margin", "entropy"]),
    "layer": ("spread.hidden_layer", [-1, 0, 2, 4]),
    "steps": ("generation.steps", [2, 4, 8, 16]),
    "block": ("generation.block_length", [16, 8, 4]),
    "pooling": ("spread.pooling", ["mean", "max_token"]),
    "decoding": ("generation", list(parallel.DECODING)),
}
COLUMNS = ("dataset", "method", "alpha", "n", "precision", "precision_ci", "d_precision", "p_precision", "f1", "f1_ci",
           "d_f1", "p_f1", "em", "copy_rate", "rsd", "d_rsd", "p_rsd", "answer_words", "s_per_q")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), required=True)
  parser.add_argument("--config", default="configs/rag_minilm_squad.yaml")
  parser.add_argument("--alpha", type=float, default=0.5, help="SPREAD alpha for the non-alpha sweeps")
  parser.add_argument("--out", default="outputs/ablations")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  if args.sweep == "decoding":
    return parallel.decoding_sweep(args.config, args.overrides, Path(args.out))
  key, values = SWEEPS[args.sweep]
  rows, manifests = [], []
  for value in values:
    # SPREAD's sweeps compare sampler rows: the config's span / l2r rows (which would repeat unchanged in
    # every value) are off unless the command line turns them on again
    over = ["generation.span_decoding=false", "generation.span_first_tokens=0", "generation.left_to_right=false",
            "generation.left_to_right_phrases=false"] + \
        list(args.overrides) + [f"{key}={value}", f"out_dir={args.out}/{args.sweep}/{value}"]
    if args.sweep != "alpha":
      over.append(f"spread.alphas=[{args.alpha}]")
    cfg = config_lib.load(RagConfig, args.config, over)
    for r in run_rag(cfg)["methods"]:
      row = {args.sweep: value if args.sweep != "alpha" else r["alpha"]}
      row.update({c: r.get(c, "") for c in COLUMNS})
      rows.append(row)
    manifests.append(f"{cfg.out_dir}/manifest.json")
  out = Path(args.out)
  print(write_table(rows, out, args.sweep))
  write_manifest(out / args.sweep, config={"sweep": args.sweep, "key": key, "values": values,
                                           "config": args.config, "overrides": args.overrides},
                 extra={"runs": manifests})
  _plot(rows, args.sweep, out / f"{args.sweep}.png")


def _err(rows, name):
  return ci_errors([r[name] for r in rows], [r[f"{name}_ci"] for r in rows])


def _plot(rows, sweep, path):
  """Precision and F1 (95% intervals as error bars) against the swept value, per data set and method."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    groups = ["all"] if sweep == "alpha" else list(dict.fromkeys(r["method"] for r in rows))
    for method in groups:
      pts = [r for r in rows if r["dataset"] == dataset and (sweep == "alpha" or r["method"] == method)]
      xs = [str(r[sweep]) for r in pts]
      tag = dataset if sweep == "alpha" else f"{dataset} {method}"
      ax.errorbar(xs, [r["precision"] for r in pts], yerr=_err(pts, "precision"), fmt="o-", capsize=3,
                  label=f"{tag} precision")
      ax.errorbar(xs, [r["f1"] for r in pts], yerr=_err(pts, "f1"), fmt="s--", capsize=3, label=f"{tag} F1")
  ax.set_xlabel(sweep + (" (0 = baseline)" if sweep == "alpha" else ""))
  ax.set_ylabel("% (95% bootstrap interval)")
  save_figure(fig, path, legend_size=6)


if __name__ == "__main__":
  main()
