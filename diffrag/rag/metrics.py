"""QA metrics (SQuAD v1.1 normalisation) and the response-semantic-drift (RSD) trace.

normalize(s) = lower-case, drop punctuation, drop articles (a, an, the), collapse spaces.
EM = [normalize(pred) == normalize(gold)]; token precision P = |common| / |pred tokens|,
recall R = |common| / |gold tokens|, F1 = 2PR / (P + R), with `common` the multiset
(Counter) intersection as in the official SQuAD script; each is the max over gold aliases.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

import numpy as np

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCT)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _prf(pred: str, gold: str) -> tuple[float, float, float]:
  p_tok, g_tok = normalize_answer(pred).split(), normalize_answer(gold).split()
  common = sum((Counter(p_tok) & Counter(g_tok)).values())
  if not p_tok or not g_tok:  # official script: both empty -> 1, one empty -> 0
    same = float(p_tok == g_tok)
    return same, same, same
  if common == 0:
    return 0.0, 0.0, 0.0
  p, r = common / len(p_tok), common / len(g_tok)
  return p, r, 2 * p * r / (p + r)


def qa_scores(pred: str, golds: Sequence[str]) -> dict[str, float]:
  """EM, precision, recall, F1 (each the max over gold aliases) and answer length in words."""
  if not golds:
    raise ValueError("a QA record without gold answers cannot be scored; drop it or give answers")
  prf = [_prf(pred, g) for g in golds]
  return {"em": max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds),
          "precision": max(x[0] for x in prf), "recall": max(x[1] for x in prf), "f1": max(x[2] for x in prf),
          "length": float(len(normalize_answer(pred).split()))}


def occurs(phrase: str, text: str) -> bool:
  """The normalised phrase occurs word-aligned in the normalised text."""
  p = normalize_answer(phrase)
  return bool(p) and f" {p} " in f" {normalize_answer(text)} "


def cut_short(pred: str, golds: Sequence[str]) -> bool:
  """The (normalised) prediction is a strict, word-aligned part of a gold answer: the right
  place in the passage, cut short (no exact match with any alias)."""
  p = normalize_answer(pred)
  if not p or any(p == normalize_answer(g) for g in golds):
    return False
  return any(occurs(pred, g) for g in golds)


ERROR_KINDS = ("answer not in prompt", "exact", "overlap", "empty", "other span, answer's passage",
               "span of another passage", "not a span of the prompt")


def error_kind(pred: str, golds: Sequence[str], passages: Sequence[str], answer_in_prompt: bool) -> str:
  """Where one answer stands, as one of `ERROR_KINDS`, checked in this order:
  the gold answer is not in the prompt (a retrieval miss: nothing to read); EM; F1 > 0 with no
  EM ("overlap": the right place, wrong boundaries); an empty answer; else the answer is a
  phrase of a passage that holds a gold answer ("other span, answer's passage"), of a passage
  that holds none ("span of another passage"), or of none ("not a span of the prompt": words
  the decoder did not copy as one piece). Occurrence is word-aligned after SQuAD normalisation."""
  if not answer_in_prompt:
    return ERROR_KINDS[0]
  s = qa_scores(pred, golds)
  if s["em"] == 1.0:
    return ERROR_KINDS[1]
  if s["f1"] > 0.0:
    return ERROR_KINDS[2]
  if not normalize_answer(pred):
    return ERROR_KINDS[3]
  holds = [p for p in passages if occurs(pred, p)]
  if any(any(occurs(g, p) for g in golds) for p in holds):
    return ERROR_KINDS[4]
  return ERROR_KINDS[5] if holds else ERROR_KINDS[6]


def copy_rate(pred: str, passages: Sequence[str]) -> float:
  """Share of the answer's (normalised) word types that occur in the retrieved passages."""
  words = set(normalize_answer(pred).split())
  if not words:
    return 0.0
  context = set(normalize_answer(" ".join(passages)).split())
  return len(words & context) / len(words)


def drift_curves(query_emb: np.ndarray, step_texts: Sequence[Sequence[str]],
                 embed: Callable[[Sequence[str]], np.ndarray]) -> list[np.ndarray]:
  """s_t = cos(E(query), E(response committed after step t)), one curve per query.

  query_emb: [Q, D] unit vectors; step_texts[q][t]: the response text after step t;
  embed: texts -> unit vectors (all non-empty texts are embedded in one call). Steps at
  which nothing readable has been committed yet give NaN.
  """
  flat = [(q, t, text) for q, texts in enumerate(step_texts) for t, text in enumerate(texts) if text.strip()]
  curves = [np.full(len(texts), np.nan, np.float32) for texts in step_texts]
  if flat:
    emb = embed([text for _, _, text in flat])
    for (q, t, _), e in zip(flat, emb):
      curves[q][t] = float(e @ query_emb[q])
  return curves


def rsd(curve: Sequence[float]) -> dict[str, float]:
  """Scalar drift summaries of one curve s_t (NaN steps ignored); lower = less drift.

  rsd (the headline, "peak drop"): (max_t s_t - s_T) / max_t s_t, the relative loss of
    query alignment between the best point of the trajectory and the final answer;
  first_last: s_first - s_T, from the first non-empty step to the end;
  area: mean_t (running_max_t - s_t), the area between the curve and its running maximum;
  final_distance: 1 - s_T, the final answer only.
  """
  s = np.asarray(curve, np.float64)
  s = s[~np.isnan(s)]
  if s.size == 0:
    return {"rsd": float("nan"), "first_last": float("nan"), "area": float("nan"), "final_distance": float("nan")}
  peak = s.max()
  return {"rsd": float((peak - s[-1]) / peak) if peak > 0 else float("nan"),
          "first_last": float(s[0] - s[-1]),
          "area": float(np.mean(np.maximum.accumulate(s) - s)),
          "final_distance": float(1.0 - s[-1])}
