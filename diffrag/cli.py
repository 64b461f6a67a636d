"""Command line: `diffrag demo | info`.

Names given on the command line are mapped to functions here, once, at the edge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffrag.report import write_table


def cmd_demo(args) -> int:
  """Warm-starts the MiniLM masked diffusion model and scores denoising on SQuAD passages."""
  import jax
  import jax.numpy as jnp

  from diffrag.data import data_dir, read_squad
  from diffrag.diffusion.objective import forward_process, token_nll
  from diffrag.models import from_pretrained, load_tokenizer, minilm_path, num_params

  root = data_dir(args.data_dir)
  t0 = time.perf_counter()
  model, params = from_pretrained(minilm_path(), init_missing_head=True)
  tok = load_tokenizer(minilm_path())
  cfg = model.config
  print(f"model: all-MiniLM-L6-v2 as a masked diffusion LM ({cfg.family}, {num_params(params) / 1e6:.1f}M params, "
        f"mask id {cfg.mask_token_id}), loaded in {time.perf_counter() - t0:.1f}s")
  records = read_squad(root / "squad" / "squad2_dev_small.json")
  contexts = list(dict.fromkeys(r["context"] for r in records))[: args.passages]
  # Each passage's first `length` tokens form one canvas (an explicit window, counted below).
  enc = tok(contexts, padding="max_length", truncation=True, max_length=args.length, return_tensors="np")
  windowed = sum(len(tok(c)["input_ids"]) > args.length for c in contexts)
  ids, real = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
  maskable = real.astype(bool) & (ids != tok.cls_token_id) & (ids != tok.sep_token_id)
  print(f"data: {len(contexts)} SQuAD passages from {root}, canvases of {args.length} tokens "
        f"({windowed} passages longer than the window)")

  @jax.jit
  def score(key, rate):
    xt, is_masked = forward_process(key, ids, jnp.full((ids.shape[0],), rate), maskable, cfg.mask_token_id)
    logits = model.apply({"params": params}, xt, attention_mask=real)
    nll = token_nll(logits, ids)
    n = jnp.sum(is_masked)
    acc = jnp.sum((jnp.argmax(logits, -1) == ids) & is_masked) / n
    return acc, jnp.sum(nll * is_masked) / n, n

  rows = []
  for rate in args.rates:
    t1 = time.perf_counter()
    acc, nll, n = jax.device_get(score(jax.random.key(args.seed), rate))
    rows.append({"mask_rate": rate, "masked_tokens": int(n), "accuracy": f"{acc:.3f}",
                 "nll_per_token": f"{nll:.3f}", "seconds": f"{time.perf_counter() - t1:.2f}"})
  table = write_table(rows, Path(args.out), "denoise_warm_start")
  print("\nOne-step denoising of masked SQuAD passages by the untrained warm start:\n")
  print(table)
  print(f"tables written to {args.out}/")
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


def cmd_bench(args) -> int:
  from diffrag import bench
  bench.main(args.out, args.only)
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
  demo.add_argument("--passages", type=int, default=64)
  demo.add_argument("--length", type=int, default=128)
  demo.add_argument("--rates", type=float, nargs="+", default=[0.15, 0.5, 0.9])
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(fn=cmd_demo)
  train = sub.add_parser("train", help="train / fine-tune a masked diffusion LM (resumes if checkpoints exist)")
  train.add_argument("--config", required=True, help="YAML config (see configs/)")
  train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 train.steps=50")
  train.set_defaults(fn=cmd_train)
  bench = sub.add_parser("bench", help="benchmarks; tables under --out")
  bench.add_argument("--out", default="bench")
  bench.add_argument("--only", default=None, help="run one section (train)")
  bench.add_argument("--data-dir", default=None)
  bench.set_defaults(fn=cmd_bench)
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
