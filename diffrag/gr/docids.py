"""Document identifiers as fixed-length token canvases, and their inverse.

Linguistic DocIDs: the title (or the first `max_tokens` tokens of the text when there is
no title), tokenised with the reader's tokenizer, cut to the canvas and EOS-padded.
Duplicates are made unique by a suffix rule: the k-th document (in corpus order) whose
DocID is already taken gets " [k]" appended, the title being cut further so that the
suffix fits; k counts up until the DocID is free.

Learnt DocIDs (residual quantisation, as TIGER's semantic IDs): document embeddings are
quantised by residual k-means, L levels of K codes:
    r_0 = e;  c_l = argmin_k ||r_{l-1} - mu_{l,k}||;  r_l = r_{l-1} - mu_{l,c_l}
and a last "collision" level numbers the documents that share the same L codes (0, 1, ...)
so that every code is unique. Each (level, code) is one new vocabulary token:
token(l, k) = base + l * K + k, the collision level using base + L * K + j.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class DocIDTable:
  """codes: [N, Lc] int token ids (every row unique); doc_ids: the N corpus ids, same order.

  Hashed by identity (a table is built once per run), so transforms and jitted decoders
  built from it can be cached per table; `index` is the constraint index (built once)."""

  codes: np.ndarray
  doc_ids: tuple[str, ...]
  kind: str
  stats: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if len(self.doc_ids) != self.codes.shape[0]:
      raise ValueError("DocIDTable: one code row per document")
    rows = {tuple(r) for r in self.codes.tolist()}
    if len(rows) != len(self.doc_ids):
      raise ValueError("DocIDTable: codes are not unique")

  @property
  def length(self) -> int:
    return self.codes.shape[1]

  @functools.cached_property
  def index(self):
    from diffrag.gr.constraints import DocIDIndex  # pylint: disable=import-outside-toplevel
    return DocIDIndex.build(self.codes)

  @functools.cached_property
  def _lookup(self) -> dict[tuple[int, ...], int]:
    return {tuple(r): i for i, r in enumerate(self.codes.tolist())}

  def vocab(self, vocab_size: int) -> np.ndarray:
    """[vocab_size] bool: the tokens some DocID uses (the output vocabulary of a retriever
    trained with `train.docid_vocab`)."""
    out = np.zeros(vocab_size, bool)
    out[np.unique(self.codes)] = True
    return out

  def decode(self, canvases) -> np.ndarray:
    """[M, Lc] generated canvases -> [M] document index, -1 where the canvas is no DocID."""
    table = self._lookup
    return np.asarray([table.get(tuple(r), -1) for r in np.asarray(canvases).tolist()], np.int64)


def linguistic_docids(titles: Sequence[str], texts: Sequence[str], doc_ids: Sequence[str], tokenizer, *,
                      max_tokens: int = 16, eos_id: int) -> DocIDTable:
  """Titles (or leading text tokens) as DocIDs, cut to max_tokens, EOS-padded, made unique."""
  if max_tokens < 2:
    raise ValueError(f"docid max_tokens must be >= 2, got {max_tokens}")
  enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
  taken: dict[tuple[int, ...], int] = {}
  codes = np.full((len(doc_ids), max_tokens), eos_id, np.int64)
  suffixed = 0
  for i, (title, text) in enumerate(zip(titles, texts)):
    source = (title or "").strip() or (text or "").strip()
    if not source:
      raise ValueError(f"document {doc_ids[i]!r} has neither title nor text: it cannot get a DocID")
    base = enc(source)[:max_tokens - 1]  # keep one EOS: the model learns where the DocID ends
    toks, k = list(base), 1
    while tuple(toks) in taken:
      k += 1
      suffix = enc(f" [{k}]")
      if suffix == enc(f" [{k - 1}]") if k > 2 else False:
        raise ValueError(f"document {doc_ids[i]!r} duplicates another DocID and the tokenizer encodes every suffix "
                         f"' [k]' alike ({suffix}): it cannot make DocIDs unique; use docids.kind=rq or a tokenizer "
                         "that has digits")
      toks = base[:max_tokens - 1 - len(suffix)] + suffix
    if k > 1:
      suffixed += 1
    taken[tuple(toks)] = i
    codes[i, :len(toks)] = toks
  return DocIDTable(codes, tuple(doc_ids), "linguistic",
                    {"documents": len(doc_ids), "suffixed_duplicates": suffixed, "canvas": max_tokens})


@jax.jit
def _assign(x, centroids):
  d = jnp.sum(x * x, 1)[:, None] - 2 * x @ centroids.T + jnp.sum(centroids * centroids, 1)[None, :]
  return jnp.argmin(d, axis=1)


def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means (k-means++ seeding): (centroids [k, D], assignment [N]). Empty clusters keep
  their previous centroid."""
  rng = np.random.default_rng(seed)
  n = x.shape[0]
  k = min(k, n)
  centroids = [x[rng.integers(n)]]
  d2 = np.sum((x - centroids[0]) ** 2, 1)
  for _ in range(1, k):
    probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
    c = x[rng.choice(n, p=probs)]
    centroids.append(c)
    d2 = np.minimum(d2, np.sum((x - c) ** 2, 1))
  cen = jnp.asarray(np.stack(centroids), jnp.float32)
  xj = jnp.asarray(x, jnp.float32)
  for _ in range(iters):
    a = _assign(xj, cen)
    one = jax.nn.one_hot(a, k, dtype=jnp.float32)
    counts = one.sum(0)
    new = (one.T @ xj) / jnp.maximum(counts, 1.0)[:, None]
    cen = jnp.where(counts[:, None] > 0, new, cen)
  return np.asarray(cen), np.asarray(_assign(xj, cen))


