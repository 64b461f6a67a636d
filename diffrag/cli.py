"""Command line: `diffrag demo | train | sample | rag | gr | bench | info`.

Names given on the command line are mapped to functions here, once, at the edge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffrag.report import markdown_table, write_table


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cmd_demo(args) -> int:
  """The main job on the real data: RAG with SPREAD on SQuAD, then generative retrieval on SciFact."""
  from diffrag import config as config_lib
  from diffrag.data import data_dir
  from diffrag.gr.pipeline import GRConfig, run_gr
  from diffrag.rag.pipeline import RagConfig, run_rag
  root = data_dir(args.data_dir)
  tables = []
  if args.only in (None, "rag"):
    cfg = config_lib.load(RagConfig, CONFIGS / "rag_minilm_squad.yaml",
                          [f"data.data_dir={root}", f"out_dir={args.out}/rag"] + list(args.rag))
    print(f"[1/2] RAG: MiniLM masked-diffusion reader trained on {cfg.reader.train_data} "
          f"({cfg.reader.train_steps} steps x {cfg.reader.batch_size}), evaluated on {cfg.data.dataset} "
          f"(+ {', '.join(cfg.data.also) or 'nothing else'}); {cfg.retrieval.retriever} retrieval (top "
          f"{cfg.retrieval.k}); answers of {cfg.generation.gen_length} tokens in {cfg.generation.steps} steps; "
          f"SPREAD alphas {cfg.spread.alphas}")
    summary = run_rag(cfg)
    tables.append(f"RAG: the baseline sampler vs SPREAD, span and left-to-right decoding, as configured (outputs in "
                  f"{cfg.out_dir}/). {rag_caption(summary)}\n\n" + summary["table"])
  if args.only in (None, "gr"):
    cfg = config_lib.load(GRConfig, CONFIGS / "gr_minilm_scifact.yaml",
                          [f"data.data_dir={root}", f"out_dir={args.out}/gr"] + list(args.gr))
    ar_steps = cfg.train.steps if cfg.train.ar_steps is None else cfg.train.ar_steps
    print(f"[2/2] Generative retrieval: {cfg.data.dataset}, {cfg.docids.kind} DocIDs, MiniLM diffusion retriever "
          f"({cfg.train.steps} steps) and its autoregressive twin "
          f"({f'{ar_steps} steps' if ar_steps else 'skipped: train.ar_steps=0'})")
    summary = run_gr(cfg)
    c = summary["counts"]
    tables.append(f"DiffuGR on SciFact: {c['eval_queries']} test queries, {c['documents']} documents; recall/MRR "
                  f"in %, latency per query on this CPU (outputs in {cfg.out_dir}/):\n\n" + summary["table"])
  print("\n" + "\n\n".join(tables))
  return 0


def _maybe_init_distributed() -> None:
  """Multi-host: one process per host, coordinated through JAX_COORDINATOR_ADDRESS."""
  import os
  import jax
  if os.environ.get("DIFFRAG_DISTRIBUTED") == "auto":  # TPU pods, SLURM: jax detects the cluster
    jax.distributed.initialize()
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all three for multi-host runs")
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))


def cmd_train(args) -> int:
  _maybe_init_distributed()
  from diffrag import config as config_lib
  from diffrag.train.loop import TrainConfig, run
  cfg = config_lib.load(TrainConfig, args.config, args.overrides)
  result = run(cfg)
  last = result.history[-1] if result.history else {}
  print(f"trained to step {int(result.state.step)}: loss {last.get('loss', float('nan')):.4f}, "
        f"masked accuracy {last.get('masked_accuracy', float('nan')):.3f}; metrics in {result.out_dir}/metrics.jsonl"
        + (f"; model exported to {result.export_dir}" if result.export_dir else ""))
  return 0


def sample_transform(args, family: str):
  """The ScoreTransform named by the sampling flags (names are mapped to functions here, once)."""
  from diffrag.sampling import transforms as T
  if args.alg is not None:
    if args.remasking is not None or args.cfg_scale:
      raise ValueError("--alg (Dream's rules) cannot be combined with --remasking/--cfg-scale (LLaDA's)")
    return T.dream(args.temperature, args.top_p, args.top_k, args.alg, args.alg_temp, threshold=args.threshold)
  if args.alg_temp is not None or args.top_p is not None or args.top_k is not None:
    raise ValueError("--alg-temp/--top-p/--top-k belong to Dream's rules: give --alg too")
  return T.llada(args.temperature, args.cfg_scale, args.remasking or "low_confidence", args.threshold)


def _prompt_ids(args, tokenizer_dir):
  if args.prompt_ids is not None:
    try:
      return [[int(t) for t in args.prompt_ids.split(",") if t.strip()]], None
    except ValueError:
      raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
  from diffrag.models import load_tokenizer
  try:
    tok = load_tokenizer(tokenizer_dir)
  except Exception as e:  # no tokenizer files in the checkpoint
    raise ValueError(f"--prompt needs a tokenizer in {tokenizer_dir} ({e}); pass --prompt-ids instead") from None
  if args.chat and getattr(tok, "chat_template", None):
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
  else:
    ids = tok(args.prompt)["input_ids"]
  return [list(ids)], tok


DLM_FLAGS = {"steps": "--steps", "block_length": "--block-length", "alg": "--alg", "alg_temp": "--alg-temp",
             "remasking": "--remasking", "threshold": "--threshold", "cfg_scale": "--cfg-scale"}


def cmd_sample(args) -> int:
  import jax
  from diffrag.models import from_pretrained
  if not Path(args.checkpoint, "config.json").exists():
    raise FileNotFoundError(f"no config.json in --checkpoint {args.checkpoint}: give a Hugging Face checkpoint folder")
  model, params = from_pretrained(args.checkpoint, dtype=args.dtype)
  prompt, tok = _prompt_ids(args, args.checkpoint)
  if model.config.causal:
    return _sample_ar(args, model, params, prompt, tok)
  if args.temperature > 0 and args.alg is None:
    jax.config.update("jax_enable_x64", True)  # LLaDA's Gumbel-max noise is float64
  from diffrag.sampling.sampler import generate, truncate_at_eos
  transform = sample_transform(args, model.config.family)
  t0 = time.perf_counter()
  out = generate(model, params, prompt, transform, jax.random.key(args.seed), gen_length=args.gen_length,
                 steps=args.steps or args.gen_length, block_length=args.block_length, cache=args.cache,
                 stop_at_eos=args.stop_at_eos)
  out = jax.device_get(out)
  seconds = time.perf_counter() - t0
  gen = out.tokens[:, len(prompt[0]):].tolist()
  eos = model.config.eos_token_id
  answers = truncate_at_eos(gen, eos) if eos is not None else gen
  text = [tok.decode(a, skip_special_tokens=True) for a in answers] if tok is not None else None
  if args.json:
    print(json.dumps({"generated_ids": gen, "text": text, "num_forward": int(out.num_forward),
                      "timing": {"seconds": round(seconds, 4), "includes_compile": True,
                                 "tokens_per_second": round(args.gen_length / seconds, 2)}}))
  else:
    print(text[0] if text is not None else " ".join(map(str, answers[0])))
    print(f"[{args.gen_length} tokens, {int(out.num_forward)} forward passes, {seconds:.2f}s incl. compile]",
          file=sys.stderr)
  return 0


def rag_caption(summary: dict) -> str:
  """What a reader of the RAG table needs: n, leakage counts, the reader's budget, the statistics."""
  parts = []
  for name, rep in summary["sets"].items():
    c, leak = rep["counts"], rep["leakage"]
    parts.append(f"{name}: {c['eval']} questions ({c['without_answers_skipped']} records without answers skipped), "
                 f"corpus {c['corpus']} passages; shared with the reader's training data: "
                 f"{leak['questions_shared']} questions, {leak['contexts_shared']} contexts, "
                 f"{leak['answers_as_training_targets']} answer targets.")
  b = summary["budget"]
  parts.append(f"Reader budget: {b['train_steps']} steps, {b['train_examples_seen']} examples seen, "
               f"{b['train_s']} s. EM/F1/precision in %, F1 and precision with 95% bootstrap intervals; d_* = "
               "difference to the baseline on the same questions [95% paired bootstrap interval], * = significant "
               "(interval excludes 0), p_* = paired randomization test; RSD = relative drop of cos(question, "
               "answer so far) from its peak to the end (lower is better); forward_passes = mean per question (per batch "
               "for l2r, which stops once every row has its EOS); s_per_q excludes compilation (compile_s).")
  return " ".join(parts)


