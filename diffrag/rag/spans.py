"""Extractive span decoding: the answer as the best-scoring span of the prompt, in one pass.

An extractive reader answers with words of its passages, so the answers it can give form a
finite set: every contiguous span of the prompt of 1 .. G-1 tokens, EOS-padded to the
G-token canvas. Like DiffuGR's one-pass scoring of DocIDs (`diffrag.gr.decode.one_pass`),
one forward pass over the fully masked canvas scores every candidate at once by the
mean-field log-probability

    s(j, l) = sum_{p < l} log p_p(x_{j+p} | prompt, all masked)
              + sum_{l <= p < G} log p_p(EOS | prompt, all masked),

where x is the prompt and p_p the model's distribution at canvas position p. Every candidate
scores all G positions, so the per-position normalisers are common to all of them and the
ranking is that of the summed logits. The answer is the arg max; its length is part of the
decision (the EOS terms), which the iterative sampler makes one confident EOS at a time.

The mean-field score at positions after the first is a mixture over every place the answer
could start, which favours EOS. With `first_tokens = K` the K distinct first tokens of the best
spans are committed at canvas position 0 (K canvases, one batched pass) and the spans starting
with each are rescored under it: a chain rule over the first token (`_first_token_scores`).

Candidates (`span_candidates`): spans of real prompt tokens with no special token inside,
starting at a word start and ending at a word end (a WordPiece `##` piece continues a word;
a SentencePiece `▁` / byte-BPE `Ġ` piece starts one; other tokenizers: every token).
"""

from __future__ import annotations

import functools
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from diffrag.gr.decode import canvas_logp, masked_canvas_logp
from diffrag.sampling.sampler import Sample


def word_starts(tokens: Sequence[str]) -> np.ndarray:
  """[P] bool: token i starts a word (WordPiece, SentencePiece and byte-BPE conventions)."""
  if any(t.startswith("##") for t in tokens):
    return np.array([not t.startswith("##") for t in tokens], bool)
  if any(t.startswith(("\u2581", "\u0120")) for t in tokens):
    return np.array([t.startswith(("\u2581", "\u0120")) for t in tokens], bool)
  return np.ones(len(tokens), bool)


def span_candidates(ids: np.ndarray, mask: np.ndarray, starts: np.ndarray, special: np.ndarray,
                    max_len: int) -> np.ndarray:
  """Which (start j, length l) spans of each prompt are answers: [B, P, max_len] bool (l = index + 1).

  ids, mask, starts, special: [B, P] (left-padded prompts; starts: word starts; special:
  special tokens, never inside an answer).
  """
  chex.assert_equal_shape([ids, mask, starts, special])
  b, p = ids.shape
  ok_tok = mask.astype(bool) & ~special.astype(bool)
  # ends[j]: a word may end at j (the next token starts a word, is special, or the prompt ends)
  nxt_start = np.concatenate([starts[:, 1:] | special[:, 1:].astype(bool) | ~mask[:, 1:].astype(bool),
                              np.ones((b, 1), bool)], 1)
  out = np.zeros((b, p, max_len), bool)
  run = np.zeros((b, p), bool)  # all of x_j .. x_{j+l-1} are answer tokens
  for l in range(1, max_len + 1):
    last = np.arange(p) + l - 1
    inside = last < p
    tok_ok = np.zeros((b, p), bool)
    tok_ok[:, inside] = ok_tok[:, last[inside]]
    run = tok_ok if l == 1 else run & tok_ok
    end_ok = np.zeros((b, p), bool)
    end_ok[:, inside] = nxt_start[:, last[inside]]
    out[:, :, l - 1] = run & starts.astype(bool) & end_ok
  return out


