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


# ----------------------------------------------------------------------------- QA sets
# Every reader returns [{id, question, answers: [str], passages: [{id, title, text}]}];
# `passages` are the contexts a data set ships with its questions (empty for open sets).

# name -> split -> candidate files (the first that exists is read: the full public release
# where present, else the small copy shipped in ../shared/data). A set's default split is
# the first one listed whose file exists.
QA_SETS = {
    "squad": {"dev": ["squad/squad2_dev_small.json"]},  # SQuAD 2.0 dev, two articles (the small copy)
    "squad_v1": {"dev": ["squad/dev-v1.1.json"],
                 "train": ["squad/train-v1.1.json", "squad/train-v1.1-first44.json"]},
    "squad_v2": {"dev": ["squad/dev-v2.0.json"], "train": ["squad/train-v2.0.json"]},
    "musique": {"dev": ["musique/musique_ans_v1.0_dev.jsonl"],
                "train": ["musique/musique_ans_v1.0_train.jsonl", "musique/musique_100.json"]},
    "nq_open": {"dev": ["nq_open/NQ-open.dev.jsonl"], "train": ["nq_open/NQ-open.train.jsonl"]},
    "hotpotqa": {"dev": ["hotpotqa/hotpot_dev_distractor_v1.json"], "train": ["hotpotqa/hotpot_train_v1.1.json"]},
    "2wikimultihopqa": {"dev": ["2wikimultihopqa/dev.json"], "train": ["2wikimultihopqa/train.json"]},
    "triviaqa": {"dev": ["triviaqa/unfiltered-web-dev.json"], "train": ["triviaqa/unfiltered-web-train.json"]},
    "popqa": {"test": ["popqa/popQA.tsv"]},
}


def _json_or_jsonl(path: Path, what: str) -> list[dict]:
  path = require_file(path, what)
  text = path.read_text()
  if text.lstrip().startswith("["):
    return json.loads(text)
  if path.suffix == ".jsonl" or "\n{" in text.strip():
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  return json.loads(text)