def _sample_ar(args, model, params, prompt, tok) -> int:
  """`diffrag sample` with a causal checkpoint: KV-cached autoregressive generation."""
  import jax
  from diffrag.sampling.autoregressive import ar_sampler, generate_ar, stop_ids_of
  given = [flag for field, flag in DLM_FLAGS.items() if getattr(args, field) not in (None, 0, 0.0)]
  if args.cache != "none":
    given.append("--cache")
  if args.stop_at_eos:
    given.append("--stop-at-eos")
  if given:
    raise ValueError(f"{given} apply to masked diffusion models only; {args.checkpoint} is an autoregressive "
                     f"{model.config.family} model (it writes left to right and stops at its EOS): drop them")
  stops = stop_ids_of(args.checkpoint, model.config)
  t0 = time.perf_counter()
  out = jax.device_get(generate_ar(model, params, prompt, jax.random.key(args.seed), max_new_tokens=args.gen_length,
                                   transform=ar_sampler(args.temperature, args.top_k, args.top_p), stop_ids=stops))
  seconds = time.perf_counter() - t0
  n = int(out.lengths[0])
  gen = [out.tokens[0, len(prompt[0]):len(prompt[0]) + n].tolist()]  # up to and including the first stop id
  text = [tok.decode(g, skip_special_tokens=True) for g in gen] if tok is not None else None
  if args.json:
    print(json.dumps({"generated_ids": gen, "text": text, "num_forward": int(out.num_forward),
                      "timing": {"seconds": round(seconds, 4), "includes_compile": True,
                                 "tokens_per_second": round(n / seconds, 2)}}))
  else:
    print(text[0] if text is not None else " ".join(map(str, gen[0])))
    print(f"[{n} tokens, {int(out.num_forward)} forward passes, {seconds:.2f}s incl. compile]", file=sys.stderr)
  return 0


