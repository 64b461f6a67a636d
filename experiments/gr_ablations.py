"""DiffuGR ablations: each writes outputs/ablations/gr_<sweep>.{md,csv,png}.

    python experiments/gr_ablations.py --sweep steps        # Recall@1 and latency vs T
    python experiments/gr_ablations.py --sweep kind         # linguistic vs learnt (RQ) DocIDs
    python experiments/gr_ablations.py --sweep decoding     # pseudo-beam vs beam over states vs one-pass
    python experiments/gr_ablations.py --sweep constraint   # constrained vs unconstrained (+ invalid share)
    python experiments/gr_ablations.py --sweep paradigm     # diffusion vs autoregressive, same backbone
    [--config configs/gr_minilm_scifact.yaml] [key=value ...]

All sweeps but `kind` read one `diffrag gr` run (trained once; rerunning reuses its
checkpoints); `kind` runs it for each DocID kind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffrag import config as config_lib
from diffrag.gr.pipeline import GRConfig, run_gr
from diffrag.report import pyplot, save_figure, write_table

PICK = {
    "steps": lambda r: r["method"].startswith("diffusion_T"),
    "decoding": lambda r: r["method"].startswith(("pseudo_beam", "beam_", "one_pass", "diffusion_T")) and (
        not r["method"].startswith("diffusion_T") or r["method"].endswith("_constrained")),
    "constraint": lambda r: r["method"].startswith("diffusion_T"),
    "paradigm": lambda r: r["method"].startswith(("beam_", "ar_beam", "bm25", "dense")),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=["steps", "kind", "decoding", "constraint", "paradigm"], required=True)
  parser.add_argument("--config", default="configs/gr_minilm_scifact.yaml")
  parser.add_argument("--out", default="outputs/ablations")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  rows = []
  kinds = ["linguistic", "rq"] if args.sweep == "kind" else [None]
  for kind in kinds:
    over = list(args.overrides) + ([f"docids.kind={kind}", f"out_dir={args.out}/gr_{kind}"] if kind else [])
    summary = run_gr(config_lib.load(GRConfig, args.config, over))
    pick = PICK.get(args.sweep, lambda r: not r["method"] in ("bm25", "dense") or kind == "linguistic")
    rows += [r for r in summary["methods"] if pick(r)]
  out = Path(args.out)
  print(write_table(rows, out, f"gr_{args.sweep}"))
  _plot(rows, args.sweep, out / f"gr_{args.sweep}.png")


def _plot(rows, sweep, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.4))
  if sweep in ("steps", "constraint"):
    for suffix, label in (("_constrained", "constrained"), ("", "unconstrained")):
      pts = sorted((r["T"], r["recall@1"], r["ms_per_query"]) for r in rows
                   if r["method"].endswith(suffix) and (suffix or not r["method"].endswith("_constrained")))
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"R@1, {label}")
        ax2 = ax.twinx() if label == "constrained" else None
        if ax2 is not None:
          ax2.plot([p[0] for p in pts], [p[2] for p in pts], "k:", label="ms/query")
          ax2.set_ylabel("ms / query")
    ax.set_xlabel("denoising steps T")
    ax.set_ylabel("Recall@1 (%)")
  else:
    labels = [f"{r['method']} ({r['docids']})" for r in rows]
    ax.barh(range(len(rows)), [r["recall@10"] for r in rows], alpha=0.4, label="R@10")
    ax.barh(range(len(rows)), [r["recall@1"] for r in rows], label="R@1")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("%")
  save_figure(fig, path)


if __name__ == "__main__":
  main()
