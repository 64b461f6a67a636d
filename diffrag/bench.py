"""Benchmarks (`make bench`): tables under bench/ as Markdown and CSV.

train: masked-diffusion training throughput (tokens/s) of the jitted JAX step vs a
PyTorch implementation of the same loss, model and AdamW update (`transformers` Llama
with an all-visible mask for the LLaDA shape; BertForMaskedLM for MiniLM), measured in
one run on the same machine. Figures are ratios; the machines are shared and noisy.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from diffrag.models import from_pretrained, init_params, minilm_path, preset
from diffrag.models.transformer import MaskedDiffusionTransformer
from diffrag.parallel import mesh as mesh_lib
from diffrag.report import write_table
from diffrag.train.loop import LoopSpec, MeshSpec, TrainConfig, _global_batch, compile_step
from diffrag.train.step import OptimConfig

BENCH_LLADA = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                   mlp_dim=688, mask_token_id=8191)


def _jax_train_tokens_per_s(model, params, batch, steps):
  cfg = TrainConfig(optim=OptimConfig(lr=1e-4, warmup_steps=1), train=LoopSpec(steps=steps + 2),
                    mesh=MeshSpec(1, 1, 1))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1))
  t0 = time.perf_counter()
  state, step, sharding = compile_step(model, params, cfg, mesh, mesh_lib.DEFAULT_RULES)
  b = _global_batch(batch, sharding)
  state, m = step(state, b, jax.random.key(0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = step(state, b, jax.random.key(i + 1))
  jax.block_until_ready((state, m))
  return batch["tokens"].size * steps / (time.perf_counter() - t0), compile_s


def _torch_train_tokens_per_s(torch_model, logits_of, batch, mask_id, steps):
  """The same objective in PyTorch: t ~ U, p = (1-eps)t + eps, mask, CE/p at masked, AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
  x0 = torch.tensor(batch["tokens"], dtype=torch.long)
  maskable = torch.tensor(batch["maskable"])
  n = maskable.sum(-1).clamp(min=1)

  def one():
    t = torch.rand(x0.shape[0])
    p = (1 - 1e-3) * t + 1e-3
    masked = maskable & (torch.rand(x0.shape) < p[:, None])
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = logits_of(xt)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    loss = ((ce * masked).sum(-1) / p / n).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    opt.step()

  one()
  t0 = time.perf_counter()
  for _ in range(steps):
    one()
  return batch["tokens"].size * steps / (time.perf_counter() - t0)


def bench_train(out: Path, steps: int = 10) -> list[dict]:
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertForMaskedLM, LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  rows = []
  rng = np.random.default_rng(0)
  # LLaDA-shaped (bidirectional Llama) model.
  cfg = preset("tiny-llada", **BENCH_LLADA)
  batch = {"tokens": rng.integers(0, cfg.vocab_size - 1, (8, 128)).astype(np.int32),
           "maskable": np.ones((8, 128), bool)}
  jax_tps, compile_s = _jax_train_tokens_per_s(MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0)),
                                               batch, steps)
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                       intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                       tie_word_embeddings=False, attn_implementation="sdpa"))
  full = torch.zeros((8, 1, 128, 128), dtype=torch.float32)
  torch_tps = _torch_train_tokens_per_s(llama, lambda x: llama(input_ids=x, attention_mask=full).logits, batch,
                                        cfg.mask_token_id, steps)
  rows.append({"model": f"LLaDA-shaped {cfg.num_layers}x{cfg.hidden_size}, V={cfg.vocab_size}", "batch": "8x128",
               "jax_tokens_per_s": round(jax_tps), "torch_tokens_per_s": round(torch_tps),
               "jax_over_torch": round(jax_tps / torch_tps, 2), "jax_compile_s": round(compile_s, 1)})
  # MiniLM warm start.
  model, params = from_pretrained(minilm_path(), init_missing_head=True)
  batch = {"tokens": rng.integers(1000, 30000, (8, 128)).astype(np.int32), "maskable": np.ones((8, 128), bool)}
  jax_tps, compile_s = _jax_train_tokens_per_s(model, params, batch, steps)
  bert = BertForMaskedLM.from_pretrained(str(minilm_path()), local_files_only=True)
  torch_tps = _torch_train_tokens_per_s(bert, lambda x: bert(input_ids=x).logits, batch, 103, steps)
  rows.append({"model": "MiniLM-L6 (BERT, V=30522)", "batch": "8x128", "jax_tokens_per_s": round(jax_tps),
               "torch_tokens_per_s": round(torch_tps), "jax_over_torch": round(jax_tps / torch_tps, 2),
               "jax_compile_s": round(compile_s, 1)})
  return rows


def main(out: str = "bench", only: str | None = None) -> None:
  out_dir = Path(out)
  sections = {"train": bench_train}
  for name, fn in sections.items():
    if only and name != only:
      continue
    rows = fn(out_dir)
    print(f"\n## {name}\n")
    print(write_table(rows, out_dir, name))
