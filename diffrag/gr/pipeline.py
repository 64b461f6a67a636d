"""`diffrag gr`: DocIDs -> fine-tune the retriever -> decode in every mode -> TREC runs, metrics, plots.

Data (local files, read through the IRDataset TFDS builder): a BEIR folder (`corpus.jsonl`,
`queries.jsonl`, `qrels/<split>.tsv`, e.g. ../shared/data/scifact) or the TSV layout used by
MS MARCO and NQ320K exports (`collection.tsv` / `corpus.tsv`: docid, [title,] text;
`queries.<split>.tsv`: qid, text; `qrels.<split>.tsv`: TREC or BEIR qrels). Queries whose relevant documents are all outside
the corpus are dropped from evaluation and counted; so are run entries with unknown ids.

Outputs under out_dir: run.trec (the default mode) and run_<mode>.trec for every mode,
metrics.json, gr.md / gr.csv, plots (recall@1 and latency vs T, diffusion vs AR,
pseudo-beam vs top-k), docids.json (DocID statistics).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from diffrag.gr import decode as D
from diffrag.gr.docids import DocIDTable, extend_vocab, linguistic_docids, rq_docids
from diffrag.report import pyplot, save_figure, write_table
from diffrag.retrieval import trec


@dataclasses.dataclass(frozen=True)
class GRData:
  dataset: str = "scifact"
  data_dir: str | None = None
  layout: str = "beir"             # beir | tsv (MS MARCO / NQ320K exports)
  train_split: str = "train"
  eval_split: str = "test"
  limit: int = 0                   # evaluate at most this many queries (0 = all)


@dataclasses.dataclass(frozen=True)
class DocIDSpec:
  kind: str = "linguistic"         # linguistic (title or leading tokens) | rq (residual k-means codes)
  max_tokens: int = 16             # linguistic canvas
  levels: int = 3                  # rq
  codes: int = 64
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
  query_tokens: int = 32           # prompt length (queries, and documents for indexing)
  indexing: bool = True            # document text -> DocID pairs for every document
  query_repeat: int = 2            # query -> DocID pairs are repeated this many times in the mix
  out_dir: str = "outputs/gr/retriever"
  ar_steps: int = 400              # autoregressive baseline (0 = skip)


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
  batch_size: int = 32


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
  """(corpus records, queries {qid: text}, train qrels, eval qrels) through the IRDataset TFDS builder."""
  from diffrag.data import data_dir  # pylint: disable=import-outside-toplevel
  from diffrag.data.builders import ir_records  # pylint: disable=import-outside-toplevel
  corpus, queries, qrels = ir_records(data_dir(cfg.data.data_dir), cfg.data.dataset, cfg.data.layout,
                                      cfg.cache_dir + "/tfds")
  for split in (cfg.data.train_split, cfg.data.eval_split):
    if split not in qrels:
      raise ValueError(f"no qrels for split {split!r} in {cfg.data.dataset}; found {sorted(qrels)}")
  return corpus, queries, qrels[cfg.data.train_split], qrels[cfg.data.eval_split]


def _clean_qrels(qrels, known: set[str], queries) -> tuple[dict, int]:
  """Keeps relevant documents that exist; drops queries left with none (counted)."""
  out, dropped = {}, 0
  for q, rel in qrels.items():
    kept = {d: v for d, v in rel.items() if v > 0 and d in known}
    if kept and q in queries:
      out[q] = kept
    elif any(v > 0 for v in rel.values()):
      dropped += 1
  return out, dropped


def _prompts(tok, texts, length, pad_id) -> np.ndarray:
  """[N, length] left-padded `[CLS] text` prompts (cut at `length`; BERT's trailing [SEP] dropped)."""
  out = np.full((len(texts), length), pad_id, np.int32)
  for i, t in enumerate(texts):
    ids = tok(t, add_special_tokens=True)["input_ids"]
    if tok.sep_token_id is not None and ids and ids[-1] == tok.sep_token_id:
      ids = ids[:-1]
    ids = ids[:length]
    out[i, length - len(ids):] = ids
  return out


# ---------------------------------------------------------------------------- training


def _train(cfg: GRConfig, model, params, tok, prompts_q, prompts_d, pairs, table: DocIDTable, *, objective, steps,
           out_dir):
  from diffrag.data.pipeline import pair_dataset, pair_example  # pylint: disable=import-outside-toplevel
  from diffrag.train.loop import LoopSpec, MeshSpec, TrainConfig, run  # pylint: disable=import-outside-toplevel
  from diffrag.train.step import OptimConfig  # pylint: disable=import-outside-toplevel
  p, lc = cfg.train.query_tokens, table.length
  ex = []
  for _ in range(cfg.train.query_repeat):
    ex += [_pair(prompts_q[q], table.codes[d], p, lc) for q, d in pairs]
  if cfg.train.indexing:
    ex += [_pair(prompts_d[d], table.codes[d], p, lc) for d in range(len(table.doc_ids))]
  tcfg = TrainConfig(optim=OptimConfig(lr=cfg.train.lr, warmup_steps=max(1, steps // 20), schedule="cosine",
                                       weight_decay=0.01, b2=0.98, lora_rank=cfg.model.lora_rank),
                     train=LoopSpec(steps=steps, batch_size=cfg.train.batch_size, log_every=25,
                                    checkpoint_every=steps, out_dir=out_dir, export=False, loss_window=[p, lc],
                                    objective=objective),
                     mesh=MeshSpec(data=1))
  result = run(tcfg, batches=iter(pair_dataset(ex, batch_size=cfg.train.batch_size, seed=cfg.docids.seed)),
               initial=(model, params, tok))
  if result.history:
    last = result.history[-1]
    print(f"{objective} retriever: {len(ex)} pairs, {steps} steps, loss {last['loss']:.3f}, "
          f"token accuracy {last['masked_accuracy']:.3f}")
  else:
    print(f"{objective} retriever: reusing {result.out_dir} (step {int(result.state.step)})")
  return result.model, result.state.params


def _pair(prompt, code, p, lc):
  return {"tokens": np.concatenate([prompt, code]).astype(np.int32),
          "maskable": np.concatenate([np.zeros(p, bool), np.ones(lc, bool)])}


# ------------------------------------------------------------------------------- run


def run_gr(cfg: GRConfig, progress: bool = True) -> dict:
  from diffrag.models import from_pretrained, load_tokenizer, minilm_path  # pylint: disable=import-outside-toplevel
  from diffrag.retrieval import BM25Retriever, Corpus, DenseRetriever, default_encoder  # pylint: disable=import-outside-toplevel
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  records, queries, train_qrels, eval_qrels = load_ir(cfg)
  corpus = Corpus.from_records(records)
  known = set(corpus.ids)
  index = {d: i for i, d in enumerate(corpus.ids)}
  train_qrels, dropped_train = _clean_qrels(train_qrels, known, queries)
  eval_qrels, dropped_eval = _clean_qrels(eval_qrels, known, queries)
  eval_ids = sorted(eval_qrels)[:cfg.data.limit or None]
  eval_qrels = {q: eval_qrels[q] for q in eval_ids}
  counts = {"documents": len(corpus), "train_queries": len(train_qrels), "eval_queries": len(eval_ids),
            "train_queries_dropped_relevant_not_in_corpus": dropped_train,
            "eval_queries_dropped_relevant_not_in_corpus": dropped_eval}
  source = cfg.model.checkpoint or minilm_path()
  tok = load_tokenizer(source)
  encoder = None
  if cfg.docids.kind == "rq" or "dense" in cfg.baselines:
    encoder = default_encoder()
    dense = DenseRetriever(corpus, encoder, cache_dir=cfg.cache_dir, progress=progress)
  model, params = from_pretrained(source, dtype=cfg.model.dtype, init_missing_head=cfg.model.checkpoint is None)
  vocab = model.config.vocab_size
  eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.sep_token_id
  pad = model.config.pad_token_id if model.config.pad_token_id is not None else (tok.pad_token_id or eos)
  if cfg.docids.kind == "linguistic":
    table = linguistic_docids(corpus.titles, corpus.texts, corpus.ids, tok, max_tokens=cfg.docids.max_tokens,
                              eos_id=eos)
  elif cfg.docids.kind == "rq":
    table = rq_docids(dense.embeddings, corpus.ids, levels=cfg.docids.levels, codes=cfg.docids.codes,
                      base_token=vocab, seed=cfg.docids.seed)
    new_cfg, params = extend_vocab(model.config, params, table.stats["new_tokens"], seed=cfg.docids.seed)
    model = type(model)(new_cfg)
  else:
    raise ValueError(f"docids.kind={cfg.docids.kind!r}; expected linguistic or rq")
  (out / "docids.json").write_text(json.dumps({"kind": table.kind, **table.stats}, indent=2))
  p = cfg.train.query_tokens
  prompts_q = {q: row for q, row in zip(queries, _prompts(tok, list(queries.values()), p, pad))}
  prompts_d = _prompts(tok, [corpus.document(i) for i in range(len(corpus))], p, pad)
  pairs = [(q, index[d]) for q, rel in sorted(train_qrels.items()) for d in rel]
  kind_dir = f"{cfg.train.out_dir}/{table.kind}"
  dm, dparams = _train(cfg, model, params, tok, prompts_q, prompts_d, pairs, table, objective="diffusion",
                       steps=cfg.train.steps, out_dir=f"{kind_dir}/diffusion")
  eval_prompts = np.stack([prompts_q[q] for q in eval_ids])
  rows, runs, curves = [], {}, []

  def record(name, family, t, rankings, invalid, seconds, samples=1):
    ranked = {q: [(corpus.ids[d], s) for d, s in r] for q, r in zip(eval_ids, rankings)}
    trec.write_run(out / f"run_{name}.trec", ranked, tag=name)
    m = trec.evaluate(trec.read_run(out / f"run_{name}.trec"), eval_qrels, known_docs=known)
    runs[name] = m
    row = {"method": name, "model": family, "docids": table.kind, "T": t,
           "recall@1": round(100 * m["recall@1"], 2), "recall@10": round(100 * m["recall@10"], 2),
           "recall@100": round(100 * m["recall@100"], 2), "mrr@10": round(100 * m["mrr@10"], 2),
           "mrr@100": round(100 * m["mrr@100"], 2),
           "invalid_%": round(100 * invalid / max(len(eval_ids) * samples, 1), 2) if invalid is not None else "",
           "ms_per_query": round(1000 * seconds / max(len(eval_ids), 1), 1)}
    rows.append(row)
    print(row, flush=True)
    return row

  for name in cfg.baselines:
    t0 = time.perf_counter()
    retr = BM25Retriever(corpus) if name == "bm25" else dense if name == "dense" else None
    if retr is None:
      raise ValueError(f"baselines: unknown {name!r}; expected bm25 or dense")
    idx, sc = retr.search([queries[q] for q in eval_ids], 100)
    record(name, "MiniLM dense" if name == "dense" else "BM25", "", [list(zip(i.tolist(), s.tolist()))
                                                                     for i, s in zip(idx, sc)], None,
           time.perf_counter() - t0)
  bs, lc = cfg.decode.batch_size, table.length
  ts = sorted({min(int(t), lc) for t in cfg.decode.steps})
  for t in ts:
    for constrained in [c for c, on in ((True, cfg.decode.constrained), (False, cfg.decode.unconstrained)) if on]:
      # warm up (compile) on one batch, then time the whole set
      D.t_step(dm, dparams, eval_prompts[:bs], table, t, constrained=constrained, batch=bs)
      r = record(f"diffusion_T{t}{'_constrained' if constrained else ''}", "MiniLM diffusion", t,
                 *D.t_step(dm, dparams, eval_prompts, table, t, constrained=constrained, batch=bs))
      curves.append((t, constrained, r["recall@1"], r["ms_per_query"]))
  if cfg.decode.pseudo_beam:
    b = cfg.decode.pseudo_beam
    t_pb = min(cfg.decode.pseudo_beam_steps, lc)
    D.pseudo_beam(dm, dparams, eval_prompts[:1], table, b, steps=t_pb, batch=bs)
    record(f"pseudo_beam_B{b}", "MiniLM diffusion", t_pb,
           *D.pseudo_beam(dm, dparams, eval_prompts, table, b, steps=t_pb,
                          temperature=cfg.decode.pseudo_beam_temperature, batch=bs), samples=b)
  if cfg.decode.beam:
    D.beam_search(dm, dparams, eval_prompts[:1], table, cfg.decode.beam, batch=bs // 2)
    record(f"beam_B{cfg.decode.beam}", "MiniLM diffusion", lc,
           *D.beam_search(dm, dparams, eval_prompts, table, cfg.decode.beam, batch=bs // 2),
           samples=cfg.decode.beam)
  if cfg.decode.one_pass:
    D.one_pass(dm, dparams, eval_prompts[:1], table, cfg.decode.one_pass, batch=bs)
    rk, inv, secs = D.one_pass(dm, dparams, eval_prompts, table, cfg.decode.one_pass, batch=bs)
    record(f"one_pass_top{cfg.decode.one_pass}", "MiniLM diffusion", 1, rk, inv, secs)
    if cfg.decode.elbo_rerank:
      t0 = time.perf_counter()
      rr = D.elbo_rerank(dm, dparams, eval_prompts, table, rk, top=cfg.decode.elbo_rerank)
      record(f"one_pass_elbo_rerank{cfg.decode.elbo_rerank}", "MiniLM diffusion", 1, rr, 0,
             secs + time.perf_counter() - t0)
  if cfg.train.ar_steps:
    ar_model = type(dm)(dm.config.replace(causal=True, shift_logits=True))
    am, aparams = _train(cfg, ar_model, params, tok, prompts_q, prompts_d, pairs, table, objective="ar",
                         steps=cfg.train.ar_steps, out_dir=f"{kind_dir}/ar")
    b = max(cfg.decode.beam, 1)
    D.beam_search(am, aparams, eval_prompts[:1], table, b, order="left_to_right", batch=bs // 2)
    record(f"ar_beam_B{b}", "MiniLM autoregressive", lc,
           *D.beam_search(am, aparams, eval_prompts, table, b, order="left_to_right", batch=bs // 2), samples=b)
  default = next((r["method"] for r in rows if r["method"].startswith("beam_")), rows[-1]["method"])
  (out / "run.trec").write_text((out / f"run_{default}.trec").read_text())
  table_md = write_table(rows, out, "gr")
  summary = {"config": dataclasses.asdict(cfg), "counts": counts, "docids": table.stats, "default_run": default,
             "methods": rows, "metrics": runs}
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  _plots(out, rows, curves)
  summary["table"] = table_md
  return summary


def _plots(out: Path, rows, curves) -> None:
  plt = pyplot()
  if curves:
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    for constrained in (True, False):
      pts = sorted((t, r, ms) for t, c, r, ms in curves if c == constrained)
      if pts:
        lab = "constrained" if constrained else "unconstrained"
        ax[0].plot([x[0] for x in pts], [x[1] for x in pts], "o-", label=lab)
        ax[1].plot([x[0] for x in pts], [x[2] for x in pts], "o-", label=lab)
    ax[0].set_xlabel("denoising steps T")
    ax[0].set_ylabel("Recall@1 (%)")
    ax[1].set_xlabel("denoising steps T")
    ax[1].set_ylabel("ms / query")
    save_figure(fig, out / "quality_latency.png")
  fig, ax = plt.subplots(figsize=(7, 3.2))
  names = [r["method"] for r in rows]
  ax.bar(range(len(rows)), [r["recall@1"] for r in rows], label="R@1")
  ax.bar(range(len(rows)), [r["recall@10"] - r["recall@1"] for r in rows], bottom=[r["recall@1"] for r in rows],
         alpha=0.5, label="R@10")
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("%")
  save_figure(fig, out / "modes.png")