def read_qa_squad(path) -> list[dict]:
  """SQuAD v1.1 / v2.0: one record per question; its paragraph is the shipped passage and its
  article the `group` (questions of one article share contexts: split by group, not by id)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  digest = lambda s: hashlib.sha1(s.encode()).hexdigest()[:10]
  return [{"id": r["id"], "question": r["question"], "answers": list(dict.fromkeys(r["answers"])),
           "group": r["title"],
           "passages": [{"id": f"squad-{digest(r['context'])}", "title": r["title"], "text": r["context"]}]}
          for r in read_squad(path)]


def read_qa_musique(path) -> list[dict]:
  """MuSiQue-Ans (json list or jsonl): answer + answer_aliases; its 20 paragraphs per question."""
  out = []
  for r in _json_or_jsonl(Path(path), "MuSiQue"):
    answers = [a for a in [r.get("answer")] + list(r.get("answer_aliases", [])) if a]
    out.append({"id": r["id"], "question": r["question"], "answers": list(dict.fromkeys(answers)),
                "passages": [{"id": f"{r['id']}-{p['idx']}", "title": p.get("title", ""), "text": p["paragraph_text"]}
                             for p in r.get("paragraphs", [])]})
  return out


def read_qa_hotpot(path) -> list[dict]:
  """HotpotQA / 2WikiMultihopQA: {_id, question, answer, context: [[title, [sentences]]]}."""
  out = []
  for r in _json_or_jsonl(Path(path), "HotpotQA/2Wiki"):
    rid = r.get("_id", r.get("id"))
    out.append({"id": rid, "question": r["question"], "answers": [r["answer"]] if r.get("answer") else [],
                "passages": [{"id": f"{rid}-{i}", "title": t, "text": "".join(s)}
                             for i, (t, s) in enumerate(r.get("context", []))]})
  return out


def read_qa_nq_open(path) -> list[dict]:
  """NQ-open jsonl {question, answer: [str]} (no passages; ids are line numbers)."""
  return [{"id": r.get("id", f"nq-{i}"), "question": r["question"], "answers": list(r.get("answer", [])),
           "passages": []} for i, r in enumerate(read_jsonl(path, "NQ-open"))]


def read_qa_triviaqa(path) -> list[dict]:
  """TriviaQA (rc/unfiltered json {Data: [{QuestionId, Question, Answer: {Value, Aliases}}]})."""
  raw = json.loads(require_file(path, "TriviaQA").read_text())
  out = []
  for r in raw["Data"] if isinstance(raw, dict) else raw:
    ans = r.get("Answer", {})
    answers = [a for a in [ans.get("Value")] + list(ans.get("Aliases", [])) if a]
    out.append({"id": r["QuestionId"], "question": r["Question"], "answers": list(dict.fromkeys(answers)),
                "passages": []})
  return out


def read_qa_popqa(path) -> list[dict]:
  """PopQA tsv (columns id, question, possible_answers as a JSON list)."""
  import csv  # pylint: disable=import-outside-toplevel
  with open(require_file(path, "PopQA"), newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  return [{"id": str(r.get("id", i)), "question": r["question"], "answers": json.loads(r["possible_answers"]),
           "passages": []} for i, r in enumerate(rows)]


QA_READERS = {"squad": read_qa_squad, "squad_v1": read_qa_squad, "squad_v2": read_qa_squad,
              "musique": read_qa_musique, "nq_open": read_qa_nq_open, "hotpotqa": read_qa_hotpot,
              "2wikimultihopqa": read_qa_hotpot, "triviaqa": read_qa_triviaqa, "popqa": read_qa_popqa}


def parse_qa_name(name: str) -> tuple[str, str | None]:
  """"squad_v1:train" -> ("squad_v1", "train"); "musique" -> ("musique", None); unknown names raise."""
  dataset, _, split = str(name).partition(":")
  if dataset not in QA_SETS:
    raise ValueError(f"unknown QA data set {dataset!r}; the sets that exist are {sorted(QA_SETS)} "
                     "(name or name:split, e.g. squad_v1:train)")
  if split and split not in QA_SETS[dataset]:
    raise ValueError(f"QA data set {dataset!r} has no split {split!r}; its splits are {sorted(QA_SETS[dataset])}")
  return dataset, split or None


def qa_file(root, name: str) -> tuple[Path, str]:
  """(file, split) of a QA set `name[:split]`: the first candidate file that exists."""
  dataset, split = parse_qa_name(name)
  splits = [split] if split else list(QA_SETS[dataset])
  for sp in splits:
    for rel in QA_SETS[dataset][sp]:
      if (Path(root) / rel).exists():
        return Path(root) / rel, sp
  wanted = [str(Path(root) / rel) for sp in splits for rel in QA_SETS[dataset][sp]]
  raise FileNotFoundError(f"QA data set {name!r}: none of {wanted} exists; place the public release there or "
                          "point --data-dir at the folder that holds it")


def read_qa(root, name: str) -> list[dict]:
  """The records of a QA set `name[:split]` in its released format (files: QA_SETS).

  Record: {id, question, answers, group, passages: [{id, title, text}]}; `group` is what
  questions sharing a context have in common (the SQuAD article; else the question id).
  """
  dataset, _ = parse_qa_name(name)
  path, _ = qa_file(root, name)
  records = QA_READERS[dataset](path)
  for r in records:
    r.setdefault("group", r["id"])
  return records


# --------------------------------------------------------------------- retrieval sets


def read_ir(folder, layout: str = "beir") -> tuple[list[dict], dict[str, str], dict[str, dict[str, dict[str, int]]]]:
  """(corpus [{id, title, text}], queries {qid: text}, qrels {split: {qid: {docid: rel}}}).

  layout "beir": corpus.jsonl, queries.jsonl, qrels/<split>.tsv (BEIR, e.g. SciFact);
  layout "tsv": collection.tsv or corpus.tsv (docid, [title,] text), queries.<split>.tsv
  (qid, text), qrels.<split>.tsv (TREC `qid 0 docid rel` or BEIR columns) — MS MARCO and
  NQ320K exports.
  """
  from diffrag.retrieval.trec import read_qrels  # pylint: disable=import-outside-toplevel
  folder = Path(folder)
  if layout == "beir":
    corpus = read_beir_corpus(folder)
    queries = {str(r["_id"]): r["text"] for r in read_jsonl(folder / "queries.jsonl", "BEIR queries")}
    files = sorted((folder / "qrels").glob("*.tsv"))
    qrels = {f.stem: read_qrels(f) for f in files}
  elif layout == "tsv":
    name = "collection.tsv" if (folder / "collection.tsv").exists() else "corpus.tsv"
    corpus = []
    for line in require_file(folder / name, "TSV corpus").read_text().splitlines():
      parts = line.split("\t")
      corpus.append({"id": parts[0], "title": parts[1] if len(parts) > 2 else "", "text": parts[-1]})
    queries = {}
    for f in sorted(folder.glob("queries.*.tsv")):
      for line in f.read_text().splitlines():
        qid, text = line.split("\t", 1)
        queries[qid] = text
    qrels = {f.name[len("qrels."):-len(".tsv")]: read_qrels(f) for f in sorted(folder.glob("qrels.*.tsv"))}
  else:
    raise ValueError(f"retrieval data layout={layout!r}; expected beir or tsv")
  if not qrels:
    raise FileNotFoundError(f"no qrels files in {folder} (expected qrels/<split>.tsv or qrels.<split>.tsv)")
  return corpus, queries, qrels