def rq_docids(embeddings: np.ndarray, doc_ids: Sequence[str], *, levels: int = 3, codes: int = 256,
              base_token: int, iters: int = 25, seed: int = 0) -> DocIDTable:
  """Residual k-means codes + a collision level; tokens base_token + l * codes + c."""
  if levels < 1 or codes < 2:
    raise ValueError(f"rq docids need levels >= 1 and codes >= 2, got {levels}, {codes}")
  residual = np.asarray(embeddings, np.float32)
  assign = np.zeros((residual.shape[0], levels), np.int64)
  usage = []
  for level in range(levels):
    centroids, a = kmeans(residual, codes, iters=iters, seed=seed + level)
    assign[:, level] = a
    residual = residual - centroids[a]
    usage.append(len(np.unique(a)) / codes)
  groups = defaultdict(list)
  for i, row in enumerate(map(tuple, assign.tolist())):
    groups[row].append(i)
  collision = np.zeros(len(doc_ids), np.int64)
  for members in groups.values():
    collision[members] = np.arange(len(members))
  tokens = base_token + np.arange(levels)[None, :] * codes + assign
  tokens = np.concatenate([tokens, base_token + levels * codes + collision[:, None]], axis=1)
  shared = sum(len(m) for m in groups.values() if len(m) > 1)
  stats = {"documents": len(doc_ids), "levels": levels, "codes": codes,
           "codebook_usage": [round(u, 4) for u in usage], "collision_rate": round(shared / len(doc_ids), 4),
           "max_collision_index": int(collision.max()), "new_tokens": levels * codes + int(collision.max()) + 1}
  return DocIDTable(tokens, tuple(doc_ids), "rq", stats)


def extend_vocab(cfg, params: dict, n_new: int, seed: int = 0, rows: np.ndarray | None = None):
  """Adds n_new tokens at the end of the vocabulary: (new config, new params).

  New embedding rows (and untied output rows) are the mean of the pretrained rows plus
  small noise (std 0.01 of the rows' std), so they start as 'an average token' that
  training can tell apart; MLM output biases start at the mean bias. rows: [n_new, D]
  optional starting rows instead of the mean (NaN rows keep the mean), e.g. `code_rows`.
  """
  if n_new <= 0:
    return cfg, params
  rng = np.random.default_rng(seed)

  def grow(table, axis):
    table = np.asarray(table)
    mean = table.mean(axis=axis, keepdims=True)
    shape = list(table.shape)
    shape[axis] = n_new
    noise = rng.normal(0, 0.01 * float(table.std()), shape).astype(table.dtype)
    start = np.broadcast_to(mean, shape)
    if rows is not None and table.ndim == 2:
      given = rows if axis == 0 else rows.T
      start = np.where(np.isnan(given), start, given).astype(table.dtype)
    return jnp.asarray(np.concatenate([table, start + noise], axis=axis))

  params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of the nesting
  params = dict(params)
  params["embed"] = dict(params["embed"], embedding=grow(params["embed"]["embedding"], 0))
  if "lm_head" in params:
    params["lm_head"] = dict(params["lm_head"], kernel=grow(params["lm_head"]["kernel"], 1))
  if "mlm_bias" in params:
    params["mlm_bias"] = grow(params["mlm_bias"], 0)
  return cfg.replace(vocab_size=cfg.vocab_size + n_new), params


def code_rows(table: DocIDTable, doc_tokens: Sequence[Sequence[int]], embedding: np.ndarray, n_new: int,
              base_token: int) -> np.ndarray:
  """Starting embedding rows of learnt DocID tokens from the documents that carry them: [n_new, D].

  Row of code token c = the mean over the documents d with c in their DocID of e(d), the mean
  pretrained embedding of d's tokens (doc_tokens[d], e.g. its title and first words), rescaled
  to the mean norm of the pretrained rows. A code then starts near the words of its cluster, so
  the first steps already separate codes by topic instead of starting from one 'average token'.
  Tokens no document carries get NaN (`extend_vocab` keeps the mean there).
  """
  embedding = np.asarray(embedding, np.float32)
  doc_emb = np.stack([embedding[np.asarray(t, np.int64)].mean(0) if len(t) else embedding.mean(0)
                      for t in doc_tokens])                                         # [N, D]
  sums = np.zeros((n_new, embedding.shape[1]), np.float64)
  counts = np.zeros(n_new, np.int64)
  for pos in range(table.codes.shape[1]):
    code = table.codes[:, pos] - base_token
    ok = (code >= 0) & (code < n_new)
    np.add.at(sums, code[ok], doc_emb[ok])
    np.add.at(counts, code[ok], 1)
  out = np.full((n_new, embedding.shape[1]), np.nan, np.float32)
  seen = counts > 0
  out[seen] = sums[seen] / counts[seen, None]
  # centre on the pretrained mean and restore a typical row's norm: codes differ by topic
  centred = out[seen] - embedding.mean(0)
  norm = np.linalg.norm(embedding - embedding.mean(0), axis=1).mean()
  out[seen] = embedding.mean(0) + centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-6) * norm
  return out
