"""`diffrag gr`: DocIDs -> fine-tune the retriever -> decode in every mode -> TREC runs, metrics, plots.

Data (local files, read through the IRDataset TFDS builder): a BEIR folder (`corpus.jsonl`,
`queries.jsonl`, `qrels/<split>.tsv`, e.g. ../shared/data/scifact) or the TSV layout used by
MS MARCO and NQ320K exports (`collection.tsv` / `corpus.tsv`: docid, [title,] text;
`queries.<split>.tsv`: qid, text; `qrels.<split>.tsv`: TREC or BEIR qrels). A folder with
no training qrels is a zero-shot corpus: the retriever learns the documents only
(indexing pairs and document-derived pseudo-queries). Queries whose relevant documents are
all outside the corpus are dropped from evaluation and counted; so are run entries with
unknown ids.

Training pairs (all mapped to the document's DocID; the query or text is the clean prompt,
the DocID canvas is masked):
  * query pairs: the training split's qrels, repeated `train.query_repeat` times;
  * indexing: the document body (without its title unless `train.index_with_title`: with
    title DocIDs the title would make indexing a copy task);
  * pseudo-queries: up to `train.pseudo_queries` sentences of the body (DSI-QG / NCI style,
    generated from the document itself, never from evaluation queries).

The diffusion retriever and its autoregressive twin (same backbone with a causal mask and
next-token CE) are artefacts keyed by everything that made them, trained with the same
pairs, steps, batch, optimizer and schedule by default. Outputs under out_dir: run.trec
(the default mode) and run_<mode>.trec for every mode, metrics.json (per-method metrics,
paired comparisons, counts), gr.md / gr.csv, manifest.json, plots, docids.json. Run files an
earlier run left there for modes this run does not decode are moved to out_dir/superseded/.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np

from diffrag.diffusion import schedule as schedules
from diffrag.experiment import stats
from diffrag.experiment.provenance import array_digest, fingerprint, write_manifest
from diffrag.experiment.store import ArtefactStore
from diffrag.experiment.timing import Stopwatch
from diffrag.gr import decode as D
from diffrag.gr.docids import DocIDTable, code_rows, extend_vocab, linguistic_docids, rq_docids
from diffrag.report import pyplot, save_figure, write_table
from diffrag.retrieval import trec

RECIPE = "gr-v2"  # bump when the retriever's training code changes what it learns


@dataclasses.dataclass(frozen=True)
class GRData:
  dataset: str = "scifact"
  data_dir: str | None = None
  layout: str = "beir"             # beir | tsv (MS MARCO / NQ320K exports)
  train_split: str | None = "train"  # absent from the folder (or null): zero-shot, documents only
  eval_split: str = "test"
  limit: int = 0                   # evaluate at most this many queries (0 = all)
  empty_docs: str = "error"        # error | drop (documents with neither title nor text; counted)


@dataclasses.dataclass(frozen=True)
class DocIDSpec:
  kind: str = "linguistic"         # linguistic (title or leading tokens) | rq (residual k-means codes)
  source: str = "title"            # linguistic: title (leading tokens where there is none) | leading
  max_tokens: int = 16             # linguistic canvas
  levels: int = 3                  # rq
  codes: int = 64
  code_init: str = "mean"          # rq: new code tokens start at the mean token (mean) or at the mean
                                   # embedding of the words of the documents carrying them (content)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class GRModel:
  checkpoint: str | None = None    # a Hugging Face LLaDA / Dream folder; None = the MiniLM warm start
  dtype: str = "float32"
  lora_rank: int = 0               # > 0: train LoRA adapters only (7B/8B backbones)


@dataclasses.dataclass(frozen=True)
class GRTrain:
  steps: int = 400
  batch_size: int = 32
  lr: float = 3.0e-4
  warmup_steps: int = 20
  query_tokens: int = 32           # prompt budget (queries, document bodies and pseudo-queries)
  indexing: bool = True            # document body -> DocID for every document
  index_with_title: bool = False   # put the title in the indexing input (a copy task for title DocIDs)
  pseudo_queries: int = 0          # sentences of each document used as pseudo-queries (0 = none)
  query_repeat: int = 2            # query -> DocID pairs are repeated this many times in the mix
  docid_vocab: bool = False        # softmax over the tokens DocIDs use only (the output layer's cost falls
                                   # with it); decoding is restricted to them too
  vocab_tile: int = 0              # > 0: cross-entropy in vocabulary tiles (no [tokens, V] logits; 7B vocabularies)
  remat: str = "none"              # rematerialisation policy of each layer (none | full | dots_saveable | ...)
  schedule: str = "linear"         # masking schedule of the diffusion objective: linear | cosine | polyK
                                   # (poly0.5: p_mask = t^0.5, more training near the fully masked canvas
                                   # that one-pass scoring and the first decoding steps see)
  weighting: str = "elbo"          # loss weight: elbo (1/t, the masked-NLL bound) | flat (every masked token once)
  ar_steps: int | None = None      # autoregressive twin: None = the same steps as diffusion, 0 = skip
  seed: int = 0
  store: str = "outputs/artefacts"


@dataclasses.dataclass(frozen=True)
class GRDecode:
  steps: list = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16])  # T values (capped at the canvas)
  constrained: bool = True
  unconstrained: bool = True       # also decode without the constraint (reports the invalid share)
  pseudo_beam: int = 10            # samples per query (0 = off)
  pseudo_beam_temperature: float = 1.0
  pseudo_beam_steps: int = 4       # T of each sampled decoding
  beam: int = 10                   # beam over denoising states (0 = off)
  one_pass: int = 100              # top-k of one-pass scoring (0 = off)
  elbo_rerank: int = 0             # re-rank this many one-pass candidates by the MC ELBO (0 = off)
  one_pass_priors: list = dataclasses.field(default_factory=list)  # lambdas > 0: one-pass rows calibrated against
                                   # the DocID prior, s(d | q) - lambda s(d | empty query) (`decode.docid_prior`)
  batch_size: int = 32
  compare_to: str = "bm25"         # every row's paired difference is against this row
  default: str = "auto"            # the mode written to run.trec: beam | one_pass | one_pass_prior<lambda> |
                                   # pseudo_beam | T<steps>, or
                                   # auto (the first of those the config runs); chosen before evaluation


@dataclasses.dataclass(frozen=True)
class GRConfig:
  data: GRData = GRData()
  model: GRModel = GRModel()
  docids: DocIDSpec = DocIDSpec()
  train: GRTrain = GRTrain()
  decode: GRDecode = GRDecode()
  baselines: list = dataclasses.field(default_factory=lambda: ["bm25", "dense"])
  cache_dir: str = "outputs/cache"
  out_dir: str = "outputs/gr"


# ------------------------------------------------------------------------------- data


def load_ir(cfg: GRConfig):
  """(corpus records, queries {qid: text}, train qrels or {}, eval qrels, info) through IRDataset."""
  from diffrag.data import data_dir  # pylint: disable=import-outside-toplevel
  from diffrag.data.builders import ir_records  # pylint: disable=import-outside-toplevel
  root = data_dir(cfg.data.data_dir)
  corpus, queries, qrels = ir_records(root, cfg.data.dataset, cfg.data.layout, cfg.cache_dir + "/tfds")
  if cfg.data.eval_split not in qrels:
    raise ValueError(f"no qrels for the evaluation split {cfg.data.eval_split!r} in {cfg.data.dataset}; "
                     f"found {sorted(qrels)}")
  train = qrels.get(cfg.data.train_split, {}) if cfg.data.train_split else {}
  info = {"dataset": cfg.data.dataset, "layout": cfg.data.layout, "folder": str((root / cfg.data.dataset).resolve()),
          "splits": sorted(qrels), "train_split": cfg.data.train_split if train else None,
          "zero_shot": not train}
  return corpus, queries, train, qrels[cfg.data.eval_split], info


def drop_empty(records, policy: str):
  """(records, dropped ids): documents with neither title nor text are an error or dropped."""
  if policy not in ("error", "drop"):
    raise ValueError(f"data.empty_docs={policy!r}; expected error or drop")
  empty = [r["id"] for r in records if not (r.get("title") or "").strip() and not (r.get("text") or "").strip()]
  if empty and policy == "error":
    raise ValueError(f"{len(empty)} documents have neither title nor text (e.g. {empty[:3]}); set "
                     "data.empty_docs=drop to drop them (they and the qrels pointing at them are counted)")
  gone = set(empty)
  return [r for r in records if r["id"] not in gone], empty


def _clean_qrels(qrels, known: set[str], queries) -> tuple[dict, int, int]:
  """Keeps relevant documents that exist; drops queries left with none. Returns
  (qrels, queries dropped, qrel entries pointing outside the corpus)."""
  out, dropped, missing = {}, 0, 0
  for q, rel in qrels.items():
    kept = {d: v for d, v in rel.items() if v > 0 and d in known}
    missing += sum(1 for d, v in rel.items() if v > 0 and d not in known)
    if kept and q in queries:
      out[q] = kept
    elif any(v > 0 for v in rel.values()):
      dropped += 1
  return out, dropped, missing


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, min_words: int = 4) -> list[str]:
  """The sentences of `text` with at least `min_words` words (pseudo-queries)."""
  return [s.strip() for s in _SENTENCE.split(text or "") if len(s.split()) >= min_words]


def _tokens(tok, text: str, limit: int) -> list[int]:
  """`[CLS] text` ids cut to `limit` (BERT's trailing [SEP] dropped: the canvas follows)."""
  ids = tok(text, add_special_tokens=True)["input_ids"]
  if tok.sep_token_id is not None and ids and ids[-1] == tok.sep_token_id:
    ids = ids[:-1]
  return ids[:limit]


def left_pad(rows, length: int, pad_id: int):
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  return ids, mask


def _mean_pct(x: np.ndarray):
  """100 x the mean, or "" for an empty group."""
  return round(100 * float(x.mean()), 2) if x.size else ""


def training_pairs(cfg: GRConfig, tok, corpus, queries, train_qrels, table: DocIDTable, index: dict):
  """[(prompt ids, DocID ids)] and counts per kind."""
  p = cfg.train.query_tokens
  code = lambda d: table.codes[d].tolist()
  pairs, counts = [], {"query": 0, "indexing": 0, "pseudo_query": 0}
  qpairs = [(q, index[d]) for q, rel in sorted(train_qrels.items()) for d in rel]
  for _ in range(cfg.train.query_repeat):
    pairs += [(_tokens(tok, queries[q], p), code(d)) for q, d in qpairs]
  counts["query"] = len(qpairs) * cfg.train.query_repeat
  for d in range(len(corpus)):
    if cfg.train.indexing:
      text = corpus.document(d, with_title=cfg.train.index_with_title) or corpus.titles[d]
      pairs.append((_tokens(tok, text, p), code(d)))
      counts["indexing"] += 1
    for s in sentences(corpus.texts[d])[:cfg.train.pseudo_queries]:
      pairs.append((_tokens(tok, s, p), code(d)))
      counts["pseudo_query"] += 1
  if not pairs:
    raise ValueError("no training pairs: the folder has no training qrels and train.indexing=false, "
                     "train.pseudo_queries=0; turn on indexing or pseudo-queries")
  return pairs, counts


# ---------------------------------------------------------------------------- training


def _train(cfg: GRConfig, model, params, tok, pairs, table: DocIDTable, *, objective: str, steps: int, spec: dict,
           output_ids=None):
  """Trains (or reuses on an exact spec match) one retriever; returns (model, params, artefact record)."""
  from diffrag.data.pipeline import PairBatches, prompt_buckets  # pylint: disable=import-outside-toplevel
  from diffrag.models import from_pretrained  # pylint: disable=import-outside-toplevel
  from diffrag.train.loop import LoopSpec, MeshSpec, TrainConfig, run  # pylint: disable=import-outside-toplevel
  from diffrag.train.step import OptimConfig  # pylint: disable=import-outside-toplevel
  tr, lc = cfg.train, table.length
  tcfg = TrainConfig(optim=OptimConfig(lr=tr.lr, warmup_steps=tr.warmup_steps, schedule="cosine", weight_decay=0.01,
                                       b2=0.98, lora_rank=cfg.model.lora_rank),
                     train=LoopSpec(steps=steps, batch_size=tr.batch_size, seed=tr.seed, log_every=25,
                                    checkpoint_every=max(50, steps // 6), export=True, loss_window=[-lc, lc],
                                    objective=objective, vocab_tile=tr.vocab_tile, remat=tr.remat,
                                    # the AR objective masks nothing: its key never depends on the schedule
                                    schedule=tr.schedule if objective == "diffusion" else "linear",
                                    weighting=tr.weighting if objective == "diffusion" else "elbo"),
                     mesh=MeshSpec(data=1))
  store = ArtefactStore(tr.store)
  art = store.get(f"{objective}_retriever", {**spec, "objective": objective, "optim": tcfg.optim, "train": tcfg.train})
  reused = art.done
  if not reused:
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.sep_token_id
    batches = PairBatches(pairs, batch_size=tr.batch_size, seed=tr.seed,
                          buckets=prompt_buckets(tr.query_tokens, 8), response_len=lc,
                          pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos, eos_id=eos)
    t0 = time.perf_counter()
    result = run(dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, out_dir=str(art.path / "train"))),
                 batches=iter(batches.dataset()), initial=(model, params, tok), output_ids=output_ids)
    last = result.history[-1] if result.history else {}
    store.finish(art, {"steps": steps, "batch_size": tr.batch_size, "examples_seen": steps * tr.batch_size,
                       "pairs": len(pairs), "wall_seconds": round(time.perf_counter() - t0, 1),
                       "final_loss": last.get("loss"), "final_token_accuracy": last.get("masked_accuracy")})
    print(f"{objective} retriever: {len(pairs)} pairs, {steps} steps, loss {last.get('loss', float('nan')):.3f}")
  trained, trained_params = from_pretrained(art.path / "train" / "hf", dtype=cfg.model.dtype)
  return trained, trained_params, art.record(reused)


