"""DocID constraints for ANY commit order, with memory independent of N * B * Lc.

A prefix trie only constrains left-to-right decoding. A masked-diffusion sampler commits
positions in any order, several at a time, so the constraint is positional: with codes
[N, Lc] the table of valid DocIDs, a partial canvas (committed positions C) allows

    consistent(b) = { d : codes[d, p] == canvas[b, p] for every p in C }
    allowed[b, p, v] = OR over d in consistent(b) of (codes[d, p] == v)

The index (`DocIDIndex`) keeps, per position p, the documents sorted by their token at p,
so the documents with token v at p form one segment [lo, hi) found by binary search.
consistent(b) is the intersection of the segments of its committed positions; it is
enumerated by scanning the SMALLEST of them (the "driver") in chunks of K documents and
checking the other committed positions on the fly. Per step the memory is O(B K Lc) for a
chunk plus the [B, Lc, V] allowed mask, whatever N is; the work is O(B |driver| Lc).
Canvases with nothing committed use the per-position token sets, computed once.

`docid_allowed` keeps only allowed tokens at every masked position (so each candidate
alone extends some valid DocID). Two positions committed in the same step could agree
with different DocIDs, so `docid_repair` keeps the step's commits greedily in order of
score while they stay jointly consistent; the kept set is read off in one scan as the
lexicographic maximum, over consistent documents, of the bit vector "agrees with
candidate j" (bit 0 = best score): greedy acceptance is exactly that maximum. The best
commit always survives, so every step makes progress, and by induction the finished
canvas is always a valid DocID.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.sampling.transforms import ScoreTransform, stateless

CHUNK = 4096  # documents scanned per iteration (the K of the module doc)
_BITS = 30    # candidate bits per int32 word of the repair key


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "order", "sorted_tokens",
                                                                    "position_tokens"], meta_fields=["chunk"])
@dataclasses.dataclass(frozen=True)
class DocIDIndex:
  """A pytree of arrays over codes [N, Lc]: order [Lc, N] (documents sorted by their token at
  each position), sorted_tokens [Lc, N], codes [N, Lc], position_tokens [Lc, V'] bool (the
  tokens each position takes over the whole table, V' = max token + 1). Pass it into jitted
  code as an argument (or in the sampler's `extras["docid_index"]`), not as a closure: a
  million-row table is data, not a compile-time constant."""

  codes: jax.Array
  order: jax.Array
  sorted_tokens: jax.Array
  position_tokens: jax.Array
  chunk: int = CHUNK

  @classmethod
  def build(cls, codes: np.ndarray, chunk: int = CHUNK) -> "DocIDIndex":
    codes = np.asarray(codes, np.int32)
    order = np.argsort(codes.T, axis=1, kind="stable").astype(np.int32)
    sorted_tokens = np.take_along_axis(codes.T, order, axis=1)
    tokens = np.zeros((codes.shape[1], int(codes.max()) + 1), bool)
    for p in range(codes.shape[1]):
      tokens[p, np.unique(codes[:, p])] = True
    return cls(jnp.asarray(codes), jnp.asarray(order), jnp.asarray(sorted_tokens), jnp.asarray(tokens), chunk)

  @property
  def size(self) -> int:
    return int(self.codes.shape[0])

  @property
  def length(self) -> int:
    return int(self.codes.shape[1])


def _driver(index: DocIDIndex, canvas, is_masked, all_when_empty: bool):
  """Per row: (position p*, lo, hi) of the smallest committed segment. A row with nothing
  committed scans the whole table (all_when_empty) or nothing; also returns `committed` [R]."""
  n = index.size
  search = lambda side: jax.vmap(lambda st, v: jnp.searchsorted(st, v, side=side), in_axes=(0, 1), out_axes=1)
  lo = search("left")(index.sorted_tokens, canvas)                            # [R, Lc]
  hi = search("right")(index.sorted_tokens, canvas)
  size = jnp.where(is_masked, n + 1, hi - lo)
  p = jnp.argmin(size, axis=-1)
  pick = lambda a: jnp.take_along_axis(a, p[:, None], 1)[:, 0]
  committed = jnp.any(~is_masked, axis=-1)
  lo_p = jnp.where(committed, pick(lo), 0)
  hi_p = jnp.where(committed, pick(hi), n if all_when_empty else 0)
  return p, lo_p, hi_p, committed


def _scan(index: DocIDIndex, canvas, is_masked, body, init, *, all_when_empty: bool):
  """Folds `body(carry, docs [R, K], ok [R, K]) -> carry` over the documents consistent with
  each row's committed positions, K at a time (ok: the document is consistent and real)."""
  chunk = index.chunk
  p, lo, hi, _ = _driver(index, canvas, is_masked, all_when_empty)
  order = jnp.pad(jnp.take(index.order, p, axis=0), ((0, 0), (0, chunk)))     # [R, N + K]
  need = jnp.max(hi - lo)

  def step(c):
    k, carry = c
    start = lo + k
    docs = jax.vmap(lambda o, s: jax.lax.dynamic_slice_in_dim(o, s, chunk))(order, start)    # [R, K]
    in_seg = (start[:, None] + jnp.arange(chunk)[None]) < hi[:, None]
    codes = jnp.take(index.codes, docs, axis=0)                                # [R, K, Lc]
    ok = in_seg & jnp.all((codes == canvas[:, None, :]) | is_masked[:, None, :], axis=-1)
    return k + chunk, body(carry, docs, ok)

  return jax.lax.while_loop(lambda c: c[0] < need, step, (jnp.int32(0), init))[1]


def consistent_any(index: DocIDIndex, canvas, is_masked):
  """[R] bool: some DocID agrees with every committed position of canvas [R, Lc]."""
  return _scan(index, canvas, is_masked, lambda acc, docs, ok: acc | jnp.any(ok, -1),
               jnp.zeros(canvas.shape[0], bool), all_when_empty=True)


def allowed_tokens_mask(index: DocIDIndex, canvas, is_masked, vocab_size: int):
  """[R, Lc, V] bool: the tokens that some DocID consistent with the canvas has at each position."""
  r, lc = canvas.shape
  if index.position_tokens.shape[1] > vocab_size:
    raise ValueError(f"DocIDs use token ids up to {index.position_tokens.shape[1] - 1}, beyond the model's "
                     f"vocabulary of {vocab_size}")
  static = jnp.zeros((lc, vocab_size), bool).at[:, :index.position_tokens.shape[1]].set(index.position_tokens)
  committed = jnp.any(~is_masked, axis=-1)
  rows = jnp.arange(r)[:, None, None]
  pos = jnp.arange(lc)[None, None, :]

  def body(acc, docs, ok):
    tok = jnp.take(index.codes, docs, axis=0)                                  # [R, K, Lc]
    return acc.at[rows, pos, tok].max(jnp.broadcast_to(ok[..., None], tok.shape))

  scanned = _scan(index, canvas, is_masked, body, jnp.zeros((r, lc, vocab_size), bool), all_when_empty=False)
  return jnp.where(committed[:, None, None], scanned, static[None])


def _repair_keys(index: DocIDIndex, cand_pos, cand_tok, cand_on, docs):
  """Per document a lexicographic key (words of _BITS bits, the top bit of word 0 = the best
  candidate): bit j set when the document agrees with candidate j. cand_*: [R, J];
  docs [R, K] -> [R, K, W] int32."""
  codes = jnp.take(index.codes, docs, axis=0)                                  # [R, K, Lc]
  at = jnp.take_along_axis(codes, jnp.broadcast_to(cand_pos[:, None, :], codes.shape[:2] + cand_pos.shape[1:]), 2)
  agree = (at == cand_tok[:, None, :]) & cand_on[:, None, :]                   # [R, K, J]
  j = agree.shape[-1]
  words = -(-j // _BITS)
  agree = jnp.pad(agree, ((0, 0), (0, 0), (0, words * _BITS - j))).reshape(agree.shape[:2] + (words, _BITS))
  weights = (1 << (_BITS - 1 - jnp.arange(_BITS))).astype(jnp.int32)
  return jnp.sum(agree.astype(jnp.int32) * weights, axis=-1)


def _lexmax(keys, ok):
  """Lexicographic max over axis 1 of keys [R, K, W] where ok [R, K]; all -1 where none."""
  alive = ok
  out = []
  for w in range(keys.shape[-1]):
    col = jnp.where(alive, keys[..., w], -1)
    m = jnp.max(col, axis=1)
    out.append(m)
    alive = alive & (col == m[:, None])
  return jnp.stack(out, -1)                                                    # [R, W]


def _lex_greater(a, b):
  """a > b lexicographically; a, b: [R, W] -> [R] bool."""
  gt = jnp.zeros(a.shape[0], bool)
  eq = jnp.ones(a.shape[0], bool)
  for w in range(a.shape[-1]):
    gt = gt | (eq & (a[:, w] > b[:, w]))
    eq = eq & (a[:, w] == b[:, w])
  return gt


def repair_commits(index: DocIDIndex, canvas, is_masked, candidates, commit, score):
  """commit [R, Lc] narrowed to the commits that stay jointly consistent, kept greedily by score."""
  r, lc = canvas.shape
  cand_pos = jnp.argsort(-jnp.where(commit, score, -jnp.inf), axis=-1)        # candidates, best first
  cand_tok = jnp.take_along_axis(candidates, cand_pos, 1)
  cand_on = jnp.take_along_axis(commit, cand_pos, 1)
  words = -(-lc // _BITS)

  def body(best, docs, ok):
    chunk_best = _lexmax(_repair_keys(index, cand_pos, cand_tok, cand_on, docs), ok)
    return jnp.where(_lex_greater(chunk_best, best)[:, None], chunk_best, best)

  best = _scan(index, canvas, is_masked, body, jnp.full((r, words), -1, jnp.int32), all_when_empty=True)
  shifts = (_BITS - 1 - jnp.arange(_BITS))[None, None, :]
  bits = ((jnp.maximum(best, 0)[:, :, None] >> shifts) & 1).reshape(r, -1)[:, :lc] > 0
  keep = jnp.zeros_like(commit).at[jnp.arange(r)[:, None], cand_pos].set(bits & cand_on)
  return keep & (best[:, :1] >= 0)


def _index(view, table) -> DocIDIndex:
  return view.extras.get("docid_index", table.index)


@functools.lru_cache(maxsize=None)
def docid_allowed(table) -> ScoreTransform:
  """Logits of tokens that no DocID consistent with the canvas has at that position -> -inf.

  Reads the index from `view.extras["docid_index"]` (pass `extras={"docid_index":
  table.index}` to `generate`), else captures it. One transform object per table (cached),
  so a jitted sampler compiles once per table."""
  table.index  # built here, outside any trace

  def fn(view, key):
    allowed = allowed_tokens_mask(_index(view, table), view.canvas, view.is_masked, view.logits.shape[-1])
    return view.replace(logits=jnp.where(allowed, view.logits, -jnp.inf))
  return stateless(fn)


@functools.lru_cache(maxsize=None)
def docid_repair(table) -> ScoreTransform:
  """Keeps the step's commits only while they stay jointly consistent (best score first)."""
  table.index

  def fn(view, key):
    commit = repair_commits(_index(view, table), view.canvas, view.is_masked, view.candidates,
                            view.commit & view.is_masked, view.score)
    return view.replace(commit=commit)
  return stateless(fn)
