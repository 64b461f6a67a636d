"""Score transforms: the composable pieces of one denoising step, shaped like optax.

A denoising step is a pipeline over a `StepView` (a pytree): the model's logits (and
hidden states) go in; logit transforms rewrite `logits`, a candidate rule fills
`candidates` (the token each position would take), score rules fill `score` (how much the
position deserves to be unmasked now) and a commit policy fills `commit` (which positions
are unmasked this step). Every piece is a `ScoreTransform(init, update)` pair of pure
functions and `chain` is the only glue:

    llada = chain(gumbel_max(0.0), low_confidence(), commit_top_k(llada_quota))

A user's new guidance method is one more function returning a `ScoreTransform`.

The sampler fills the view's `canvas`, `is_masked` (masked AND inside the current block:
the positions a policy may commit), `step` / `num_steps` (step within the block and steps
per block) and `extras`; it starts `candidates` at the canvas, `score` at -inf and `commit`
at False, then applies the chain and writes `candidates` into the canvas where `commit`.
Positions outside `is_masked` are never committed, whatever a transform writes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -jnp.inf


@chex.dataclass(frozen=True)
class StepView:
  """One denoising step, over a window of W canvas positions (the whole canvas unless cached).

  logits: [B, W, V]; hidden: [B, W, D] last-layer states or None; canvas: [B, W] int;
  is_masked: [B, W] bool, positions that may be committed now; candidates: [B, W] int;
  score: [B, W] float32; commit: [B, W] bool; step: int32 scalar, the step within the
  block; num_steps: static int, steps per block; extras: dict (the sampler adds "canvas",
  the whole [B, L] canvas, "block_start", the window's first position, and with CFG
  "uncond_logits"; user entries such as a query embedding pass through).
  """

  logits: Array
  hidden: Array | None
  canvas: Array
  is_masked: Array
  candidates: Array
  score: Array
  commit: Array
  step: Array
  num_steps: Array
  extras: dict


class ScoreTransform(NamedTuple):
  """init(view) -> state; update(view, state, key) -> (view, state).

  `needs` names what the sampler must compute for this transform beyond the logits:
  "hidden" (last-layer hidden states) or "uncond_logits" (a forward with the prompt masked).
  """

  init: Callable[[StepView], Any]
  update: Callable[[StepView, Any, Array], tuple[StepView, Any]]
  needs: frozenset = frozenset()


def stateless(fn: Callable[[StepView, Array], StepView], needs=()) -> ScoreTransform:
  """A ScoreTransform from `fn(view, key) -> view` with no state."""
  return ScoreTransform(lambda view: (), lambda view, state, key: (fn(view, key), state), frozenset(needs))


def identity() -> ScoreTransform:
  return stateless(lambda view, key: view)


def chain(*transforms: ScoreTransform) -> ScoreTransform:
  """Applies `transforms` in order; each gets its own key (split from the step's key)."""

  def init(view):
    return tuple(t.init(view) for t in transforms)

  def update(view, state, key):
    keys = jax.random.split(key, max(len(transforms), 1))
    new_state = []
    for t, s, k in zip(transforms, state, keys):
      view, s = t.update(view, s, k)
      new_state.append(s)
    return view, tuple(new_state)

  needs = frozenset().union(*(t.needs for t in transforms)) if transforms else frozenset()
  return ScoreTransform(init, update, needs)


def _finite_min(dtype) -> Array:
  return jnp.finfo(dtype).min


# ----------------------------------------------------------------------------- logits


def temperature(t: float) -> ScoreTransform:
  """logits <- logits / t; t == 0 leaves them as they are (greedy choice later)."""
  if t < 0:
    raise ValueError(f"temperature must be >= 0, got {t}")
  return stateless(lambda view, key: view.replace(logits=view.logits / t) if t > 0 else view)


def top_k(k: int) -> ScoreTransform:
  """Logits strictly below the k-th largest of their row are set to the dtype's finite minimum (Dream)."""
  if k < 1:
    raise ValueError(f"top_k must be >= 1, got {k}")

  def fn(view, key):
    kth = jax.lax.top_k(view.logits, k)[0][..., -1:]
    return view.replace(logits=jnp.where(view.logits < kth, _finite_min(view.logits.dtype), view.logits))
  return stateless(fn)


def top_p(p: float) -> ScoreTransform:
  """Nucleus filter (Dream's `top_p_logits`).

  Sorted descending, a token is removed when the cumulative probability of the tokens
  strictly before it exceeds p (the first token crossing p is kept, the top one always).
  """
  if not 0 < p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {p}")

  def fn(view, key):
    logits = view.logits
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), axis=-1)
    remove_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), (cum > p)[..., :-1]], axis=-1)
    remove = jnp.zeros_like(remove_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(remove_sorted)
    return view.replace(logits=jnp.where(remove, _finite_min(logits.dtype), logits))
  return stateless(fn) if p < 1 else identity()


def classifier_free_guidance(scale: float) -> ScoreTransform:
  """LLaDA's CFG: logits <- un + (scale + 1) * (cond - un), un from the prompt-masked canvas.

  scale == 0 disables it (no extra forward). Needs "uncond_logits" from the sampler.
  """
  if scale < 0:
    raise ValueError(f"cfg_scale must be >= 0, got {scale}")
  if scale == 0:
    return identity()

  def fn(view, key):
    un = view.extras["uncond_logits"]
    return view.replace(logits=un + (scale + 1.0) * (view.logits - un))
  return stateless(fn, needs=("uncond_logits",))


def suppress_tokens(token_ids) -> ScoreTransform:
  """Sets the logits of `token_ids` to -inf everywhere (LLaDA's `logits_eos_inf`).

  Placed after the candidate rule it changes only the confidences, which is LLaDA's
  `confidence_eos_eot_inf`.
  """
  ids = jnp.asarray(np.asarray(token_ids, np.int32))

  def fn(view, key):
    return view.replace(logits=view.logits.at[..., ids].set(NEG_INF))
  return stateless(fn)


def allowed_tokens(allowed_fn: Callable[[StepView], Array]) -> ScoreTransform:
  """Keeps only allowed tokens: logits <- -inf where allowed_fn(view) [B, W, V] (or broadcastable) is False.

  The DocID constraint of generative retrieval is one such function of the canvas.
  """

  def fn(view, key):
    allowed = allowed_fn(view)
    return view.replace(logits=jnp.where(allowed, view.logits, NEG_INF))
  return stateless(fn)


# ------------------------------------------------------------------------- candidates


def greedy() -> ScoreTransform:
  """candidates <- argmax_v logits (first index on ties, as torch.argmax)."""
  return stateless(lambda view, key: view.replace(candidates=jnp.argmax(view.logits, -1).astype(jnp.int32)))


def gumbel_max(temp: float, precision: str = "float64") -> ScoreTransform:
  """LLaDA's `add_gumbel_noise` + argmax: candidates <- argmax_v(logits_v / T + g_v).

  g = -log(-log u), u ~ U[0, 1) i.i.d. per (position, token). LLaDA computes
  argmax exp(logits) / (-log u)^T in float64; taking logs gives the same argmax without
  overflow. T == 0 is plain argmax (no noise). precision="float64" draws u and adds in
  float64 (requires `jax.config.update("jax_enable_x64", True)`; 32-bit Gumbel truncates the
  noise tail, arXiv:2409.02908); "float32" is the cheaper, truncated variant. The logits
  themselves are not changed: confidences come from the clean logits, as in LLaDA.
  """
  if temp < 0:
    raise ValueError(f"temperature must be >= 0, got {temp}")
  if precision not in ("float64", "float32"):
    raise ValueError(f"gumbel precision must be 'float64' or 'float32', got {precision!r}")

  def fn(view, key):
    if temp == 0:
      return view.replace(candidates=jnp.argmax(view.logits, -1).astype(jnp.int32))
    if precision == "float64" and not jax.config.jax_enable_x64:
      raise ValueError("gumbel_max(precision='float64') needs 64-bit JAX: call "
                       "jax.config.update('jax_enable_x64', True) first, or use precision='float32'")
    dtype = jnp.float64 if precision == "float64" else jnp.float32
    u = jax.random.uniform(key, view.logits.shape, dtype)
    noisy = view.logits.astype(dtype) - temp * jnp.log(-jnp.log(u))
    return view.replace(candidates=jnp.argmax(noisy, -1).astype(jnp.int32))
  return stateless(fn)


def categorical() -> ScoreTransform:
  """candidates ~ Categorical(softmax(logits)) per position (Dream's sampling at T > 0).

  Compose after `temperature(T)`; use `greedy()` at T == 0.
  """

  def fn(view, key):
    return view.replace(candidates=jax.random.categorical(key, view.logits.astype(jnp.float32)).astype(jnp.int32))
  return stateless(fn)


# ----------------------------------------------------------------------------- scores


def _probs(view) -> Array:
  return jax.nn.softmax(view.logits.astype(jnp.float32), axis=-1)


def low_confidence() -> ScoreTransform:
  """score <- p(candidate) = softmax(logits)[candidate] (LLaDA 'low_confidence', Dream 'maskgit_plus')."""

  def fn(view, key):
    p = jnp.take_along_axis(_probs(view), view.candidates[..., None], -1)[..., 0]
    return view.replace(score=p)
  return stateless(fn)


maskgit_plus = low_confidence


def topk_margin() -> ScoreTransform:
  """score <- p_(1) - p_(2), the margin between the two most likely tokens (Dream 'topk_margin')."""

  def fn(view, key):
    # the two largest by max, not lax.top_k: XLA's CPU backend turns a values-only top-k into a
    # full sort of the vocabulary (2.2 s vs 0.09 s at [16, 32, 30522]); the same floats either way
    p = _probs(view)
    first = jnp.argmax(p, axis=-1)
    p1 = jnp.max(p, axis=-1)
    p2 = jnp.max(jnp.where(jnp.arange(p.shape[-1]) == first[..., None], -jnp.inf, p), axis=-1)
    return view.replace(score=p1 - p2)
  return stateless(fn)


def entropy() -> ScoreTransform:
  """score <- sum_v p_v log(p_v + 1e-10) = -H(p) (Dream 'entropy'; higher = more certain)."""

  def fn(view, key):
    p = _probs(view)
    return view.replace(score=jnp.sum(p * jnp.log(p + 1e-10), axis=-1))
  return stateless(fn)


def random_score() -> ScoreTransform:
  """score <- u ~ U[0, 1) per position (LLaDA 'random' remasking)."""
  return stateless(lambda view, key: view.replace(score=jax.random.uniform(key, view.score.shape, jnp.float32)))


# ---------------------------------------------------------------------------- commits


def llada_quota(view: StepView) -> Array:
  """Tokens to commit this step, LLaDA's `get_num_transfer_tokens`: [B] int32.

  With m masked positions at block start and S steps, step i commits floor(m/S) + [i < m mod S].
  Equivalently (used here, so no state is kept): ceil(m_i / (S - i)) for the m_i still masked.
  """
  m = jnp.sum(view.is_masked, axis=-1).astype(jnp.int32)
  left = jnp.maximum(view.num_steps - view.step, 1)
  return (m + left - 1) // left


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
  """float32 linspace computed the way torch does on CPU: from both ends towards the middle,
  start + step * i with one rounding (a fused multiply-add; the float64 product is exact)."""
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float32((end32 - start32) / np.float32(n - 1)) if n > 1 else np.float32(0)
  idx = np.arange(n)
  lo = np.float64(start32) + np.float64(step) * idx
  hi = np.float64(end32) - np.float64(step) * (n - idx - 1)
  return np.where(idx < n // 2, lo, hi).astype(np.float32)


def dream_quota(eps: float = 1e-3) -> Callable[[StepView], Array]:
  """Dream's timestep schedule: t_i = linspace(1, eps, S + 1); commit k = int(m (1 - t_{i+1} / t_i)).

  The last step commits all m still masked. float32 arithmetic as upstream, so k can be 0 on
  some steps.
  """

  def quota(view):
    ts = jnp.asarray(torch_linspace(1.0, eps, view.num_steps + 1))
    t, s = ts[view.step], ts[view.step + 1]
    m = jnp.sum(view.is_masked, axis=-1)
    k = jnp.floor(m.astype(jnp.float32) * (1.0 - s / t)).astype(jnp.int32)
    return jnp.where(view.step >= view.num_steps - 1, m.astype(jnp.int32), k)
  return quota


def _top_k_mask(score: Array, k: Array) -> Array:
  """[B, W] bool: the k[b] highest scores of row b (ties: lowest index first, as torch.topk on CPU)."""
  order = jnp.argsort(-score, axis=-1, stable=True)
  ranks = jnp.zeros_like(order).at[jnp.arange(score.shape[0])[:, None], order].set(
      jnp.broadcast_to(jnp.arange(score.shape[1]), score.shape))
  return ranks < k[:, None]


def commit_top_k(quota: Callable[[StepView], Array] = llada_quota, alg_temp: float = 0.0) -> ScoreTransform:
  """Commits the quota(view)[b] masked positions with the highest score in each row.

  alg_temp > 0 (Dream's `alg_temp`) samples the positions instead, without replacement,
  with probabilities softmax(score / alg_temp) over the masked positions (Gumbel-top-k).
  """
  if alg_temp < 0:
    raise ValueError(f"alg_temp must be >= 0, got {alg_temp}")

  def fn(view, key):
    score = jnp.where(view.is_masked, view.score.astype(jnp.float32), NEG_INF)
    if alg_temp > 0:
      g = -jnp.log(-jnp.log(jax.random.uniform(key, score.shape, jnp.float32, 1e-20, 1.0)))
      score = jnp.where(view.is_masked, score / alg_temp + g, NEG_INF)
    k = jnp.minimum(quota(view), jnp.sum(view.is_masked, -1))
    return view.replace(commit=_top_k_mask(score, k) & view.is_masked)
  return stateless(fn)


def commit_threshold(tau: float) -> ScoreTransform:
  """Fast-dLLM parallel decoding: commit every masked position with score >= tau, and always
  the best one of each row that still has a masked position (so every step makes progress)."""
  if not 0 < tau <= 1:
    raise ValueError(f"threshold tau must be in (0, 1], got {tau}")

  def fn(view, key):
    score = jnp.where(view.is_masked, view.score.astype(jnp.float32), NEG_INF)
    best = jax.nn.one_hot(jnp.argmax(score, -1), score.shape[-1], dtype=bool)
    return view.replace(commit=((score >= tau) | best) & view.is_masked)
  return stateless(fn)


def commit_factor(factor: float) -> ScoreTransform:
  """Fast-dLLM's factor rule: with masked scores sorted c_(1) >= c_(2) >= ..., commit the
  largest n with (n + 1)(1 - c_(n)) < factor; at least one."""
  if factor <= 0:
    raise ValueError(f"factor must be > 0, got {factor}")

  def fn(view, key):
    score = jnp.where(view.is_masked, view.score.astype(jnp.float32), NEG_INF)
    srt = -jnp.sort(-score, axis=-1)
    n = jnp.arange(1, score.shape[-1] + 1, dtype=jnp.float32)
    ok = ((n + 1) * (1 - srt) < factor) & jnp.isfinite(srt)
    count = jnp.maximum(jnp.sum(jnp.cumprod(ok, axis=-1), -1), 1)
    return view.replace(commit=_top_k_mask(score, count) & view.is_masked)
  return stateless(fn)


def commit_bernoulli(eps: float = 1e-3) -> ScoreTransform:
  """Dream's 'origin' rule: each masked position is committed with probability 1 - t_{i+1}/t_i
  (all of them on the last step), independently of the scores."""

  def fn(view, key):
    ts = jnp.asarray(torch_linspace(1.0, eps, view.num_steps + 1))
    p = jnp.where(view.step >= view.num_steps - 1, 1.0, 1.0 - ts[view.step + 1] / ts[view.step])
    draw = jax.random.uniform(key, view.is_masked.shape) < p
    return view.replace(commit=draw & view.is_masked)
  return stateless(fn)


# ---------------------------------------------------------------------------- presets

REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def llada(temperature_: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
          threshold: float | None = None, suppress_ids=(), gumbel_precision: str = "float64") -> ScoreTransform:
  """LLaDA's `generate` step (or Fast-dLLM's with `threshold`) as a chain."""
  if remasking not in REMASKING:
    raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
  parts = [classifier_free_guidance(cfg_scale)]
  if len(suppress_ids):
    parts.append(suppress_tokens(suppress_ids))
  parts.append(gumbel_max(temperature_, gumbel_precision))
  parts.append(low_confidence() if remasking == "low_confidence" else random_score())
  parts.append(commit_top_k(llada_quota) if threshold is None else commit_threshold(threshold))
  return chain(*parts)


def dream(temperature_: float = 0.0, top_p_: float | None = None, top_k_: int | None = None,
          alg: str = "maskgit_plus", alg_temp: float | None = None, eps: float = 1e-3,
          threshold: float | None = None) -> ScoreTransform:
  """Dream's `diffusion_generate` step (`sample_tokens` + the alg's commit rule) as a chain."""
  if alg not in DREAM_ALGS:
    raise ValueError(f"alg must be one of {DREAM_ALGS}, got {alg!r}")
  parts = [temperature(temperature_)]
  if top_p_ is not None and top_p_ < 1:
    parts.append(top_p(top_p_))
  if top_k_ is not None:
    parts.append(top_k(top_k_))
  parts.append(categorical() if temperature_ > 0 else greedy())
  if alg == "origin":
    return chain(*parts, commit_bernoulli(eps))
  parts.append({"maskgit_plus": low_confidence, "topk_margin": topk_margin, "entropy": entropy}[alg]())
  if threshold is not None:
    return chain(*parts, commit_threshold(threshold))
  return chain(*parts, commit_top_k(dream_quota(eps), alg_temp or 0.0))
