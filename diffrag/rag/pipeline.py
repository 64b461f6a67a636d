"""`diffrag rag`: retrieval -> prompt -> masked-diffusion reader, baseline and SPREAD side by side.

One run: (train or reuse) a reader, then for every evaluated QA set retrieve passages, build
the prompts and answer every question with the baseline sampler and with SPREAD at each
alpha, same prompts and same keys. Predictions are appended to predictions.jsonl as they
are made (a rerun skips the (set, method, id) triples already there; out_dir is bound to what
its predictions depend on, `predictions.spec.json`, and a rerun with a different config or
data there is an error). Outputs under out_dir: predictions.jsonl, predictions.spec.json,
metrics.json, rag.md/rag.csv, manifest.json, drift.png, alpha.png.

Honest by construction (the `diffrag.experiment` layer):
  * the reader is an artefact keyed by a hash of everything that made it (init, training
    questions and their prompts, answer canvas, training spec); it is reused only on an
    exact match;
  * training and evaluation never share a question, a context passage or an article
    (counted in metrics.json under "leakage");
  * timings exclude compilation (compile time is reported apart);
  * every method is compared with the baseline on the same questions: mean difference,
    paired bootstrap 95% interval, randomization-test p-value, n.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.experiment import stats
from diffrag.experiment.provenance import (array_digest, canonical, code_version, file_fingerprint,
                                           write_json_atomic, write_manifest)
from diffrag.experiment.store import ArtefactStore, spec_diff
from diffrag.experiment.timing import Stopwatch
from diffrag.rag import metrics as M
from diffrag.rag.prompts import PromptSpec, build_prompt
from diffrag.rag.spans import phrase_continuations, span_candidates, span_decode, word_starts
from diffrag.rag.spread import DREAM_HIDDEN, query_representation, spread, unit_entropy
from diffrag.report import pyplot, save_figure, write_table
from diffrag.sampling import transforms as T
from diffrag.sampling.autoregressive import ar_sampler, generate_ar, stop_ids_of
from diffrag.sampling.sampler import Sample, generate

RECIPE = "minilm-reader-v2"  # bump when the reader's training code changes what it learns


@dataclasses.dataclass(frozen=True)
class RagData:
  dataset: str = "squad_v1:dev"   # QA set evaluated: name[:split] (see diffrag.data.readers.QA_SETS)
  also: list = dataclasses.field(default_factory=list)  # more QA sets evaluated with the same reader
  data_dir: str | None = None
  cache_dir: str = "outputs/cache/tfds"
  holdout: float = 1.0            # share of the evaluated set's groups (articles) held out; the rest can train
  limit: int = 0                  # evaluate at most this many questions per set (a seeded sample; 0 = all)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  retriever: str = "dense"        # dense (MiniLM) | bm25 | hybrid (reciprocal rank fusion of bm25 and dense)
                                  # | gold (the passages shipped with each question)
  rrf_c: float = 60.0             # hybrid: score(d) = sum over bm25, dense of 1 / (rrf_c + rank(d))
  corpus: list = dataclasses.field(default_factory=lambda: ["dataset"])  # "dataset" or passage sources
  k: int = 5
  max_chars: int = 2000
  chunk_words: int = 0            # > 0: passages are split into chunks of at most this many words (at
                                  # sentence ends) and the chunks are what is retrieved
  parent_fusion: bool = False     # with chunks: also rank each chunk by its whole passage (the retriever's
                                  # passage-level ranking fused with its chunk-level one; hybrid: 4 lists)
  cache_dir: str = "outputs/cache"


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
  checkpoint: str | None = None   # a Hugging Face LLaDA/Dream (instruct) folder, used as is
  dtype: str = "float32"
  train_data: str | None = None   # QA set name[:split] the MiniLM reader trains on; None: the evaluated
                                  # set's groups outside the holdout
  train_limit: int = 0            # train on at most this many questions (0 = all)
  distractors: int = 1            # retrieved passages beside the gold one in every training prompt
  prompt_variants: int = 1        # training prompts per question: variant v holds the distractors retrieved at
                                  # ranks [v d, (v + 1) d) and the gold passage at its own seeded rank
  distractor_retriever: str = "dense"  # dense | bm25 | hybrid: what retrieves those distractors from the training
                                       # set's own passages (hybrid: the harder ones the hybrid eval retriever shows)
  train_steps: int = 300
  batch_size: int = 16
  lr: float = 2.0e-4
  warmup_steps: int = 30
  extractive: bool = True         # answer with words of the passages only (training softmax and decoding
                                  # restricted to the prompt's tokens + EOS)
  copy_head: bool = True          # a pointer over the prompt as the output distribution (`ModelConfig.copy_head`)
  dropout: float = 0.0            # hidden dropout while training (`ModelConfig.dropout`; BERT pretrained with 0.1)
  schedule: str = "linear"        # masking schedule of training: linear | cosine | polyK (poly0.5 masks more)
  weighting: str = "elbo"         # loss weight: elbo (the 1/t-weighted bound) | flat (every masked token once)
  prefix_share: float = 0.0       # share of training prompts whose answer is masked left to right (a clean prefix of
                                  # k ~ U{0..answer length} tokens, the rest masked: the states `l2r` decodes through)
  bucket: int = 32                # prompts are bucketed by length in steps of this many tokens
  seed: int = 0
  store: str = "outputs/artefacts"


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
  gen_length: int = 16
  steps: int = 16
  block_length: int | None = None
  temperature: float = 0.0
  rule: str = "auto"              # auto (the reader family's) | llada (Gumbel, linear quota) | dream (tempered
                                  # confidence, Dream's timestep quota)
  eps: float = 1e-3               # Dream's schedule end point
  confidence: str = "prob"        # prob (LLaDA low_confidence / Dream maskgit_plus) | margin | entropy
  threshold: float | None = None
  answer_scope: str = "first_eos"  # first_eos (text before the first EOS) | canvas (the whole canvas, special
                                   # tokens dropped: the SPREAD paper's protocol)
  stop_at_eos: bool = False       # SPREAD's paper runs all steps without EOS handling
  cache: str = "none"             # none | prefix | dual (Fast-dLLM; approximate, same for every method)
  span_decoding: bool = False     # also answer with the prompt span of highest one-pass score (method "span",
                                  # paired with the baseline; `diffrag.rag.spans`)
  span_first_tokens: int = 0      # > 0 (with span_decoding): also method "span_k<K>", the spans of the K best
                                  # first tokens rescored with that token committed (1 + K forward passes)
  left_to_right: bool = False     # also answer with the baseline's sampler committing one token per forward
                                  # pass from left to right (block_length 1, steps = gen_length, stop at EOS):
                                  # method "l2r", paired with the baseline; every length decision is made with
                                  # the answer so far committed
  left_to_right_phrases: bool = False  # also method "l2r_phrase": l2r whose every token keeps the answer a
                                       # phrase of the prompt (it starts at a word start, continues a run of
                                       # prompt tokens, ends at a word end: `spans.phrase_continuations`)
  batch_size: int = 8
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SpreadSpec:
  alphas: list = dataclasses.field(default_factory=lambda: [0.5])  # run beside the baseline (alpha = 0)
  pooling: str = "mean"           # mean | max_token
  hidden_layer: int = -1
  dream_hidden: str = "i"         # i (the masked position's own state) | i_minus_1 (the state whose logits
                                  # predict it; shifted-logit readers only)


@dataclasses.dataclass(frozen=True)
class RagConfig:
  data: RagData = RagData()
  retrieval: RetrievalSpec = RetrievalSpec()
  reader: ReaderSpec = ReaderSpec()
  prompt: PromptSpec = PromptSpec()
  generation: GenerationSpec = GenerationSpec()
  spread: SpreadSpec = SpreadSpec()
  drift: bool = True              # per-step query-response similarity with the MiniLM embedder
  out_dir: str = "outputs/rag"


# ------------------------------------------------------------------------------- data


def _group_in_holdout(group: str, share: float, seed: int) -> bool:
  if share >= 1.0:
    return True
  h = hashlib.sha1(f"{seed}:{group}".encode()).hexdigest()[:8]
  return int(h, 16) / 0xFFFFFFFF < share


def load_set(cfg: RagConfig, name: str):
  """(records with answers, info) of QA set `name`; records without gold answers are counted."""
  from diffrag.data import data_dir  # pylint: disable=import-outside-toplevel
  from diffrag.data.builders import qa_records  # pylint: disable=import-outside-toplevel
  records, info = qa_records(data_dir(cfg.data.data_dir), name, cfg.data.cache_dir)
  answered = sorted((r for r in records if r["answers"]), key=lambda r: r["id"])
  info = dict(info, records=len(records), without_answers_skipped=len(records) - len(answered),
              file_fingerprint=file_fingerprint(info["file"]))
  return answered, info


def split_records(cfg: RagConfig, records):
  """(train, eval): whole groups (SQuAD articles) go to one side, `data.holdout` of them to eval."""
  evals = [r for r in records if _group_in_holdout(r["group"], cfg.data.holdout, cfg.data.seed)]
  train = [r for r in records if not _group_in_holdout(r["group"], cfg.data.holdout, cfg.data.seed)]
  return train, evals


def sample(records, limit: int, seed: int):
  """At most `limit` records, a seeded sample in id order (all when limit is 0)."""
  if not limit or limit >= len(records):
    return list(records)
  keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
  return [records[i] for i in keep]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def chunk_passage(p: dict, words: int) -> list[dict]:
  """Consecutive chunks of at most `words` words, cut at sentence ends (a longer sentence is cut
  at `words`); ids `<id>#<k>`, the title kept. words <= 0: the passage itself."""
  if words <= 0:
    return [p]
  pieces = []
  for sent in _SENTENCE_END.split(p["text"]):
    toks = sent.split()
    pieces += [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)]
  chunks, cur = [], []
  for piece in pieces:
    if cur and len(" ".join(cur + [piece]).split()) > words:
      chunks.append(" ".join(cur))
      cur = []
    cur.append(piece)
  if cur:
    chunks.append(" ".join(cur))
  return [{"id": f"{p['id']}#{k}", "title": p.get("title", ""), "text": c} for k, c in enumerate(chunks)]


def build_corpus(cfg: RagConfig, records):
  from diffrag.data import data_dir, read_passages  # pylint: disable=import-outside-toplevel
  from diffrag.retrieval import Corpus  # pylint: disable=import-outside-toplevel
  docs: dict[str, dict] = {}
  for source in cfg.retrieval.corpus:
    rows = [p for r in records for p in r["passages"]] if source == "dataset" else \
        read_passages(data_dir(cfg.data.data_dir), source)
    for p in (c for row in rows for c in chunk_passage(row, cfg.retrieval.chunk_words)):
      if p["id"] in docs and docs[p["id"]]["text"] != p["text"]:
        raise ValueError(f"passage id {p['id']!r} names two different texts in the corpus; ids must be unique")
      docs[p["id"]] = p
  if not docs:
    raise ValueError(f"the retrieval corpus {cfg.retrieval.corpus} is empty (this data set ships no passages): "
                     "set retrieval.corpus to passage sources, e.g. [squad, musique]")
  return Corpus.from_records(list(docs.values()))


def retrieve(cfg: RagConfig, records, corpus, k: int | None = None) -> dict[str, list[dict]]:
  """question id -> top-k passages [{id, text}] (text cut to max_chars)."""
  from diffrag.retrieval import (BM25Retriever, DenseRetriever, HybridRetriever, ParentRetriever,  # pylint: disable=import-outside-toplevel
                                 default_encoder, parents_of)
  k, cut = k or cfg.retrieval.k, cfg.retrieval.max_chars
  if cfg.retrieval.retriever == "gold":
    chunks = lambda r: [c for p in r["passages"] for c in chunk_passage(p, cfg.retrieval.chunk_words)]
    return {r["id"]: [{"id": p["id"], "text": corpus_text(p)[:cut]} for p in chunks(r)[:k]] for r in records}
  kinds = {"bm25": ["bm25"], "dense": ["dense"], "hybrid": ["bm25", "dense"]}.get(cfg.retrieval.retriever)
  if kinds is None:
    raise ValueError(f"retrieval.retriever={cfg.retrieval.retriever!r}; expected dense, bm25, hybrid or gold")
  make = lambda kind, c: BM25Retriever(c) if kind == "bm25" else \
      DenseRetriever(c, default_encoder(), cache_dir=cfg.retrieval.cache_dir)
  retrievers = [make(kind, corpus) for kind in kinds]
  if cfg.retrieval.parent_fusion:
    if cfg.retrieval.chunk_words <= 0:
      raise ValueError("retrieval.parent_fusion ranks chunks by the passages they were cut from: set "
                       "retrieval.chunk_words > 0, or parent_fusion=false")
    parents, parent = parents_of(corpus)
    retrievers += [ParentRetriever(make(kind, parents), corpus, parent) for kind in kinds]
  retriever = retrievers[0] if len(retrievers) == 1 else HybridRetriever(retrievers, c=cfg.retrieval.rrf_c)
  idx, _ = retriever.search([r["question"] for r in records], min(k, len(corpus)))
  return {r["id"]: [{"id": corpus.ids[j], "text": corpus.document(j)[:cut]} for j in row]
          for r, row in zip(records, idx)}


def corpus_text(p: dict) -> str:
  return f"{p['title']}\n{p['text']}" if p.get("title") else p["text"]


def answer_in(text: str, answers) -> bool:
  """A gold answer occurs in `text` (SQuAD-normalised substring)."""
  return any(M.occurs(a, text) for a in answers)


# ----------------------------------------------------------------------------- reader


DISTRACTOR_RETRIEVERS = ("dense", "bm25", "hybrid")


def _training_prompts(cfg: RagConfig, train, tok, spec: PromptSpec):
  """Per training question, `reader.prompt_variants` prompts: gold passage + retrieved distractors
  (variant v: the distractors at ranks [v d, (v + 1) d) of the retrieved list without the gold
  passage, the gold one at a seeded random rank, moved first if the fitting rule would cut its
  answer out). Variant 0 is the single prompt of `prompt_variants=1`. Returns (pairs, stats,
  passages {id: every passage its prompts used})."""
  corpus = build_corpus(dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, corpus=["dataset"])),
                        train)
  n_dis, n_var = cfg.reader.distractors, cfg.reader.prompt_variants
  # distractors are retrieved at chunk level only (parent_fusion is an evaluation-time choice)
  by = dataclasses.replace(cfg.retrieval, retriever=cfg.reader.distractor_retriever, parent_fusion=False)
  retrieved = retrieve(dataclasses.replace(cfg, retrieval=by), train, corpus, k=n_dis * n_var + 1) if n_dis else {}
  g, cut = cfg.generation.gen_length, cfg.retrieval.max_chars
  pairs, used, moved, missing, split = [], {}, 0, 0, 0
  for r in train:
    chunks = [c for c in chunk_passage(r["passages"][0], cfg.retrieval.chunk_words) if answer_in(c["text"], r["answers"])]
    if not chunks:
      split += 1  # the answer crosses a chunk boundary: no chunk holds it (skipped, counted)
      continue
    answer = tok(r["answers"][0], add_special_tokens=False)["input_ids"]
    if len(answer) > g - 1:
      missing += 1  # an answer longer than the canvas cannot be a target: skipped, counted
      continue
    gold = {"id": chunks[0]["id"], "text": corpus_text(chunks[0])[:cut]}
    pool = [p for p in retrieved.get(r["id"], []) if p["id"] != gold["id"]]
    seen = {}
    for v in range(n_var):
      others = pool[v * n_dis:(v + 1) * n_dis]
      if v and not others:
        break  # fewer retrieved passages than variants ask for: no further distinct prompt
      salt = f"{cfg.reader.seed}:{r['id']}" + (f":{v}" if v else "")
      rank = int(hashlib.sha1(salt.encode()).hexdigest()[:8], 16) % (len(others) + 1)
      ctx = others[:rank] + [gold] + others[rank:]
      prompt, kept, _ = build_prompt(tok, spec, r["question"], [p["text"] for p in ctx])
      if kept <= rank or not answer_in(tok.decode(prompt), r["answers"][:1]):
        ctx = [gold] + others
        prompt, kept, _ = build_prompt(tok, spec, r["question"], [p["text"] for p in ctx])
        moved += 1
      pairs.append((prompt, answer))
      seen.update({p["id"]: p for p in ctx[:kept]})
    used[r["id"]] = list(seen.values())
  stats_ = {"questions": len(train), "pairs": len(pairs), "answers_longer_than_canvas_skipped": missing,
            "answer_split_across_chunks_skipped": split, "gold_moved_first_to_fit": moved}
  return pairs, stats_, used


@dataclasses.dataclass
class ReaderRequest:
  """Everything that determines a MiniLM reader: `spec` (hashed into its artefact key), and the
  training pairs, their counts, the passages each training prompt used and the train config."""

  spec: dict
  pairs: list
  pair_stats: dict
  used: dict
  train_config: object
  tokenizer: object


def reader_request(cfg: RagConfig, train, train_info: dict, spec: PromptSpec) -> ReaderRequest:
  from diffrag.models import load_tokenizer, minilm_path  # pylint: disable=import-outside-toplevel
  from diffrag.train.loop import LoopSpec, MeshSpec, ModelSpec, TrainConfig  # pylint: disable=import-outside-toplevel
  from diffrag.train.step import OptimConfig  # pylint: disable=import-outside-toplevel
  if cfg.reader.distractor_retriever not in DISTRACTOR_RETRIEVERS:
    raise ValueError(f"reader.distractor_retriever={cfg.reader.distractor_retriever!r}; expected one of "
                     f"{DISTRACTOR_RETRIEVERS} (what retrieves the training prompts' distractors)")
  if cfg.reader.prompt_variants < 1:
    raise ValueError(f"reader.prompt_variants={cfg.reader.prompt_variants}; expected an integer >= 1 (training "
                     "prompts per question)")
  tok = load_tokenizer(minilm_path())
  if not train:
    raise ValueError(f"the reader's training set ({train_info.get('name')}) has no answerable question: set "
                     "reader.train_data to a QA set with answers, or lower data.holdout")
  pairs, pair_stats, used = _training_prompts(cfg, train, tok, spec)
  g, rd = cfg.generation.gen_length, cfg.reader
  dropout = {"dropout": rd.dropout} if rd.dropout else {}  # absent at 0: readers trained before it existed match
  variants = {"prompt_variants": rd.prompt_variants} if rd.prompt_variants != 1 else {}  # likewise at 1
  tcfg = TrainConfig(model=ModelSpec(init="minilm", overrides={"copy_head": rd.copy_head, **dropout}),
                     optim=OptimConfig(lr=rd.lr, warmup_steps=rd.warmup_steps, schedule="cosine", weight_decay=0.01),
                     train=LoopSpec(steps=rd.train_steps, batch_size=rd.batch_size, seed=rd.seed, log_every=25,
                                    checkpoint_every=max(50, rd.train_steps // 6), export=True, loss_window=[-g, g],
                                    schedule=rd.schedule, weighting=rd.weighting, prefix_share=rd.prefix_share),
                     mesh=MeshSpec(data=1))
  flat = np.concatenate([np.asarray(p + [-1] + a + [-2], np.int64) for p, a in pairs])
  art_spec = {"recipe": RECIPE, "init": "all-MiniLM-L6-v2", "tokenizer": "all-MiniLM-L6-v2",
              "train_data": {k: train_info.get(k) for k in ("name", "file_fingerprint", "holdout_of")},
              "prompt": spec, "distractors": rd.distractors, "retriever": rd.distractor_retriever,
              "max_chars": cfg.retrieval.max_chars,
              "answer_canvas": g, "bucket": rd.bucket, "extractive": rd.extractive, "copy_head": rd.copy_head,
              "pairs": array_digest(flat), **dropout, **variants,
              "n_pairs": len(pairs), "optim": tcfg.optim, "train": tcfg.train}
  return ReaderRequest(art_spec, pairs, pair_stats, used, tcfg, tok)


def _minilm_reader(cfg: RagConfig, train, train_info: dict, spec: PromptSpec):
  """Trains (or reuses, on an exact spec match) the MiniLM masked-diffusion reader.

  Returns (model, params, tokenizer, record for the manifest, training prompts used).
  """
  from diffrag.data.pipeline import PairBatches, prompt_buckets  # pylint: disable=import-outside-toplevel
  from diffrag.models import from_pretrained  # pylint: disable=import-outside-toplevel
  from diffrag.train.loop import run  # pylint: disable=import-outside-toplevel
  req = reader_request(cfg, train, train_info, spec)
  g, rd, tok, tcfg = cfg.generation.gen_length, cfg.reader, req.tokenizer, req.train_config
  store = ArtefactStore(rd.store)
  art = store.get("reader", req.spec)
  reused = art.done
  if not reused:
    batches = PairBatches(req.pairs, batch_size=rd.batch_size, seed=rd.seed,
                          buckets=prompt_buckets(spec.max_prompt_tokens, rd.bucket), response_len=g,
                          pad_id=tok.pad_token_id, eos_id=tok.sep_token_id,
                          allowed="prompt" if rd.extractive else None, vocab_size=len(tok))
    t0 = time.perf_counter()
    result = run(dataclasses.replace(tcfg, train=dataclasses.replace(tcfg.train, out_dir=str(art.path / "train"))),
                 batches=iter(batches.dataset()))
    last = result.history[-1] if result.history else {}
    store.finish(art, {"steps": rd.train_steps, "batch_size": rd.batch_size,
                       "examples_seen": rd.train_steps * rd.batch_size, "pairs": len(req.pairs),
                       "answers_not_in_prompt_skipped": batches.not_allowed,
                       "wall_seconds": round(time.perf_counter() - t0, 1), "final_loss": last.get("loss"),
                       "final_masked_accuracy": last.get("masked_accuracy"), **req.pair_stats})
    print(f"reader: MiniLM trained on {len(req.pairs)} {train_info.get('name')} questions for {rd.train_steps} "
          f"steps (loss {last.get('loss', float('nan')):.3f})")
  model, params = from_pretrained(art.path / "train" / "hf")
  return model, params, tok, art.record(reused), req.used


def load_reader(cfg: RagConfig, train, train_info, spec: PromptSpec):
  """(model, params, tokenizer, artefact record or None, training prompts used {id: passages})."""
  from diffrag.models import from_pretrained, load_tokenizer  # pylint: disable=import-outside-toplevel
  if cfg.reader.checkpoint:
    model, params = from_pretrained(cfg.reader.checkpoint, dtype=cfg.reader.dtype)
    return model, params, load_tokenizer(cfg.reader.checkpoint), None, {}
  return _minilm_reader(cfg, train, train_info, spec)


# ------------------------------------------------------------------------- generation


def _rule(gen: GenerationSpec, family: str) -> str:
  rule = gen.rule if gen.rule != "auto" else ("dream" if family == "dream" else "llada")
  if rule not in ("llada", "dream"):
    raise ValueError(f"generation.rule={gen.rule!r}; expected auto, llada or dream")
  return rule


_CONFIDENCE = {"prob": T.low_confidence, "margin": T.topk_margin, "entropy": unit_entropy}


def _prompt_tokens(view):
  return view.extras["allowed_tokens"][:, None, :]


def _phrase_tokens(eos_ids: tuple[int, ...]):
  """allowed_fn of method l2r_phrase: [B, 1, V], the tokens that keep the answer a phrase of the
  prompt (`phrase_continuations`; extras "phrase_ok" and "phrase_starts", [B, P]) and EOS where the
  answer may end there. One position per window: the order is left to right."""
  def fn(view):
    if view.canvas.shape[1] != 1:
      raise ValueError(f"phrase-constrained decoding commits one position at a time, left to right; this window "
                       f"has {view.canvas.shape[1]} positions (use left_to_right_kwargs: block_length 1)")
    nxt, end = phrase_continuations(view.extras["canvas"], view.extras["block_start"], view.extras["phrase_ok"],
                                    view.extras["phrase_starts"], view.logits.shape[-1])
    end = end | ~nxt.any(axis=1)  # a row with nothing left to copy (or past its EOS) can only end
    return nxt.at[:, jnp.asarray(eos_ids)].set(end[:, None])[:, None, :]
  return fn


@functools.lru_cache(maxsize=None)
def make_transform(gen: GenerationSpec, rule: str, alpha: float | None, pooling: str,
                   extractive: bool = False, phrase_eos: tuple[int, ...] = ()) -> T.ScoreTransform:
  """Baseline (alpha None) or SPREAD chain: [extractive], candidates, confidence, [spread], commit.

  Built once per setting (cached), so every call with the same setting passes the same
  object to the jitted sampler and nothing recompiles. rule "llada": Gumbel-max candidates
  at the temperature, confidence from the clean logits, LLaDA's linear quota; "dream":
  logits / T, categorical (greedy at 0) candidates, confidence from the tempered logits
  (maskgit_plus), Dream's timestep quota with `eps`. extractive: only the tokens in
  extras["allowed_tokens"] [B, V] (the prompt's words + EOS) can be committed. phrase_eos (the
  reader's EOS ids; left-to-right only): only tokens that keep the answer a phrase of the prompt
  (`_phrase_tokens`).
  """
  conf = _CONFIDENCE.get(gen.confidence)
  if conf is None:
    raise ValueError(f"generation.confidence={gen.confidence!r}; expected one of {sorted(_CONFIDENCE)}")
  parts = [T.allowed_tokens(_prompt_tokens)] if extractive else []
  if phrase_eos:
    parts.append(T.allowed_tokens(_phrase_tokens(phrase_eos)))
  if rule == "llada":
    parts += [T.gumbel_max(gen.temperature, "float32") if gen.temperature > 0 else T.greedy(), conf()]
    quota = T.llada_quota
  else:
    parts += [T.temperature(gen.temperature), T.categorical() if gen.temperature > 0 else T.greedy(), conf()]
    quota = T.dream_quota(gen.eps)
  if alpha is not None:
    parts.append(spread(alpha, pooling))
  parts.append(T.commit_threshold(gen.threshold) if gen.threshold is not None else T.commit_top_k(quota))
  return T.chain(*parts)


def methods_of(cfg: RagConfig) -> list[tuple[str, float | None]]:
  """(name, SPREAD alpha) of every decoding method the config runs; a bad choice is an error."""
  g = cfg.generation
  if g.span_first_tokens < 0 or (g.span_first_tokens and not g.span_decoding):
    raise ValueError(f"generation.span_first_tokens={g.span_first_tokens} rescores span decoding's candidates: "
                     "set generation.span_decoding=true with it, and K >= 1 (0 turns the rescoring off)")
  out = [("baseline", None)]
  for a in cfg.spread.alphas:
    if not 0 < float(a) <= 1:
      raise ValueError(f"spread.alphas must lie in (0, 1] (alpha = 0 is the baseline, always run), got {a}")
    out.append((f"spread_a{float(a):g}", float(a)))
  if cfg.generation.span_decoding:
    out.append((SPAN, None))
    if cfg.generation.span_first_tokens:
      out.append((f"{SPAN}_k{cfg.generation.span_first_tokens}", None))
  if g.left_to_right:
    out.append((L2R, None))
  if g.left_to_right_phrases:
    out.append((L2R_PHRASE, None))
  return out


SPAN = "span"  # the method name of extractive one-pass span decoding (span_k<K>: first-token rescoring)
L2R = "l2r"    # the method name of the baseline sampler in left-to-right order (`left_to_right_kwargs`)
L2R_PHRASE = "l2r_phrase"  # l2r constrained to phrases of the prompt (`_phrase_tokens`)


def left_to_right_kwargs(gen_kw: dict) -> dict:
  """The sampler settings of method "l2r": `gen_kw` with one position per block and one step
  per position (each forward pass commits the leftmost masked position, so the sampler's
  order is the chain rule p(x_0) p(x_1 | x_0) ...), and rows stop once they have committed
  EOS (`stop_at_eos`: the text up to the first EOS is the same as without it)."""
  return {**gen_kw, "block_length": 1, "steps": gen_kw["gen_length"], "stop_at_eos": True}


def _is_alpha_method(name: str) -> bool:
  """The baseline and SPREAD rows: the sampler at some alpha (what the alpha plot draws)."""
  return name == "baseline" or name.startswith("spread_a")


def _left_pad(rows, length, pad_id):
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  return ids, mask


def answer_ids(gen_ids, eos_ids, scope: str) -> list[list[int]]:
  """The generated ids [B, G] read as answers: `first_eos` cuts before the first EOS (how
  LLaDA/Dream chat answers are read); `canvas` keeps the whole canvas (special tokens are
  dropped when decoding: the SPREAD paper's protocol). eos_ids: one id or several (stop ids)."""
  stops = {eos_ids} if isinstance(eos_ids, (int, np.integer)) else set(eos_ids)
  rows = np.asarray(gen_ids).tolist()
  if scope == "canvas":
    return rows
  return [r[:next((i for i, x in enumerate(r) if x in stops), len(r))] for r in rows]


def _check(cfg: RagConfig, model_cfg) -> None:
  g = cfg.generation
  if g.answer_scope not in ("first_eos", "canvas"):
    raise ValueError(f"generation.answer_scope={g.answer_scope!r}; expected first_eos or canvas")
  if cfg.spread.dream_hidden not in DREAM_HIDDEN:
    raise ValueError(f"spread.dream_hidden={cfg.spread.dream_hidden!r}; expected one of {DREAM_HIDDEN}")
  if cfg.spread.dream_hidden == "i_minus_1" and not model_cfg.shift_logits:
    raise ValueError("spread.dream_hidden=i_minus_1 applies to shifted-logit readers (Dream), whose logits at i "
                     "come from the state at i - 1; this reader predicts each position from its own state")
  if model_cfg.causal:  # an autoregressive reader (Llama, Qwen2): DLM-only switches are errors
    dlm_only = {"spread.alphas": bool(cfg.spread.alphas), "generation.block_length": g.block_length is not None,
                "generation.cache": g.cache != "none", "generation.threshold": g.threshold is not None,
                "generation.stop_at_eos": g.stop_at_eos, "generation.span_decoding": g.span_decoding,
                "generation.left_to_right": g.left_to_right,
                "generation.left_to_right_phrases": g.left_to_right_phrases}
    bad = [k for k, on in dlm_only.items() if on]
    if bad:
      raise ValueError(f"{bad} apply to masked diffusion readers only: this {model_cfg.family} reader is "
                       "autoregressive (it writes left to right, one token per step, so there is no masked position "
                       "to choose, no block and no cache to reuse); unset them (spread.alphas=[])")
  total, limit = cfg.prompt.max_prompt_tokens + g.gen_length, model_cfg.max_position_embeddings
  if cfg.prompt.context_limit:
    limit = min(limit, cfg.prompt.context_limit)
  if total > limit:
    raise ValueError(f"prompt.max_prompt_tokens ({cfg.prompt.max_prompt_tokens}) + generation.gen_length "
                     f"({g.gen_length}) = {total} tokens exceeds the reader's context limit of {limit} "
                     "(max_position_embeddings or prompt.context_limit): lower one of them")


# ---------------------------------------------------------------------------- leakage


def _norm_text(t: str) -> str:
  return " ".join(t.split())


def leakage(train, train_prompts: dict, evals, chunk_words: int = 0) -> dict:
  """Counts of what an evaluated question shares with the reader's training data (0 when leak-free).

  contexts_shared: evaluated questions whose gold passage (or one of its chunks) was in a
  training prompt; answers_as_training_targets: ... whose gold answer was a training target
  for the same context; answer_strings_shared_any_context: the same answer string was a
  training target for any context (information: short answers such as years recur)."""
  if not train:
    return {"questions_shared": 0, "contexts_shared": 0, "groups_shared": 0, "answers_as_training_targets": 0,
            "answer_strings_shared_any_context": 0}
  t_ids = {r["id"] for r in train}
  t_questions = {M.normalize_answer(r["question"]) for r in train}
  t_groups = {r["group"] for r in train}
  t_passages = {_norm_text(p["text"]) for ps in train_prompts.values() for p in ps}
  t_targets = {(_norm_text(corpus_text(r["passages"][0])), M.normalize_answer(r["answers"][0]))
               for r in train if r["passages"]}
  t_answers = {M.normalize_answer(r["answers"][0]) for r in train}
  gold = lambda r: _norm_text(corpus_text(r["passages"][0])) if r["passages"] else None
  out = {
      "questions_shared": sum(r["id"] in t_ids or M.normalize_answer(r["question"]) in t_questions for r in evals),
      "contexts_shared": sum(any(_norm_text(corpus_text(c)) in t_passages or _norm_text(c["text"]) in t_passages
                                 for p in r["passages"] for c in [p] + chunk_passage(p, chunk_words))
                             for r in evals),
      "groups_shared": sum(r["group"] in t_groups for r in evals if r["group"] != r["id"]),
      "answers_as_training_targets": sum(any((gold(r), M.normalize_answer(a)) in t_targets for a in r["answers"])
                                         for r in evals),
      "answer_strings_shared_any_context": sum(any(M.normalize_answer(a) in t_answers for a in r["answers"])
                                               for r in evals),
  }
  return out


# ------------------------------------------------------------------------------- run


PREDICTION_SPEC = "predictions.spec.json"
# config fields a stored prediction does not depend on: where things are written, and what
# only adds predictions (more sampled questions, more sets, more alphas: keyed by set, method, id)
_ADDS_OR_PLACES = (("data", "limit"), ("data", "also"), ("data", "cache_dir"), ("data", "data_dir"),
                   ("retrieval", "cache_dir"), ("reader", "store"), ("spread", "alphas"),
                   ("generation", "span_decoding"), ("generation", "span_first_tokens"),
                   ("generation", "left_to_right"), ("generation", "left_to_right_phrases"))


# the code a prediction is computed by (the reader's own training code is in its artefact key)
PREDICTION_CODE = ("diffrag.models", "diffrag.sampling", "diffrag.rag", "diffrag.retrieval", "diffrag.data")


def prediction_spec(cfg: RagConfig, infos: dict) -> dict:
  """What a stored prediction depends on: the config (less `_ADDS_OR_PLACES` and out_dir), the
  reader's training recipe, the fingerprints of every data file read (`infos`: name -> info)
  and the version of the code that computes predictions (`code_version(PREDICTION_CODE)`)."""
  d = dataclasses.asdict(cfg)
  d.pop("out_dir")
  for section, key in _ADDS_OR_PLACES:
    d[section].pop(key)
  files = {name: {k: (info.get("file_fingerprint") or {}).get(k) for k in ("bytes", "sha256")}  # content, not place
           for name, info in sorted(infos.items())}
  return canonical({"config": d, "reader_recipe": RECIPE, "data_files": files,
                    "code": code_version(PREDICTION_CODE)})


def _less_new_defaults(old, new, default):
  """`new` less the fields `old` lacks whose value in `new` is their `default`: settings diffrag
  added after `old` was written, left at the value every earlier run had (all nested dicts)."""
  if not isinstance(new, dict) or not isinstance(old, dict):
    return new
  default = default if isinstance(default, dict) else {}
  return {k: _less_new_defaults(old[k], v, default.get(k)) if k in old else v for k, v in new.items()
          if k in old or k not in default or default[k] != v}


def claim_out_dir(out: Path, spec: dict, defaults: dict | None = None) -> None:
  """Binds out_dir's predictions to `spec` (`prediction_spec`): written while the folder holds no
  prediction yet; once it does, a rerun with the same spec resumes and any other is an error
  naming what differs, so predictions of one config are never counted as another's. A setting
  the stored spec lacks matches when it is at its value in `defaults` (the spec of the default
  config): added to diffrag since, it cannot have changed those predictions."""
  path, preds = out / PREDICTION_SPEC, out / "predictions.jsonl"
  # the code is no setting: predictions written before it was recorded are another code's
  defaults = {k: v for k, v in (defaults or {}).items() if k != "code"}
  if preds.exists() and preds.stat().st_size:
    if not path.exists():
      raise ValueError(f"{preds} was written by a run that did not record what its predictions depend on (an "
                       f"older diffrag): move it away or set out_dir to a new folder")
    old = json.loads(path.read_text())
    compared = _less_new_defaults(old, spec, defaults)
    if old != compared:
      diff = spec_diff(old, compared)  # the real differences only, not settings added since at their default
      raise ValueError(f"{out} holds predictions of a different run ({len(diff)} field(s) differ: "
                       f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}); set out_dir to a new folder, or "
                       f"delete {preds} and {path} to start over")
    return
  out.mkdir(parents=True, exist_ok=True)
  write_json_atomic(path, spec, indent=2, sort_keys=True)


