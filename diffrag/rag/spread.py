"""SPREAD: query-anchored denoising as one score transform (training-free).

    r_i     = sigmoid(cos(h_i, h_q))                 for every position i of the step's view
    score_i <- alpha * r_i + (1 - alpha) * score_i   (score_i: the confidence set before it)

h_i: the step's hidden state at position i (the same forward as the logits: no second
pass per step); h_q: the query representation from one forward pass over the query alone
(`query_representation`), once per question. alpha = 0 is the baseline sampler,
alpha = 1 the relevance-only rule printed in the paper's Algorithm 1, 0 < alpha < 1 the
weighted sum the first author described (../shared/specs/spread.md section 3.2).
Which confidence is mixed is whatever score transform comes before `spread` in the
chain (low_confidence = LLaDA/Dream maskgit_plus, topk_margin, or entropy rescaled to
[0, 1] by `unit_entropy`); which layer is `generate(..., hidden_layer=k)`; the query
pooling is `pooling`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffrag.models.transformer import positions_from_mask
from diffrag.retrieval.dense import mean_pool
from diffrag.sampling.transforms import ScoreTransform, stateless

POOLINGS = ("mean", "max_token")
DREAM_HIDDEN = ("i", "i_minus_1")  # which state represents masked position i (spec 3.3.1)


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def relevance(hidden, query, query_mask=None, pooling: str = "mean"):
  """r [B, W] = sigmoid(cos(h_i, h_q)).

  hidden: [B, W, D]; mean: query [B, D] (a pooled vector); max_token: query [B, Lq, D]
  per-token states with query_mask [B, Lq], r_i = sigmoid(max_j cos(h_i, h_{q_j})).
  """
  h = _unit(hidden.astype(jnp.float32))
  if pooling == "mean":
    cos = jnp.einsum("bwd,bd->bw", h, _unit(query.astype(jnp.float32)))
  else:
    cos = jnp.einsum("bwd,bjd->bwj", h, _unit(query.astype(jnp.float32)))
    cos = jnp.max(jnp.where(query_mask[:, None, :].astype(bool), cos, -jnp.inf), axis=-1)
  return jax.nn.sigmoid(cos)


def spread(alpha: float, pooling: str = "mean") -> ScoreTransform:
  """The SPREAD selection score; reads extras["query_hidden"] (and extras["query_mask"] for max_token)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"SPREAD alpha must be in [0, 1], got {alpha}")
  if pooling not in POOLINGS:
    raise ValueError(f"SPREAD pooling must be one of {POOLINGS}, got {pooling!r}")

  def fn(view, key):
    r = relevance(view.hidden, view.extras["query_hidden"], view.extras.get("query_mask"), pooling)
    return view.replace(score=alpha * r + (1.0 - alpha) * view.score)
  return stateless(fn, needs=("hidden",))


def unit_entropy() -> ScoreTransform:
  """score <- 1 - H(p) / log V in [0, 1] (Dream's entropy confidence on the same scale as r)."""

  def fn(view, key):
    p = jax.nn.softmax(view.logits.astype(jnp.float32), axis=-1)
    h = -jnp.sum(p * jnp.log(p + 1e-10), axis=-1)
    return view.replace(score=1.0 - h / jnp.log(view.logits.shape[-1]))
  return stateless(fn)


def query_representation(model, params, query_ids, query_mask, *, hidden_layer: int = -1, pooling: str = "mean"):
  """h_q from one forward pass over the query alone.

  query_ids, query_mask: [B, Lq] (1 = real token). mean: [B, D] mean-pooled, L2-normalised;
  max_token: [B, Lq, D] per-token states (with query_mask as extras["query_mask"]).
  Padding is invisible: padded keys are masked and positions count real tokens only, so the
  same question gives the same h_q whatever it is batched or padded with (BERT's absolute
  positions included).
  """
  _, hidden = model.apply({"params": params}, query_ids, attention_mask=query_mask,
                          positions=positions_from_mask(query_mask), return_hidden=True, hidden_layer=hidden_layer)
  if pooling == "mean":
    return mean_pool(hidden.astype(jnp.float32), query_mask)
  return hidden.astype(jnp.float32)
