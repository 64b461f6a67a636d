"""MFU and peak memory of the masked-diffusion train step on a GPU (issue 14, item 5).

    PYTHONPATH=. python experiments/gpu_train_mfu.py --out bench              # a GPU: bench/gpu_train.{md,csv}
    PYTHONPATH=. python experiments/gpu_train_mfu.py --dry-run --out /tmp/gt  # CPU, tiny shapes, the same code

Rows, each measured in its own process (so `peak_bytes_in_use` is that row's alone):
  1. `llada-1b` (16 x 2048, V = 126,464) at batch 8 x 2,048: bf16 compute with float32 master
     params and AdamW moments, the pretraining objective (every token maskable), the
     cross-entropy in vocabulary tiles (`train.vocab_tile`), one row per remat policy;
  2. `llada-8b`'s shape with FSDP over every local device and full remat: all 32 layers if XLA's
     memory analysis of the compiled step (abstract arrays, nothing allocated) fits the
     device, else the most layers that do, tried from 32 down; that row is then measured.
Each row runs the training code's own `compile_step` (the mesh, the parameter shardings, the
donated state): a first step compiles and is timed apart, then `--steps` steps are timed one
by one (median).

MFU = model FLOPs per step / step time / peak, with (`diffrag.bench.train_flops`)

    model FLOPs = 3 x [2 x sum over weight matmuls of M K N  +  4 x layers x B x L^2 x heads x head_dim]
                = 6 x P_matmul x B x L + 12 x layers x B x L^2 x heads x head_dim

P_matmul: every projection and the output layer (the input embedding is a gather); attention
counts QK^T and PV over the whole L x L square (bidirectional). Remat's recomputed forward is
not counted (MFU, not hardware FLOPs utilisation). Peak: the GPU's dense bf16 FLOP/s from its
datasheet (`diffrag.bench.GPU_PEAKS`; H100 and H200 SXM 989 TFLOP/s). The table is rewritten
after every row, so a run cut short keeps what it measured; `--budget-s` skips rows that would
start after it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# A row (a child process) may use the whole GPU, not JAX's default 75% pool; the parent only reads
# the device's kind and memory limit, so it holds no pool, or the children would find the GPU taken.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
_CHILD_ENV = dict(os.environ)
if not any(a in ("--measure", "--fits") for a in sys.argv):
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

import diffrag  # noqa: E402,F401  (sets XLA defaults before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffrag.bench import gpu_peaks, train_flops
from diffrag.diffusion import schedule as schedules
from diffrag.experiment.timing import compiled_memory
from diffrag.models import MaskedDiffusionTransformer, init_params, num_params, preset
from diffrag.models.transformer import param_shapes
from diffrag.parallel import mesh as mesh_lib
from diffrag.report import write_table
from diffrag.train import loop, step as step_lib


def _model_cfg(row: dict):
  extra = {"num_layers": row["layers"]} if row.get("layers") else {}
  return preset(row["preset"], dtype=row["dtype"], param_dtype=row["param_dtype"], remat=row["remat"],
                layer_loop="scan", **extra)


def _train_cfg(row: dict) -> loop.TrainConfig:
  mesh = loop.MeshSpec(data=1, fsdp=-1) if row["fsdp"] else loop.MeshSpec(data=-1)
  return loop.TrainConfig(
      optim=step_lib.OptimConfig(lr=1e-4, warmup_steps=10),
      train=loop.LoopSpec(steps=1000, batch_size=row["batch"], remat=row["remat"], layer_loop="scan",
                          vocab_tile=row["vocab_tile"], export=False),
      mesh=mesh)


def measure(row: dict) -> dict:
  """Runs `row`'s train step (in this process): step times, tokens/s, MFU, peak memory."""
  cfg = _model_cfg(row)
  tcfg = _train_cfg(row)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(tcfg.mesh.data, tcfg.mesh.fsdp, tcfg.mesh.tensor))
  rules = mesh_lib.DEFAULT_RULES
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  n_params = num_params(params)
  state, step, batch_sharding = loop.compile_step(MaskedDiffusionTransformer(cfg), params, tcfg, mesh, rules)
  del params
  b, length = row["batch"], row["length"]
  rng = np.random.default_rng(0)
  host = {"tokens": rng.integers(0, cfg.vocab_size - 2, (b, length)).astype(np.int32),
          "maskable": np.ones((b, length), bool)}
  batch = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics["loss"])
  first_s = time.perf_counter() - t0
  times = []
  for i in range(row["steps"]):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  flops = train_flops(cfg, b, length)
  dev = jax.local_devices()[0]
  peaks = gpu_peaks(dev)
  stats = dev.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak_gb, source = stats["peak_bytes_in_use"] / 2**30, "device peak_bytes_in_use"
  else:  # CPU: the process's peak resident memory (Linux reports KiB)
    peak_gb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host peak RSS"
  n_dev = len(jax.devices())
  return {"model": f"{row['preset']} ({cfg.num_layers}x{cfg.hidden_size}, V={cfg.vocab_size})",
          "params_B": round(n_params / 1e9, 3), "batch": f"{b}x{length}", "remat": row["remat"],
          "mesh": "fsdp" if row["fsdp"] else "data", "devices": n_dev, "vocab_tile": row["vocab_tile"] or "none",
          "step_s": round(step_s, 4), "step_range_s": f"{min(times):.4f}-{max(times):.4f}",
          "tokens_per_s": round(b * length / step_s, 1), "model_TFLOP_per_step": round(flops / 1e12, 2),
          "achieved_TFLOPs": round(flops / step_s / 1e12 / n_dev, 1),
          "MFU": round(flops / step_s / n_dev / peaks[1], 3) if peaks else "",
          "peak_memory_GB": round(peak_gb, 2), "memory_source": source, "first_step_s": round(first_s, 1),
          "loss_finite": bool(np.isfinite(float(metrics["loss"]))), "device": dev.device_kind}


