"""Shared pieces of the training tests (also imported by the distributed worker)."""

import jax
import numpy as np

from diffrag.models import init_params, preset
from diffrag.models.transformer import MaskedDiffusionTransformer
from diffrag.parallel import mesh as mesh_lib
from diffrag.train.loop import LoopSpec, MeshSpec, TrainConfig, _global_batch, compile_step
from diffrag.train.step import OptimConfig


def tiny_batch(batch=8, length=16, vocab=512, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab - 1, size=(batch, length)).astype(np.int32)
  maskable = np.ones_like(tokens, bool)
  maskable[:, :4] = False
  return {"tokens": tokens, "maskable": maskable}


def one_step(data=1, fsdp=1, tensor=1, devices=None, micro_batches=1):
  """(loss, params after one step) of tiny-llada on a (data, fsdp, tensor) mesh."""
  cfg = preset("tiny-llada")
  model = MaskedDiffusionTransformer(cfg)
  params = init_params(cfg, jax.random.key(0))
  tc = TrainConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), train=LoopSpec(steps=10, micro_batches=micro_batches),
                   mesh=MeshSpec(data, fsdp, tensor))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data, fsdp, tensor), devices)
  state, step, batch_sharding = compile_step(model, params, tc, mesh, mesh_lib.DEFAULT_RULES)
  batch = _global_batch(tiny_batch(), batch_sharding)
  state, metrics = step(state, batch, jax.random.key(7))
  return float(metrics["loss"]), state.params


def one_step_loss(data):
  return one_step(data=data)[0]


def toy_pairs(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(2, 400, int(rng.integers(3, 12))).tolist(), rng.integers(2, 400, 3).tolist())
          for _ in range(n)]


def per_host_step(shard=(0, 1), data=1):
  """(loss after one step on global batch 0, pair indices this process read) with per-host data:
  the process builds only its rows of the batch, the global array is assembled across hosts."""
  from diffrag.data.pipeline import PairBatches  # pylint: disable=import-outside-toplevel
  cfg = preset("tiny-llada")
  model = MaskedDiffusionTransformer(cfg)
  params = init_params(cfg, jax.random.key(0))
  batches = PairBatches(toy_pairs(), batch_size=8, seed=0, buckets=[8, 16], response_len=4, pad_id=0, eos_id=1,
                        shard=shard)
  tc = TrainConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), train=LoopSpec(steps=10, loss_window=[-4, 4]),
                   mesh=MeshSpec(data, 1, 1))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data, 1, 1))
  state, step, batch_sharding = compile_step(model, params, tc, mesh, mesh_lib.DEFAULT_RULES)
  batch = _global_batch(batches.batch(0), batch_sharding, per_host=shard[1] > 1)
  state, metrics = step(state, batch, jax.random.key(7))
  return float(metrics["loss"]), batches.rows(0)[1].tolist()
