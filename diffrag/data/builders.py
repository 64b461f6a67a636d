"""TFDS builders over local files, prepared as array_record and read without TensorFlow.

Nothing is downloaded: the builders read the public releases from the data directory
(TFDS `manual_dir`) and write array_record shards to a cache folder; `tfds` data
sources over those shards feed Grain pipelines (`diffrag.data.pipeline`).

    source = passage_source(data_dir(), ("squad", "musique"), cache_dir="outputs/cache/tfds")
    len(source), source[0]  # {"id": b"...", "title": b"...", "text": b"..."}
"""

from __future__ import annotations

import hashlib
import os
import numpy as np
from pathlib import Path

import tensorflow_datasets as tfds

from diffrag.data import readers

DEFAULT_CACHE = "outputs/cache/tfds"


class PassageCorpus(tfds.core.GeneratorBasedBuilder):
  """Passages of local data sets (SQuAD contexts, MuSiQue paragraphs, BEIR corpora)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point the data directory at a folder with squad/, musique/, scifact/ as in ../shared/data."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "title": tfds.features.Text(), "text": tfds.features.Text(),
        "source": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: Path):
    seen = set()
    for source in self.builder_config.name.split("-"):
      for p in readers.read_passages(root, source):
        if p["id"] in seen:
          raise ValueError(f"duplicate passage id {p['id']!r} in {source}; ids must be unique")
        seen.add(p["id"])
        yield p["id"], {"id": p["id"], "title": p["title"], "text": p["text"], "source": source}


def _fingerprint(root: Path, sources: tuple[str, ...]) -> str:
  """Changes when the source files or the builders' code change, so a stale prepared copy is never read."""
  from diffrag.experiment.provenance import code_version  # pylint: disable=import-outside-toplevel
  h = hashlib.sha1(str(root.resolve()).encode())
  h.update(code_version(("diffrag.data.builders",))["source"].encode())
  for sub in sources:
    files = [root / sub] if (root / sub).is_file() else sorted((root / sub).rglob("*"))
    for f in files:
      if f.is_file():
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}".encode())
  return h.hexdigest()[:12]


def prepare(builder_cls, root: str | os.PathLike, config_name: str, sources: tuple[str, ...],
            cache_dir: str | os.PathLike = DEFAULT_CACHE):
  """Prepares (once) and returns the builder, keyed by the source files' fingerprint."""
  root = Path(root)
  cache = Path(cache_dir) / _fingerprint(root, sources)
  builder = builder_cls(config=tfds.core.BuilderConfig(name=config_name), data_dir=str(cache),
                        file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder


def passage_source(root: str | os.PathLike, sources: tuple[str, ...], cache_dir: str | os.PathLike = DEFAULT_CACHE,
                   split: str = "train"):
  """Random-access data source of passages from `sources` (squad, musique, scifact)."""
  if not sources:
    raise ValueError(f"data.sources is empty; name at least one of {sorted(readers.PASSAGE_FILES)}")
  for source in sources:
    readers.passage_file(root, source)
  builder = prepare(PassageCorpus, root, "-".join(sources), tuple(sources), cache_dir)
  return builder.as_data_source(split=split)


def decode(record: dict) -> dict:
  """bytes -> str for the text features of a TFDS record."""
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}