def _span_scores(logp, ids, eos_id, first=None):
  """s(j, l) of every span of the prompt: [B, P, G-1] (l = index + 1).

  logp: [B, G, V] canvas log-probabilities; ids: [B, P]; first: [B, P] (optional) replaces the
  position-0 term log p_0(x_j) (the first token's log-probability from another pass)."""
  (b, g, _), p = logp.shape, ids.shape[1]
  m = g - 1
  tok = jnp.take_along_axis(logp, jnp.broadcast_to(ids[:, None, :], (b, g, p)), axis=2)  # [B, G, P]: log p_p(x_j)
  at = jnp.minimum(jnp.arange(p)[:, None] + jnp.arange(m)[None, :], p - 1)  # [P, m]: j + q
  diag = tok[:, jnp.arange(m)[None, :], at]                                 # [B, P, m]: log p_q(x_{j+q})
  if first is not None:
    diag = diag.at[:, :, 0].set(first)
  head = jnp.cumsum(diag, axis=2)                                           # [B, P, m]: sum over q < l
  eos = logp[:, :, eos_id]                                                  # [B, G]
  tail = jnp.flip(jnp.cumsum(jnp.flip(eos, 1), 1), 1)[:, 1:]               # [B, m]: sum over p >= l, l = 1..m
  return head + tail[:, None, :]


def _first_token_scores(params, ids, mask, score, logp, *, model, eos_id, k):
  """Spans rescored with their first token committed: [B, P, G-1] (-inf unless x_j is one of the k first tokens).

  score: [B, P, G-1] one-pass scores (-inf for non-candidates); logp: [B, G, V] of that pass.
  The k distinct first tokens of the best spans are committed at canvas position 0, one
  canvas each (one batched pass of B·k rows), and a span starting with token c scores
      log p_0(c | all masked) + sum_{1 <= p < l} log p_p(x_{j+p} | c) + sum_{p >= l} log p_p(EOS | c)."""
  (b, p), g = ids.shape, logp.shape[1]
  v = logp.shape[2]
  best_at = score.max(axis=2)                                               # [B, P]: best span starting at j
  per_token = jnp.full((b, v), -jnp.inf).at[jnp.arange(b)[:, None], ids].max(best_at)  # [B, V]
  top, first = jax.lax.top_k(per_token, k)                                  # [B, k] distinct first tokens
  canvas = jnp.full((b * k, g), model.config.mask_token_id, jnp.int32).at[:, 0].set(first.reshape(-1))
  rep = lambda x: jnp.repeat(x, k, axis=0)
  cond = canvas_logp(params, rep(ids), rep(mask), canvas, model)            # [B·k, G, V]
  first_lp = jnp.take_along_axis(logp[:, 0, :], ids, axis=1)               # [B, P]: log p_0(x_j | all masked)
  s = _span_scores(cond, rep(ids), eos_id, rep(first_lp)).reshape(b, k, p, g - 1)
  starts_with = (ids[:, None, :] == first[:, :, None]) & jnp.isfinite(top)[:, :, None]  # [B, k, P]
  s = jnp.where(starts_with[..., None] & jnp.isfinite(score)[:, None], s, -jnp.inf)
  return s.max(axis=1), cond.reshape(b, k, g, v), first


@functools.partial(jax.jit, static_argnames=("model", "gen_length", "eos_id", "first_tokens"))
def _span_decode(params, ids, mask, valid, *, model, gen_length, eos_id, first_tokens):
  """ids, mask: [B, P]; valid: [B, P, G-1] -> (canvas [B, G], log p_p of each canvas token [B, G])."""
  g, (b, p) = gen_length, ids.shape
  m = g - 1
  logp = masked_canvas_logp(params, ids, mask, g, model)                  # [B, G, V]
  score = jnp.where(valid, _span_scores(logp, ids, eos_id), -jnp.inf)     # [B, P, m]
  if first_tokens:
    score, cond, first = _first_token_scores(params, ids, mask, score, logp, model=model, eos_id=eos_id,
                                             k=first_tokens)
  best = jnp.argmax(score.reshape(b, p * m), axis=1)
  j, l = best // m, best % m + 1
  pos = jnp.arange(g)[None, :]
  src = jnp.clip(j[:, None] + pos, 0, p - 1)
  out = jnp.where(pos < l[:, None], jnp.take_along_axis(ids, src, axis=1), eos_id).astype(jnp.int32)
  logprob = jnp.take_along_axis(logp, out[..., None], axis=2)[..., 0]
  if first_tokens:  # positions >= 1 under the pass that committed the answer's first token
    which = jnp.argmax(first == out[:, :1], axis=1)                         # [B]
    chosen = cond[jnp.arange(b), which]                                     # [B, G, V]
    logprob = logprob.at[:, 1:].set(jnp.take_along_axis(chosen, out[..., None], axis=2)[:, 1:, 0])
  return out, logprob


