"""Decoding DocIDs from a masked-diffusion (or autoregressive) retriever.

Every function takes queries as left-padded prompts [Q, P] with their attention mask
[Q, P] (1 = real token) and a DocIDTable, and returns a `Decoded`: per query a ranking
[(document index, score)] best first (valid DocIDs only: invalid canvases are counted,
not ranked), the forward passes per query, and the timing. Queries are decoded in fixed
batches; the first batch compiles and is timed apart (`Timing.compile_seconds`), the rest
are timed in steady state and any compilation there is counted (`compiles_in_timed`).

- `t_step`: DiffuGR's parallel denoising of the DocID canvas in T steps, optionally
  constrained; one DocID per query. A constrained step can keep a commit back (repair), so
  the forward passes can exceed T: they are counted.
- `pseudo_beam`: the paper's "pseudo beam search", as the spec's candidate (A): B sampled
  decodings per query (Gumbel-max at a temperature), de-duplicated, ranked by the summed
  log-probabilities of the tokens at the steps they were committed.
- `beam_search`: a true top-k beyond the paper, a beam over denoising states: after every
  step the B best partial canvases by cumulative log-probability are kept (one token per
  step; `order="confidence"` commits the most confident masked position of each beam,
  `order="left_to_right"` the next position: the autoregressive baseline's beam search).
- `one_pass`: score every DocID from one forward pass over the fully masked canvas,
  s(d) = sum_p log p(codes[d, p] | prompt, all masked); exact top-k of that factorised
  score, over the table in chunks (memory O(Q * chunk), never [Q, N, Lc]).
- `elbo_rerank`: re-rank candidates by the Monte-Carlo ELBO of the training objective.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.diffusion.objective import mc_log_likelihood
from diffrag.experiment.timing import Stopwatch, Timing
from diffrag.gr.constraints import allowed_tokens_mask, docid_allowed, docid_repair
from diffrag.gr.docids import DocIDTable
from diffrag.models.transformer import positions_from_mask, prediction_window
from diffrag.sampling import transforms as T
from diffrag.sampling.sampler import generate

ONE_PASS_CHUNK = 65536  # DocIDs scored per block of one-pass top-k


@dataclasses.dataclass
class Decoded:
  """rankings: per query [(doc index, score)] best first; invalid: canvases that are no DocID;
  forward: mean forward passes per query; timing: steady-state seconds over `timed_queries`."""

  rankings: list
  invalid: int
  forward: float
  timing: Timing
  timed_queries: int

  @property
  def ms_per_query(self) -> float:
    return 1000 * self.timing.seconds / max(self.timed_queries, 1)


def _rank_unique(doc_idx, scores):
  """Best score per document, sorted; -1 (invalid) dropped."""
  best: dict[int, float] = {}
  for d, s in zip(doc_idx, scores):
    if d >= 0 and (d not in best or s > best[d]):
      best[int(d)] = float(s)
  return sorted(best.items(), key=lambda x: -x[1])


def _docid_vocab(view):
  return view.extras["docid_vocab"][None, None, :]


@functools.lru_cache(maxsize=None)
def diffusion_chain(table: DocIDTable | None, temperature: float = 0.0, vocab: bool = False) -> T.ScoreTransform:
  """greedy (or Gumbel at T) + low_confidence + top-k commits, wrapped in the DocID constraint
  if a table is given; `vocab` (unconstrained decoding of a retriever trained on the DocID
  vocabulary) keeps the tokens of extras["docid_vocab"] [V] only. Cached: one chain object
  per setting, so the jitted sampler compiles once and every later call reuses it."""
  cand = T.gumbel_max(temperature, "float32") if temperature > 0 else T.greedy()
  inner = [cand, T.low_confidence(), T.commit_top_k()]
  if table is None:
    return T.chain(*([T.allowed_tokens(_docid_vocab)] if vocab else []), *inner)
  return T.chain(docid_allowed(table), *inner, docid_repair(table))


def _extras(table: DocIDTable, constrained: bool, vocab) -> dict:
  if constrained:
    return {"docid_index": table.index}
  return {} if vocab is None else {"docid_vocab": jnp.asarray(vocab)}


def _batches(fn, prompts, mask, per: int, rows_per_query: int = 1):
  """Runs fn(rows [per * rpq, P], row_mask, start) over the queries in fixed batches: the
  first compiles (timed apart), the rest are timed. Returns ([(start, n, output)], Stopwatch, timed queries)."""
  prompts, mask = np.asarray(prompts), np.asarray(mask)
  sw, outs, timed = Stopwatch(), [], 0
  starts = list(range(0, len(prompts), per))
  for i, start in enumerate(starts):
    q, m = prompts[start:start + per], mask[start:start + per]
    n = len(q)
    rows, rmask = _fixed(np.repeat(q, rows_per_query, 0), per * rows_per_query), \
        _fixed(np.repeat(m, rows_per_query, 0), per * rows_per_query)
    if i == 0:
      with sw.warmup():
        out = jax.device_get(fn(rows, rmask, start))
      if len(starts) > 1:
        outs.append((start, n, out))
        continue
    with sw.timed():
      out = jax.device_get(fn(rows, rmask, start))
    timed += n
    outs.append((start, n, out))
  return outs, sw, timed


def t_step(model, params, prompts, mask, table: DocIDTable, steps: int, *, constrained: bool,
           batch: int = 32, vocab=None) -> Decoded:
  """One DocID per query from T = steps denoising steps. vocab: [V] bool, the output
  vocabulary of a retriever trained on the DocID tokens only (applied when unconstrained)."""
  chain = diffusion_chain(table if constrained else None, 0.0, vocab is not None and not constrained)
  lc = table.length
  extras = _extras(table, constrained, vocab)
  run = lambda rows, rmask, start: generate(model, params, rows, chain, jax.random.key(start), gen_length=lc,
                                            steps=steps, attention_mask=rmask, extras=extras)
  outs, sw, timed = _batches(run, prompts, mask, batch)
  rankings, invalid, forward = [], 0, 0.0
  for _, n, out in outs:
    idx = table.decode(out.tokens[:n, -lc:])
    invalid += int((idx < 0).sum())
    forward += int(out.num_forward) * n
    score = out.logprob[:n].sum(-1)
    rankings += [_rank_unique([d], [s]) for d, s in zip(idx, score)]
  return Decoded(rankings, invalid, forward / max(len(prompts), 1), sw.timing, timed)


def pseudo_beam(model, params, prompts, mask, table: DocIDTable, samples: int, *, steps: int,
                temperature: float = 1.0, constrained: bool = True, batch: int = 32, seed: int = 0,
                vocab=None) -> Decoded:
  """B samples per query, deduplicated, ranked by commit-time log-prob."""
  chain = diffusion_chain(table if constrained else None, temperature, vocab is not None and not constrained)
  lc = table.length
  per = max(1, batch // samples)
  extras = _extras(table, constrained, vocab)
  run = lambda rows, rmask, start: generate(model, params, rows, chain, jax.random.key(seed + start), gen_length=lc,
                                            steps=steps, attention_mask=rmask, extras=extras)
  outs, sw, timed = _batches(run, prompts, mask, per, rows_per_query=samples)
  rankings, invalid, forward = [], 0, 0.0
  for _, n, out in outs:
    idx = table.decode(out.tokens[:, -lc:])
    score = out.logprob.sum(-1)
    forward += int(out.num_forward) * n
    for i in range(n):
      sl = slice(i * samples, (i + 1) * samples)
      invalid += int((idx[sl] < 0).sum())
      rankings.append(_rank_unique(idx[sl], score[sl]))
  return Decoded(rankings, invalid, forward / max(len(prompts), 1), sw.timing, timed)


def _apply(model, params, ids, mask, window):
  """Logits [B, n, V] about the tokens of window (start, n), for any family (`prediction_window`)."""
  return model.apply({"params": params}, ids, attention_mask=mask, positions=positions_from_mask(mask),
                     output_window=prediction_window(model.config, *window))


@functools.partial(jax.jit, static_argnames=("model", "beam", "order"))
def _beam(params, prompts, mask, index, *, model, beam, order):
  mask_id = model.config.mask_token_id
  lc = index.codes.shape[1]
  q, p = prompts.shape
  canvas = jnp.full((q, beam, lc), mask_id, jnp.int32)
  cum = jnp.where(jnp.arange(beam) == 0, 0.0, -jnp.inf)[None].repeat(q, 0)
  rep = jnp.repeat(prompts, beam, axis=0)
  rep_mask = jnp.concatenate([jnp.repeat(mask, beam, axis=0), jnp.ones((q * beam, lc), mask.dtype)], 1)

  def step(i, carry):
    canvas, cum = carry
    flat = canvas.reshape(q * beam, lc)
    logits = _apply(model, params, jnp.concatenate([rep, flat], 1), rep_mask, (p, lc))
    logits = logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf)
    is_masked = flat == mask_id
    logits = jnp.where(allowed_tokens_mask(index, flat, is_masked, logits.shape[-1]), logits, -jnp.inf)
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


def beam_search(model, params, prompts, mask, table: DocIDTable, beam: int, *, constrained: bool = True,
                order: str = "confidence", batch: int = 16) -> Decoded:
  """The B best canvases by cumulative log-probability (one commit per step: Lc forward passes)."""
  if order not in ("confidence", "left_to_right"):
    raise ValueError(f"beam order={order!r}; expected confidence or left_to_right")
  if not constrained:
    raise ValueError("beam search over DocIDs runs under the DocID constraint (constrained=True)")
  run = lambda rows, rmask, start: _beam(params, jnp.asarray(rows, jnp.int32), jnp.asarray(rmask, jnp.int32),
                                         table.index, model=model, beam=beam, order=order)
  outs, sw, timed = _batches(run, prompts, mask, batch)
  rankings, invalid = [], 0
  for _, n, (canv, score) in outs:
    for i in range(n):
      idx = table.decode(canv[i])
      ok = np.isfinite(score[i])
      invalid += int(((idx < 0) & ok).sum())
      rankings.append(_rank_unique(idx[ok], score[i][ok]))
  return Decoded(rankings, invalid, float(table.length), sw.timing, timed)


def canvas_logp(params, prompts, mask, canvas, model):
  """log p_p(. | prompt, canvas): [Q, Lc, V] at every canvas position (the mask token excluded).

  prompts, mask: [Q, P] left-padded; canvas: [Q, Lc] (the mask id where masked)."""
  mask_id = model.config.mask_token_id
  (q, p), lc = prompts.shape, canvas.shape[1]
  full_mask = jnp.concatenate([mask, jnp.ones((q, lc), mask.dtype)], 1)
  logits = _apply(model, params, jnp.concatenate([prompts, canvas], 1), full_mask, (p, lc))
  return jax.nn.log_softmax(logits.astype(jnp.float32).at[..., mask_id].set(-jnp.inf), -1)


def masked_canvas_logp(params, prompts, mask, lc, model):
  """log p_p(. | prompt, all Lc canvas positions masked): [Q, Lc, V] (the mask token excluded).

  prompts, mask: [Q, P] left-padded; the one-pass scorers of DocIDs and of answer spans use it."""
  canvas = jnp.full((prompts.shape[0], lc), model.config.mask_token_id, jnp.int32)
  return canvas_logp(params, prompts, mask, canvas, model)


def _chunks(codes, chunk):
  """codes [N, Lc] padded to a multiple of chunk: ([N', Lc], number of chunks)."""
  padded = jnp.pad(codes, ((0, -codes.shape[0] % chunk), (0, 0)))
  return padded, padded.shape[0] // chunk


def _chunk_scores(logp, padded, c, chunk):
  """s(d) = sum_p logp[:, p, codes[d, p]] for the DocIDs of chunk c: [Q, chunk]."""
  ids = jax.lax.dynamic_slice_in_dim(padded, c * chunk, chunk)              # [C, Lc]
  s = jnp.zeros((logp.shape[0], chunk))
  for pos in range(padded.shape[1]):
    s = s + jnp.take(logp[:, pos, :], ids[:, pos], axis=1)
  return s


@functools.partial(jax.jit, static_argnames=("model", "k"))
def _one_pass(params, prompts, mask, codes, prior, *, model, k):
  n, lc = codes.shape                                                        # codes: [N, Lc]; prior: [N]
  q = prompts.shape[0]
  logp = masked_canvas_logp(params, prompts, mask, lc, model)              # [Q, Lc, V]
  chunk = min(ONE_PASS_CHUNK, n)
  padded, count = _chunks(codes, chunk)
  prior = jnp.pad(prior, (0, padded.shape[0] - n))

  def block(carry, c):
    best_s, best_i = carry
    s = _chunk_scores(logp, padded, c, chunk) - jax.lax.dynamic_slice_in_dim(prior, c * chunk, chunk)[None]
    doc = c * chunk + jnp.arange(chunk)
    s = jnp.where(doc[None] < n, s, -jnp.inf)
    cat_s = jnp.concatenate([best_s, s], 1)
    cat_i = jnp.concatenate([best_i, jnp.broadcast_to(doc, (q, chunk))], 1)
    top_s, pos_ = jax.lax.top_k(cat_s, k)
    return (top_s, jnp.take_along_axis(cat_i, pos_, 1)), None

  init = (jnp.full((q, k), -jnp.inf), jnp.zeros((q, k), jnp.int32))
  (vals, idx), _ = jax.lax.scan(block, init, jnp.arange(count))
  return vals, idx


@functools.partial(jax.jit, static_argnames=("model",))
def _all_scores(params, prompt, mask, codes, *, model):
  """One-pass scores of every DocID for one prompt [1, P]: [N]."""
  n, lc = codes.shape
  logp = masked_canvas_logp(params, prompt, mask, lc, model)
  chunk = min(ONE_PASS_CHUNK, n)
  padded, count = _chunks(codes, chunk)
  _, s = jax.lax.scan(lambda _, c: (None, _chunk_scores(logp, padded, c, chunk)[0]), None, jnp.arange(count))
  return s.reshape(-1)[:n]


def docid_prior(model, params, prompt, mask, table: DocIDTable) -> np.ndarray:
  """[N]: each DocID's one-pass score under a content-free prompt [1, P] (e.g. the empty
  query): the prior over DocIDs the training pairs taught, s(d | empty)."""
  return np.asarray(_all_scores(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(mask, jnp.int32),
                                table.index.codes, model=model))


def one_pass(model, params, prompts, mask, table: DocIDTable, k: int = 100, batch: int = 32,
             prior: np.ndarray | None = None) -> Decoded:
  """Top-k DocIDs by the one-pass factorised log-probability (one forward pass per query).

  prior: [N] subtracted from every query's scores (`docid_prior` times a weight lambda:
  s(d | q) - lambda s(d | empty), a calibration against the DocID prior; None = 0)."""
  k = min(k, len(table.doc_ids))
  prior = jnp.zeros((len(table.doc_ids),), jnp.float32) if prior is None else jnp.asarray(prior, jnp.float32)
  run = lambda rows, rmask, start: _one_pass(params, jnp.asarray(rows, jnp.int32), jnp.asarray(rmask, jnp.int32),
                                             table.index.codes, prior, model=model, k=k)
  outs, sw, timed = _batches(run, prompts, mask, batch)
  rankings = []
  for _, n, (vals, idx) in outs:
    rankings += [list(zip(idx[i].tolist(), vals[i].tolist())) for i in range(n)]
  return Decoded(rankings, 0, 1.0, sw.timing, timed)


@functools.partial(jax.jit, static_argnames=("model", "mc_num"))
def _elbo(params, tokens, tmask, maskable, key, *, model, mc_num: int):
  """MC ELBO of each row's maskable span: tokens, tmask, maskable: [R, L] -> [R]."""
  rep = jnp.repeat(tmask, mc_num, axis=0)  # mc_log_likelihood evaluates each row mc_num times, row-major
  fn = lambda x: model.apply({"params": params}, x, attention_mask=rep, positions=positions_from_mask(rep))
  return mc_log_likelihood(fn, key, tokens, maskable, model.config.mask_token_id, mc_num=mc_num, group=mc_num)


def elbo_rerank(model, params, prompts, mask, table: DocIDTable, decoded: Decoded, *, top: int = 10,
                mc_num: int = 8, seed: int = 0) -> Decoded:
  """Re-scores the first `top` candidates of each ranking by the MC ELBO log p(DocID | query);
  the timing adds the re-ranking to the first pass's."""
  lc = table.length
  sw, timed = Stopwatch(), 0
  out = []
  for qi, ranked in enumerate(decoded.rankings):
    cands = [d for d, _ in ranked[:top]]
    if not cands:
      out.append(ranked)
      continue
    padded = (cands + [cands[-1]] * top)[:top]  # fixed shape: one compilation
    tokens = np.concatenate([np.repeat(prompts[qi:qi + 1], top, 0), table.codes[padded]], 1)
    tmask = np.concatenate([np.repeat(mask[qi:qi + 1], top, 0), np.ones((top, lc), mask.dtype)], 1)
    maskable = np.zeros_like(tokens, bool)
    maskable[:, -lc:] = True
    key = jax.random.key(seed + qi)
    call = lambda: np.asarray(_elbo(params, jnp.asarray(tokens), jnp.asarray(tmask), jnp.asarray(maskable), key,
                                    model=model, mc_num=mc_num))
    if sw.timing.compile_seconds == 0.0:
      with sw.warmup():
        ll = call()
    else:
      with sw.timed():
        ll = call()
      timed += 1
    rescored = sorted(zip(cands, ll[:len(cands)].tolist()), key=lambda x: -x[1])
    out.append(rescored + [r for r in ranked[top:]])
  first, second = decoded.timing, sw.timing
  per_query = first.seconds / max(decoded.timed_queries, 1) + second.seconds / max(timed, 1)
  timing = Timing(per_query * decoded.timed_queries, first.calls + second.calls,
                  first.compile_seconds + second.compile_seconds, first.compiles_in_timed + second.compiles_in_timed)
  return Decoded(out, decoded.invalid, decoded.forward + mc_num, timing, decoded.timed_queries)


def _fixed(rows, batch):
  """Pads a batch of prompts to `batch` rows (repeating the last) so that one compilation serves all."""
  rows = np.asarray(rows)
  if len(rows) == batch:
    return rows
  return np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), 0)], 0)