def _docid_key(spec: DocIDSpec) -> dict:
  """The DocID spec as it enters artefact keys; the default code_init is left out, so keys made
  before the field existed still match (it only matters for learnt codes)."""
  key = dataclasses.asdict(spec)
  if key["code_init"] == "mean":
    key.pop("code_init")
  return key


def _docid_table(cfg: GRConfig, corpus, tok, model, params, dense, store: ArtefactStore):
  """(table, model, params, artefact record or None): linguistic DocIDs, or RQ codes (an artefact)
  with the vocabulary extended by one token per code."""
  eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.sep_token_id
  if cfg.docids.kind == "linguistic":
    if cfg.docids.source not in ("title", "leading"):
      raise ValueError(f"docids.source={cfg.docids.source!r}; expected title or leading")
    titles = corpus.titles if cfg.docids.source == "title" else [""] * len(corpus)
    return linguistic_docids(titles, corpus.texts, corpus.ids, tok, max_tokens=cfg.docids.max_tokens,
                             eos_id=eos), model, params, None
  if cfg.docids.kind != "rq":
    raise ValueError(f"docids.kind={cfg.docids.kind!r}; expected linguistic or rq")
  vocab = model.config.vocab_size
  art = store.get("rq_docids", {"embeddings": array_digest(dense.embeddings), "ids": fingerprint(list(corpus.ids)),
                                "levels": cfg.docids.levels, "codes": cfg.docids.codes, "seed": cfg.docids.seed,
                                "base_token": vocab}, code=("diffrag.gr.docids",))
  reused = art.done
  if reused:
    saved = np.load(art.path / "codes.npz")
    table = DocIDTable(saved["codes"], tuple(corpus.ids), "rq", json.loads(str(saved["stats"])))
  else:
    t0 = time.perf_counter()
    table = rq_docids(dense.embeddings, corpus.ids, levels=cfg.docids.levels, codes=cfg.docids.codes,
                      base_token=vocab, seed=cfg.docids.seed)
    np.savez(art.path / "codes.npz", codes=table.codes, stats=json.dumps(table.stats))
    store.finish(art, {"wall_seconds": round(time.perf_counter() - t0, 1), **table.stats})
  n_new = table.stats["new_tokens"]
  rows = None
  if cfg.docids.code_init == "content":
    words = [tok(f"{title} {text}", add_special_tokens=False, truncation=True, max_length=64)["input_ids"]
             for title, text in zip(corpus.titles, corpus.texts)]
    rows = code_rows(table, words, np.asarray(params["embed"]["embedding"]), n_new, vocab)
  elif cfg.docids.code_init != "mean":
    raise ValueError(f"docids.code_init={cfg.docids.code_init!r}; expected mean or content")
  new_cfg, params = extend_vocab(model.config, params, n_new, seed=cfg.docids.seed, rows=rows)
  return table, type(model)(new_cfg), params, art.record(reused)