def cmd_rag(args) -> int:
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, run_rag
  cfg = config_lib.load(RagConfig, args.config, args.overrides)
  summary = run_rag(cfg)
  print("\n" + rag_caption(summary) + "\n")
  print(summary["table"])
  print(f"predictions, metrics.json, manifest.json, rag.md and plots in {cfg.out_dir}/")
  return 0


def cmd_gr(args) -> int:
  from diffrag import config as config_lib
  from diffrag.gr.pipeline import GRConfig, run_gr
  cfg = config_lib.load(GRConfig, args.config, args.overrides)
  summary = run_gr(cfg)
  c = summary["counts"]
  print(f"\n{cfg.data.dataset}: {c['eval_queries']} queries, {c['documents']} documents, {cfg.docids.kind} DocIDs "
        f"({c['eval_queries_dropped_relevant_not_in_corpus']} queries dropped: relevant document not in corpus)\n")
  print(summary["table"])
  print(f"run.trec ({summary['default_run']}), run_<mode>.trec, metrics.json, gr.md and plots in {cfg.out_dir}/")
  return 0


def cmd_bench(args) -> int:
  from diffrag import bench
  bench.main(args.out, args.only, args.data_dir)
  return 0


def cmd_compare(args) -> int:
  from diffrag.experiment.compare import compare_methods, compare_runs
  if args.vs and args.treatment:
    raise ValueError("give one run folder with --vs METHOD (methods of one run paired), or two folders "
                     "without it (one run against another), not both")
  if not args.vs and not args.treatment:
    raise ValueError("give a second run folder (TREATMENT) to pair two runs, or --vs METHOD to pair the methods "
                     "of one run against METHOD")
  if args.vs:
    rows = compare_methods(args.control, args.vs, args.group or None, args.metric or None)
    head = (f"run: {args.control}\ncontrol: the method {args.vs!r}, treatment: each other method (paired on the "
            "items both decoded")
  else:
    rows = compare_runs(args.control, args.treatment, args.group or None, args.metric or None)
    head = f"control: {args.control}\ntreatment: {args.treatment}\n(paired on the items both runs evaluated"
  out = Path(args.out) if args.out else None
  table = write_table(rows, out, "compare") if out else markdown_table(rows)
  print(head + ": mean difference [95% bootstrap interval], * = significant, p = randomization test)\n")
  print(table)
  if out:
    print(f"compare.md / compare.csv in {out}/")
  return 0


