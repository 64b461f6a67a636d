"""Masking schedules for absorbing-state (masked) diffusion.

Time t in [0, 1]; alpha(t) is the probability that a token is still clean at time t
(md4's convention), so a token is masked with probability m(t) = 1 - alpha(t).
LLaDA and Dream train with the linear schedule and clip the masking probability away
from zero: p_mask(t) = (1 - eps) * m(t) + eps.

The continuous-time ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)) = m'(t) / m(t);
for the linear schedule this is 1/t, which LLaDA applies as 1 / p_mask.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

DEFAULT_EPS = 1e-3


class MaskingSchedule(NamedTuple):
  """mask_prob(t) -> p_mask in [eps, 1];  weight(t) -> ELBO weight of the CE at time t."""

  name: str
  mask_prob: Callable
  weight: Callable


def linear(eps: float = DEFAULT_EPS) -> MaskingSchedule:
  """alpha(t) = 1 - t;  p_mask = (1 - eps) t + eps;  w = 1 / p_mask (LLaDA, Dream)."""
  mask_prob = lambda t: (1.0 - eps) * t + eps
  return MaskingSchedule("linear", mask_prob, lambda t: 1.0 / mask_prob(t))


def cosine(eps: float = DEFAULT_EPS) -> MaskingSchedule:
  """alpha(t) = 1 - cos(pi/2 (1 - t));  m(t) = cos(pi/2 (1 - t));  w = m'(t) / m(t).

  m'(t) = pi/2 sin(pi/2 (1 - t)), so w = pi/2 tan(pi/2 (1 - t)), evaluated at the clipped m.
  """
  m = lambda t: jnp.cos(0.5 * jnp.pi * (1.0 - t))
  mask_prob = lambda t: (1.0 - eps) * m(t) + eps
  weight = lambda t: (1.0 - eps) * 0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * (1.0 - t)) / mask_prob(t)
  return MaskingSchedule("cosine", mask_prob, weight)


def polynomial(k: float, eps: float = DEFAULT_EPS) -> MaskingSchedule:
  """alpha(t) = 1 - t^k;  m(t) = t^k;  w = k t^(k-1) / m(t) (= k / t unclipped)."""
  mask_prob = lambda t: (1.0 - eps) * t**k + eps
  weight = lambda t: (1.0 - eps) * k * t ** (k - 1.0) / mask_prob(t)
  return MaskingSchedule(f"poly{k:g}", mask_prob, weight)


def flat(schedule: MaskingSchedule) -> MaskingSchedule:
  """The same masking with w(t) = 1: each masked token's cross-entropy counts once.

  loss = (1/B) sum_b sum_i [masked_bi] CE_bi / n_b, so a draw with more tokens masked weighs
  more (MaskGIT's loss). It is not the ELBO: its draws at small t, which the 1/t weight blows
  up, no longer dominate the gradient, at the price of a biased likelihood bound.
  """
  return MaskingSchedule(f"{schedule.name}-flat", schedule.mask_prob, jnp.ones_like)


WEIGHTINGS = ("elbo", "flat")


def get(name: str, eps: float = DEFAULT_EPS, weighting: str = "elbo") -> MaskingSchedule:
  """'linear' | 'cosine' | 'polyK' (e.g. 'poly2'); weighting 'elbo' (w(t) above) or 'flat' (`flat`)."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {WEIGHTINGS}")
  wrap = flat if weighting == "flat" else (lambda s: s)
  if name == "linear":
    return wrap(linear(eps))
  if name == "cosine":
    return wrap(cosine(eps))
  if name.startswith("poly"):
    try:
      return wrap(polynomial(float(name[4:]), eps))
    except ValueError:
      pass
  raise ValueError(f"unknown masking schedule {name!r}; expected 'linear', 'cosine' or 'polyK' (e.g. 'poly2')")