def span_decode(model, params, ids, mask, valid, eos_id: int, first_tokens: int = 0) -> Sample:
  """The best span of each prompt as a `Sample` (every position committed at step 0).

  ids, mask: [B, P] left-padded prompts; valid: [B, P, G-1] from `span_candidates` (G the canvas).
  first_tokens = 0: one forward pass, mean-field scores. first_tokens = k > 0: the spans whose
  first token is one of the k best first tokens are rescored with that token committed
  (`_first_token_scores`); 1 + k forward passes (the k in one batched call), reported in
  `num_forward`. A prompt with no candidate span answers with EOS (`eos_id`, the reader's
  padding token) only.
  """
  ids, mask, valid = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(valid, bool)
  chex.assert_rank([ids, mask, valid], [2, 2, 3])
  if first_tokens < 0:
    raise ValueError(f"first_tokens must be >= 0 (0: one-pass mean-field scores), got {first_tokens}")
  g = valid.shape[2] + 1
  canvas, logprob = _span_decode(params, ids, mask, valid, model=model, gen_length=g, eos_id=int(eos_id),
                                 first_tokens=int(first_tokens))
  none = ~valid.any(axis=(1, 2))[:, None]
  canvas = jnp.where(none, eos_id, canvas)
  return Sample(tokens=jnp.concatenate([ids, canvas], 1), commit_step=jnp.zeros(canvas.shape, jnp.int32),
                logprob=jnp.where(none, 0.0, logprob), num_forward=jnp.asarray(1 + int(first_tokens), jnp.int32))


def phrase_continuations(canvas, block_start, ok, starts, vocab_size: int):
  """The tokens that keep a left-to-right answer a phrase of its prompt, and whether it may end now.

  canvas: [B, P + G] (the left-padded prompt, then the answer canvas); block_start: the canvas
  position about to be committed, P + k with the answer's first k tokens a_0 .. a_{k-1} already
  committed; ok: [B, P] real, non-special prompt tokens; starts: [B, P] word starts. With x the
  prompt, the prefix a_{<k} *precedes* prompt position j when x_{j-k} .. x_{j-1} = a_0 .. a_{k-1}
  (k = 0: every j). Then

      next[b, v] = exists j: prefix precedes j, ok_j, x_j = v, and (k > 0 or x_j starts a word)
      end[b]     = k == 0 or exists j <= P: prefix precedes j and (j = P or x_j starts a word
                   or not ok_j)

  so a committed answer is always a contiguous run of real prompt tokens that starts at a word
  start, and it can stop only at a word end (`span_candidates`' rule, decoded one token at a time).
  Returns (next [B, V] bool, end [B] bool).
  """
  b, p = ok.shape
  g = canvas.shape[1] - p
  x = jnp.concatenate([canvas[:, :p], jnp.full((b, 1), -1, canvas.dtype)], 1)      # [B, P + 1]: j = P past the end
  ok1 = jnp.concatenate([ok, jnp.zeros((b, 1), bool)], 1)
  starts1 = jnp.concatenate([starts, jnp.zeros((b, 1), bool)], 1)
  answer = canvas[:, p:]                                                          # [B, G]
  k = block_start - p
  precedes = jnp.ones((b, p + 1), bool)
  for d in range(1, g + 1):  # the prefix's token a_{k-d} sits at x_{j-d}
    before = jnp.concatenate([jnp.full((b, d), -2, x.dtype), x[:, :p + 1 - d]], 1)  # x_{j-d} (-2 before the prompt)
    a = jnp.take(answer, jnp.clip(k - d, 0, g - 1), axis=1)                        # [B]
    precedes &= (d > k) | (before == a[:, None])
  nxt = precedes & ok1 & ((k > 0) | starts1)
  allowed = jnp.zeros((b, vocab_size), bool).at[jnp.arange(b)[:, None], jnp.maximum(x, 0)].max(nxt)
  end = (k == 0) | jnp.any(precedes & (starts1 | ~ok1), axis=1)
  return allowed, end