def run_rag(cfg: RagConfig, progress: bool = True) -> dict:
  methods_of(cfg)  # the decoding choices are checked before any data is read or reader trained
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  walls: dict[str, float] = {}
  t0 = time.perf_counter()
  names = list(dict.fromkeys([cfg.data.dataset] + list(cfg.data.also)))
  loaded = {name: load_set(cfg, name) for name in names}
  resolved = {info["name"]: name for name, (_, info) in loaded.items()}
  spec = cfg.prompt
  # what the reader trains on: another set, or the evaluated set's groups outside the holdout
  train, train_info, held = [], {}, {}
  if not cfg.reader.checkpoint:
    train_name = cfg.reader.train_data or cfg.data.dataset
    records, info = loaded.get(train_name) or load_set(cfg, train_name)
    if info["name"] in resolved:  # the same set is evaluated: whole groups to one side only
      train, held[info["name"]] = split_records(cfg, records)
      info = dict(info, holdout_of=[cfg.data.holdout, cfg.data.seed])
    else:
      train = records
    train = sample(train, cfg.reader.train_limit, cfg.reader.seed)
    train_info = info
  infos = {info["name"]: info for _, info in loaded.values()} | ({"reader_train": train_info} if train_info else {})
  claim_out_dir(out, prediction_spec(cfg, infos), defaults=prediction_spec(RagConfig(), infos))
  walls["load_data"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  model, params, tok, reader_record, train_prompts = load_reader(cfg, train, train_info, spec)
  walls["reader"] = time.perf_counter() - t0
  mcfg = model.config
  _check(cfg, mcfg)
  rule = _rule(cfg.generation, mcfg.family)
  eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else tok.sep_token_id
  pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (tok.pad_token_id or eos)
  encoder = None
  if cfg.drift:
    from diffrag.retrieval import default_encoder  # pylint: disable=import-outside-toplevel
    encoder = default_encoder()
  methods = methods_of(cfg)
  budget = {"train_steps": 0, "train_examples_seen": 0, "train_s": 0.0}
  if reader_record:
    budget = {"train_steps": reader_record.get("steps"), "train_examples_seen": reader_record.get("examples_seen"),
              "train_s": reader_record.get("wall_seconds")}
  done = _read_done(out / "predictions.jsonl")
  report, timings = {}, {}
  for name in names:
    records, info = loaded[name]
    evals = held.get(info["name"], records)
    evals = sample(evals, cfg.data.limit, cfg.data.seed)
    if not evals:
      raise ValueError(f"no question of {info['name']} is held out for evaluation: raise data.holdout")
    t0 = time.perf_counter()
    corpus = build_corpus(cfg, records)
    passages = retrieve(cfg, evals, corpus)
    walls[f"retrieval:{info['name']}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sw = _evaluate_set(cfg, info["name"], evals, passages, model, params, tok, methods, rule, eos, pad, encoder,
                       done, out, progress)
    walls[f"generation:{info['name']}"] = time.perf_counter() - t0
    timings[info["name"]] = {m: sw[m].timing for m in sw}
    counts = {k: info[k] for k in ("records", "without_answers_skipped")}
    counts.update(eval=len(evals), train=len(train), corpus=len(corpus))
    report[info["name"]] = {"info": info, "counts": counts,
                            "leakage": leakage(train, train_prompts, evals, cfg.retrieval.chunk_words),
                            "evals": evals, "passages": passages}
  summary = summarize(cfg, done, report, methods, timings, budget)
  write_manifest(out, config=cfg, data={n: r["info"] for n, r in report.items()} | (
      {"reader_train": train_info} if train_info else {}),
                 seeds={"generation": cfg.generation.seed, "data": cfg.data.seed, "reader": cfg.reader.seed},
                 wall_times=walls, artefacts=[reader_record] if reader_record else [])
  return summary


def _evaluate_set(cfg: RagConfig, set_name: str, evals, passages, model, params, tok, methods, rule, eos, pad,
                  encoder, done, out: Path, progress: bool) -> dict[str, Stopwatch]:
  """Answers every question of one set with every method, appending to predictions.jsonl."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  spec, gen, mcfg = cfg.prompt, cfg.generation, model.config
  shift = 1 if cfg.spread.dream_hidden == "i_minus_1" else 0
  qrep = _query_fn(model, cfg.spread.hidden_layer, cfg.spread.pooling, shift)
  extractive = cfg.reader.extractive and not cfg.reader.checkpoint
  causal = mcfg.causal
  stops = stop_ids_of(cfg.reader.checkpoint, mcfg) if causal and cfg.reader.checkpoint else (eos,)
  transforms = {"baseline": ar_sampler(gen.temperature)} if causal else \
      {n: make_transform(gen, rule, a, cfg.spread.pooling, extractive, tuple(stops) if n == L2R_PHRASE else ())
       for n, a in methods if not n.startswith(SPAN)}
  special = np.zeros(len(tok), bool)
  special[[i for i in tok.all_special_ids if i < len(tok)]] = True
  watches = {n: Stopwatch() for n, _ in methods}
  bs = gen.batch_size
  gen_kw = dict(gen_length=gen.gen_length, steps=gen.steps, block_length=gen.block_length, stop_at_eos=gen.stop_at_eos,
                hidden_layer=cfg.spread.hidden_layer, hidden_offset=shift, cache=gen.cache)
  batches = list(range(0, len(evals), bs))
  with open(out / "predictions.jsonl", "a") as sink:
    for bi, start in enumerate(tqdm(batches, desc=f"rag {set_name}", disable=not progress)):
      batch = evals[start:start + bs]
      todo = [(n, a) for n, a in methods if any((set_name, n, r["id"]) not in done for r in batch)]
      if not todo:
        continue
      rows = batch + [batch[-1]] * (bs - len(batch))  # fixed batch shape: one compilation
      built = [build_prompt(tok, spec, r["question"], [p["text"] for p in passages[r["id"]]]) for r in rows]
      ids, mask = _left_pad([b.ids for b in built], spec.max_prompt_tokens, pad)
      q_tok = [tok(r["question"], add_special_tokens=False)["input_ids"][:QUERY_TOKENS] for r in rows]
      q_ids, q_mask = _left_pad(q_tok, QUERY_TOKENS, pad)
      extras = {"query_hidden": qrep(params, q_ids, q_mask)} if not causal else {}
      if extractive:
        allowed = np.zeros((len(rows), mcfg.vocab_size), bool)
        for i, b in enumerate(built):
          allowed[i, b.ids] = True
        allowed[:, eos] = True
        extras["allowed_tokens"] = jnp.asarray(allowed)
      if cfg.spread.pooling == "max_token":
        extras["query_mask"] = jnp.asarray(q_mask)
      key = jax.random.key(gen.seed + start)
      spans_on, phrases_on = any(n.startswith(SPAN) for n, _ in todo), any(n == L2R_PHRASE for n, _ in todo)
      if spans_on or phrases_on:  # both answer with whole words of the prompt
        starts = np.zeros(ids.shape, bool)
        for i, b in enumerate(built):
          starts[i, ids.shape[1] - len(b.ids):] = word_starts(tok.convert_ids_to_tokens(b.ids))
      if spans_on:
        valid = span_candidates(ids, mask, starts, special[ids], gen.gen_length - 1)
      if phrases_on:
        phrase_extras = {**extras, "phrase_ok": jnp.asarray(mask.astype(bool) & ~special[ids]),
                         "phrase_starts": jnp.asarray(starts)}
      for name, _ in todo:
        if name.startswith(SPAN):
          k = 0 if name == SPAN else gen.span_first_tokens
          call = lambda: jax.device_get(span_decode(model, params, ids, mask, valid, eos, first_tokens=k))
        elif causal:
          call = lambda: _ar_as_sample(generate_ar(model, params, ids, key, max_new_tokens=gen.gen_length,
                                                   transform=transforms[name], attention_mask=mask, stop_ids=stops,
                                                   pad_id=pad))
        else:
          kw = left_to_right_kwargs(gen_kw) if name in (L2R, L2R_PHRASE) else gen_kw
          call = lambda: jax.device_get(generate(model, params, ids, transforms[name], key, attention_mask=mask,
                                                 extras=phrase_extras if name == L2R_PHRASE else extras, **kw))
        if watches[name].timing.compile_seconds == 0.0:  # the first batch compiles: timed apart
          with watches[name].warmup():
            sample_ = call()
        else:
          with watches[name].timed():
            sample_ = call()
        gen_ids = sample_.tokens[:, spec.max_prompt_tokens:]
        answers = answer_ids(gen_ids, stops, gen.answer_scope)
        curves = _drift(encoder, tok, [r["question"] for r in batch], gen_ids, sample_.commit_step, stops,
                        mcfg.mask_token_id, int(sample_.num_forward), gen.answer_scope) \
            if encoder is not None else [[]] * len(batch)
        for i, r in enumerate(batch):
          if (set_name, name, r["id"]) in done:
            continue
          prompt_text = tok.decode(built[i].ids, skip_special_tokens=True)
          rec = {"dataset": set_name, "method": name, "id": r["id"], "question": r["question"],
                 "answers": r["answers"], "passage_ids": [p["id"] for p in passages[r["id"]]],
                 "passages_kept": built[i].kept, "prompt_tokens_cut": built[i].cut_tokens,
                 "answer_in_prompt": answer_in(prompt_text, r["answers"]),
                 "prediction": tok.decode(answers[i], skip_special_tokens=True).strip(),
                 "commit_step": sample_.commit_step[i].tolist(),
                 "eos_first": eos_first(gen_ids[i], sample_.commit_step[i], stops),
                 "drift_curve": [None if np.isnan(v) else round(float(v), 5) for v in curves[i]],
                 "forward_passes": int(sample_.num_forward)}
          sink.write(json.dumps(rec) + "\n")
          sink.flush()
          done[(set_name, name, r["id"])] = rec
  return watches


def eos_first(gen_ids, commit_step, eos) -> bool:
  """Whether the first forward pass committed only EOS (the canvas filled from its padding end).

  gen_ids, commit_step: [G] (commit_step -1 = never committed)."""
  first = np.asarray(gen_ids)[np.asarray(commit_step) == 0]
  return bool(first.size) and bool(np.isin(first, np.asarray(list(eos))).all())


QUERY_TOKENS = 64  # questions are padded to this length for h_q (positions ignore the padding)


def _ar_as_sample(out) -> Sample:
  """An autoregressive generation as a `Sample`: position t is committed at forward pass t."""
  out = jax.device_get(out)
  g = out.logprob.shape[1]
  steps = np.broadcast_to(np.arange(g), out.logprob.shape)
  commit = np.where(steps < out.lengths[:, None], steps, -1).astype(np.int32)
  return Sample(out.tokens, commit, out.logprob, out.num_forward)


@functools.lru_cache(maxsize=None)
def _query_fn(model, hidden_layer: int, pooling: str, shift: int):
  del shift  # h_q pools the question's own states, whatever position SPREAD reads on the canvas
  return jax.jit(lambda p, ids, m: query_representation(model, p, ids, m, hidden_layer=hidden_layer, pooling=pooling))


def _drift(encoder, tok, questions, gen_ids, commit_step, eos, mask_id, steps, scope):
  """Per question, the drift curve over forward passes t = 0..steps-1 of the answer text
  committed by step t (up to a committed EOS with answer_scope first_eos). An autoregressive
  reader commits position t at step t, so its curve is over prefixes (share of the answer)."""
  eos = set(eos) if isinstance(eos, (tuple, list, set)) else {eos}
  texts = []
  for row, cs in zip(gen_ids[:len(questions)], commit_step[:len(questions)]):
    per_step = []
    for t in range(steps):
      words = []
      for x, c in zip(row.tolist(), cs.tolist()):
        if not 0 <= c <= t:
          continue
        if x in eos and scope == "first_eos":
          break
        if x != mask_id:
          words.append(x)
      per_step.append(tok.decode(words, skip_special_tokens=True))
    texts.append(per_step)
  return M.drift_curves(encoder.encode(list(questions)), texts, encoder.encode)


def _read_done(path: Path) -> dict:
  done = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        rec = json.loads(line)
        done[(rec.get("dataset", ""), rec["method"], rec["id"])] = rec
  return done


# --------------------------------------------------------------------------- summary


def _per_question(cfg, recs, passages) -> dict[str, np.ndarray]:
  scores = [M.qa_scores(r["prediction"], r["answers"]) for r in recs]
  drift = [M.rsd([np.nan if v is None else v for v in r["drift_curve"]]) if r["drift_curve"] else
           {"rsd": np.nan} for r in recs]
  out = {k: np.array([100 * s[k] for s in scores]) for k in ("em", "precision", "recall", "f1")}
  out["length"] = np.array([s["length"] for s in scores])
  out["copy_rate"] = np.array([100 * M.copy_rate(r["prediction"], [p["text"] for p in passages.get(r["id"], [])])
                               for r in recs])
  out["rsd"] = np.array([d["rsd"] for d in drift], np.float64)
  out["cut_short"] = np.array([100.0 * M.cut_short(r["prediction"], r["answers"]) for r in recs])
  out["eos_first"] = np.array([100.0 * r["eos_first"] if "eos_first" in r else np.nan for r in recs])
  return out


def summarize(cfg: RagConfig, done: dict, report: dict, methods, timings: dict, budget: dict) -> dict:
  with warnings.catch_warnings():  # NaN steps (nothing committed yet) are expected in drift curves
    warnings.simplefilter("ignore", RuntimeWarning)
    return _summarize(cfg, done, report, methods, timings, budget)


def _summarize(cfg: RagConfig, done: dict, report: dict, methods, timings: dict, budget: dict) -> dict:
  out = Path(cfg.out_dir)
  rows, curves, sets = [], {}, {}
  for set_name, rep in report.items():
    ids = [r["id"] for r in rep["evals"]]
    per = {}
    for name, alpha in methods:
      recs = [done[(set_name, name, i)] for i in ids if (set_name, name, i) in done]
      if len(recs) != len(ids):
        continue
      per[name] = (alpha, recs, _per_question(cfg, recs, rep["passages"]))
    base = per.get("baseline")
    set_rows = []
    for name, (alpha, recs, q) in per.items():
      t = timings.get(set_name, {}).get(name)
      timed_q = max(len(ids) - cfg.generation.batch_size, 1)
      f1 = stats.bootstrap_ci(q["f1"])
      prec = stats.bootstrap_ci(q["precision"])
      row = {"dataset": set_name, "method": name, "alpha": 0.0 if alpha is None else alpha, "n": len(recs),
             "em": round(float(q["em"].mean()), 2), "f1": round(f1[0], 2),
             "f1_ci": f"[{f1[1]:.2f}, {f1[2]:.2f}]", "precision": round(prec[0], 2),
             "precision_ci": f"[{prec[1]:.2f}, {prec[2]:.2f}]", "recall": round(float(q["recall"].mean()), 2),
             "answer_words": round(float(q["length"].mean()), 2),
             "distinct_%": round(100 * len({r["prediction"] for r in recs}) / len(recs), 1),
             "copy_rate": round(float(q["copy_rate"].mean()), 2),
             "rsd": round(float(np.nanmean(q["rsd"])), 4) if np.isfinite(q["rsd"]).any() else "",
             "answer_in_prompt_%": round(100 * float(np.mean([r["answer_in_prompt"] for r in recs])), 1),
             "cut_short_%": round(float(q["cut_short"].mean()), 1),
             "forward_passes": round(float(np.mean([r.get("forward_passes", np.nan) for r in recs])), 2),
             "eos_first_%": round(float(np.nanmean(q["eos_first"])), 1) if np.isfinite(q["eos_first"]).any() else ""}
      if base is not None and name != "baseline":
        for key in ("f1", "precision", "em"):
          c = stats.compare(q[key], base[2][key])
          row[f"d_{key}"] = stats.fmt_diff(c)
          row[f"p_{key}"] = stats.fmt_p(c["p"])
          row.setdefault("_compare", {})[key] = c
        both = np.isfinite(q["rsd"]) & np.isfinite(base[2]["rsd"])
        if both.any():
          c = stats.compare(q["rsd"][both], base[2]["rsd"][both])
          row["d_rsd"] = stats.fmt_diff(c, digits=4)
          row["p_rsd"] = stats.fmt_p(c["p"])
          row["_compare"]["rsd"] = c
      if t is not None:
        row["s_per_q"] = round(t.seconds / timed_q, 4) if t.calls else ""
        row["compile_s"] = round(t.compile_seconds, 2)
        row["compiles_in_timed"] = t.compiles_in_timed
      row.update(budget)
      set_rows.append(row)
      drift = [r["drift_curve"] for r in recs if r["drift_curve"]]
      if drift:
        length = max(len(c) for c in drift)
        mat = np.full((len(drift), length), np.nan)
        for i, c in enumerate(drift):
          mat[i, :len(c)] = [np.nan if v is None else v for v in c]
        curves[f"{set_name} {name}"] = np.nanmean(mat, axis=0)
    base_s = next((r.get("s_per_q") for r in set_rows if r["method"] == "baseline"), None)
    for r in set_rows:
      r["time_vs_baseline"] = round(r["s_per_q"] / base_s, 3) if base_s and r.get("s_per_q") else ""
    rows += set_rows
    sets[set_name] = {"counts": rep["counts"], "leakage": rep["leakage"], "methods": set_rows}
  table_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  table = write_table(table_rows, out, "rag")
  summary = {"config": dataclasses.asdict(cfg), "budget": budget, "sets": sets, "methods": rows}
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  _plots(out, curves, rows)
  summary["table"] = table
  return summary


def _plots(out: Path, curves: dict, rows: list[dict]) -> None:
  plt = pyplot()
  if curves:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, c in curves.items():
      ax.plot(np.linspace(0, 1, len(c)), c, label=name)
    ax.set_xlabel("share of denoising steps")
    ax.set_ylabel("cos(query, committed answer)")
    ax.set_title("semantic drift (mean over questions)")
    save_figure(fig, out / "drift.png", legend_size=7)
  if len([r for r in rows if _is_alpha_method(r["method"])]) > 1:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for set_name in dict.fromkeys(r["dataset"] for r in rows):
      pts = sorted(((r["alpha"], r["f1"], r) for r in rows
                    if r["dataset"] == set_name and _is_alpha_method(r["method"])),
                   key=lambda x: x[:2])
      xs = [p[0] for p in pts]
      ys = [p[1] for p in pts]
      err = ci_errors(ys, [p[2]["f1_ci"] for p in pts])
      ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=f"{set_name} F1")
    ax.set_xlabel("SPREAD alpha (0 = baseline)")
    ax.set_ylabel("F1 (%) with 95% interval")
    save_figure(fig, out / "alpha.png", legend_size=7)


def ci_bounds(ci: str) -> tuple[float, float]:
  """(lo, hi) of a table's interval string '[lo, hi]'."""
  lo, hi = ci.strip("[]").split(",")
  return float(lo), float(hi)


def ci_errors(values, cis) -> np.ndarray:
  """Error bars [2, n] (below, above) of `values` from their interval strings, for `errorbar`."""
  bounds = np.array([ci_bounds(c) for c in cis])
  v = np.asarray(values, float)
  return np.stack([v - bounds[:, 0], bounds[:, 1] - v])
