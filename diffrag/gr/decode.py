"""Decoding DocIDs from a masked-diffusion (or autoregressive) retriever.

Every function takes prompts [Q, P] (left-padded queries) and a DocIDTable, and returns
rankings: per query a list of (document index, score), best first, valid DocIDs only
(invalid canvases are counted, not ranked).

- `t_step`: DiffuGR's parallel denoising of the DocID canvas in T steps (any remasking
  chain), optionally constrained; one DocID per query.
- `pseudo_beam`: the paper's "pseudo beam search", as the spec's candidate (A): B sampled
  decodings per query (Gumbel-max at a temperature), de-duplicated, ranked by the summed
  log-probabilities of the tokens at the steps they were committed.
- `beam_search`: a true top-k beyond the paper, a beam over denoising states: after every
  step the B best partial canvases by cumulative log-probability are kept (one token per
  step; `order="confidence"` commits the most confident masked position of each beam,
  `order="left_to_right"` the next position: the autoregressive baseline's beam search).
- `one_pass`: score every DocID from one forward pass over the fully masked canvas,
  s(d) = sum_p log p(codes[d, p] | prompt, all masked); exact top-k of that factorised score.
- `elbo_rerank`: re-rank candidates by the Monte-Carlo ELBO of the training objective.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.diffusion.objective import mc_log_likelihood
from diffrag.gr.constraints import allowed_tokens_mask, consistent_docs, docid_allowed, docid_repair
from diffrag.gr.docids import DocIDTable
from diffrag.sampling import transforms as T
from diffrag.sampling.sampler import generate


def _rank_unique(doc_idx, scores):
  """Best score per document, sorted; -1 (invalid) dropped."""
  best: dict[int, float] = {}
  for d, s in zip(doc_idx, scores):
    if d >= 0 and (d not in best or s > best[d]):
      best[int(d)] = float(s)
  return sorted(best.items(), key=lambda x: -x[1])


def diffusion_chain(table: DocIDTable | None, temperature: float = 0.0) -> T.ScoreTransform:
  """greedy (or Gumbel at T) + low_confidence + top-k commits, wrapped in the DocID constraint if a table is given."""
  cand = T.gumbel_max(temperature, "float32") if temperature > 0 else T.greedy()
  inner = [cand, T.low_confidence(), T.commit_top_k()]
  if table is None:
    return T.chain(*inner)
  return T.chain(docid_allowed(table), *inner, docid_repair(table))


def t_step(model, params, prompts, table: DocIDTable, steps: int, *, constrained: bool, batch: int = 32):
  """(rankings, invalid count, seconds). One DocID per query from T = steps denoising steps."""
  chain = diffusion_chain(table if constrained else None)
  lc = table.length
  rankings, invalid, seconds = [], 0, 0.0
  for start in range(0, len(prompts), batch):
    rows = _fixed(prompts[start:start + batch], batch)
    t0 = time.perf_counter()
    out = jax.device_get(generate(model, params, rows, chain, jax.random.key(start), gen_length=lc, steps=steps))
    seconds += time.perf_counter() - t0
    n = min(batch, len(prompts) - start)
    canv = out.tokens[:n, -lc:]
    idx = table.decode(canv)
    invalid += int((idx < 0).sum())
    score = out.logprob[:n].sum(-1)
    rankings += [_rank_unique([d], [s]) for d, s in zip(idx, score)]
  return rankings, invalid, seconds


def pseudo_beam(model, params, prompts, table: DocIDTable, samples: int, *, steps: int, temperature: float = 1.0,
                constrained: bool = True, batch: int = 32, seed: int = 0):
  """(rankings, invalid count, seconds): B samples per query, deduplicated, ranked by commit-time log-prob."""
  chain = diffusion_chain(table if constrained else None, temperature)
  lc = table.length
  per = max(1, batch // samples)
  rankings, invalid, seconds = [], 0, 0.0
  for start in range(0, len(prompts), per):
    q = prompts[start:start + per]
    rows = _fixed(np.repeat(q, samples, axis=0), per * samples)
    t0 = time.perf_counter()
    out = jax.device_get(generate(model, params, rows, chain, jax.random.key(seed + start), gen_length=lc,
                                  steps=steps))
    seconds += time.perf_counter() - t0
    idx = table.decode(out.tokens[:, -lc:])
    score = out.logprob.sum(-1)
    for i in range(len(q)):
      sl = slice(i * samples, (i + 1) * samples)
      invalid += int((idx[sl] < 0).sum())
      rankings.append(_rank_unique(idx[sl], score[sl]))
  return rankings, invalid, seconds


@functools.partial(jax.jit, static_argnames=("model", "beam", "lc", "order", "constrained"))
def _beam(params, prompts, codes, *, model, beam, lc, order, constrained):
  mask_id = model.config.mask_token_id
  q, p = prompts.shape
  canvas = jnp.full((q, beam, lc), mask_id, jnp.int32)
  cum = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None].repeat(q, 0)
  rep = jnp.repeat(prompts, beam, axis=0)

  def step(i, carry):
    canvas, cum = carry
    flat = canvas.reshape(q * beam, lc)
    logits = model.apply({"params": params}, jnp.concatenate([rep, flat], 1), output_window=(p, lc))
    logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
    is_masked = flat == mask_id
    if constrained:
      cons = consistent_docs(codes, flat, is_masked)
      logits = jnp.where(allowed_tokens_mask(codes, cons, logits.shape[-1]), logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, -1)                                      # [QB, Lc, V]
    if order == "confidence":
      conf = jnp.where(is_masked, jnp.max(logp, -1), -jnp.inf)
      pos = jnp.argmax(conf, -1)
    else:
      pos = jnp.full((q * beam,), i)
    lp_pos = jnp.take_along_axis(logp, pos[:, None, None], 1)[:, 0]             # [QB, V]
    vals, toks = jax.lax.top_k(lp_pos, beam)                                   # [QB, B]
    child = jnp.repeat(flat[:, None, :], beam, 1)
    child = jnp.where(jnp.arange(lc)[None, None, :] == pos[:, None, None], toks[:, :, None], child)
    child = child.reshape(q, beam * beam, lc)
    score = (cum[:, :, None] + vals.reshape(q, beam, beam)).reshape(q, beam * beam)
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    # drop duplicates: a child equal to a better-scored one
    order_ = jnp.argsort(-score, axis=-1)
    child = jnp.take_along_axis(child, order_[:, :, None], 1)
    score = jnp.take_along_axis(score, order_, 1)
    same = jnp.all(child[:, :, None, :] == child[:, None, :, :], -1)
    earlier = jnp.tril(jnp.ones((beam * beam, beam * beam), bool), -1)
    dup = jnp.any(same & earlier[None], -1)
    score = jnp.where(dup, -jnp.inf, score)
    top, keep = jax.lax.top_k(score, beam)
    return jnp.take_along_axis(child, keep[:, :, None], 1), top

  return jax.lax.fori_loop(0, lc, step, (canvas, cum))


def beam_search(model, params, prompts, table: DocIDTable, beam: int, *, constrained: bool = True,
                order: str = "confidence", batch: int = 16):
  """(rankings, invalid count, seconds): the B best canvases by cumulative log-probability."""
  if order not in ("confidence", "left_to_right"):
    raise ValueError(f"beam order={order!r}; expected confidence or left_to_right")
  codes = jnp.asarray(table.codes, jnp.int32)
  rankings, invalid, seconds = [], 0, 0.0
  for start in range(0, len(prompts), batch):
    rows = _fixed(prompts[start:start + batch], batch)
    t0 = time.perf_counter()
    canv, score = jax.device_get(_beam(params, jnp.asarray(rows, jnp.int32), codes, model=model, beam=beam,
                                       lc=table.length, order=order, constrained=constrained))
    seconds += time.perf_counter() - t0
    for i in range(min(batch, len(prompts) - start)):
      idx = table.decode(canv[i])
      ok = np.isfinite(score[i])
      invalid += int(((idx < 0) & ok).sum())
      rankings.append(_rank_unique(idx[ok], score[i][ok]))
  return rankings, invalid, seconds


@functools.partial(jax.jit, static_argnames=("model", "lc", "k"))
def _one_pass(params, prompts, codes, *, model, lc, k):
  mask_id = model.config.mask_token_id
  q, p = prompts.shape
  canvas = jnp.full((q, lc), mask_id, jnp.int32)
  logits = model.apply({"params": params}, jnp.concatenate([prompts, canvas], 1), output_window=(p, lc))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf), -1)  # [Q, Lc, V]
  scores = jnp.zeros((q, codes.shape[0]))
  for pos in range(lc):
    scores = scores + logp[:, pos, :][:, codes[:, pos]]
  return jax.lax.top_k(scores, k)


def one_pass(model, params, prompts, table: DocIDTable, k: int = 100, batch: int = 32):
  """(rankings, 0, seconds): top-k DocIDs by the one-pass factorised log-probability."""
  codes = jnp.asarray(table.codes, jnp.int32)
  k = min(k, len(table.doc_ids))
  rankings, seconds = [], 0.0
  for start in range(0, len(prompts), batch):
    rows = _fixed(prompts[start:start + batch], batch)
    t0 = time.perf_counter()
    vals, idx = jax.device_get(_one_pass(params, jnp.asarray(rows, jnp.int32), codes, model=model,
                                         lc=table.length, k=k))
    seconds += time.perf_counter() - t0
    rankings += [list(zip(idx[i].tolist(), vals[i].tolist())) for i in range(min(batch, len(prompts) - start))]
  return rankings, 0, seconds


def elbo_rerank(model, params, prompts, table: DocIDTable, rankings, *, top: int = 10, mc_num: int = 8, seed: int = 0):
  """Re-scores the first `top` candidates of each ranking by the MC ELBO log p(DocID | query)."""
  lc, mask_id = table.length, model.config.mask_token_id
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  out = []
  for qi, ranked in enumerate(rankings):
    cands = [d for d, _ in ranked[:top]]
    if not cands:
      out.append(ranked)
      continue
    tokens = np.concatenate([np.repeat(prompts[qi:qi + 1], len(cands), 0), table.codes[cands]], 1)
    maskable = np.zeros_like(tokens, bool)
    maskable[:, -lc:] = True
    ll = np.asarray(mc_log_likelihood(lambda x: fn(params, x), jax.random.key(seed + qi), jnp.asarray(tokens),
                                      jnp.asarray(maskable), mask_id, mc_num=mc_num, group=mc_num))
    rescored = sorted(zip(cands, ll.tolist()), key=lambda x: -x[1])
    out.append(rescored + [r for r in ranked[top:]])
  return out


def _fixed(rows, batch):
  """Pads a batch of prompts to `batch` rows (repeating the last) so that one compilation serves all."""
  rows = np.asarray(rows)
  if len(rows) == batch:
    return rows
  return np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), 0)], 0)
