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

from diffrag.gr.decode import masked_canvas_logp
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


@functools.partial(jax.jit, static_argnames=("model", "gen_length", "eos_id"))
def _span_decode(params, ids, mask, valid, *, model, gen_length, eos_id):
  """ids, mask: [B, P]; valid: [B, P, G-1] -> (canvas [B, G], log p_p of each canvas token [B, G])."""
  g, (b, p) = gen_length, ids.shape
  logp = masked_canvas_logp(params, ids, mask, g, model)                  # [B, G, V]
  tok = jnp.take_along_axis(logp, jnp.broadcast_to(ids[:, None, :], (b, g, p)), axis=2)  # [B, G, P]: log p_p(x_j)
  m = g - 1
  at = jnp.minimum(jnp.arange(p)[:, None] + jnp.arange(m)[None, :], p - 1)  # [P, m]: j + q
  diag = tok[:, jnp.arange(m)[None, :], at]                                 # [B, P, m]: log p_q(x_{j+q})
  head = jnp.cumsum(diag, axis=2)                                           # [B, P, m]: sum over q < l
  eos = logp[:, :, eos_id]                                        # [B, G]
  tail = jnp.flip(jnp.cumsum(jnp.flip(eos, 1), 1), 1)[:, 1:]               # [B, m]: sum over p >= l, l = 1..m
  score = jnp.where(valid, head + tail[:, None, :], -jnp.inf).reshape(b, p * m)
  best = jnp.argmax(score, axis=1)
  j, l = best // m, best % m + 1
  pos = jnp.arange(g)[None, :]
  src = jnp.clip(j[:, None] + pos, 0, p - 1)
  out = jnp.where(pos < l[:, None], jnp.take_along_axis(ids, src, axis=1), eos_id).astype(jnp.int32)
  return out, jnp.take_along_axis(logp, out[..., None], axis=2)[..., 0]


def span_decode(model, params, ids, mask, valid, eos_id: int) -> Sample:
  """The best span of each prompt as a `Sample` (one forward pass; every position committed at step 0).

  ids, mask: [B, P] left-padded prompts; valid: [B, P, G-1] from `span_candidates` (G the canvas).
  A prompt with no candidate span answers with EOS (`eos_id`, the reader's padding token) only.
  """
  ids, mask, valid = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(valid, bool)
  chex.assert_rank([ids, mask, valid], [2, 2, 3])
  g = valid.shape[2] + 1
  canvas, logprob = _span_decode(params, ids, mask, valid, model=model, gen_length=g, eos_id=int(eos_id))
  none = ~valid.any(axis=(1, 2))[:, None]
  canvas = jnp.where(none, eos_id, canvas)
  return Sample(tokens=jnp.concatenate([ids, canvas], 1), commit_step=jnp.zeros(canvas.shape, jnp.int32),
                logprob=jnp.where(none, 0.0, logprob), num_forward=jnp.asarray(1, jnp.int32))
