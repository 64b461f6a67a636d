"""Fast-dLLM's parallel decoding measured on a trained reader (`--sweep decoding`, `make bench`).

Each setting runs `run_rag` on the same reader, prompts and questions with the baseline
sampler only (no SPREAD, no drift) and `generation.steps` = the canvas length. Every row is
paired with the first setting (exact: one token per step, no cache) on the questions both
answered: d_f1 and d_em with their 95% bootstrap interval, randomization p and n, generated
tokens per second (compilation excluded; the canvas's tokens, EOS padding included, so that
every row counts the same tokens), its ratio to exact and the mean number of forward passes.
The baseline sampler is the only method run (SPREAD, span and l2r rows are switched off).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffrag import config as config_lib
from diffrag.experiment import stats
from diffrag.experiment.provenance import write_manifest
from diffrag.rag.metrics import qa_scores
from diffrag.rag.pipeline import RagConfig, ci_errors, run_rag
from diffrag.report import pyplot, save_figure, write_table

# Fast-dLLM settings of `--sweep decoding`: name -> generation overrides (the first is the reference)
DECODING = {
    "exact": [],
    "threshold0.9": ["generation.threshold=0.9"],
    "threshold0.7": ["generation.threshold=0.7"],
    "threshold0.5": ["generation.threshold=0.5"],
    "threshold0.9+prefix": ["generation.threshold=0.9", "generation.cache=prefix"],
    "threshold0.9+dual": ["generation.threshold=0.9", "generation.cache=dual"],
    # one position per block, stopping once every row has its EOS (`pipeline.left_to_right_kwargs`)
    "left_to_right": ["generation.block_length=1", "generation.stop_at_eos=true"],
}
DECODING_COLUMNS = ("dataset", "decoding", "n", "f1", "f1_ci", "d_f1", "p_f1", "em", "d_em", "p_em", "answer_words",
                    "tokens_per_s", "speedup", "forward_passes", "s_per_q")


def _scores(out_dir: Path) -> dict:
  """{(dataset, id): (f1, em, forward passes)} of the baseline sampler's predictions in a run folder."""
  got = {}
  with open(out_dir / "predictions.jsonl", encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if r["method"] == "baseline":
        s = qa_scores(r["prediction"], r["answers"])
        got[(r["dataset"], r["id"])] = (100 * s["f1"], 100 * s["em"], r["forward_passes"])
  return got


def decoding_sweep(config: str | None, overrides: list[str], out: Path, settings: dict | None = None) -> list[dict]:
  """Every setting (default DECODING; the first is the reference) on the same reader and
  questions, each paired with the reference on the questions both answered."""
  settings = dict(settings or DECODING)
  base = config_lib.load(RagConfig, config, list(overrides))
  if base.reader.copy_head and not base.reader.checkpoint:
    cached = [k for k, over in settings.items() if any(o.startswith("generation.cache=") for o in over)]
    if cached:  # the copy head points at the prompt, whose states a cached forward does not recompute
      print(f"decoding sweep: {cached} left out: the MiniLM reader's copy head needs the prompt in every forward "
            "(KV caches apply to LLaDA / Dream readers, reader.checkpoint=...)")
      settings = {k: v for k, v in settings.items() if k not in cached}
  # at most one token per forward pass: exact is the one-token-per-step sampler, thresholds commit more
  one_per_step = [f"generation.steps={base.generation.gen_length}"]
  rows, manifests, runs = [], [], {}
  for name, over in settings.items():
    cfg = config_lib.load(RagConfig, config, list(overrides) + one_per_step + over + [
        "spread.alphas=[]", "drift=false", "generation.span_decoding=false", "generation.span_first_tokens=0",
        "generation.left_to_right=false", "generation.left_to_right_phrases=false", f"out_dir={out}/decoding/{name}"])
    summary = run_rag(cfg)
    runs[name] = (_scores(Path(cfg.out_dir)), {r["dataset"]: r for r in summary["methods"]}, cfg.generation)
    manifests.append(f"{cfg.out_dir}/manifest.json")
  reference = next(iter(settings))
  ref_scores, ref_rows, _ = runs[reference]
  for name, (scores, by_set, gen) in runs.items():
    for dataset, row in by_set.items():
      keys = sorted(k for k in ref_scores if k[0] == dataset and k in scores)
      mine = np.array([scores[k] for k in keys])
      ref = np.array([ref_scores[k] for k in keys])
      tps = gen.gen_length / row["s_per_q"] if row.get("s_per_q") else float("nan")
      ref_s = ref_rows[dataset].get("s_per_q")
      out_row = {"dataset": dataset, "decoding": name, "n": len(keys), "f1": row["f1"], "f1_ci": row["f1_ci"],
                 "em": row["em"], "answer_words": row["answer_words"], "tokens_per_s": round(tps, 1),
                 "speedup": round(ref_s / row["s_per_q"], 2) if ref_s and row.get("s_per_q") else "",
                 "forward_passes": round(float(mine[:, 2].mean()), 2), "s_per_q": row.get("s_per_q", "")}
      if name != reference:
        for col, key in ((0, "f1"), (1, "em")):
          c = stats.compare(mine[:, col], ref[:, col])
          out_row[f"d_{key}"], out_row[f"p_{key}"] = stats.fmt_diff(c), stats.fmt_p(c["p"])
      rows.append({c: out_row.get(c, "") for c in DECODING_COLUMNS})
  print(write_table(rows, out, "decoding"))
  write_manifest(out / "decoding", config={"sweep": "decoding", "settings": settings, "config": config,
                                           "overrides": overrides}, extra={"runs": manifests})
  _plot_decoding(rows, out / "decoding.png")
  return rows


def _plot_decoding(rows, path):
  """F1 (95% interval) against generated tokens per second, one point per setting and data set."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    pts = [r for r in rows if r["dataset"] == dataset]
    err = ci_errors([r["f1"] for r in pts], [r["f1_ci"] for r in pts])
    ax.errorbar([r["tokens_per_s"] for r in pts], [r["f1"] for r in pts], yerr=err, fmt="o", capsize=3,
                label=dataset)
    for r in pts:
      ax.annotate(r["decoding"], (r["tokens_per_s"], r["f1"]), fontsize=6)
  ax.set_xlabel("generated tokens / s (compilation excluded)")
  ax.set_ylabel("F1 % (95% bootstrap interval)")
  save_figure(fig, path, legend_size=6)