# ------------------------------------------------------------------------------- run


def t_row(t: int, constrained: bool) -> str:
  """The row name of T-step decoding with `t` forward passes (constrained or not)."""
  return f"diffusion_T{t}{'_constrained' if constrained else ''}"


def prior_row(k: int, lam) -> str:
  """The row name of one-pass top-k calibrated against the DocID prior with weight lam."""
  return f"one_pass_top{k}_prior{float(lam):g}"


def default_mode(dec: GRDecode, length: int | None = None) -> str:
  """The row name `decode.default` selects (an error naming the modes this config runs).

  T-step modes are keyed by the requested T and named by the T that runs: T is capped at the
  DocID canvas `length` when it is known (`decode.steps=[32]` on a 16-token canvas runs T16)."""
  cap = (lambda t: min(int(t), length)) if length else int
  modes = {"beam": f"beam_B{dec.beam}" if dec.beam else None,
           "one_pass": f"one_pass_top{dec.one_pass}" if dec.one_pass else None,
           **{f"one_pass_prior{float(lam):g}": prior_row(dec.one_pass, lam) if dec.one_pass else None
              for lam in dec.one_pass_priors},
           "pseudo_beam": f"pseudo_beam_B{dec.pseudo_beam}" if dec.pseudo_beam else None,
           **{f"T{t}": t_row(cap(t), dec.constrained) if dec.constrained or dec.unconstrained else None
              for t in dec.steps}}
  if dec.default == "auto":
    return next(v for v in modes.values() if v) if any(modes.values()) else ""
  if modes.get(dec.default) is None:
    raise ValueError(f"decode.default={dec.default!r} is not a mode this config runs; choose one of "
                     f"{sorted(k for k, v in modes.items() if v)}")
  return modes[dec.default]


