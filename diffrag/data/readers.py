"""Readers for the public releases' own file formats (no downloads: local paths only).

The data directory is `--data-dir`, else `$DIFFRAG_DATA_DIR`, else `../shared/data`
(relative to the working directory). Readers accept the full public releases as well as
the small copies shipped beside the project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_DATA_DIR = "../shared/data"


def data_dir(override: str | os.PathLike | None = None) -> Path:
  """The data directory: explicit override, else $DIFFRAG_DATA_DIR, else ../shared/data."""
  path = Path(override or os.environ.get("DIFFRAG_DATA_DIR") or DEFAULT_DATA_DIR)
  if not path.is_dir():
    raise FileNotFoundError(f"data directory {path} does not exist; pass --data-dir or set DIFFRAG_DATA_DIR "
                            "to a folder holding the data sets (see ../shared/data/README.md for the layout)")
  return path


def require_file(path: str | os.PathLike, what: str) -> Path:
  """Returns `path` if it exists, else raises an error naming the file and the data set."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what}: expected the file {path}, which does not exist; place the public release "
                            "there or point --data-dir at the folder that holds it")
  return path


def read_squad(path: str | os.PathLike) -> list[dict]:
  """Official SQuAD v1.1/v2.0 JSON -> one record per question.

  Record: {id, title, context, question, answers: [str], is_impossible}.
  """
  raw = json.loads(require_file(path, "SQuAD").read_text())
  records = []
  for article in raw["data"]:
    for para in article["paragraphs"]:
      for qa in para["qas"]:
        records.append({
            "id": qa["id"], "title": article.get("title", ""), "context": para["context"],
            "question": qa["question"], "answers": [a["text"] for a in qa.get("answers", [])],
            "is_impossible": bool(qa.get("is_impossible", False)),
        })
  return records


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict]:
  with open(require_file(path, what)) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_beir_corpus(folder: str | os.PathLike) -> list[dict]:
  """BEIR `corpus.jsonl` ({_id, title, text}) -> [{id, title, text}]."""
  rows = read_jsonl(Path(folder) / "corpus.jsonl", "BEIR corpus")
  return [{"id": str(r["_id"]), "title": r.get("title", "") or "", "text": r.get("text", "") or ""} for r in rows]


def read_musique_corpus(path: str | os.PathLike) -> list[dict]:
  """MuSiQue paragraph pool `[{title, text}]` -> [{id, title, text}] (id = position)."""
  rows = json.loads(require_file(path, "MuSiQue corpus").read_text())
  return [{"id": f"musique-{i}", "title": r.get("title", ""), "text": r["text"]} for i, r in enumerate(rows)]


PASSAGE_FILES = {
    "squad": "squad/squad2_dev_small.json",
    "musique": "musique/musique_100_corpus.json",
    "scifact": "scifact/corpus.jsonl",
}


def passage_file(root: str | os.PathLike, source: str) -> Path:
  """The file a passage source reads (checked to exist)."""
  if source not in PASSAGE_FILES:
    raise ValueError(f"unknown passage source {source!r}; expected one of {sorted(PASSAGE_FILES)}")
  return require_file(Path(root) / PASSAGE_FILES[source], f"passage source {source!r}")


def read_passages(root: str | os.PathLike, source: str) -> list[dict]:
  """Passages of one local data set as [{id, title, text}] (for corpus training).

  source: squad (unique contexts) | musique (paragraph pool) | scifact (BEIR corpus).
  """
  path = passage_file(root, source)
  if source == "squad":
    contexts = dict.fromkeys((r["title"], r["context"]) for r in read_squad(path))
    return [{"id": f"squad-{i}", "title": t, "text": c} for i, (t, c) in enumerate(contexts)]
  if source == "musique":
    return read_musique_corpus(path)
  return read_beir_corpus(path.parent)