def fits(row: dict, budget_bytes: float) -> dict:
  """XLA's memory analysis of `row`'s compiled step on one device (abstract arrays: nothing is
  allocated): {"total_GB", "fits"} against budget_bytes."""
  cfg = _model_cfg(row)
  tcfg = _train_cfg(row)
  tx = step_lib.make_optimizer(tcfg.optim, tcfg.train.steps)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, tcfg.optim, jax.random.key(0)), param_shapes(cfg))
  step = step_lib.make_train_step(step_lib.model_apply_fn(MaskedDiffusionTransformer(cfg)), tx, tcfg.optim,
                                  mask_id=cfg.mask_token_id, schedule=schedules.get("linear"),
                                  vocab_tile=row["vocab_tile"])
  b, length = row["batch"], row["length"]
  batch = {"tokens": jax.ShapeDtypeStruct((b, length), np.int32),
           "maskable": jax.ShapeDtypeStruct((b, length), bool)}
  mem = compiled_memory(jax.jit(step, donate_argnums=0).lower(state, batch, jax.random.key(0)))
  total = mem.get("total", 0)
  return {"total_GB": round(total / 2**30, 2), "fits": bool(total and total <= budget_bytes)}


def state_bytes(row: dict) -> int:
  """Bytes of the params, their gradients and AdamW's two moments (all in param_dtype): a lower
  bound of what the step needs, from the parameter shapes alone."""
  shapes = jax.tree_util.tree_leaves(param_shapes(_model_cfg(row)))
  return 4 * sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in shapes)