def _set_aside_stale_runs(out: Path, written: set[str]) -> list[str]:
  """Moves run_*.trec files an earlier run left in `out` (modes this run did not decode) to
  out/superseded/, so every run file beside metrics.json is this run's; returns their names."""
  stale = sorted(p.name for p in out.glob("run_*.trec") if p.name not in written)
  if stale:
    (out / "superseded").mkdir(exist_ok=True)
    for name in stale:
      (out / name).replace(out / "superseded" / name)
    print(f"{len(stale)} run file(s) of an earlier run in {out} moved to {out / 'superseded'}: {', '.join(stale)}")
  return stale


def run_gr(cfg: GRConfig, progress: bool = True) -> dict:
  from diffrag.models import from_pretrained, load_tokenizer, minilm_path  # pylint: disable=import-outside-toplevel
  from diffrag.retrieval import BM25Retriever, Corpus, DenseRetriever, default_encoder  # pylint: disable=import-outside-toplevel
  default = default_mode(cfg.decode)
  bad = [lam for lam in cfg.decode.one_pass_priors if not isinstance(lam, (int, float)) or not lam > 0]
  if bad or (cfg.decode.one_pass_priors and not cfg.decode.one_pass):
    raise ValueError(f"decode.one_pass_priors={cfg.decode.one_pass_priors}: weights must be numbers > 0 (the plain "
                     "one-pass row is lambda 0, always run) and need decode.one_pass > 0")
  schedules.get(cfg.train.schedule, weighting=cfg.train.weighting)  # an unknown one fails here, before any work
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  walls: dict[str, float] = {}
  t0 = time.perf_counter()
  records, queries, train_qrels, eval_qrels, info = load_ir(cfg)
  records, empty = drop_empty(records, cfg.data.empty_docs)
  corpus = Corpus.from_records(records)
  known = set(corpus.ids)
  index = {d: i for i, d in enumerate(corpus.ids)}
  empty_set = set(empty)
  counts = {"documents": len(corpus), "empty_documents_dropped": len(empty),
            "qrels_pointing_at_dropped_documents": sum(1 for qr in (train_qrels, eval_qrels) for rel in qr.values()
                                                       for d in rel if d in empty_set)}
  train_qrels, dropped_train, _ = _clean_qrels(train_qrels, known, queries)
  eval_qrels, dropped_eval, _ = _clean_qrels(eval_qrels, known, queries)
  eval_ids = sorted(eval_qrels)[:cfg.data.limit or None]
  eval_qrels = {q: eval_qrels[q] for q in eval_ids}
  # no evaluation query is ever a training query (by id or by text): removed and counted
  eval_text = {" ".join(queries[q].lower().split()) for q in eval_ids}
  leaked = [q for q in train_qrels if q in eval_qrels or " ".join(queries[q].lower().split()) in eval_text]
  for q in leaked:
    del train_qrels[q]
  # "seen": a relevant document of the query is the DocID of a training query pair (the rest are reached
  # through indexing and pseudo-queries alone); metrics are split along it (DSI / NCI report the same split)
  relevant = lambda rel: {d for d, v in rel.items() if v > 0}
  queried = set().union(*map(relevant, train_qrels.values()))
  seen_of = {q: bool(relevant(eval_qrels[q]) & queried) for q in eval_ids}
  counts.update({"train_queries": len(train_qrels), "eval_queries": len(eval_ids),
                 "eval_queries_seen": sum(seen_of.values()), "eval_queries_unseen": len(eval_ids) - sum(seen_of.values()),
                 "train_queries_dropped_relevant_not_in_corpus": dropped_train,
                 "eval_queries_dropped_relevant_not_in_corpus": dropped_eval,
                 "eval_queries_in_training_removed": len(leaked), "zero_shot": info["zero_shot"]})
  if info["zero_shot"]:
    print(f"gr: {cfg.data.dataset} has no training qrels ({cfg.data.train_split!r}): zero-shot, the retriever learns "
          "the documents only (indexing + pseudo-queries)")
  walls["load_data"] = time.perf_counter() - t0
  source = cfg.model.checkpoint or minilm_path()
  tok = load_tokenizer(source)
  dense = None
  if cfg.docids.kind == "rq" or "dense" in cfg.baselines:
    dense = DenseRetriever(corpus, default_encoder(), cache_dir=cfg.cache_dir, progress=progress)
  model, params = from_pretrained(source, dtype=cfg.model.dtype, init_missing_head=cfg.model.checkpoint is None)
  store = ArtefactStore(cfg.train.store)
  table, model, params, docid_record = _docid_table(cfg, corpus, tok, model, params, dense, store)
  (out / "docids.json").write_text(json.dumps({"kind": table.kind, **table.stats}, indent=2))
  pairs, pair_counts = training_pairs(cfg, tok, corpus, queries, train_qrels, table, index)
  counts["training_pairs"] = pair_counts
  flat = np.concatenate([np.asarray(p + [-1] + c + [-2], np.int64) for p, c in pairs])
  spec = {"recipe": RECIPE, "init": str(cfg.model.checkpoint or "all-MiniLM-L6-v2"), "dtype": cfg.model.dtype,
          "lora_rank": cfg.model.lora_rank, "data": info | {"eval_split": cfg.data.eval_split},
          "docids": _docid_key(cfg.docids), "table": array_digest(table.codes),
          "index_with_title": cfg.train.index_with_title, "pseudo_queries": cfg.train.pseudo_queries,
          "query_repeat": cfg.train.query_repeat, "query_tokens": cfg.train.query_tokens,
          "docid_vocab": cfg.train.docid_vocab,
          "pairs": array_digest(flat), "n_pairs": len(pairs)}
  vocab = table.vocab(model.config.vocab_size) if cfg.train.docid_vocab else None
  output_ids = None if vocab is None else np.flatnonzero(vocab).astype(np.int32)
  causal_backbone = model.config.causal  # an AR checkpoint (Qwen2.5, Llama): only the AR row is trained
  d_record = None
  if not causal_backbone:
    t0 = time.perf_counter()
    dm, dparams, d_record = _train(cfg, model, params, tok, pairs, table, objective="diffusion",
                                   steps=cfg.train.steps, spec=spec, output_ids=output_ids)
    walls["train_diffusion"] = time.perf_counter() - t0
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  q_ids, q_mask = left_pad([_tokens(tok, queries[q], cfg.train.query_tokens) for q in eval_ids],
                           cfg.train.query_tokens, pad)
  per_query, rows, curves = {}, [], []
  budget = lambda rec: {"train_steps": rec.get("steps"), "train_examples_seen": rec.get("examples_seen"),
                        "train_s": rec.get("wall_seconds")}
  index_input = "title+body" if cfg.train.index_with_title else "body"

  written: set[str] = set()  # run files of this run; any other run_*.trec in out_dir is an earlier run's

  def record(name, family, t, decoded: D.Decoded | None, rankings=None, samples=1, train_rec=None, timing=None):
    rankings = decoded.rankings if decoded is not None else rankings
    ranked = {q: [(corpus.ids[d], s) for d, s in r] for q, r in zip(eval_ids, rankings)}
    trec.write_run(out / f"run_{name}.trec", ranked, tag=name)
    written.add(f"run_{name}.trec")
    run = trec.read_run(out / f"run_{name}.trec")
    qids, scores = trec.per_query(run, eval_qrels)
    seen = np.array([seen_of[q] for q in qids], bool)
    per_query[name] = scores
    extra = trec.evaluate(run, eval_qrels, known_docs=known)
    r10, nd = stats.bootstrap_ci(scores["recall@10"]), stats.bootstrap_ci(scores["ndcg@10"])
    row = {"method": name, "model": family, "docids": table.kind if train_rec else "",
           "index_input": index_input if train_rec else "", "T": t, "n": len(eval_ids),
           "recall@1": round(100 * float(scores["recall@1"].mean()), 2),
           "recall@10": round(100 * r10[0], 2), "recall@10_ci": f"[{100 * r10[1]:.2f}, {100 * r10[2]:.2f}]",
           "recall@100": round(100 * float(scores["recall@100"].mean()), 2),
           "mrr@10": round(100 * float(scores["mrr@10"].mean()), 2),
           "ndcg@10": round(100 * nd[0], 2), "ndcg@10_ci": f"[{100 * nd[1]:.2f}, {100 * nd[2]:.2f}]",
           "recall@10_seen": _mean_pct(scores["recall@10"][seen]),
           "recall@10_unseen": _mean_pct(scores["recall@10"][~seen]),
           "invalid_%": round(100 * decoded.invalid / max(len(eval_ids) * samples, 1), 2)
           if decoded is not None else "",
           "forward_passes": round(decoded.forward, 2) if decoded is not None else "",
           "unknown_docids": int(extra.get("unknown_docids_in_run", 0))}
    tm = decoded.timing if decoded is not None else timing
    row["ms_per_query"] = round(decoded.ms_per_query, 2) if decoded is not None else \
        round(1000 * tm.seconds / max(len(eval_ids), 1), 2)
    row["compile_s"] = round(tm.compile_seconds, 2)
    row["compiles_in_timed"] = tm.compiles_in_timed
    row.update(budget(train_rec) if train_rec else {"train_steps": "", "train_examples_seen": "", "train_s": ""})
    rows.append(row)
    print({k: row[k] for k in ("method", "recall@1", "recall@10", "ndcg@10", "ms_per_query")}, flush=True)
    return row

  for name in cfg.baselines:
    if name not in ("bm25", "dense"):
      raise ValueError(f"baselines: unknown {name!r}; expected bm25 or dense")
    retr = BM25Retriever(corpus) if name == "bm25" else dense
    sw = Stopwatch()
    texts = [queries[q] for q in eval_ids]
    with sw.warmup():
      retr.search(texts[:8], 100)
    with sw.timed():
      idx, sc = retr.search(texts, 100)
    record(name, "MiniLM dense" if name == "dense" else "BM25", "", None,
           rankings=[list(zip(i.tolist(), s.tolist())) for i, s in zip(idx, sc)], timing=sw.timing)
  bs, lc = cfg.decode.batch_size, table.length
  fam = "diffusion"
  t0 = time.perf_counter()
  for t in sorted({min(int(t), lc) for t in cfg.decode.steps}) if not causal_backbone else []:
    for constrained in [c for c, on in ((True, cfg.decode.constrained), (False, cfg.decode.unconstrained)) if on]:
      dec = D.t_step(dm, dparams, q_ids, q_mask, table, t, constrained=constrained, batch=bs, vocab=vocab)
      r = record(t_row(t, constrained), fam, t, dec, train_rec=d_record)
      curves.append((t, constrained, r["recall@1"], r["ms_per_query"], r["forward_passes"]))
  if cfg.decode.pseudo_beam and not causal_backbone:
    b = cfg.decode.pseudo_beam
    t_pb = min(cfg.decode.pseudo_beam_steps, lc)
    record(f"pseudo_beam_B{b}", fam, t_pb,
           D.pseudo_beam(dm, dparams, q_ids, q_mask, table, b, steps=t_pb,
                         temperature=cfg.decode.pseudo_beam_temperature, batch=bs), samples=b, train_rec=d_record)
  if cfg.decode.beam and not causal_backbone:
    record(f"beam_B{cfg.decode.beam}", fam, lc,
           D.beam_search(dm, dparams, q_ids, q_mask, table, cfg.decode.beam, batch=max(1, bs // 2)),
           samples=cfg.decode.beam, train_rec=d_record)
  if cfg.decode.one_pass and not causal_backbone:
    first = D.one_pass(dm, dparams, q_ids, q_mask, table, cfg.decode.one_pass, batch=bs)
    record(f"one_pass_top{cfg.decode.one_pass}", fam, 1, first, train_rec=d_record)
    if cfg.decode.one_pass_priors:
      e_ids, e_mask = left_pad([_tokens(tok, "", cfg.train.query_tokens)], cfg.train.query_tokens, pad)
      prior = D.docid_prior(dm, dparams, e_ids, e_mask, table)
      for lam in cfg.decode.one_pass_priors:
        record(prior_row(cfg.decode.one_pass, lam), fam, 1,
               D.one_pass(dm, dparams, q_ids, q_mask, table, cfg.decode.one_pass, batch=bs, prior=float(lam) * prior),
               train_rec=d_record)
    if cfg.decode.elbo_rerank:
      record(f"one_pass_elbo_rerank{cfg.decode.elbo_rerank}", fam, 1,
             D.elbo_rerank(dm, dparams, q_ids, q_mask, table, first, top=cfg.decode.elbo_rerank), train_rec=d_record)
  walls["decode_diffusion"] = time.perf_counter() - t0
  records_used = [r for r in (docid_record, d_record) if r]
  ar_steps = cfg.train.steps if cfg.train.ar_steps is None or causal_backbone else cfg.train.ar_steps
  if ar_steps:
    t0 = time.perf_counter()
    # the AR twin: the same backbone with a causal mask (an AR checkpoint is used as it is)
    ar_model = model if causal_backbone else type(model)(model.config.replace(causal=True, shift_logits=True))
    am, aparams, a_record = _train(cfg, ar_model, params, tok, pairs, table, objective="ar", steps=ar_steps,
                                   spec=spec, output_ids=output_ids)
    walls["train_ar"] = time.perf_counter() - t0
    records_used.append(a_record)
    b = max(cfg.decode.beam, 1)
    t0 = time.perf_counter()
    record(f"ar_beam_B{b}", f"autoregressive ({ar_model.config.family})", lc,
           D.beam_search(am, aparams, q_ids, q_mask, table, b, order="left_to_right", batch=max(1, bs // 2)),
           samples=b, train_rec=a_record)
    walls["decode_ar"] = time.perf_counter() - t0
  _compare_rows(rows, per_query, cfg.decode.compare_to)
  default = default_mode(cfg.decode, lc)
  if causal_backbone or not default:  # an AR checkpoint decodes with its own beam only
    default = next((r["method"] for r in rows if r["method"].startswith("ar_beam_")), rows[-1]["method"])
  (out / "run.trec").write_text((out / f"run_{default}.trec").read_text())
  _set_aside_stale_runs(out, written)
  table_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  table_md = write_table(table_rows, out, "gr")
  summary = {"config": dataclasses.asdict(cfg), "counts": counts, "docids": table.stats, "default_run": default,
             "index_input": index_input, "methods": rows,
             "per_query": {m: {k: v.tolist() for k, v in s.items()} for m, s in per_query.items()},
             "eval_query_ids": eval_ids}
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  write_manifest(out, config=cfg, data=info, seeds={"train": cfg.train.seed, "docids": cfg.docids.seed},
                 wall_times=walls, artefacts=records_used)
  _plots(out, rows, curves)
  summary["table"] = table_md
  return summary


def _compare_rows(rows, per_query, ref: str) -> None:
  """Adds to every row its paired nDCG@10 / R@10 difference with the reference row."""
  if ref not in per_query:
    return
  for row in rows:
    if row["method"] == ref:
      continue
    comp = {}
    for metric in ("ndcg@10", "recall@10"):
      c = stats.compare(per_query[row["method"]][metric], per_query[ref][metric])
      comp[metric] = c
      row[f"d_{metric}_vs_{ref}"] = stats.fmt_diff(c, scale=100)
      row[f"p_{metric}"] = stats.fmt_p(c["p"])
    row["_compare"] = comp


def _plots(out: Path, rows, curves) -> None:
  plt = pyplot()
  if curves:
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for constrained in (True, False):
      pts = sorted((t, r, ms, f) for t, c, r, ms, f in curves if c == constrained)
      if pts:
        lab = "constrained" if constrained else "unconstrained"
        ax[0].plot([x[0] for x in pts], [x[1] for x in pts], "o-", label=lab)
        ax[1].plot([x[3] for x in pts], [x[1] for x in pts], "o-", label=lab)
    ax[0].set_xlabel("denoising steps T")
    ax[0].set_ylabel("Recall@1 (%)")
    ax[1].set_xlabel("forward passes per query (repairs included)")
    ax[1].set_ylabel("Recall@1 (%)")
    save_figure(fig, out / "quality_latency.png")
  fig, ax = plt.subplots(figsize=(7, 3.4))
  names = [r["method"] for r in rows]
  vals = [r["ndcg@10"] for r in rows]
  err = np.array([[r["ndcg@10"] - float(r["ndcg@10_ci"].strip("[]").split(",")[0]),
                   float(r["ndcg@10_ci"].strip("[]").split(",")[1]) - r["ndcg@10"]] for r in rows]).T
  ax.bar(range(len(rows)), vals, yerr=err, capsize=2, label="nDCG@10 (95% interval)")
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("%")
  save_figure(fig, out / "modes.png")
