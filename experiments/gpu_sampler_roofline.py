"""Per-step sampler latency of an LLaDA-8B-shaped model (random bf16 weights) vs the roofline.

    PYTHONPATH=. python experiments/gpu_sampler_roofline.py --out bench

On one GPU: batch 1 and 8, canvas 512 (prompt 384 + answer 128, blocks of 32, one token per
step). A step's roofline is max(FLOPs / peak FLOP/s, bytes / peak bandwidth), with FLOPs of
the full forward plus the head on the 32-position block, and bytes = the weights read once
(the input embedding table is gathered, not read). Writes gpu_sampler.{md,csv}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import diffrag  # noqa: F401  (sets XLA defaults before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np

from diffrag.bench import GPU_PEAKS, forward_flops, gpu_peaks, matmul_params
from diffrag.models import MaskedDiffusionTransformer, init_params, num_params, preset
from diffrag.report import write_table
from diffrag.rag.spread import spread
from diffrag.sampling import transforms as T
from diffrag.sampling.sampler import generate


def _peaks(device) -> tuple[str, float, float]:
  found = gpu_peaks(device)
  if found is None:
    print(f"no peak figures for {device.device_kind!r} (add them to diffrag.bench.GPU_PEAKS); using H200's for a dry run")
    return "H200?", *GPU_PEAKS["H200"]
  return found


def step_roofline(cfg, batch, length, block, peak_flops, peak_bw) -> tuple[float, float, float]:
  flops = forward_flops(cfg, batch, length, head_tokens=batch * block)  # the head on the block only
  weight_bytes = 2.0 * matmul_params(cfg)  # layers + output head, bf16
  return max(flops / peak_flops, weight_bytes / peak_bw), flops, weight_bytes


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="bench")
  parser.add_argument("--prompt", type=int, default=384)
  parser.add_argument("--gen", type=int, default=128)
  parser.add_argument("--block", type=int, default=32)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--preset", default="llada-8b", help="tiny-llada for a dry run on CPU")
  args = parser.parse_args()
  dev = jax.devices()[0]
  name, peak_flops, peak_bw = _peaks(dev)
  cfg = preset(args.preset, dtype="bfloat16", param_dtype="bfloat16")
  model = MaskedDiffusionTransformer(cfg)
  t0 = time.perf_counter()
  params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
  jax.block_until_ready(params)
  print(f"{dev.device_kind}: {num_params(params) / 1e9:.2f}B random bf16 params in {time.perf_counter() - t0:.0f}s",
        flush=True)
  length = args.prompt + args.gen
  rows = []
  llada = T.llada()
  for batch in args.batches:
    prompt = np.random.default_rng(batch).integers(0, cfg.vocab_size - 2, (batch, args.prompt))
    canvas = jnp.asarray(np.concatenate([prompt, np.full((batch, args.gen), cfg.mask_token_id)], 1), jnp.int32)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, output_window=(args.prompt, args.block)))
    jax.block_until_ready(fwd(params, canvas))
    t0 = time.perf_counter()
    for _ in range(10):
      out = fwd(params, canvas)
    jax.block_until_ready(out)
    fwd_s = (time.perf_counter() - t0) / 10
    roof, flops, nbytes = step_roofline(cfg, batch, length, args.block, peak_flops, peak_bw)
    spread_chain = T.chain(T.greedy(), T.low_confidence(), spread(0.5), T.commit_top_k())
    h_q = jax.random.normal(jax.random.key(1), (batch, cfg.hidden_size))
    for mode, tr, cache in [("LLaDA low_confidence", llada, "none"), ("SPREAD alpha 0.5", spread_chain, "none"),
                            ("dual cache", llada, "dual")]:
      run = lambda: generate(model, params, prompt, tr, jax.random.key(0), gen_length=args.gen, steps=args.gen,
                             block_length=args.block, cache=cache, extras={"query_hidden": h_q})
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      sample = run()
      jax.block_until_ready(sample)
      step_s = (time.perf_counter() - t0) / args.gen
      exact = cache == "none"
      row = {"device": name, "batch": batch, "canvas": length, "mode": mode,
             "step_ms": round(step_s * 1e3, 2), "forward_only_ms": round(fwd_s * 1e3, 2) if exact else "",
             "roofline_ms": round(roof * 1e3, 2) if exact else "",
             "step_over_roofline": round(step_s / roof, 2) if exact else "",
             "achieved_TFLOPs": round(flops / step_s / 1e12, 1) if exact else "",
             "tokens_per_s": round(batch * args.gen / (step_s * args.gen), 1),
             "forward_passes": int(sample.num_forward), "first_call_s": round(compile_s, 1)}
      rows.append(row)
      print(row, flush=True)
  print(write_table(rows, Path(args.out), "gpu_sampler"))
  print(f"roofline: FLOPs/step at batch 1 = {step_roofline(cfg, 1, length, args.block, 1, 1)[1] / 1e12:.2f} T, "
        f"weights read/step = {nbytes / 1e9:.1f} GB; peaks {peak_flops / 1e12:.0f} TFLOP/s, {peak_bw / 1e12:.2f} TB/s")


if __name__ == "__main__":
  main()
