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


def text_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int, eos_id: int,
                 mode: str = "pack", long: str = "error", field: str = "text") -> grain.IterDataset:
  """Pretraining batches from a text source: every position maskable (LLaDA pretraining).

  mode="pack": concatenate `text + EOS` and split into windows of seq_len;
  mode="pad": one record per row, padded with EOS (trained on, as LLaDA pads).
  """
  tokenize = _tokenize_fn(tokenizer)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  if mode == "pack":
    ds = ds.map(lambda r: {"tokens": np.asarray(tokenize(decode(r)[field]) + [eos_id], np.int32)})
    it = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len})
    it = it.map(lambda r: {"tokens": r["tokens"].astype(np.int32)})
  elif mode == "pad":
    def pad(r):
      r = decode(r)
      return {"tokens": _fit(tokenize(r[field]), seq_len, eos_id, long, f"record {r.get('id', '?')!r}")}
    it = ds.map(pad).to_iter_dataset()
  else:
    raise ValueError(f"data.mode={mode!r}; expected 'pack' or 'pad'")
  it = it.map(lambda r: {"tokens": r["tokens"], "maskable": np.ones_like(r["tokens"], bool)})
  return it.batch(batch_size, drop_remainder=True)


def pair_example(prompt_ids: Sequence[int], response_ids: Sequence[int], *, prompt_len: int, response_len: int,
                 pad_id: int, eos_id: int, long: str = "error", what: str = "example") -> dict:
  """One conditional example (LLaDA SFT / DiffuGR query -> DocID).

  tokens = prompt (left-padded with pad_id to prompt_len) ++ response + EOS... (to response_len);
  maskable = the response span only (trailing EOS included: the model learns to stop).
  """
  if len(response_ids) > response_len:
    raise ValueError(f"{what}: response has {len(response_ids)} tokens, more than response_len={response_len}")
  if len(prompt_ids) > prompt_len:
    if long != "truncate":
      raise ValueError(f"{what}: prompt has {len(prompt_ids)} tokens, more than prompt_len={prompt_len}; "
                       "raise prompt_len or set long=truncate (keeps the last prompt_len tokens)")
    prompt_ids = prompt_ids[-prompt_len:]
  prompt = np.full((prompt_len,), pad_id, np.int32)
  if len(prompt_ids):
    prompt[prompt_len - len(prompt_ids):] = prompt_ids
  response = np.full((response_len,), eos_id, np.int32)
  response[:len(response_ids)] = response_ids
  maskable = np.concatenate([np.zeros(prompt_len, bool), np.ones(response_len, bool)])
  return {"tokens": np.concatenate([prompt, response]), "maskable": maskable}


def pair_dataset(examples: Sequence[dict], *, batch_size: int, seed: int) -> grain.IterDataset:
  """Shuffled, repeated batches of prebuilt `pair_example` dicts."""
  return grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat().to_iter_dataset().batch(
      batch_size, drop_remainder=True)
