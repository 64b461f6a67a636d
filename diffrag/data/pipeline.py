"""Grain input pipelines: tokenise, pack or pad to a fixed length, shuffle deterministically.

Every pipeline yields batches {"tokens": [B, L] int32, "maskable": [B, L] bool} for the
train step. Its iterator has `get_state()` / `set_state()`; the training loop stores that
state in each checkpoint, so a resumed run sees exactly the batches it would have seen.

Long sequences: `long="error"` (default) raises, naming the record and the lengths;
"truncate" keeps the first `seq_len` tokens; packing ("pack") never truncates: passages
are concatenated with EOS separators and cut into `seq_len` windows.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from diffrag.data.builders import decode


def _tokenize_fn(tokenizer) -> Callable[[str], list[int]]:
  return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _fit(ids: Sequence[int], seq_len: int, pad_id: int, long: str, what: str) -> np.ndarray:
  if len(ids) > seq_len:
    if long != "truncate":
      raise ValueError(f"{what} has {len(ids)} tokens, more than data.seq_len={seq_len}; raise seq_len, "
                       "or set data.long=truncate (or data.mode=pack for corpora) to allow it")
    ids = ids[:seq_len]
  out = np.full((seq_len,), pad_id, np.int32)
  out[:len(ids)] = ids
  return out


def check_shard(batch_size: int, shard: tuple[int, int]) -> int:
  """The per-process batch size of a global batch split over `shard = (index, count)` processes."""
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"process index {index} is outside [0, {count})")
  if batch_size % count:
    raise ValueError(f"data.per_host: the global batch train.batch_size={batch_size} is not divisible by the "
                     f"{count} processes (each reads batch_size / processes rows); make batch_size a multiple of "
                     f"{count}")
  return batch_size // count


def text_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int, eos_id: int,
                 mode: str = "pack", long: str = "error", field: str = "text",
                 shard: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """Pretraining batches from a text source: every position maskable (LLaDA pretraining).

  mode="pack": concatenate `text + EOS` and split into windows of seq_len;
  mode="pad": one record per row, padded with EOS (trained on, as LLaDA pads).
  shard=(i, n): this process reads only its share and yields its batch_size / n rows of
  each global batch. In pad mode those are exactly rows [i b, (i + 1) b) of the single-
  process global batch (b = batch_size / n), so the global batch is the same whatever the
  number of hosts; in pack mode each process packs the records i, i + n, ... of the
  shuffled order (disjoint records, the global batch is a different but equally valid one).
  """
  tokenize = _tokenize_fn(tokenizer)
  local = check_shard(batch_size, shard)
  index, count = shard
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  if mode == "pack":
    if count > 1:
      ds = ds[index::count]
    ds = ds.map(lambda r: {"tokens": np.asarray(tokenize(decode(r)[field]) + [eos_id], np.int32)})
    it = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
    it = it.map(lambda r: {"tokens": r["tokens"].astype(np.int32)})
  elif mode == "pad":
    def pad(r):
      r = decode(r)
      return {"tokens": _fit(tokenize(r[field]), seq_len, eos_id, long, f"record {r.get('id', '?')!r}")}
    if count > 1:  # local example j of batch k is global example k * batch_size + index * local + j
      ds = grain.MapDataset.range(len(ds)).map(lambda i: ds[(i // local) * batch_size + index * local + i % local])
    it = ds.map(pad).to_iter_dataset()
  else:
    raise ValueError(f"data.mode={mode!r}; expected 'pack' or 'pad'")
  it = it.map(lambda r: {"tokens": r["tokens"], "maskable": np.ones_like(r["tokens"], bool)})
  return it.batch(local, drop_remainder=True)


class PairBatches:
  """Conditional prompt -> response batches (LLaDA SFT, DiffuGR query -> DocID), bucketed by prompt length.

  pairs: [(prompt_ids, response_ids)] unpadded. Each prompt goes to the smallest bucket
  length >= its length (a bucket with fewer than `batch_size` prompts is merged into the
  next longer one), is left-padded with `pad_id` to it, and the response is EOS-padded to
  `response_len`. Batch b of epoch e holds examples of one bucket:
    tokens [B, Lb + G] int32, maskable [B, Lb + G] (the response only, trailing EOS
    included), attention_mask [B, Lb + G] (0 on the left padding).
  Within an epoch every bucket is shuffled and cut into batches (a partial last batch is
  dropped; the next epoch reshuffles), and the batch order is shuffled, all from
  `seed` and the epoch number: index -> batch is a pure function, so the Grain iterator's
  state (an index) resumes exactly. Prompts longer than the longest bucket raise, unless
  `long="truncate"` (keeps the last tokens; counted in `truncated`). With
  `shard=(i, n)` (one process of n), a process builds only its rows [i b, (i + 1) b) of
  each global batch (b = batch_size / n): the global batch is the same on any number of hosts.

  `allowed` restricts the output vocabulary the loss normalises over (batch key
  "allowed_tokens" [B, V] bool): "prompt" = the tokens of each row's prompt plus EOS (an
  extractive reader, which can only answer with words of its passages), or a [V] bool
  array shared by every row (e.g. the tokens DocIDs use). Pairs whose response leaves the
  allowed set cannot be learnt under it: they are dropped and counted (`not_allowed`).
  """

  def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, seed: int,
               buckets: Sequence[int], response_len: int, pad_id: int, eos_id: int, long: str = "error",
               allowed: str | np.ndarray | None = None, vocab_size: int | None = None,
               shard: tuple[int, int] = (0, 1)):
    self.shard, self.local = shard, check_shard(batch_size, shard)
    if allowed is not None and vocab_size is None:
      raise ValueError("PairBatches(allowed=...) needs vocab_size")
    if isinstance(allowed, str) and allowed != "prompt":
      raise ValueError(f"allowed={allowed!r}; expected 'prompt', a [V] bool array or None")
    self.allowed, self.vocab_size, self.not_allowed = allowed, vocab_size, 0
    if allowed is not None:
      kept = []
      for prompt, response in pairs:
        ok = set(prompt) | {eos_id} if isinstance(allowed, str) else None
        if all((t in ok) if ok is not None else bool(allowed[t]) for t in response):
          kept.append((prompt, response))
      self.not_allowed = len(pairs) - len(kept)
      pairs = kept
    if not pairs:
      raise ValueError("no training pairs: the training set is empty (check the data set and its split)")
    buckets = sorted(set(int(b) for b in buckets))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"prompt buckets must be positive lengths, got {buckets}")
    self.batch_size, self.seed, self.response_len = batch_size, seed, response_len
    self.pad_id, self.eos_id, self.truncated = pad_id, eos_id, 0
    self.prompts, self.responses = [], []
    for i, (prompt, response) in enumerate(pairs):
      prompt, response = list(prompt), list(response)
      if len(response) > response_len:
        raise ValueError(f"pair {i}: response has {len(response)} tokens, more than response_len={response_len}")
      if len(prompt) > buckets[-1]:
        if long != "truncate":
          raise ValueError(f"pair {i}: prompt has {len(prompt)} tokens, more than the longest bucket {buckets[-1]}; "
                           "raise the prompt budget or set long=truncate (keeps the last tokens)")
        prompt = prompt[-buckets[-1]:]
        self.truncated += 1
      self.prompts.append(prompt)
      self.responses.append(response)
    lengths = np.array([len(p) for p in self.prompts])
    which = np.searchsorted(np.array(buckets), lengths)
    members = {b: np.flatnonzero(which == k) for k, b in enumerate(buckets)}
    self.buckets: dict[int, np.ndarray] = {}
    carry = np.zeros(0, np.int64)
    for b in buckets:  # merge buckets too small for one batch into the next longer one
      idx = np.concatenate([carry, members[b]])
      if len(idx) >= batch_size or b == buckets[-1]:
        if len(idx):
          self.buckets[b] = idx
        carry = np.zeros(0, np.int64)
      else:
        carry = idx
    self.per_epoch = sum(len(v) // batch_size for v in self.buckets.values())
    if self.per_epoch == 0:
      raise ValueError(f"{len(pairs)} training pairs cannot fill one batch of {batch_size}: lower the batch size")
    self._epochs: dict[int, list] = {}

  def __len__(self) -> int:
    return self.per_epoch

  def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    if epoch not in self._epochs:
      rng = np.random.default_rng([self.seed, epoch])
      plan = []
      for b, idx in self.buckets.items():
        perm = rng.permutation(idx)
        plan += [(b, perm[j:j + self.batch_size]) for j in range(0, len(perm) - self.batch_size + 1, self.batch_size)]
      order = rng.permutation(len(plan))
      self._epochs = {epoch: [plan[j] for j in order]}  # keep one epoch's plan
    return self._epochs[epoch]

  def rows(self, index: int) -> tuple[int, np.ndarray]:
    """(bucket length, indices of the pairs in this process's rows of batch `index`)."""
    length, rows = self._plan(int(index) // self.per_epoch)[int(index) % self.per_epoch]
    return length, rows[self.shard[0] * self.local:(self.shard[0] + 1) * self.local]

  def batch(self, index: int) -> dict:
    """Global batch `index`, or this process's rows of it (shard=(i, n): rows [i b, (i + 1) b))."""
    length, rows = self.rows(index)
    g, n = self.response_len, len(rows)
    tokens = np.full((n, length + g), self.pad_id, np.int32)
    mask = np.zeros((n, length + g), np.int32)
    tokens[:, length:] = self.eos_id
    mask[:, length:] = 1
    for r, i in enumerate(rows):
      p, a = self.prompts[i], self.responses[i]
      tokens[r, length - len(p):length] = p
      mask[r, length - len(p):length] = 1
      tokens[r, length:length + len(a)] = a
    maskable = np.zeros((n, length + g), bool)
    maskable[:, length:] = True
    out = {"tokens": tokens, "maskable": maskable, "attention_mask": mask}
    if isinstance(self.allowed, str):
      allowed = np.zeros((n, self.vocab_size), bool)
      for r, i in enumerate(rows):
        allowed[r, self.prompts[i]] = True
      allowed[:, self.eos_id] = True
      out["allowed_tokens"] = allowed
    elif self.allowed is not None:
      out["allowed_tokens"] = np.broadcast_to(np.asarray(self.allowed, bool), (n, self.vocab_size)).copy()
    return out

  def dataset(self, epochs: int = 100000) -> grain.IterDataset:
    """The Grain dataset of batches (index -> `batch(index)`); iterate it, save/restore its iterator state."""
    return grain.MapDataset.range(self.per_epoch * epochs).map(self.batch).to_iter_dataset()


def prompt_buckets(max_len: int, step: int = 32) -> list[int]:
  """Bucket lengths step, 2 step, ... up to max_len (max_len always included)."""
  return sorted(set(list(range(step, max_len, step)) + [max_len]))