class QADataset(tfds.core.GeneratorBasedBuilder):
  """Questions, gold answers and shipped passages of a QA set (config name = "<set>.<split>")."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "group feature (SQuAD article) for leak-free splits; named splits"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point the data directory at a folder laid out as readers.QA_SETS."

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": text, "question": text, "answers": tfds.features.Sequence(text), "group": text,
        "passages": tfds.features.Sequence({"id": text, "title": text, "text": text})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: Path):
    seen = set()
    name = self.builder_config.name.replace(".", ":")
    for r in readers.read_qa(root, name):
      if r["id"] in seen:
        raise ValueError(f"duplicate question id {r['id']!r} in {name}")
      seen.add(r["id"])
      yield r["id"], r


def qa_records(root: str | os.PathLike, name: str, cache_dir: str | os.PathLike = DEFAULT_CACHE) -> tuple[list[dict], dict]:
  """(records, info) of a QA set `name[:split]` through its TFDS builder (prepared once per file version).

  info: {name, split, file}: the resolved split and the file read.
  """
  path, split = readers.qa_file(root, name)
  dataset, _ = readers.parse_qa_name(name)
  builder = prepare(QADataset, root, f"{dataset}.{split}", (str(path.relative_to(Path(root))),), cache_dir)
  source = builder.as_data_source(split="train")
  out = []
  for i in range(len(source)):
    r = source[i]
    ps = r["passages"]
    out.append({"id": _s(r["id"]), "question": _s(r["question"]), "answers": [_s(a) for a in r["answers"]],
                "group": _s(r["group"]),
                "passages": [{"id": _s(a), "title": _s(b), "text": _s(c)}
                             for a, b, c in zip(ps["id"], ps["title"], ps["text"])]})
  return out, {"name": f"{dataset}:{split}", "split": split, "file": str(path)}


def _s(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class IRDataset(tfds.core.GeneratorBasedBuilder):
  """A retrieval set: splits `corpus` (id, title, text), `queries` (id, text) and
  `qrels_<split>` (query_id, id, relevance). Config name "<folder>-<layout>"."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Point the data directory at a folder holding <dataset>/ in BEIR or TSV layout."

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": text, "title": text, "text": text, "query_id": text, "relevance": tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    name, layout = self.builder_config.name.rsplit("-", 1)
    corpus, queries, qrels = readers.read_ir(Path(dl_manager.manual_dir) / name, layout)
    splits = {"corpus": self._generate_examples(self._corpus(corpus)),
              "queries": self._generate_examples(self._queries(queries))}
    for split, table in qrels.items():
      splits[f"qrels_{split}"] = self._generate_examples(self._qrels(table))
    return splits

  def _generate_examples(self, rows):
    yield from rows

  def _corpus(self, corpus):
    seen = set()
    for r in corpus:
      if r["id"] in seen:
        raise ValueError(f"duplicate document id {r['id']!r} in the corpus; ids must be unique")
      seen.add(r["id"])
      yield r["id"], {"id": r["id"], "title": r["title"], "text": r["text"], "query_id": "", "relevance": 0}

  def _queries(self, queries):
    for qid, text in queries.items():
      yield qid, {"id": qid, "title": "", "text": text, "query_id": qid, "relevance": 0}

  def _qrels(self, table):
    for qid, docs in table.items():
      for docid, rel in docs.items():
        yield f"{qid}\t{docid}", {"id": docid, "title": "", "text": "", "query_id": qid, "relevance": rel}


def ir_records(root: str | os.PathLike, dataset: str, layout: str = "beir", cache_dir: str | os.PathLike = DEFAULT_CACHE):
  """(corpus [{id, title, text}], queries {qid: text}, qrels {split: {qid: {docid: rel}}}) through IRDataset."""
  root = Path(root)
  if not (root / dataset).is_dir():
    raise FileNotFoundError(f"retrieval data set folder {root / dataset} does not exist; point --data-dir at its parent")
  builder = prepare(IRDataset, root, f"{dataset}-{layout}", (dataset,), cache_dir)
  splits = list(builder.info.splits.keys())
  corpus, queries, qrels = [], {}, {}
  src = builder.as_data_source(split="corpus")
  corpus = [{k: _s(src[i][k]) for k in ("id", "title", "text")} for i in range(len(src))]
  src = builder.as_data_source(split="queries")
  for i in range(len(src)):
    queries[_s(src[i]["id"])] = _s(src[i]["text"])
  for split in splits:
    if split.startswith("qrels_"):
      src = builder.as_data_source(split=split)
      table: dict[str, dict[str, int]] = {}
      for i in range(len(src)):
        r = src[i]
        table.setdefault(_s(r["query_id"]), {})[_s(r["id"])] = int(r["relevance"])
      qrels[split[len("qrels_"):]] = table
  return corpus, queries, qrels
