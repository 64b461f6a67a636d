"""`diffrag rag`: retrieval -> prompt -> masked-diffusion reader, baseline and SPREAD side by side.

Same prompts, same keys for every method; predictions are appended to predictions.jsonl as
they are made, and a rerun skips the (method, id) pairs already there. Outputs under
out_dir: predictions.jsonl, metrics.json, rag.md/rag.csv, drift.png, alpha.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.rag import metrics as M
from diffrag.rag.prompts import PromptSpec, build_prompt
from diffrag.rag.spread import query_representation, spread, unit_entropy
from diffrag.report import pyplot, save_figure, write_table
from diffrag.sampling import transforms as T
from diffrag.sampling.sampler import generate, truncate_at_eos


@dataclasses.dataclass(frozen=True)
class RagData:
  dataset: str = "squad"          # squad | musique | nq_open | hotpotqa | 2wikimultihopqa | triviaqa | popqa
  data_dir: str | None = None
  cache_dir: str = "outputs/cache/tfds"
  holdout: float = 0.25           # share of questions held out for evaluation (the rest trains a reader)
  limit: int = 0                  # evaluate at most this many held-out questions (0 = all)


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  retriever: str = "dense"        # dense (MiniLM) | bm25 | gold (the passages shipped with each question)
  corpus: list = dataclasses.field(default_factory=lambda: ["dataset"])  # "dataset" or passage sources
  k: int = 5
  max_chars: int = 2000
  cache_dir: str = "outputs/cache"


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
  checkpoint: str | None = None   # a Hugging Face LLaDA/Dream (instruct) folder, used as is
  dtype: str = "float32"
  train_steps: int = 150          # without a checkpoint: fine-tune the MiniLM warm start as a reader
  batch_size: int = 8
  lr: float = 2.0e-4
  out_dir: str = "outputs/rag/reader"


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
  gen_length: int = 16
  steps: int = 16
  block_length: int | None = None
  temperature: float = 0.0
  confidence: str = "prob"        # prob (LLaDA low_confidence / Dream maskgit_plus) | margin | entropy
  threshold: float | None = None
  stop_at_eos: bool = False       # SPREAD's paper runs all steps without EOS handling
  cache: str = "none"             # none | prefix | dual (Fast-dLLM; approximate, same for every method)
  batch_size: int = 8
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SpreadSpec:
  alphas: list = dataclasses.field(default_factory=lambda: [0.5])  # run beside the baseline (alpha = 0)
  pooling: str = "mean"           # mean | max_token
  hidden_layer: int = -1


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


def _in_holdout(qid: str, share: float) -> bool:
  return int(hashlib.sha1(qid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def load_questions(cfg: RagConfig):
  """(train records, eval records, counts): records without gold answers are skipped and counted."""
  from diffrag.data import data_dir  # pylint: disable=import-outside-toplevel
  from diffrag.data.builders import qa_records  # pylint: disable=import-outside-toplevel
  records = qa_records(data_dir(cfg.data.data_dir), cfg.data.dataset, cfg.data.cache_dir)
  answered = [r for r in records if r["answers"]]
  skipped = len(records) - len(answered)
  answered.sort(key=lambda r: r["id"])
  evals = [r for r in answered if _in_holdout(r["id"], cfg.data.holdout)]
  train = [r for r in answered if not _in_holdout(r["id"], cfg.data.holdout)]
  if cfg.data.limit:
    evals = evals[:cfg.data.limit]
  if not evals:
    raise ValueError(f"no held-out questions in {cfg.data.dataset}: raise data.holdout")
  return train, evals, {"records": len(records), "without_answers_skipped": skipped, "train": len(train),
                        "eval": len(evals)}


def build_corpus(cfg: RagConfig, records):
  from diffrag.data import data_dir, read_passages  # pylint: disable=import-outside-toplevel
  from diffrag.retrieval import Corpus  # pylint: disable=import-outside-toplevel
  docs: dict[str, dict] = {}
  for source in cfg.retrieval.corpus:
    rows = [p for r in records for p in r["passages"]] if source == "dataset" else \
        read_passages(data_dir(cfg.data.data_dir), source)
    for p in rows:
      if p["id"] in docs and docs[p["id"]]["text"] != p["text"]:
        raise ValueError(f"passage id {p['id']!r} names two different texts in the corpus; ids must be unique")
      docs[p["id"]] = p
  if not docs:
    raise ValueError(f"the retrieval corpus {cfg.retrieval.corpus} is empty (this data set ships no passages): "
                     "set retrieval.corpus to passage sources, e.g. [squad, musique]")
  return Corpus.from_records(list(docs.values()))


def retrieve(cfg: RagConfig, records, corpus) -> dict[str, list[dict]]:
  """question id -> top-k passages [{id, text}] (text cut to max_chars)."""
  from diffrag.retrieval import BM25Retriever, DenseRetriever, default_encoder  # pylint: disable=import-outside-toplevel
  k, cut = cfg.retrieval.k, cfg.retrieval.max_chars
  if cfg.retrieval.retriever == "gold":
    return {r["id"]: [{"id": p["id"], "text": corpus_text(p)[:cut]} for p in r["passages"][:k]] for r in records}
  if cfg.retrieval.retriever == "bm25":
    retriever = BM25Retriever(corpus)
  elif cfg.retrieval.retriever == "dense":
    retriever = DenseRetriever(corpus, default_encoder(), cache_dir=cfg.retrieval.cache_dir)
  else:
    raise ValueError(f"retrieval.retriever={cfg.retrieval.retriever!r}; expected dense, bm25 or gold")
  idx, _ = retriever.search([r["question"] for r in records], k)
  return {r["id"]: [{"id": corpus.ids[j], "text": corpus.document(j)[:cut]} for j in row]
          for r, row in zip(records, idx)}


def corpus_text(p: dict) -> str:
  return f"{p['title']}\n{p['text']}" if p.get("title") else p["text"]


# ----------------------------------------------------------------------------- reader


def _minilm_reader(cfg: RagConfig, train, passages, spec: PromptSpec):
  """Fine-tunes the MiniLM warm start on (passages + question -> answer) pairs, answer span masked."""
  from diffrag.data.pipeline import pair_dataset, pair_example  # pylint: disable=import-outside-toplevel
  from diffrag.models import load_tokenizer, minilm_path  # pylint: disable=import-outside-toplevel
  from diffrag.train.loop import LoopSpec, MeshSpec, ModelSpec, TrainConfig, run  # pylint: disable=import-outside-toplevel
  from diffrag.train.step import OptimConfig  # pylint: disable=import-outside-toplevel
  tok = load_tokenizer(minilm_path())
  g, p_len = cfg.generation.gen_length, spec.max_prompt_tokens
  examples = []
  for r in train:
    prompt, _ = build_prompt(tok, spec, r["question"], [x["text"] for x in passages[r["id"]]])
    answer = tok(r["answers"][0], add_special_tokens=False)["input_ids"][:g - 1]
    examples.append(pair_example(prompt, answer, prompt_len=p_len, response_len=g, pad_id=tok.pad_token_id,
                                 eos_id=tok.sep_token_id, what=f"question {r['id']}"))
  tcfg = TrainConfig(model=ModelSpec(init="minilm"),
                     optim=OptimConfig(lr=cfg.reader.lr, warmup_steps=max(1, cfg.reader.train_steps // 10),
                                       schedule="cosine", weight_decay=0.01),
                     train=LoopSpec(steps=cfg.reader.train_steps, batch_size=cfg.reader.batch_size,
                                    log_every=10, checkpoint_every=max(cfg.reader.train_steps, 1),
                                    out_dir=cfg.reader.out_dir, export=False, loss_window=[p_len, g]),
                     mesh=MeshSpec(data=1))
  batches = iter(pair_dataset(examples, batch_size=cfg.reader.batch_size, seed=0))
  result = run(tcfg, batches=batches)
  if result.history:
    last = result.history[-1]
    print(f"reader: MiniLM fine-tuned on {len(examples)} {cfg.data.dataset} questions for {cfg.reader.train_steps} "
          f"steps (loss {last['loss']:.3f}, masked accuracy {last['masked_accuracy']:.3f})")
  else:
    print(f"reader: reusing the fine-tuned MiniLM in {result.out_dir} (step {int(result.state.step)})")
  return result.model, result.state.params, tok


def load_reader(cfg: RagConfig, train, passages, spec: PromptSpec):
  """(model, params, tokenizer, uses_padding_mask)."""
  from diffrag.models import from_pretrained, load_tokenizer  # pylint: disable=import-outside-toplevel
  if cfg.reader.checkpoint:
    model, params = from_pretrained(cfg.reader.checkpoint, dtype=cfg.reader.dtype)
    return model, params, load_tokenizer(cfg.reader.checkpoint), True
  model, params, tok = _minilm_reader(cfg, train, passages, spec)
  return model, params, tok, False  # trained on left-padded prompts without a padding mask


# ------------------------------------------------------------------------- generation


def make_transform(gen: GenerationSpec, alpha: float | None, pooling: str) -> T.ScoreTransform:
  """Baseline (alpha None) or SPREAD chain: candidates, confidence, [spread], commit."""
  cand = T.gumbel_max(gen.temperature, "float32") if gen.temperature > 0 else T.greedy()
  conf = {"prob": T.low_confidence, "margin": T.topk_margin, "entropy": unit_entropy}.get(gen.confidence)
  if conf is None:
    raise ValueError(f"generation.confidence={gen.confidence!r}; expected prob, margin or entropy")
  commit = T.commit_threshold(gen.threshold) if gen.threshold is not None else T.commit_top_k()
  parts = [cand, conf()] + ([spread(alpha, pooling)] if alpha is not None else []) + [commit]
  return T.chain(*parts)


def _methods(cfg: RagConfig) -> list[tuple[str, float | None]]:
  out = [("baseline", None)]
  for a in cfg.spread.alphas:
    if not 0 < float(a) <= 1:
      raise ValueError(f"spread.alphas must lie in (0, 1] (alpha = 0 is the baseline, always run), got {a}")
    out.append((f"spread_a{float(a):g}", float(a)))
  return out


def _left_pad(rows, length, pad_id):
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  return ids, mask


def run_rag(cfg: RagConfig, progress: bool = True) -> dict:
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  out = Path(cfg.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train, evals, counts = load_questions(cfg)
  corpus = build_corpus(cfg, train + evals)
  passages = retrieve(cfg, train + evals, corpus)
  g = cfg.generation.gen_length
  spec = cfg.prompt
  model, params, tok, pad_mask = load_reader(cfg, train, passages, spec)
  mcfg = model.config
  eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else tok.sep_token_id
  pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (tok.pad_token_id or eos)
  if mcfg.positions == "learned" and spec.max_prompt_tokens + g > mcfg.max_position_embeddings:
    raise ValueError(f"prompt.max_prompt_tokens ({spec.max_prompt_tokens}) + gen_length ({g}) exceeds the "
                     f"reader's {mcfg.max_position_embeddings} positions")
  done = _read_done(out / "predictions.jsonl")
  encoder = None
  if cfg.drift:
    from diffrag.retrieval import default_encoder  # pylint: disable=import-outside-toplevel
    encoder = default_encoder()
  qrep = jax.jit(lambda p, ids, m: query_representation(model, p, ids, m, hidden_layer=cfg.spread.hidden_layer,
                                                        pooling=cfg.spread.pooling))
  methods = _methods(cfg)
  transforms = {name: make_transform(cfg.generation, alpha, cfg.spread.pooling) for name, alpha in methods}
  timing = {name: 0.0 for name, _ in methods}
  bs = cfg.generation.batch_size
  gen_kw = dict(gen_length=g, steps=cfg.generation.steps, block_length=cfg.generation.block_length,
                stop_at_eos=cfg.generation.stop_at_eos, hidden_layer=cfg.spread.hidden_layer,
                cache=cfg.generation.cache)
  with open(out / "predictions.jsonl", "a") as sink:
    for start in tqdm(range(0, len(evals), bs), desc="rag", disable=not progress):
      batch = evals[start:start + bs]
      todo = [(n, a) for n, a in methods if any((n, r["id"]) not in done for r in batch)]
      if not todo:
        continue
      rows = batch + [batch[-1]] * (bs - len(batch))  # fixed batch shape: one compilation
      prompts = [build_prompt(tok, spec, r["question"], [p["text"] for p in passages[r["id"]]])[0] for r in rows]
      ids, mask = _left_pad(prompts, spec.max_prompt_tokens, pad)
      q_tok = [tok(r["question"], add_special_tokens=False)["input_ids"][:spec.max_prompt_tokens] for r in rows]
      q_len = max(8, 1 << (max(len(q) for q in q_tok) - 1).bit_length())
      q_ids, q_mask = _left_pad(q_tok, q_len, pad)
      extras = {"query_hidden": qrep(params, q_ids, q_mask)}
      if cfg.spread.pooling == "max_token":
        extras["query_mask"] = jnp.asarray(q_mask)
      for name, _ in todo:
        t0 = time.perf_counter()
        sample = jax.device_get(generate(model, params, ids, transforms[name],
                                         jax.random.key(cfg.generation.seed + start),
                                         attention_mask=mask if pad_mask else None, extras=extras, **gen_kw))
        if start > 0:  # the first batch compiles: timed separately
          timing[name] += time.perf_counter() - t0
        else:
          timing[f"{name}_first_batch"] = time.perf_counter() - t0
        gen_ids = sample.tokens[:, spec.max_prompt_tokens:]
        answers = truncate_at_eos(gen_ids, eos)
        curves = _drift(encoder, tok, [r["question"] for r in batch], gen_ids, sample.commit_step, eos,
                        mcfg.mask_token_id, int(sample.num_forward)) if encoder is not None else [[]] * len(batch)
        for i, r in enumerate(batch):
          if (name, r["id"]) in done:
            continue
          pred = tok.decode(answers[i], skip_special_tokens=True).strip()
          curve = curves[i]
          rec = {"method": name, "id": r["id"], "question": r["question"], "answers": r["answers"],
                 "passage_ids": [p["id"] for p in passages[r["id"]]], "prediction": pred,
                 "drift_curve": [None if np.isnan(v) else round(float(v), 5) for v in curve],
                 "forward_passes": int(sample.num_forward)}
          sink.write(json.dumps(rec) + "\n")
          sink.flush()
          done[(name, r["id"])] = rec
  return summarize(cfg, done, passages, methods, counts, timing)


def _drift(encoder, tok, questions, gen_ids, commit_step, eos, mask_id, steps):
  """Per question, the drift curve over forward passes t = 0..steps-1 of the text committed
  by step t (up to a committed EOS)."""
  texts = []
  for row, cs in zip(gen_ids[:len(questions)], commit_step[:len(questions)]):
    per_step = []
    for t in range(steps):
      words = []
      for x, c in zip(row.tolist(), cs.tolist()):
        if not 0 <= c <= t:
          continue
        if x == eos:
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
        done[(rec["method"], rec["id"])] = rec
  return done


def summarize(cfg: RagConfig, done: dict, passages, methods, counts, timing) -> dict:
  with warnings.catch_warnings():  # NaN steps (nothing committed yet) are expected in drift curves
    warnings.simplefilter("ignore", RuntimeWarning)
    return _summarize(cfg, done, passages, methods, counts, timing)


def _summarize(cfg: RagConfig, done: dict, passages, methods, counts, timing) -> dict:
  out = Path(cfg.out_dir)
  rows, curves = [], {}
  for name, alpha in methods:
    recs = [r for (n, _), r in done.items() if n == name]
    if not recs:
      continue
    scores = [M.qa_scores(r["prediction"], r["answers"]) for r in recs]
    cr = [M.copy_rate(r["prediction"], [p["text"] for p in passages.get(r["id"], [])]) for r in recs]
    drift = [M.rsd([np.nan if v is None else v for v in r["drift_curve"]]) for r in recs if r["drift_curve"]]
    mean = lambda key, xs: float(np.nanmean([x[key] for x in xs])) if xs else float("nan")
    row = {"method": name, "alpha": 0.0 if alpha is None else alpha, "questions": len(recs),
           "em": round(100 * mean("em", scores), 2), "precision": round(100 * mean("precision", scores), 2),
           "recall": round(100 * mean("recall", scores), 2), "f1": round(100 * mean("f1", scores), 2),
           "answer_words": round(mean("length", scores), 2), "copy_rate": round(100 * float(np.mean(cr)), 2),
           "rsd": round(mean("rsd", drift), 4), "rsd_first_last": round(mean("first_last", drift), 4),
           "rsd_area": round(mean("area", drift), 4), "final_distance": round(mean("final_distance", drift), 4),
           "seconds": round(timing.get(name, 0.0), 2)}
    rows.append(row)
    if drift:
      length = max(len(r["drift_curve"]) for r in recs)
      mat = np.full((len(recs), length), np.nan)
      for i, r in enumerate(recs):
        mat[i, :len(r["drift_curve"])] = [np.nan if v is None else v for v in r["drift_curve"]]
      curves[name] = np.nanmean(mat, axis=0)
  base = next((r for r in rows if r["method"] == "baseline"), None)
  for r in rows:
    r["time_vs_baseline"] = round(r["seconds"] / base["seconds"], 3) if base and base["seconds"] else ""
  table = write_table(rows, out, "rag")
  summary = {"config": dataclasses.asdict(cfg), "counts": counts, "methods": rows}
  (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
  _plots(out, curves, rows)
  summary["table"] = table
  return summary


def _plots(out: Path, curves: dict, rows: list[dict]) -> None:
  plt = pyplot()
  if curves:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, c in curves.items():
      ax.plot(np.arange(1, len(c) + 1), c, label=name)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("cos(query, committed answer)")
    ax.set_title("semantic drift (mean over questions)")
    save_figure(fig, out / "drift.png")
  if len(rows) > 1:
    fig, ax = plt.subplots(figsize=(4, 3))
    pts = sorted((r["alpha"], r["precision"], r["f1"]) for r in rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="precision")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="F1")
    ax.set_xlabel("SPREAD alpha (0 = baseline)")
    ax.set_ylabel("%")
    save_figure(fig, out / "alpha.png")
