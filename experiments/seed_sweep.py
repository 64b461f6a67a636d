"""Training seeds: how far a result moves when only the training run changes.

    python experiments/seed_sweep.py --seeds 0 1 2 3 4 [--config configs/rag_minilm_squad.yaml] [k=v ...]
    python experiments/seed_sweep.py --seeds 0 1 2 --treatment reader.train_steps=720 [k=v ...]
    python experiments/seed_sweep.py --kind gr --config configs/gr_minilm_scifact.yaml --seeds 0 1 2

Every interval `diffrag rag|gr` prints covers the questions (or queries) for one trained
model. A reader retrained with another seed, or by code that differs only in float rounding,
lands elsewhere: on the demo reader that moved F1 by 3-5 points. This script trains one model
per seed (`reader.seed`, or `train.seed` for `--kind gr`; each is its own artefact, reused
when it exists) and evaluates each, in `<out>/<name>/<arm>/seed_<s>/`. With `--treatment`
a second arm runs the same seeds with those overrides added. `--run treatment` runs only
that arm and reads the control arm's folders as an earlier call left them (`--run none`
only summarises); each run's manifest records the commit and config that made it.

Writes `<out>/<name>/seeds.{md,csv}` (per arm, method and metric: the per-seed means, their
sd, the t interval over seeds and the crossed seeds x questions bootstrap interval, beside
one run's question interval), `seed_diffs.{md,csv}` (each method minus `--reference` within
each arm, and the treatment arm minus the control arm, method by method, summarised the
same way), `seeds.png` and a manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffrag import config as config_lib
from diffrag.experiment import stats
from diffrag.experiment.compare import summarize_seeds
from diffrag.experiment.provenance import write_manifest
from diffrag.report import pyplot, save_figure, write_table

KINDS = {"rag": ("configs/rag_minilm_squad.yaml", "reader.seed", "baseline"),
         "gr": ("configs/gr_minilm_scifact.yaml", "train.seed", None)}


def _runner(kind: str):
  if kind == "rag":
    from diffrag.rag.pipeline import RagConfig, run_rag  # pylint: disable=import-outside-toplevel
    return RagConfig, run_rag
  from diffrag.gr.pipeline import GRConfig, run_gr  # pylint: disable=import-outside-toplevel
  return GRConfig, run_gr


def run_arm(kind: str, config: str, overrides: list[str], seeds: list[int], out: Path) -> list[Path]:
  """One run per seed (its own trained model), in out/seed_<s>; returns the run folders."""
  cls, run = _runner(kind)
  seed_key = KINDS[kind][1]
  dirs = []
  for s in seeds:
    cfg = config_lib.load(cls, config, list(overrides) + [f"{seed_key}={s}", f"out_dir={out}/seed_{s}"])
    print(f"== {out.name}: {seed_key}={s} ==")
    run(cfg)
    dirs.append(Path(cfg.out_dir))
  return dirs


def plot(levels: list[dict], path: Path, arms: dict[str, list[Path]]) -> None:
  """Per method (first metric): each seed's mean as a dot, the mean over seeds with its t interval."""
  metric = levels[0]["metric"]
  rows = [r for r in levels if r["metric"] == metric]
  groups = list(dict.fromkeys(r["group"] for r in rows))
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups)), 3.6))
  width = 0.8 / len(arms)
  for j, arm in enumerate(arms):
    for i, g in enumerate(groups):
      r = next(r for r in rows if r["arm"] == arm and r["group"] == g)
      x = i + (j - (len(arms) - 1) / 2) * width
      seeds = [float(v) for v in r["per_seed"].split(" / ")]
      mean, lo, hi = stats.t_interval(seeds)
      ax.plot([x] * len(seeds), seeds, "o", color=f"C{j}", alpha=0.5, label=arm if i == 0 else None)
      ax.errorbar([x], [mean], yerr=[[mean - lo], [hi - mean]], fmt="_", color=f"C{j}", capsize=4)
  ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
  ax.set_ylabel(f"{metric} (%): seeds, mean, 95% t interval")
  save_figure(fig, path, legend_size=7)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", choices=sorted(KINDS), default="rag")
  parser.add_argument("--config", help="default: configs/rag_minilm_squad.yaml (rag), configs/gr_minilm_scifact.yaml")
  parser.add_argument("--seeds", type=int, nargs="+", required=True, help="at least 2 training seeds")
  parser.add_argument("--treatment", action="append", default=[], metavar="KEY=VALUE",
                      help="an override of the second arm (repeat for several)")
  parser.add_argument("--reference", help="the method each other is compared with (rag: baseline)")
  parser.add_argument("--metric", action="append", help="metrics to summarise (default: f1 and em, or ndcg@10)")
  parser.add_argument("--name", help="the sweep's folder name under --out (default: the config's name)")
  parser.add_argument("--out", default="outputs/seeds")
  parser.add_argument("--run", choices=("all", "control", "treatment", "none"), default="all",
                      help="which arms to run before the summary (the others are read from their folders, as "
                           "earlier runs left them; none: summarise only)")
  parser.add_argument("overrides", nargs="*", help="key=value overrides of both arms")
  args = parser.parse_args()
  if len(set(args.seeds)) < 2 or len(set(args.seeds)) != len(args.seeds):
    parser.error(f"--seeds needs at least 2 distinct seeds; got {args.seeds}")
  config = args.config or KINDS[args.kind][0]
  reference = args.reference or KINDS[args.kind][2]
  metrics = args.metric or (["f1", "em"] if args.kind == "rag" else ["ndcg@10"])
  out = Path(args.out) / (args.name or Path(config).stem)
  plan = {"control": args.overrides, **({"treatment": args.overrides + args.treatment} if args.treatment else {})}
  arms = {}
  for arm, overrides in plan.items():
    if args.run in ("all", arm):
      arms[arm] = run_arm(args.kind, config, overrides, args.seeds, out / arm)
    else:  # finished runs of an earlier call: their manifests say which commit and config made them
      arms[arm] = [out / arm / f"seed_{s}" for s in args.seeds]
  levels, diffs = summarize_seeds(arms, metrics=metrics, reference=reference)
  print(write_table(levels, out, "seeds"))
  if diffs:
    print(write_table(diffs, out, "seed_diffs"))
  plot(levels, out / "seeds.png", arms)
  write_manifest(out, config={"kind": args.kind, "config": config, "seeds": args.seeds, "overrides": args.overrides,
                              "treatment": args.treatment, "reference": reference, "metrics": metrics},
                 seeds={"training": args.seeds},
                 extra={"runs": {a: [str(d / "manifest.json") for d in dirs] for a, dirs in arms.items()}})


if __name__ == "__main__":
  main()
