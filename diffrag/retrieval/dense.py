"""Dense retrieval: all-MiniLM-L6-v2 run through the project's own Flax BERT family.

Sentence embedding = mean of the last hidden states over real tokens, L2-normalised (the
sentence-transformers recipe for this model). Search is exact inner product in chunks
(`jnp` matmul + top-k), fine for corpora up to a few million passages on an accelerator;
for larger corpora, export `embeddings` to an approximate index (e.g. faiss IVF-PQ or
ScaNN) and keep this class's encode/cache. Corpus embeddings are cached on disk under
`cache_dir`, keyed by the corpus fingerprint, the encoder's name and max length, and the
version of the code that encodes (`ENCODER_CODE`: a change to it encodes again).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.experiment.provenance import code_version, fingerprint
from diffrag.retrieval.corpus import Corpus

# the code an embedding is computed by: part of the cache key (provenance.code_version)
ENCODER_CODE = ("diffrag.models", "diffrag.retrieval.dense")


def mean_pool(hidden, mask):
  """L2-normalised mean of hidden [B, L, D] over mask [B, L] (1 = real token): [B, D]."""
  mask = mask.astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# Tokens per forward pass when encoding: a batch of 64 x 256 tokens runs faster as 16 passes
# of 4 sequences, one after another, whose activations stay in the CPU's caches (MiniLM on 2
# cores: 40 -> 52 docs/s at 256 tokens; batches of 2-8 are within 5%; PyTorch BertModel is at
# 28-32 docs/s for every batch from 2 to 64; measured 2026-12-05). The encoder's batch_size
# still sets how many texts are tokenised, padded and sent to the device at once.
ENCODE_TOKENS_PER_PASS = 1024


def sub_batch(batch: int, length: int, tokens: int | None = None) -> int:
  """The largest divisor of `batch` with at most `tokens` (default `ENCODE_TOKENS_PER_PASS`)
  tokens of `length` each (at least 1)."""
  from diffrag.models.transformer import largest_divisor  # pylint: disable=import-outside-toplevel
  tokens = ENCODE_TOKENS_PER_PASS if tokens is None else tokens
  return largest_divisor(batch, tokens // max(length, 1))


class MiniLMEncoder:
  """Texts -> [N, 384] unit vectors with the real all-MiniLM-L6-v2 weights (or any BERT checkpoint)."""

  def __init__(self, checkpoint: str | Path | None = None, max_length: int = 256, batch_size: int = 64):
    from diffrag.models import from_pretrained, load_tokenizer, minilm_path  # pylint: disable=import-outside-toplevel
    path = Path(checkpoint) if checkpoint else minilm_path()
    self.model, self.params = from_pretrained(path, init_missing_head=True)
    self.tokenizer = load_tokenizer(path)
    self.max_length, self.batch_size = max_length, batch_size
    self.name = f"{path.name}-{max_length}"
    self._embed = jax.jit(functools.partial(self._forward, self.model))

  @staticmethod
  def _forward(model, params, ids, mask):
    """ids, mask: [B, L] -> [B, D], the model run on sub-batches of `sub_batch(B, L)` sequences."""
    (b, length), sub = ids.shape, sub_batch(*ids.shape)

    def embed(rows):
      _, hidden = model.apply({"params": params}, rows[0], attention_mask=rows[1], return_hidden=True)
      return mean_pool(hidden.astype(jnp.float32), rows[1])

    out = jax.lax.map(embed, (ids.reshape(b // sub, sub, length), mask.reshape(b // sub, sub, length)))
    return out.reshape(b, out.shape[-1])

  def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
    """[N, D] float32 unit vectors. Texts longer than max_length tokens are cut (as sentence-transformers)."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    out = []
    order = np.argsort([len(t) for t in texts])  # similar lengths together: fewer padded tokens
    batches = range(0, len(texts), self.batch_size)
    for start in tqdm(batches, desc="encode", disable=not progress):
      chunk = [texts[i] for i in order[start:start + self.batch_size]]
      enc = self.tokenizer(chunk, padding="longest", truncation=True, max_length=self.max_length,
                           return_tensors="np")
      length = enc["input_ids"].shape[1]
      bucket = min(self.max_length, -(-length // 32) * 32)  # multiples of 32: few shapes, little padding
      ids = np.full((len(chunk), bucket), self.tokenizer.pad_token_id, np.int32)
      mask = np.zeros((len(chunk), bucket), np.int32)
      ids[:, :length], mask[:, :length] = enc["input_ids"], enc["attention_mask"]
      rows = np.zeros((self.batch_size, bucket), np.int32)
      rows[:len(chunk)] = ids
      rmask = np.zeros_like(rows)
      rmask[:len(chunk)] = mask
      out.append(np.asarray(self._embed(self.params, rows, rmask))[:len(chunk)])
    emb = np.concatenate(out) if out else np.zeros((0, 384), np.float32)
    result = np.empty_like(emb)
    result[order] = emb
    return result


@functools.lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
  """The all-MiniLM-L6-v2 encoder, loaded once per process (retrieval, drift traces, RQ DocIDs)."""
  return MiniLMEncoder()


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int, chunk: int = 65536):
  """Top-k inner products: (indices [Q, k], scores [Q, k]), exact, over doc chunks."""
  k = min(k, docs.shape[0])
  best_s, best_i = None, None
  q = jnp.asarray(queries)
  for start in range(0, docs.shape[0], chunk):
    s = q @ jnp.asarray(docs[start:start + chunk]).T
    top_s, top_i = jax.lax.top_k(s, min(k, s.shape[1]))
    top_i = top_i + start
    if best_s is None:
      best_s, best_i = top_s, top_i
    else:
      cat_s, cat_i = jnp.concatenate([best_s, top_s], 1), jnp.concatenate([best_i, top_i], 1)
      best_s, pos = jax.lax.top_k(cat_s, k)
      best_i = jnp.take_along_axis(cat_i, pos, 1)
  return np.asarray(best_i), np.asarray(best_s)


class DenseRetriever:
  """Exact dense retrieval over a Corpus with cached document embeddings."""

  def __init__(self, corpus: Corpus, encoder: MiniLMEncoder, cache_dir: str | Path | None = "outputs/cache",
               progress: bool = True):
    self.corpus, self.encoder = corpus, encoder
    docs = [corpus.document(i) for i in range(len(corpus))]
    code = fingerprint(code_version(ENCODER_CODE), 8)
    path = None if cache_dir is None else Path(cache_dir) / f"emb-{corpus.fingerprint()}-{encoder.name}-{code}.npy"
    if path is not None and path.exists():
      self.embeddings = np.load(path)
    else:
      self.embeddings = encoder.encode(docs, progress=progress)
      if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, self.embeddings)
        tmp.rename(path)

  def search(self, queries: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(indices [Q, k], cosine scores [Q, k]), best first."""
    if any(not q.strip() for q in queries):
      raise ValueError("empty query: every query needs text")
    return exact_search(self.encoder.encode(list(queries)), self.embeddings, k)
