"""DocID constraints as score transforms, valid for ANY commit order (not only left to right).

A prefix trie only constrains left-to-right decoding. A masked-diffusion sampler commits
positions in any order, several at a time, so the constraint here is positional: with
codes [N, Lc] the table of valid DocIDs,

    consistent[b, d] = AND over committed positions p of (codes[d, p] == canvas[b, p])
    allowed[b, p, v] = OR over consistent d of (codes[d, p] == v)

`docid_allowed` keeps only allowed tokens at every masked position (so each candidate
alone extends some valid DocID). Two positions committed in the same step could still
agree with different DocIDs, so `docid_repair` re-checks the step's commits one by one in
order of score, narrowing the consistent set, and leaves a commit that would break joint
consistency masked for a later step (the best-scored commit always survives, so every
step makes progress). By induction the finished canvas is always a valid DocID.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffrag.gr.docids import DocIDTable
from diffrag.sampling.transforms import ScoreTransform, stateless


def consistent_docs(codes, canvas, is_masked):
  """[B, N] bool: DocIDs that agree with every committed (unmasked) position of canvas [B, Lc]."""
  agree = codes[None, :, :] == canvas[:, None, :]                      # [B, N, Lc]
  return jnp.all(agree | is_masked[:, None, :], axis=-1)


def allowed_tokens_mask(codes, consistent, vocab_size: int):
  """[B, Lc, V] bool: tokens that some consistent DocID has at each position."""
  b, (n, lc) = consistent.shape[0], codes.shape
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, n, lc))
  pos = jnp.broadcast_to(jnp.arange(lc)[None, None, :], (b, n, lc))
  tok = jnp.broadcast_to(codes[None], (b, n, lc))
  val = jnp.broadcast_to(consistent[:, :, None], (b, n, lc))
  return jnp.zeros((b, lc, vocab_size), bool).at[rows, pos, tok].max(val)


def docid_allowed(table: DocIDTable) -> ScoreTransform:
  """Logits of tokens that no DocID consistent with the canvas has at that position -> -inf."""
  codes = jnp.asarray(table.codes, jnp.int32)

  def fn(view, key):
    cons = consistent_docs(codes, view.canvas, view.is_masked)
    allowed = allowed_tokens_mask(codes, cons, view.logits.shape[-1])
    return view.replace(logits=jnp.where(allowed, view.logits, -jnp.inf))
  return stateless(fn)


def docid_repair(table: DocIDTable) -> ScoreTransform:
  """Keeps the step's commits only while they stay jointly consistent (best score first)."""
  codes = jnp.asarray(table.codes, jnp.int32)

  def fn(view, key):
    cons = consistent_docs(codes, view.canvas, view.is_masked)                  # [B, N]
    order = jnp.argsort(-jnp.where(view.commit, view.score, -jnp.inf), axis=-1)  # [B, Lc]

    def body(j, carry):
      cons, commit = carry
      p = order[:, j]                                                            # [B]
      tok = jnp.take_along_axis(view.candidates, p[:, None], 1)[:, 0]
      want = jnp.take_along_axis(commit, p[:, None], 1)[:, 0]
      match = codes[:, p].T == tok[:, None]                                      # [B, N]
      ok = jnp.any(cons & match, axis=-1)
      keep = want & ok
      cons = jnp.where(keep[:, None], cons & match, cons)
      commit = commit.at[jnp.arange(commit.shape[0]), p].set(keep)
      return cons, commit

    _, commit = jax.lax.fori_loop(0, view.commit.shape[1], body, (cons, view.commit))
    return view.replace(commit=commit)
  return stateless(fn)