def cmd_info(args) -> int:
  from diffrag.models import num_params, read_hf_config
  from diffrag.models.families import config_from_hf
  from diffrag.models.transformer import param_shapes
  cfg = config_from_hf(read_hf_config(args.checkpoint), Path(args.checkpoint))
  print(json.dumps(cfg.__dict__, indent=2))
  print(f"parameters: {num_params(param_shapes(cfg)):,}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="diffrag", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="the main job on the real data in --data-dir")
  demo.add_argument("--data-dir", default=None, help="data sets folder (default $DIFFRAG_DATA_DIR or ../shared/data)")
  demo.add_argument("--out", default="outputs/demo", help="folder for tables and plots")
  demo.add_argument("--only", choices=["rag", "gr"], default=None, help="run one half of the demo")
  demo.add_argument("--rag", nargs="*", default=[], help="key=value overrides of configs/rag_minilm_squad.yaml")
  demo.add_argument("--gr", nargs="*", default=[], help="key=value overrides of configs/gr_minilm_scifact.yaml")
  demo.set_defaults(fn=cmd_demo)
  train = sub.add_parser("train", help="train / fine-tune a masked diffusion LM (resumes if checkpoints exist)")
  train.add_argument("--config", required=True, help="YAML config (see configs/)")
  train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 train.steps=50")
  train.set_defaults(fn=cmd_train)
  sample = sub.add_parser("sample", help="denoise an answer for a prompt with LLaDA / Dream / Fast-dLLM rules "
                                         "(or generate it left to right with a causal Llama / Qwen2 checkpoint)")
  sample.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder")
  what = sample.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", help="prompt text (tokenised with the checkpoint's tokenizer)")
  what.add_argument("--prompt-ids", help="prompt token ids, comma-separated")
  sample.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template")
  sample.add_argument("--gen-length", type=int, default=128)
  sample.add_argument("--steps", type=int, default=None, help="denoising steps (default: --gen-length)")
  sample.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block (default: gen length)")
  sample.add_argument("--temperature", type=float, default=0.0)
  sample.add_argument("--cfg-scale", type=float, default=0.0, help="LLaDA classifier-free guidance (0 = off)")
  sample.add_argument("--remasking", choices=["low_confidence", "random"], default=None, help="LLaDA's rule")
  sample.add_argument("--alg", choices=["origin", "maskgit_plus", "topk_margin", "entropy"], default=None,
                      help="Dream's rule (instead of --remasking)")
  sample.add_argument("--alg-temp", type=float, default=None, help="Dream: sample positions from softmax(conf/A)")
  sample.add_argument("--top-p", type=float, default=None)
  sample.add_argument("--top-k", type=int, default=None)
  sample.add_argument("--threshold", type=float, default=None, help="Fast-dLLM: commit every token with conf >= TAU")
  sample.add_argument("--cache", choices=["none", "prefix", "dual"], default="none", help="Fast-dLLM KV cache")
  sample.add_argument("--stop-at-eos", action="store_true", help="skip the blocks after a finished answer")
  sample.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  sample.add_argument("--seed", type=int, default=0)
  sample.add_argument("--json", action="store_true", help="print generated_ids and timing as JSON")
  sample.set_defaults(fn=cmd_sample)
  rag = sub.add_parser("rag", help="retrieval-augmented QA: baseline sampler vs SPREAD, with metrics and drift")
  rag.add_argument("--config", required=True, help="YAML config (see configs/rag_*.yaml)")
  rag.add_argument("overrides", nargs="*", help="key=value overrides, e.g. spread.alphas=[0.3,0.7]")
  rag.set_defaults(fn=cmd_rag)
  gr = sub.add_parser("gr", help="generative retrieval by diffusion (DiffuGR): train, decode, TREC runs, metrics")
  gr.add_argument("--config", required=True, help="YAML config (see configs/gr_*.yaml)")
  gr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. docids.kind=rq decode.beam=20")
  gr.set_defaults(fn=cmd_gr)
  bench = sub.add_parser("bench", help="benchmarks; tables under --out")
  bench.add_argument("--out", default="bench")
  bench.add_argument("--only", default=None, help="run one section: sampler | train | encode | remat | ar | gr | reader")
  bench.add_argument("--data-dir", default=None)
  bench.set_defaults(fn=cmd_bench)
  compare = sub.add_parser("compare", help="paired comparison of two rag (or two gr) run folders, or of the methods of one (--vs), on their shared "
                                           "questions / queries: difference, 95%% interval, p, n per method")
  compare.add_argument("control", help="out_dir of the reference run (with --vs: the one run)")
  compare.add_argument("treatment", nargs="?", default=None, help="out_dir of the run with the change")
  compare.add_argument("--vs", default=None, help="pair the methods of one run: every method against this one "
                                                  "(RAG: e.g. l2r, paired within each dataset; GR: e.g. bm25)")
  compare.add_argument("--group", action="append", help="only this method (RAG: dataset/method, e.g. "
                                                        "squad_v1:dev/baseline; GR: e.g. one_pass_top100); repeatable")
  compare.add_argument("--metric", action="append", help="only this metric (RAG: f1 em precision answer_words; "
                                                         "GR: ndcg@10 recall@1 recall@10 recall@100 mrr@10)")
  compare.add_argument("--out", default=None, help="also write compare.md / compare.csv here")
  compare.set_defaults(fn=cmd_compare)
  info = sub.add_parser("info", help="print the config a checkpoint directory loads as")
  info.add_argument("--checkpoint", required=True)
  info.set_defaults(fn=cmd_info)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (FileNotFoundError, ValueError) as e:  # user-actionable errors: one clear line, no traceback
    print(f"diffrag {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
