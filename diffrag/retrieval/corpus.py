"""A retrieval corpus: parallel lists of ids, titles and texts, validated once."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Corpus:
  """ids, titles, texts: parallel tuples. Ids are unique; every document has text or a title."""

  ids: tuple[str, ...]
  titles: tuple[str, ...]
  texts: tuple[str, ...]

  def __post_init__(self):
    if not self.ids:
      raise ValueError("the corpus is empty: give at least one document")
    if not len(self.ids) == len(self.titles) == len(self.texts):
      raise ValueError("corpus ids, titles and texts must have the same length")
    dupes = [i for i, n in Counter(self.ids).items() if n > 1]
    if dupes:
      raise ValueError(f"the corpus has {len(dupes)} duplicate document ids (e.g. {dupes[:3]}); ids must be unique")
    empty = [i for i, t, x in zip(self.ids, self.titles, self.texts) if not (t or "").strip() and not (x or "").strip()]
    if empty:
      raise ValueError(f"{len(empty)} documents have neither title nor text (e.g. {empty[:3]}); drop or fill them")

  @classmethod
  def from_records(cls, records: Sequence[dict]) -> "Corpus":
    """From [{id, title, text}] (the readers' format)."""
    return cls(tuple(str(r["id"]) for r in records), tuple(r.get("title", "") or "" for r in records),
               tuple(r.get("text", "") or "" for r in records))

  def __len__(self) -> int:
    return len(self.ids)

  def document(self, i: int, with_title: bool = True) -> str:
    """Title and text joined (the string that is indexed and shown to the reader)."""
    title, text = self.titles[i], self.texts[i]
    return f"{title}\n{text}" if with_title and title else text

  def fingerprint(self) -> str:
    """sha256 over ids, titles and texts: a cache key that changes with any edit."""
    h = hashlib.sha256()
    for parts in zip(self.ids, self.titles, self.texts):
      for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cut_passages(texts: Sequence[str], k: int = 5, max_chars: int = 2000) -> list[str]:
  """The first k passages, each cut to at most max_chars characters (SPREAD: 5 x 2,000)."""
  if k < 1 or max_chars < 1:
    raise ValueError(f"passages need k >= 1 and max_chars >= 1, got k={k}, max_chars={max_chars}")
  return [t[:max_chars] for t in list(texts)[:k]]


def parents_of(corpus: Corpus, sep: str = "#") -> tuple[Corpus, np.ndarray]:
  """The passages a corpus of chunks was cut from: (parents, parent [N] int, chunk i -> parent index).

  A chunk id `<parent id><sep><k>` (k an integer, the chunk's place in its passage) belongs to
  `<parent id>`; any other id is its own parent. A parent's text is its chunks' texts joined by
  one space in the order of k (the passage, whitespace normalised), its title the first chunk's.
  """
  keys = []
  for i in corpus.ids:
    head, _, tail = i.rpartition(sep)
    keys.append((head, int(tail)) if head and tail.isdigit() else (i, 0))
  order: dict[str, list[tuple[int, int]]] = {}
  for n, (pid, k) in enumerate(keys):
    order.setdefault(pid, []).append((k, n))
  ids, titles, texts, parent = [], [], [], np.zeros(len(corpus), np.int64)
  for p, (pid, members) in enumerate(order.items()):
    members.sort()
    ids.append(pid)
    titles.append(corpus.titles[members[0][1]])
    texts.append(" ".join(corpus.texts[n] for _, n in members if corpus.texts[n]))
    parent[[n for _, n in members]] = p
  return Corpus(tuple(ids), tuple(titles), tuple(texts)), parent
