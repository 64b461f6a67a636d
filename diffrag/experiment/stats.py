"""Paired statistics for every comparison diffrag prints.

Both systems are scored on the same n items (questions, queries), so differences are
paired: d_i = treatment_i - control_i.

    bootstrap interval:   resample the n items with replacement B times; the 2.5% and 97.5%
                          percentiles of mean(d*) give the 95% interval of mean(d).
    randomization test:   under H0 each pair is exchangeable, so flip the sign of every d_i
                          at random; p = (1 + #{|mean(s d)| >= |mean(d)|}) / (1 + R)
                          (two-sided; Fisher's randomization test as in ranx.compare, with the
                          +1 correction so p is never 0).

`compare` returns both with n; a difference whose interval contains 0 is not significant.
Everything is seeded: the same inputs give the same interval and p-value.

These intervals cover the questions, for one trained model. Training is random too (the
seed, and float rounding, move a reader's F1 by several points), so runs over S training
seeds are summarised by

    t interval over runs:  m_s = mean_q x[s, q];  mean(m) +- t_{S-1, 0.975} sd(m) / sqrt(S)
    crossed bootstrap:     resample S runs and Q questions with replacement, independently
                           (Owen's 2007 "pigeonhole" bootstrap of a crossed design); the
                           percentiles of mean(x[s*][:, q*]) give an interval that covers
                           both the training runs and the questions.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 10000
N_PERM = 10000


def _as_1d(x, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64).reshape(-1)
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(a)))} NaN/inf value(s): drop or fill them first")
  return a


def bootstrap_ci(x, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0, chunk: int = 1000):
  """(mean, lo, hi): percentile bootstrap interval of the mean of x [n]."""
  x = _as_1d(x, "x")
  if x.size == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = []
  for start in range(0, n_boot, chunk):
    idx = rng.integers(0, x.size, (min(chunk, n_boot - start), x.size))
    means.append(x[idx].mean(axis=1))
  means = np.concatenate(means)
  a = (1 - level) / 2
  return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def randomization_p(d, *, n_perm: int = N_PERM, seed: int = 0, chunk: int = 1000) -> float:
  """Two-sided paired sign-flip randomization p-value of mean(d) != 0."""
  d = _as_1d(d, "d")
  if d.size == 0:
    return float("nan")
  observed = abs(d.mean())
  rng = np.random.default_rng(seed)
  hits = 0
  for start in range(0, n_perm, chunk):
    signs = rng.integers(0, 2, (min(chunk, n_perm - start), d.size)) * 2 - 1
    hits += int(np.sum(np.abs(signs @ d) / d.size >= observed - 1e-12))
  return (hits + 1) / (n_perm + 1)


def compare(treatment, control, *, n_boot: int = N_BOOT, n_perm: int = N_PERM, seed: int = 0,
            level: float = 0.95) -> dict:
  """Paired comparison of per-item scores: {n, diff, lo, hi, p, significant}."""
  t, c = _as_1d(treatment, "treatment"), _as_1d(control, "control")
  if t.shape != c.shape:
    raise ValueError(f"paired scores need the same items: {t.size} treatment vs {c.size} control scores")
  d = t - c
  diff, lo, hi = bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
  p = randomization_p(d, n_perm=n_perm, seed=seed + 1)
  return {"n": int(d.size), "diff": diff, "lo": lo, "hi": hi, "p": p,
          "significant": bool(d.size and not lo <= 0.0 <= hi)}


def fmt_interval(mean: float, lo: float, hi: float, scale: float = 1.0, digits: int = 2) -> str:
  """'12.34 [10.01, 14.50]'."""
  if not np.isfinite(mean):
    return ""
  f = lambda v: f"{scale * v:.{digits}f}"
  return f"{f(mean)} [{f(lo)}, {f(hi)}]"


def fmt_diff(c: dict, scale: float = 1.0, digits: int = 2) -> str:
  """'+1.23 [-0.40, 2.90] (n.s.)' or '+3.10 [1.20, 5.00] *' from a `compare` result."""
  if not c or not np.isfinite(c["diff"]):
    return ""
  f = lambda v: f"{scale * v:+.{digits}f}"
  return f"{f(c['diff'])} [{f(c['lo'])}, {f(c['hi'])}]" + (" *" if c["significant"] else " (n.s.)")


def fmt_p(p: float) -> str:
  return "" if not np.isfinite(p) else (f"{p:.4f}" if p >= 1e-4 else "<1e-4")


def t_interval(x, *, level: float = 0.95):
  """(mean, lo, hi): Student-t interval of the mean of x [S] (one value per independent run):
  mean +- t_{S-1, (1 + level) / 2} * sd(x, ddof=1) / sqrt(S). Needs S >= 2."""
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  x = _as_1d(x, "x")
  if x.size < 2:
    raise ValueError(f"an interval over runs needs at least 2 runs (seeds); got {x.size}")
  half = float(sps.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
  return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def crossed_bootstrap_ci(x, *, n_boot: int = N_BOOT, level: float = 0.95, seed: int = 0, chunk: int = 1000):
  """(mean, lo, hi) of the grand mean of x [S runs, Q items] with runs and items both resampled:
  each draw takes S runs and Q items with replacement, independently, and the mean of that
  sub-table, sum_{s,q} a_s x[s, q] b_q / (S Q) with multinomial counts a, b (Owen 2007)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f"x must be [runs, items] with both > 0; got shape {x.shape}")
  _as_1d(x, "x")
  n_runs, n_items = x.shape
  rng = np.random.default_rng(seed)
  means = []
  for start in range(0, n_boot, chunk):
    b = min(chunk, n_boot - start)
    a = rng.multinomial(n_runs, np.full(n_runs, 1 / n_runs), b)   # [b, S] counts
    w = rng.multinomial(n_items, np.full(n_items, 1 / n_items), b)  # [b, Q] counts
    means.append(np.einsum("bs,sq,bq->b", a, x, w) / (n_runs * n_items))
  means = np.concatenate(means)
  q = (1 - level) / 2
  return float(x.mean()), float(np.quantile(means, q)), float(np.quantile(means, 1 - q))
