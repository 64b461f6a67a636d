"""Paired comparison of two run folders: `diffrag compare CONTROL TREATMENT`.

Two `diffrag rag` (or two `diffrag gr`) runs that differ in one setting (training steps, a
decoding switch, a data mix) are compared on the items both evaluated, method by method:
d_i = treatment_i - control_i for every shared question (RAG: F1, EM, precision, answer
words, from `predictions.jsonl`) or query (GR: nDCG@10, Recall@1/10/100, MRR@10, from the
per-query scores in `metrics.json`), with the 95% paired bootstrap interval of mean(d), the
randomization p-value and n (`diffrag.experiment.stats.compare`). Items only one run has are
counted, never paired.

`diffrag compare RUN --vs METHOD` pairs the methods of one run instead: every method against
METHOD on the items both decoded (RAG: within each dataset), e.g. `l2r_phrase` against `l2r`
on the same questions and the same trained reader.
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


def _reference_group(group: str, reference: str) -> str:
  """The group a method is paired with: RAG groups are "dataset/method", compared within a dataset."""
  if "/" in reference:
    return reference
  return group.rsplit("/", 1)[0] + "/" + reference if "/" in group else reference


def _select(available: list[str], groups: list[str] | None, refusal: str) -> list[str]:
  """`groups` (all of them in `available`, else a ValueError "group(s) [...] <refusal>: available"), or all."""
  if not groups:
    return available
  unknown = [g for g in groups if g not in available]
  if unknown:
    raise ValueError(f"group(s) {unknown} {refusal} {available}")
  return list(groups)


def _metric_names(kind: str, metrics: list[str] | None) -> list[str]:
  return list(metrics or (RAG_METRICS if kind == "rag" else GR_METRICS))


def _paired_rows(c: dict[str, dict[str, float]], t: dict[str, dict[str, float]], group: str,
                 metrics: list[str], what: str) -> list[dict]:
  """One row per metric: control scores c and treatment scores t ({item id: {metric: value}}) paired by item."""
  ids = sorted(set(c) & set(t))
  if not ids:
    raise ValueError(f"{group}: {what} evaluated no common item (different questions or queries)")
  rows = []
  for m in metrics:
    if m not in c[ids[0]] or m not in t[ids[0]]:
      raise ValueError(f"metric {m!r} is not in both of {what}' {group}; expected one of {sorted(c[ids[0]])}")
    a = np.array([c[i][m] for i in ids])
    b = np.array([t[i][m] for i in ids])
    cmp = stats.compare(b, a)
    rows.append({"group": group, "metric": m, "n": len(ids), "control": round(float(a.mean()), 2),
                 "treatment": round(float(b.mean()), 2), "d (treatment - control)": stats.fmt_diff(cmp),
                 "p": stats.fmt_p(cmp["p"]), "only_control": len(c) - len(ids), "only_treatment": len(t) - len(ids)})
  return rows


def compare_runs(control: str | Path, treatment: str | Path, groups: list[str] | None = None,
                 metrics: list[str] | None = None) -> list[dict]:
  """One row per (group, metric) that both runs have: means, paired difference, interval, p, n."""
  kind_c, c = load_scores(control)
  kind_t, t = load_scores(treatment)
  if kind_c != kind_t:
    raise ValueError(f"{control} is a {kind_c} run and {treatment} a {kind_t} run: compare runs of one kind")
  shared = _select([g for g in c if g in t], groups, "are not in both runs; both have")
  if not shared:
    raise ValueError(f"the runs share no method: {control} has {sorted(c)}, {treatment} has {sorted(t)}")
  names = _metric_names(kind_c, metrics)
  return [row for g in shared for row in _paired_rows(c[g], t[g], g, names, "the runs")]


def compare_methods(run: str | Path, reference: str, groups: list[str] | None = None,
                    metrics: list[str] | None = None) -> list[dict]:
  """Every method of one run against `reference` on the items both decoded.

  `reference` is a method (RAG: "l2r", paired within each dataset that has it, or a whole
  group "squad_v1:dev/l2r"; GR: a row such as "bm25"). Rows as `compare_runs`, with the
  reference as control, the method as treatment and `reference` naming the control group.
  """
  kind, scores = load_scores(run)
  refs = {g: _reference_group(g, reference) for g in scores}
  if not any(r in scores for r in refs.values()):
    raise ValueError(f"{run} has no method {reference!r}; its methods are {sorted(scores)}")
  same_set = lambda g: "/" not in g or g.rsplit("/", 1)[0] == refs[g].rsplit("/", 1)[0]  # noqa: E731
  paired = _select([g for g in scores if refs[g] in scores and refs[g] != g and same_set(g)], groups,
                   f"cannot be paired with {reference!r} in {run}; these can:")
  if not paired:
    raise ValueError(f"{run} has no other method beside {reference!r} to pair with it: {sorted(scores)}")
  names = _metric_names(kind, metrics)
  rows = []
  for g in paired:
    rows += [{"reference": refs[g], **row} for row in _paired_rows(scores[refs[g]], scores[g], g, names,
                                                                   "the two methods")]
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
  shared = _select([g for g in runs[names[0]][0] if all(g in r for rs in runs.values() for r in rs)], groups,
                   "are not in every run; every run has")
  kind = kinds.pop()
  wanted = _metric_names(kind, metrics)
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
        ref = _reference_group(g, reference) if reference else None
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
