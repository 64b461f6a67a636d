"""Paired comparison of two run folders: `diffrag compare CONTROL TREATMENT`.

Two `diffrag rag` (or two `diffrag gr`) runs that differ in one setting (training steps, a
decoding switch, a data mix) are compared on the items both evaluated, method by method:
d_i = treatment_i - control_i for every shared question (RAG: F1, EM, precision, answer
words, from `predictions.jsonl`) or query (GR: nDCG@10, Recall@1/10/100, MRR@10, from the
per-query scores in `metrics.json`), with the 95% paired bootstrap interval of mean(d), the
randomization p-value and n (`diffrag.experiment.stats.compare`). Items only one run has are
counted, never paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffrag.experiment import stats

RAG_METRICS = ("f1", "em", "precision", "answer_words")
GR_METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10")


def load_scores(out_dir: str | Path) -> tuple[str, dict[str, dict[str, dict[str, float]]]]:
  """(kind, {group: {item id: {metric: value}}}) of one run folder.

  RAG (`predictions.jsonl`): group = "dataset/method", items = question ids, metrics in %
  (answer_words in words). GR (`metrics.json` with per-query scores): group = the row's
  method, items = query ids, metrics in %.
  """
  out = Path(out_dir)
  preds, metrics = out / "predictions.jsonl", out / "metrics.json"
  if preds.exists():
    from diffrag.rag.metrics import qa_scores  # pylint: disable=import-outside-toplevel
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for line in preds.read_text().splitlines():
      if not line.strip():
        continue
      r = json.loads(line)
      s = qa_scores(r["prediction"], r["answers"])
      groups.setdefault(f"{r.get('dataset', '')}/{r['method']}", {})[r["id"]] = {
          "f1": 100 * s["f1"], "em": 100 * s["em"], "precision": 100 * s["precision"],
          "answer_words": float(s["length"])}
    return "rag", groups
  if metrics.exists():
    summary = json.loads(metrics.read_text())
    if "per_query" in summary and "eval_query_ids" in summary:
      ids = summary["eval_query_ids"]
      groups = {}
      for method, scores in summary["per_query"].items():
        cols = {m: scores[m] for m in GR_METRICS if m in scores}
        if any(len(v) != len(ids) for v in cols.values()):
          raise ValueError(f"{metrics}: the per-query scores of {method!r} do not match its {len(ids)} query ids")
        groups[method] = {q: {m: 100 * float(v[i]) for m, v in cols.items()} for i, q in enumerate(ids)}
      return "gr", groups
  raise FileNotFoundError(f"{out} holds no predictions.jsonl (a `diffrag rag` run) nor a metrics.json with "
                          "per-query scores (a `diffrag gr` run): give the out_dir of a finished run")


def compare_runs(control: str | Path, treatment: str | Path, groups: list[str] | None = None,
                 metrics: list[str] | None = None) -> list[dict]:
  """One row per (group, metric) that both runs have: means, paired difference, interval, p, n."""
  kind_c, c = load_scores(control)
  kind_t, t = load_scores(treatment)
  if kind_c != kind_t:
    raise ValueError(f"{control} is a {kind_c} run and {treatment} a {kind_t} run: compare runs of one kind")
  shared = [g for g in c if g in t]
  if groups:
    unknown = [g for g in groups if g not in shared]
    if unknown:
      raise ValueError(f"group(s) {unknown} are not in both runs; both have {shared}")
    shared = list(groups)
  if not shared:
    raise ValueError(f"the runs share no method: {control} has {sorted(c)}, {treatment} has {sorted(t)}")
  names = list(metrics or (RAG_METRICS if kind_c == "rag" else GR_METRICS))
  rows = []
  for g in shared:
    ids = sorted(set(c[g]) & set(t[g]))
    if not ids:
      raise ValueError(f"{g}: the runs evaluated no common item (different questions or queries)")
    for m in names:
      if m not in c[g][ids[0]] or m not in t[g][ids[0]]:
        raise ValueError(f"metric {m!r} is not in both runs' {g}; expected one of {sorted(c[g][ids[0]])}")
      a = np.array([c[g][i][m] for i in ids])
      b = np.array([t[g][i][m] for i in ids])
      cmp = stats.compare(b, a)
      rows.append({"group": g, "metric": m, "n": len(ids), "control": round(float(a.mean()), 2),
                   "treatment": round(float(b.mean()), 2), "d (treatment - control)": stats.fmt_diff(cmp),
                   "p": stats.fmt_p(cmp["p"]), "only_control": len(c[g]) - len(ids),
                   "only_treatment": len(t[g]) - len(ids)})
  return rows


def _table(runs: list[dict], group: str, metric: str, ids: list[str]) -> np.ndarray:
  """scores [runs, items] of one group and metric, items in `ids` order."""
  return np.array([[r[group][i][metric] for i in ids] for r in runs])


def _over_runs(x: np.ndarray) -> dict:
  """The summary of scores x [S runs, Q items]: per-run means, sd, t and crossed intervals."""
  per_run = x.mean(axis=1)
  mean, lo, hi = stats.t_interval(per_run)
  _, clo, chi = stats.crossed_bootstrap_ci(x)
  return {"per_seed": " / ".join(f"{v:.2f}" for v in per_run), "mean": round(float(mean), 2),
          "sd_seeds": round(float(per_run.std(ddof=1)), 2), "t_ci_seeds": stats.fmt_interval(mean, lo, hi),
          "crossed_ci": stats.fmt_interval(mean, clo, chi), "significant": not clo <= 0.0 <= chi}


def summarize_seeds(arms: dict[str, list[str | Path]], groups: list[str] | None = None,
                    metrics: list[str] | None = None, reference: str | None = None) -> tuple[list[dict], list[dict]]:
  """Runs that differ only in their training seed, summarised over the seeds.

  `arms`: {arm name: [run folder per seed]}, every arm with the same number of seeds (>= 2),
  seed i of one arm paired with seed i of another. For every group (method) and metric the
  runs all evaluated, on the items every run has:
    levels: per-seed means, their sd, the t interval over seeds and the crossed
            (seeds x items) bootstrap interval, with the mean half-width of one run's
            question interval beside them (`q_ci_halfwidth`), to see which variance dominates;
    diffs:  d[s, q] = treatment - control for each seed s and item q, summarised the same
            way: every group against `reference` (a method, e.g. "baseline"; RAG groups are
            "dataset/method", compared within a dataset) in each arm, and every arm against
            the first arm, group by group.
  A difference is marked significant when its crossed interval excludes 0.
  """
  names = list(arms)
  if not names:
    raise ValueError("no arm to summarise")
  sizes = {a: len(d) for a, d in arms.items()}
  if len(set(sizes.values())) != 1 or min(sizes.values()) < 2:
    raise ValueError(f"every arm needs the same number (>= 2) of seeds; got {sizes}")
  loaded = {a: [load_scores(d) for d in dirs] for a, dirs in arms.items()}
  kinds = {k for runs in loaded.values() for k, _ in runs}
  if len(kinds) != 1:
    raise ValueError(f"the runs mix kinds {sorted(kinds)}: summarise runs of one kind")
  runs = {a: [g for _, g in r] for a, r in loaded.items()}
  shared = [g for g in runs[names[0]][0] if all(g in r for rs in runs.values() for r in rs)]
  if groups:
    unknown = [g for g in groups if g not in shared]
    if unknown:
      raise ValueError(f"group(s) {unknown} are not in every run; every run has {shared}")
    shared = list(groups)
  kind = kinds.pop()
  wanted = list(metrics or (RAG_METRICS if kind == "rag" else GR_METRICS))
  levels, diffs = [], []
  for g in shared:
    every = [r[g] for rs in runs.values() for r in rs]
    ids = sorted(set.intersection(*(set(r) for r in every)))
    if not ids:
      raise ValueError(f"{g}: the runs evaluated no common item")
    for m in wanted:
      if m not in every[0][ids[0]]:
        raise ValueError(f"metric {m!r} is not in {g}; expected one of {sorted(every[0][ids[0]])}")
      for a in names:
        x = _table(runs[a], g, m, ids)
        half = np.mean([(hi - lo) / 2 for _, lo, hi in (stats.bootstrap_ci(row, n_boot=2000) for row in x)])
        row = _over_runs(x)
        row.pop("significant")
        levels.append({"arm": a, "group": g, "metric": m, "seeds": len(x), "n": len(ids), **row,
                       "q_ci_halfwidth": round(float(half), 2)})
        ref = (g.rsplit("/", 1)[0] + "/" + reference if "/" in g else reference) if reference else None
        if ref and ref != g and ref in shared:
          ref_ids = sorted(set(ids).intersection(*(set(r[ref]) for r in runs[a])))
          d = _table(runs[a], g, m, ref_ids) - _table(runs[a], ref, m, ref_ids)
          diffs.append({"difference": f"{g} - {ref}", "arm": a, "metric": m, "seeds": len(d), "n": len(ref_ids),
                        **_over_runs(d)})
      for a in names[1:]:
        d = _table(runs[a], g, m, ids) - _table(runs[names[0]], g, m, ids)
        diffs.append({"difference": f"{g}: {a} - {names[0]}", "arm": "", "metric": m, "seeds": len(d),
                      "n": len(ids), **_over_runs(d)})
  return levels, diffs