def _child(mode: str, row: dict, timeout_s: float) -> dict:
  """Runs `mode` (measure | fits) for `row` in a fresh process; its last stdout line is the JSON result."""
  cmd = [sys.executable, __file__, f"--{mode}", json.dumps(row)]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=_CHILD_ENV)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  if done.returncode != 0:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-400:] or f"exit {done.returncode}"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="bench")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes on any backend: checks the script")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
  parser.add_argument("--policies", nargs="+", default=["none", "dots_saveable", "full"])
  parser.add_argument("--budget-s", type=float, default=540, help="start no row after this many seconds")
  parser.add_argument("--memory-fraction", type=float, default=0.9,
                      help="share of the device's memory a compiled step may need to count as fitting")
  parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--fits", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure or args.fits:
    row = json.loads(args.measure or args.fits)
    if args.measure:
      print(json.dumps(measure(row)), flush=True)
    else:
      print(json.dumps(fits(row, row["budget_bytes"])), flush=True)
    return

  t_start = time.perf_counter()
  dev = jax.local_devices()[0]
  if gpu_peaks(dev) is None and not args.dry_run:
    raise SystemExit(f"no datasheet peak for {dev.device_kind!r}: add it to diffrag.bench.GPU_PEAKS, or pass "
                     "--dry-run to check the script on this backend")
  small, big = ("tiny-llada", "tiny-llada") if args.dry_run else ("llada-1b", "llada-8b")
  b, length = (2, 64) if args.dry_run else (8, 2048)
  tile = 128 if args.dry_run else 16384
  base = {"preset": small, "batch": b, "length": length, "dtype": "bfloat16", "param_dtype": "float32",
          "vocab_tile": tile, "steps": args.steps, "fsdp": False, "layers": None}
  stats = dev.memory_stats() or {}
  capacity = stats.get("bytes_limit") or stats.get("bytes_reservable_limit") or (2 * 2**30 if args.dry_run else 0)
  out = Path(args.out)
  rows: list[dict] = []
  remaining = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731

  def record(result: dict, spec: dict) -> None:
    if "error" in result:
      result = {"model": spec["preset"], "remat": spec["remat"], "batch": f"{spec['batch']}x{spec['length']}",
                "error": result["error"]}
    rows.append(result)
    print(result, flush=True)
    write_table(rows, out, "gpu_train")

  for policy in args.policies:
    if remaining() <= 0:
      print(f"budget spent: skipping remat={policy}", flush=True)
      continue
    spec = {**base, "remat": policy}
    record(_child("measure", spec, max(remaining(), 60)), spec)

  # the largest llada-8b-shaped model whose compiled step fits one device, with full remat and FSDP
  big_layers = preset(big).num_layers
  candidates = [n for n in (big_layers, 24, 16, 12, 8, 4, 2) if n <= big_layers]
  chosen, fit_rows = None, []
  for n in dict.fromkeys(candidates):
    if remaining() <= 0 or not capacity:
      break
    spec = {**base, "preset": big, "remat": "full", "fsdp": True, "layers": n,
            "budget_bytes": args.memory_fraction * capacity}
    floor = state_bytes(spec)
    if floor > spec["budget_bytes"]:  # params, gradients and both moments alone do not fit: no compile needed
      verdict = {"total_GB": f">= {floor / 2**30:.1f} (params + grads + AdamW moments)", "fits": False}
    else:
      verdict = _child("fits", spec, max(remaining(), 60))
    fit_rows.append({"model": big, "layers": n, "remat": "full", "batch": f"{b}x{length}",
                     "budget_GB": round(spec["budget_bytes"] / 2**30, 1), **verdict})
    print(fit_rows[-1], flush=True)
    write_table(fit_rows, out, "gpu_train_fit")
    if verdict.get("fits"):
      chosen = spec
      break
  if chosen and remaining() > 0:
    record(_child("measure", chosen, max(remaining(), 60)), chosen)
  elif not chosen:
    print(f"no {big}-shaped model was found to fit ({'no device memory limit known' if not capacity else 'budget'})")
  print(f"{len(rows)} rows in {out}/gpu_train.md ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
  main()
