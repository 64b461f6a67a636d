"""Benchmarks (`make bench`): tables under bench/ as Markdown and CSV.

sampler: the jitted sampler vs an eager per-step Python loop over the same JAX model and
vs a PyTorch implementation of LLaDA's `generate` on the same weights (tokens must be
equal), plus Fast-dLLM threshold decoding and KV caching (tokens/s, forward passes, agreement).

train: masked-diffusion training throughput (tokens/s) of the jitted JAX step vs a
PyTorch implementation of the same loss, model and AdamW update (`transformers` Llama
with an all-visible mask for the LLaDA shape; BertForMaskedLM for MiniLM), measured in
one run on the same machine. Figures are ratios; the machines are shared and noisy.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.models import from_pretrained, init_params, minilm_path, preset
from diffrag.models.transformer import MaskedDiffusionTransformer
from diffrag.parallel import mesh as mesh_lib
from diffrag.experiment.provenance import write_manifest
from diffrag.experiment.timing import Stopwatch, count_compiles
from diffrag.report import write_table
from diffrag.train.loop import LoopSpec, MeshSpec, TrainConfig, _global_batch, compile_step
from diffrag.train.step import OptimConfig

BENCH_LLADA = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                   mlp_dim=688, mask_token_id=8191)


def _jax_train_runner(model, params, batch, loss_window=None, batches=None, loss_tokens=0):
  """(run, compile s): run(steps) trains `steps` more jitted steps (cycling through `batches`) and
  returns their tokens/s (every batch's tokens, padding included); compilation is done here."""
  cfg = TrainConfig(optim=OptimConfig(lr=1e-4, warmup_steps=1),
                    train=LoopSpec(steps=10_000, loss_window=loss_window, loss_tokens=loss_tokens),
                    mesh=MeshSpec(1, 1, 1))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1))
  batches = batches or [batch]
  sw = Stopwatch()
  with sw.warmup():
    state, step, sharding = compile_step(model, params, cfg, mesh, mesh_lib.DEFAULT_RULES)
    placed = [_global_batch(b, sharding) for b in batches]
    for b in placed:  # every shape compiles here
      state, m = step(state, b, jax.random.key(0))
    jax.block_until_ready(m)
  done = [0, state]

  def run(steps: int) -> float:
    first, state = done
    keys = [jax.random.key(first + i + 1) for i in range(steps)]
    sw.timing.seconds = 0.0
    with sw.timed():
      for i, key in enumerate(keys):
        state, m = step(state, placed[(first + i) % len(placed)], key)
      jax.block_until_ready((state, m))
    if sw.timing.compiles_in_timed:
      raise RuntimeError("the timed training steps compiled: the step must be jitted once per shape")
    done[:] = [first + steps, state]
    return sum(batches[(first + i) % len(batches)]["tokens"].size for i in range(steps)) / sw.timing.seconds

  return run, sw.timing.compile_seconds


def _torch_train_runner(torch_model, logits_of, batch, mask_id, window: int = 0):
  """run(steps) -> tokens/s of the same objective in PyTorch: t ~ U, p = (1-eps)t + eps, mask,
  CE/p at masked, AdamW. window > 0: the loss (and the output layer, via logits_of(x, window))
  on the last `window` positions. One warm-up step is taken here."""
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
    logits = logits_of(xt, window)
    target, m = (x0[:, -window:], masked[:, -window:]) if window else (x0, masked)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    loss = ((ce * m).sum(-1) / p / n).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    opt.step()

  one()

  def run(steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      one()
    return batch["tokens"].size * steps / (time.perf_counter() - t0)

  return run


def _model_gemms(cfg, tokens: int, head_tokens: int) -> list[tuple[int, int, int]]:
  """The weight matmuls (M, K, N) of one forward: every layer's projections on `tokens` rows, the
  output layer (and BERT's MLM transform) on `head_tokens` rows. Attention's own products,
  norms and activations are left out."""
  d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  mlp = [(tokens, d, cfg.mlp_dim)] * (2 if cfg.mlp == "swiglu" else 1) + [(tokens, cfg.mlp_dim, d)]
  layer = [(tokens, d, q), (tokens, d, kv), (tokens, d, kv), (tokens, q, d)] + mlp
  head = ([(head_tokens, d, d)] if cfg.head == "mlm" else []) + [(head_tokens, d, cfg.vocab_size)]
  return layer * cfg.num_layers + head


def matmul_params(cfg) -> int:
  """Parameters of the weight matmuls (sum of K N over `_model_gemms`: every layer's projections
  and the output layer; the input embedding, a gather, and norms and biases excluded): the
  weights a forward reads from memory once per step (P_matmul of `train_flops`)."""
  return sum(k * n for _, k, n in _model_gemms(cfg, 1, 1))


# Dense bf16 tensor-core peak (FLOP/s) and HBM bandwidth (bytes/s) of GPUs, datasheet figures (SXM).
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def gpu_peaks(device) -> tuple[str, float, float] | None:
  """(name, peak bf16 FLOP/s, peak bytes/s) of a `jax.Device` from `GPU_PEAKS`, or None if unknown."""
  for name, (flops, bw) in GPU_PEAKS.items():
    if name in device.device_kind:
      return name, flops, bw
  return None


def forward_flops(cfg, batch: int, length: int, head_tokens: int | None = None) -> float:
  """Model FLOPs of one forward over [batch, length] tokens, 2 per multiply-add:
  2 * sum(M K N) over the weight matmuls (`_model_gemms`; the input embedding is a gather, not
  a matmul) + attention's QK^T and PV, 2 * L^2 * heads * head_dim each per layer and sequence
  (bidirectional: the whole square). The output layer runs on `head_tokens` rows (default: every
  token; 0: none, an encoder). Norms, softmax and activations are not counted."""
  tokens = batch * length
  gemms = _model_gemms(cfg, tokens, tokens if head_tokens is None else head_tokens)
  attention = 4.0 * cfg.num_layers * batch * length ** 2 * cfg.num_heads * cfg.head_dim
  return 2.0 * sum(m * k * n for m, k, n in gemms) + attention


def train_flops(cfg, batch: int, length: int, head_tokens: int | None = None) -> float:
  """Model FLOPs of one train step: 3 x `forward_flops` (the forward, and the backward's two
  products per matmul: 6 N per token for the weights, 12 L heads head_dim per token and layer
  for attention). Rematerialisation's recomputed forward is not counted: MFU, not hardware
  FLOPs utilisation."""
  return 3.0 * forward_flops(cfg, batch, length, head_tokens)


def _matmul_floor(gemms: list[tuple[int, int, int]], units: float, train: bool):
  """run(calls=1) -> `units` per second if a step did nothing but these matmuls (forward, and
  with `train` the two backward products of each: x^T g and g W^T), jitted as one program on
  this machine's XLA. The bound a step at these shapes cannot beat without doing fewer FLOPs."""
  keys = jax.random.split(jax.random.key(0), 3 * len(gemms))
  xs = [jax.random.normal(keys[3 * i], (m, k)) for i, (m, k, _) in enumerate(gemms)]
  ws = [jax.random.normal(keys[3 * i + 1], (k, n)) * 0.02 for i, (_, k, n) in enumerate(gemms)]
  cot = [jax.random.normal(keys[3 * i + 2], (m, n)) for i, (m, _, n) in enumerate(gemms)]

  def fwd(xs, ws):  # a random cotangent per product, so no backward matmul folds into a sum
    return sum(jnp.vdot(x @ w, c) for x, w, c in zip(xs, ws, cot))

  # the value too: the loss is linear in each product, so its gradient alone needs no forward matmul
  fn = jax.jit(jax.value_and_grad(fwd, argnums=(0, 1)) if train else fwd)
  jax.block_until_ready(fn(xs, ws))

  def run(calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(xs, ws)
    jax.block_until_ready(out)
    return units * calls / (time.perf_counter() - t0)

  return run


def _rounds(runs: dict, rounds: int) -> dict:
  """Calls every run once per round, in order, for `rounds` rounds, so a change in the machine's
  load hits every side alike; returns {name: np.array([rounds]) of what each call returned}."""
  out = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      out[name].append(run())
  return {name: np.asarray(v, np.float64) for name, v in out.items()}


def _settled(run, steps: int, pause_s: float = 0.3):
  """A round of `run` (steps -> rate) as `_rounds` calls it: one untimed step and a pause first, so
  the other side's threads, still spinning after its round, and its cache contents do not land in
  this side's timing."""

  def one() -> float:
    run(1)
    time.sleep(pause_s)
    return run(steps)

  return one


def _ratio(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, str]:
  """(median of the per-round rate ratios, 'min-max' of them)."""
  r = ours / theirs
  return round(float(np.median(r)), 2), f"{r.min():.2f}-{r.max():.2f}"


def bench_train(out: Path, steps: int = 8, rounds: int = 5) -> list[dict]:
  """Train-step throughput against PyTorch (same loss, model and AdamW), pretraining (every token
  maskable) and conditional (a 16-token response window), plus the RAG reader's setting. Each
  row alternates `rounds` rounds of `steps` steps of ours and PyTorch's (`_rounds`, each round
  `_settled`): median tokens/s of each, the median per-round ratio and its range."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertForMaskedLM, LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  rows = []
  rng = np.random.default_rng(0)
  cfg = preset("tiny-llada", **BENCH_LLADA)
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                       intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                       tie_word_embeddings=False, attn_implementation="sdpa"))
  full = torch.zeros((8, 1, 128, 128), dtype=torch.float32)
  bert = BertForMaskedLM.from_pretrained(str(minilm_path()), local_files_only=True)
  minilm, minilm_params = from_pretrained(minilm_path(), init_missing_head=True)

  def bert_logits(x, window):
    h = bert.bert(input_ids=x).last_hidden_state
    return bert.cls(h[:, -window:] if window else h)

  sides = [("LLaDA-shaped 4x256, V=8192", MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0)),
            lambda x, w: llama(input_ids=x, attention_mask=full, logits_to_keep=w).logits, llama, (0, cfg.vocab_size - 1),
            cfg.mask_token_id),
           ("MiniLM-L6 (BERT, V=30522)", minilm, minilm_params, bert_logits, bert, (1000, 30000), 103)]
  # the gathered head: 640 slots for 1,024 maskable tokens (about 512 masked; a draw past 640
  # takes the full path, so the loss is the same)
  objectives = (("pretraining (all 128 tokens masked-able)", 0, 0),
                ("pretraining, output layer on masked positions (640 slots)", 0, 640),
                ("conditional (16-token response)", 16, 0))
  for label, model, params, torch_logits, torch_model, (lo, hi), mask_id in sides:
    for objective, window, loss_tokens in objectives:
      maskable = np.ones((8, 128), bool) if not window else np.arange(128)[None].repeat(8, 0) >= 128 - window
      batch = {"tokens": rng.integers(lo, hi, (8, 128)).astype(np.int32), "maskable": maskable}
      ours, compile_s = _jax_train_runner(model, params, batch, loss_window=[-window, window] if window else None,
                                          loss_tokens=loss_tokens)
      theirs = _torch_train_runner(torch_model, torch_logits, batch, mask_id, window)
      head = loss_tokens or (8 * window if window else 8 * 128)
      floor = _matmul_floor(_model_gemms(model.config, 8 * 128, head), 8 * 128, train=True)
      r = _rounds({"jax": _settled(ours, steps), "torch": _settled(theirs, steps), "floor": _settled(floor, steps)},
                  rounds)
      ratio, spread = _ratio(r["jax"], r["torch"])
      rows.append({"model": label, "objective": objective, "batch": "8x128",
                   "jax_tokens_per_s": round(float(np.median(r["jax"]))),
                   "torch_tokens_per_s": round(float(np.median(r["torch"]))), "jax_over_torch": ratio,
                   "ratio_range": spread, "rounds": f"{rounds} x {steps} steps",
                   "matmul_floor_tokens_per_s": round(float(np.median(r["floor"]))),
                   "jax_share_of_floor": _ratio(r["jax"], r["floor"])[0],
                   "floor_over_torch": _ratio(r["floor"], r["torch"])[0], "jax_compile_s": round(compile_s, 1)})
      print(rows[-1], flush=True)
  rows += _bench_reader_batches(minilm, minilm_params, steps)
  return rows


def _bench_reader_batches(model, params, steps) -> list[dict]:
  """The RAG reader's training batches before and after: every prompt padded to the budget with
  the output layer on all positions, vs length buckets with the output layer on the answer only.
  Prompt lengths follow SQuAD chunks (70-160 tokens)."""
  from diffrag.data.pipeline import PairBatches, prompt_buckets  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  pairs = [(rng.integers(1000, 20000, int(rng.integers(70, 161))).tolist(), rng.integers(1000, 20000, 4).tolist())
           for _ in range(256)]
  rows = []
  for label, buckets, window in (("padded to 160, head on every position", [160], None),
                                 ("length buckets of 32, head on the 16-token answer", prompt_buckets(160, 32), [-16, 16])):
    pb = PairBatches(pairs, batch_size=16, seed=0, buckets=buckets, response_len=16, pad_id=0, eos_id=102)
    batches = [pb.batch(i) for i in range(len(pb))]
    real = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    run, compile_s = _jax_train_runner(model, params, None, loss_window=window, batches=batches)
    tps = run(steps * 2)
    per_batch = np.mean([b["tokens"].size for b in batches])
    rows.append({"model": "MiniLM reader (SQuAD-like pairs)", "objective": label, "batch": "16 pairs",
                 "jax_tokens_per_s": round(tps), "examples_per_s": round(float(16 * tps / per_batch), 1),
                 "real_tokens_share": round(float(real / per_batch), 3), "jax_compile_s": round(compile_s, 1)})
    print(rows[-1], flush=True)
  return rows


_LLADA_TO_LLAMA = [("model.transformer.wte.", "model.embed_tokens."), ("model.transformer.ln_f.", "model.norm."),
                   ("model.transformer.ff_out.", "lm_head."), ("model.transformer.blocks.", "model.layers."),
                   (".q_proj", ".self_attn.q_proj"), (".k_proj", ".self_attn.k_proj"),
                   (".v_proj", ".self_attn.v_proj"), (".attn_out", ".self_attn.o_proj"),
                   (".ff_proj", ".mlp.gate_proj"), (".up_proj", ".mlp.up_proj"), (".ff_out", ".mlp.down_proj"),
                   (".attn_norm", ".input_layernorm"), (".ff_norm", ".post_attention_layernorm")]


def _torch_llama_like(cfg, params):
  """A `transformers` Llama holding the same weights as our LLaDA-family params (via the HF layout)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  from diffrag.models import save_pretrained  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    save_pretrained(cfg, params, tmp)
    state = load_file(f"{tmp}/model.safetensors")
  renamed = {}
  for name, t in state.items():
    for a, b in _LLADA_TO_LLAMA:
      if name.startswith("model.transformer.ff_out.") and a == ".ff_out":
        continue
      name = name.replace(a, b)
    renamed[name] = t
  llama = LlamaForCausalLM(LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=False, attention_bias=False, attn_implementation="sdpa"))
  llama.load_state_dict(renamed, strict=True)
  return llama.eval()


def _torch_llada_generate(llama, prompt, *, steps, gen_length, block_length, mask_id):
  """LLaDA's generate (temperature 0, low_confidence) in PyTorch, batch rows looped for top-k."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
  x[:, :prompt.shape[1]] = torch.as_tensor(prompt)
  full = torch.zeros((x.shape[0], 1, x.shape[1], x.shape[1]))
  lp, spb = prompt.shape[1], steps // (gen_length // block_length)
  with torch.no_grad():
    for nb in range(gen_length // block_length):
      end = lp + (nb + 1) * block_length
      m = (x[:, end - block_length:end] == mask_id).sum(1, keepdim=True)
      ntt = (m // spb).repeat(1, spb) + (torch.arange(spb)[None] < (m % spb)).long()
      for i in range(spb):
        mask_index = x == mask_id
        logits = llama(input_ids=x, attention_mask=full).logits
        logits[..., mask_id] = -torch.inf
        x0 = logits.argmax(-1)
        p = torch.gather(torch.softmax(logits, -1), -1, x0[..., None])[..., 0]
        p[:, end:] = -torch.inf
        conf = torch.where(mask_index, p, -torch.inf)
        x0 = torch.where(mask_index, x0, x)
        for j in range(x.shape[0]):
          sel = torch.topk(conf[j], int(ntt[j, i])).indices
          x[j, sel] = x0[j, sel]
  return x.numpy()


def _eager_generate(model, params, prompt, *, steps, gen_length, block_length, mask_id):
  """The same algorithm as a per-step Python loop: a jitted forward, eager jnp selection."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  x = jnp.concatenate([jnp.asarray(prompt, jnp.int32),
                       jnp.full((prompt.shape[0], gen_length), mask_id, jnp.int32)], 1)
  lp, spb = prompt.shape[1], steps // (gen_length // block_length)
  pos = jnp.arange(x.shape[1])
  for nb in range(gen_length // block_length):
    end = lp + (nb + 1) * block_length
    m = int(jnp.sum(x[0, end - block_length:end] == mask_id))
    for i in range(spb):
      k = m // spb + (i < m % spb)
      logits = fwd(params, x).at[..., mask_id].set(-jnp.inf)
      x0 = jnp.argmax(logits, -1)
      p = jnp.take_along_axis(jax.nn.softmax(logits, -1), x0[..., None], -1)[..., 0]
      conf = jnp.where((x == mask_id) & (pos < end)[None], p, -jnp.inf)
      sel = jax.lax.top_k(conf, k)[1]
      rows = jnp.arange(x.shape[0])[:, None]
      x = x.at[rows, sel].set(x0[rows, sel])
  return np.asarray(x)


def _timed(fn, repeat=3, strict=True):
  """(output, XLA compile seconds of the first call, best of `repeat` later calls in s); raises
  if a timed call compiled (the timing would not be steady state), unless `strict=False` (the
  eager per-op loop, whose ops are cached after the warm-up anyway). The compile seconds are
  XLA's own (`count_compiles`): a first call minus a later one mixes in the machine's noise
  and can come out negative when nothing compiles."""
  sw = Stopwatch()
  with sw.warmup(), count_compiles() as compiled:
    out = jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeat):
    lap = Stopwatch()
    with lap.timed():
      out = jax.block_until_ready(fn())
    best = min(best, lap.timing.seconds)
    sw.timing.compiles_in_timed += lap.timing.compiles_in_timed
  if strict and sw.timing.compiles_in_timed:
    raise RuntimeError(f"a timed benchmark call compiled {sw.timing.compiles_in_timed} time(s): build the function "
                       "and its static arguments once, outside the timed calls")
  return out, compiled["seconds"], best


def _rate(fn, units: int, strict: bool = True):
  """A callable that times one call of `fn` (to its outputs being ready) and returns units/s;
  raises if that call compiled, unless `strict=False`."""

  def run() -> float:
    lap = Stopwatch()
    with lap.timed():
      jax.block_until_ready(fn())
    if strict and lap.timing.compiles_in_timed:
      raise RuntimeError("a timed benchmark call compiled: build the function and its static arguments once, "
                         "outside the timed calls")
    return units / lap.timing.seconds

  return run


def bench_sampler(out: Path, prompt_len: int = 32, rounds: int = 5) -> list[dict]:
  """Section 1 (batch 1, jit vs PyTorch vs an eager loop): every side is warmed up, then timed in
  `rounds` alternating rounds (`_rounds`); rates are medians, the ratio the median per-round one."""
  from diffrag.sampling import transforms as T  # pylint: disable=import-outside-toplevel
  from diffrag.sampling.sampler import generate  # pylint: disable=import-outside-toplevel
  rows = []
  llada = T.llada()
  # 1. Plain LLaDA generate, batch 1: jit vs eager loop vs PyTorch, equal outputs required.
  for label, cfg in [("tiny-llada 2x64, V=512", preset("tiny-llada")),
                     (f"LLaDA-shaped 4x256, V={BENCH_LLADA['vocab_size']}", preset("tiny-llada", **BENCH_LLADA))]:
    model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
    llama = _torch_llama_like(cfg, params)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size - 1, (1, prompt_len))
    for gen in (64, 256):
      kw = dict(steps=gen, gen_length=gen, block_length=32)
      sides = {"jit": (lambda: generate(model, params, prompt, llada, jax.random.key(0), **kw), True),
               "torch": (lambda: _torch_llada_generate(llama, prompt, mask_id=cfg.mask_token_id, **kw), True),
               # the eager per-op loop's ops are cached after its warm-up: its timed calls may not be "compile-free"
               "eager": (lambda: _eager_generate(model, params, prompt, mask_id=cfg.mask_token_id, **kw), False)}
      # every side gets a warm-up call (compilation, allocation), then `rounds` timed calls, alternating
      warm = {name: _timed(fn, repeat=0, strict=strict) for name, (fn, strict) in sides.items()}
      # one forward per generated token: the canvas's matmuls, the output layer on the 32-token block
      floor = _matmul_floor(_model_gemms(cfg, prompt_len + gen, 32), 1, train=False)
      r = _rounds({**{name: _rate(fn, gen, strict) for name, (fn, strict) in sides.items()},
                   "floor": lambda: floor(gen)}, rounds)
      sample, compile_s = warm["jit"][0], warm["jit"][1]
      ours, ref, eager = np.asarray(sample.tokens), warm["torch"][0], warm["eager"][0]
      vs_torch, spread = _ratio(r["jit"], r["torch"])
      rows.append({"model": label, "mode": f"LLaDA generate, prompt {prompt_len}, gen {gen}, block 32",
                   "batch": 1, "tokens_per_s": round(float(np.median(r["jit"])), 1),
                   "eager_loop_tokens_per_s": round(float(np.median(r["eager"])), 1),
                   "torch_tokens_per_s": round(float(np.median(r["torch"])), 1),
                   "speedup_vs_eager": _ratio(r["jit"], r["eager"])[0], "speedup_vs_torch": vs_torch,
                   "speedup_vs_torch_range": spread, "rounds": rounds,
                   "matmul_floor_tokens_per_s": round(float(np.median(r["floor"])), 1),
                   "share_of_floor": _ratio(r["jit"], r["floor"])[0], "floor_over_torch": _ratio(r["floor"], r["torch"])[0],
                   "forward_passes": int(sample.num_forward),
                   "same_tokens_as": f"torch {np.mean(ref == ours):.3f}, eager {np.mean(eager == ours):.3f}",
                   "compile_s": round(compile_s, 2)})
  # 2. Fast-dLLM on a RAG-like shape (long prompt, short answer) vs the plain sampler. The
  #    random weights are scaled (x5, head x20) so that outputs are diverse and confidences
  #    spread over (0, 1); a random network is chaotic, so agreement is a pessimistic figure.
  cfg = preset("tiny-llada", **BENCH_LLADA)
  model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(
      lambda path, w: w * (5.0 if "kernel" in str(path) or "embedding" in str(path) else 1.0), params)
  params = {**params, "lm_head": jax.tree.map(lambda w: w * 4.0, params["lm_head"])}
  gen, plen = 128, 512
  prompts = np.random.default_rng(1).integers(0, cfg.vocab_size - 1, (4, plen))
  base, _, base_s = _timed(lambda: generate(model, params, prompts, llada, jax.random.key(0), steps=gen,
                                            gen_length=gen, block_length=32))
  for name, tr, cache in [("plain top-k (1 token/step)", llada, "none"),
                          ("threshold 0.9", T.llada(threshold=0.9), "none"),
                          ("threshold 0.7", T.llada(threshold=0.7), "none"),
                          ("threshold 0.5", T.llada(threshold=0.5), "none"),
                          ("prefix cache", llada, "prefix"), ("dual cache", llada, "dual"),
                          ("threshold 0.9 + prefix cache", T.llada(threshold=0.9), "prefix"),
                          ("threshold 0.9 + dual cache", T.llada(threshold=0.9), "dual")]:
    steps = gen if tr is llada else gen // 32
    sample, compile_s, secs = _timed(lambda: generate(model, params, prompts, tr, jax.random.key(0), steps=steps,
                                                  gen_length=gen, block_length=32, cache=cache))
    rows.append({"model": "LLaDA-shaped 4x256 (scaled random)", "mode": f"Fast-dLLM {name}, prompt {plen}, gen {gen}",
                 "batch": prompts.shape[0], "tokens_per_s": round(prompts.shape[0] * gen / secs, 1),
                 "eager_loop_tokens_per_s": "", "torch_tokens_per_s": "", "speedup_vs_eager": "",
                 "speedup_vs_torch": "", "forward_passes": int(sample.num_forward),
                 "same_tokens_as": f"plain {np.mean(np.asarray(sample.tokens)[:, plen:] == np.asarray(base.tokens)[:, plen:]):.3f}",
                 "compile_s": round(compile_s, 2), "speedup_vs_plain": round(base_s / secs, 2)})
  return rows


def bench_encode(out: Path, data_dir: str | None = None, n_docs: int = 1500) -> list[dict]:
  """Dense encoding (MiniLM, mean pooling, max 256 tokens, batch 64) of SciFact documents:
  our Flax path against transformers' BertModel in PyTorch, same texts, embeddings compared."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import BertModel  # pylint: disable=import-outside-toplevel
  from diffrag.data import data_dir as resolve, read_beir_corpus  # pylint: disable=import-outside-toplevel
  from diffrag.retrieval import MiniLMEncoder  # pylint: disable=import-outside-toplevel
  docs = read_beir_corpus(resolve(data_dir) / "scifact")[:n_docs]
  texts = [f"{d['title']}\n{d['text']}" if d["title"] else d["text"] for d in docs]
  enc = MiniLMEncoder(max_length=256, batch_size=64)
  sw = Stopwatch()
  with sw.warmup():
    enc.encode(texts)  # every length bucket compiles here
  with sw.timed():
    ours = enc.encode(texts)
  bert = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()

  def torch_encode():
    out_ = []
    order = np.argsort([len(t) for t in texts])
    for start in range(0, len(texts), 64):
      batch = [texts[i] for i in order[start:start + 64]]
      tok = enc.tokenizer(batch, padding="longest", truncation=True, max_length=256, return_tensors="pt")
      with torch.no_grad():
        h = bert(**tok).last_hidden_state
      m = tok["attention_mask"][..., None].float()
      e = (h * m).sum(1) / m.sum(1).clamp(min=1)
      out_.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    emb = np.concatenate(out_)
    result = np.empty_like(emb)
    result[order] = emb
    return result

  torch_encode()
  t0 = time.perf_counter()
  ref = torch_encode()
  torch_s = time.perf_counter() - t0
  lengths = [min(256, len(enc.tokenizer(t)["input_ids"])) for t in texts]
  cfg = enc.model.config
  flops = sum(forward_flops(cfg, 1, n, head_tokens=0) for n in lengths)  # the encoder: no output layer
  gemm = _gemm_gflops()
  rows = [{"encoder": "all-MiniLM-L6-v2, mean pooling", "docs": len(texts), "ours_docs_per_s": round(len(texts) / sw.timing.seconds, 1),
           "torch_docs_per_s": round(len(texts) / torch_s, 1), "ours_over_torch": round(torch_s / sw.timing.seconds, 2),
           "min_cosine": round(float(np.min(np.sum(ours * ref, 1))), 6),
           "ours_gflops": round(flops / sw.timing.seconds / 1e9, 1), "gemm_peak_gflops": round(gemm, 1),
           "compile_s": round(sw.timing.compile_seconds, 1), "compiles_in_timed": sw.timing.compiles_in_timed}]
  print(rows[-1], flush=True)
  return rows


def _gemm_gflops(n: int = 2048) -> float:
  """A plain float32 n x n x n GEMM through XLA on this machine: the peak the forward is measured against."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  t0 = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(f(a))
  return 3 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def bench_ar(out: Path) -> list[dict]:
  """Greedy decoding of a causal LM: our jitted KV-cached loop against transformers' generate
  (KV cache, do_sample=False) on the same weights, tokens compared."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
  from diffrag.sampling.autoregressive import generate_ar  # pylint: disable=import-outside-toplevel
  rows = []
  for label, shape in (("tiny Llama 2x64, V=512", dict(vocab_size=512, hidden_size=64, intermediate_size=160,
                                                        num_hidden_layers=2, num_attention_heads=4)),
                       ("Llama-shaped 4x256, V=8192", dict(vocab_size=8192, hidden_size=256, intermediate_size=688,
                                                           num_hidden_layers=4, num_attention_heads=4))):
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"],
                                       max_position_embeddings=512, tie_word_embeddings=False,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
      ref.save_pretrained(tmp, safe_serialization=True)
      model, params = from_pretrained(tmp)
    for batch, new in ((1, 64), (1, 256), (8, 128)):
      prompt = np.random.default_rng(0).integers(3, shape["vocab_size"], (batch, 32))
      out_, compile_s, ours = _timed(lambda: generate_ar(model, params, prompt, jax.random.key(0),
                                                         max_new_tokens=new, stop_ids=()), repeat=2)
      with torch.no_grad():
        run = lambda: ref.generate(torch.tensor(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                   pad_token_id=0)
        want = run()
        t0 = time.perf_counter()
        want = run()
        torch_s = time.perf_counter() - t0
      same = float(np.mean(np.asarray(out_.tokens)[:, 32:] == want.numpy()[:, 32:]))
      rows.append({"model": label, "batch": batch, "prompt": 32, "new_tokens": new,
                   "ours_tokens_per_s": round(batch * new / ours, 1), "torch_tokens_per_s": round(batch * new / torch_s, 1),
                   "ours_over_torch": round(torch_s / ours, 2), "same_tokens": round(same, 3),
                   "compile_s": round(compile_s, 1)})
      print(rows[-1], flush=True)
  return rows


def bench_remat(out: Path, batch: int = 8, length: int = 2048) -> list[dict]:
  """Compiled memory of the llada-1b train step at batch x length per remat policy (XLA's memory
  analysis of the compiled step on abstract arrays: nothing is allocated), full softmax and tiled.
  total = temp + arguments + outputs - aliased (the donated state's buffers counted once)."""
  from diffrag.experiment.timing import compiled_memory  # pylint: disable=import-outside-toplevel
  from diffrag.models.transformer import param_shapes  # pylint: disable=import-outside-toplevel
  from diffrag.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from diffrag.diffusion import schedule as schedules  # pylint: disable=import-outside-toplevel
  rows = []
  base = preset("llada-1b")
  optim = OptimConfig(lr=1e-4, warmup_steps=1)
  tx = step_lib.make_optimizer(optim, 10)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  tokens = jax.ShapeDtypeStruct((batch, length), np.int32)
  batch_ = {"tokens": tokens, "maskable": jax.ShapeDtypeStruct((batch, length), bool)}
  for policy in ("none", "dots_saveable", "full"):
    for tile in (0, 16384):
      cfg = base.replace(remat=policy)
      model = MaskedDiffusionTransformer(cfg)
      params = param_shapes(cfg)
      state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, optim, jax.random.key(0)), params)
      step = step_lib.make_train_step(step_lib.model_apply_fn(model), tx, optim, mask_id=cfg.mask_token_id,
                                      schedule=schedules.get("linear"), vocab_tile=tile)
      t0 = time.perf_counter()
      # the state is donated, as in training (`loop.compile_step`): its update reuses its buffers
      mem = compiled_memory(jax.jit(step, donate_argnums=0).lower(abstract(state), batch_, jax.random.key(0)))
      gib = lambda k: round(mem.get(k, 0) / 2**30, 2)
      rows.append({"model": f"llada-1b ({base.num_layers}x{base.hidden_size}, V={base.vocab_size})",
                   "batch": f"{batch}x{length}", "remat": policy, "vocab_tile": tile or "none (full softmax)",
                   "temp_GB": gib("temp"), "arguments_GB": gib("arguments"), "outputs_GB": gib("outputs"),
                   "aliased_GB": gib("alias"), "total_GB": gib("total"),
                   "compile_s": round(time.perf_counter() - t0, 1)})
      print(rows[-1], flush=True)
  return rows


def synthetic_docids(n: int, kind: str, *, length: int = 16, vocab: int = 30522, eos: int = 102,
                     seed: int = 0) -> np.ndarray:
  """[n, length] unique DocIDs shaped like real ones. title: 1-14 word-piece tokens drawn from a
  Zipf distribution over the vocabulary, EOS-padded (short titles dominate, as in SciFact and
  Wikipedia); rq: 3 levels of 256 codes (cluster sizes from a Zipf law) + a collision level,
  each (level, code) its own token above `vocab`."""
  rng = np.random.default_rng(seed)
  if kind == "title":
    lengths = np.clip(rng.geometric(0.15, n), 1, length - 2)
    ranks = np.minimum(rng.zipf(1.2, (n, length)), vocab - 2000)
    codes = (1000 + ranks).astype(np.int64)
    codes[np.arange(length)[None, :] >= lengths[:, None]] = eos
    codes, first = np.unique(codes, axis=0, return_index=True)
    while len(codes) < n:  # top up duplicates with longer titles
      extra = 1000 + np.minimum(rng.zipf(1.2, (n - len(codes), length)), vocab - 2000)
      extra[:, -1] = eos
      codes = np.unique(np.concatenate([codes, extra]), axis=0)
    return rng.permutation(codes[:n])
  if kind == "rq":
    levels = np.stack([np.minimum(rng.zipf(1.3, n), 256) - 1 for _ in range(3)], 1)
    order = np.lexsort(levels.T[::-1])
    levels = levels[order]
    same = np.r_[False, np.all(levels[1:] == levels[:-1], 1)]
    collision = np.zeros(n, np.int64)
    for i in np.flatnonzero(same):
      collision[i] = collision[i - 1] + 1
    codes = np.concatenate([vocab + np.arange(3)[None] * 256 + levels, vocab + 768 + collision[:, None]], 1)
    return rng.permutation(codes)
  raise ValueError(f"synthetic DocIDs kind={kind!r}; expected title or rq")


def bench_gr(out: Path, sizes=(10_000, 100_000, 1_000_000), queries: int = 16) -> list[dict]:
  """Constrained decoding and top-k at scale: ms/query and compiled memory per mode, on a small
  random model (the constraint's cost does not depend on the model's quality)."""
  from diffrag.experiment.timing import compiled_memory  # pylint: disable=import-outside-toplevel
  from diffrag.gr import decode as D  # pylint: disable=import-outside-toplevel
  from diffrag.gr.docids import DocIDTable  # pylint: disable=import-outside-toplevel
  from diffrag.sampling.sampler import lower  # pylint: disable=import-outside-toplevel
  rows = []
  rng = np.random.default_rng(0)
  for kind in ("title", "rq"):
    for n in sizes:
      t0 = time.perf_counter()
      codes = synthetic_docids(n, kind)
      table = DocIDTable(codes, tuple(map(str, range(n))), kind)
      table.index  # pylint: disable=pointless-statement
      build_s = time.perf_counter() - t0
      vocab = int(codes.max()) + 2
      cfg = preset("tiny-bert", vocab_size=vocab, mask_token_id=vocab - 1, eos_token_id=102,
                   max_position_embeddings=64)
      model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
      prompts = rng.integers(1000, 20000, (queries, 16)).astype(np.int32)
      mask = np.ones_like(prompts)
      lc = table.length
      modes = [("T-step constrained, T=4", lambda: D.t_step(model, params, prompts, mask, table, 4, constrained=True,
                                                             batch=queries // 2),
                lambda: lower(model, params, prompts[:queries // 2], D.diffusion_chain(table), jax.random.key(0),
                              gen_length=lc, steps=4, attention_mask=mask[:queries // 2],
                              extras={"docid_index": table.index})),
               ("beam over states, B=10", lambda: D.beam_search(model, params, prompts, mask, table, 10,
                                                                batch=queries // 4),
                lambda: D._beam.lower(params, prompts[:queries // 4], mask[:queries // 4], table.index, model=model,
                                      beam=10, order="confidence")),
               ("one-pass top-100", lambda: D.one_pass(model, params, prompts, mask, table, 100, batch=queries // 2),
                lambda: D._one_pass.lower(params, prompts[:queries // 2], mask[:queries // 2], table.index.codes,
                                          np.zeros((n,), np.float32), model=model, k=100))]
      for name, run, lowered in modes:
        dec = run()
        mem = compiled_memory(lowered())
        rows.append({"docids": kind, "N": n, "Lc": lc, "mode": name, "ms_per_query": round(dec.ms_per_query, 1),
                     "forward_passes": round(dec.forward, 2), "invalid": dec.invalid,
                     "compile_s": round(dec.timing.compile_seconds, 1),
                     "compiles_in_timed": dec.timing.compiles_in_timed,
                     "compiled_temp_MB": round(mem.get("temp", 0) / 2**20, 1),
                     "index_MB": round(sum(x.nbytes for x in jax.tree.leaves(table.index)) / 2**20, 1),
                     "index_build_s": round(build_s, 2), "devices": 1})
        print(rows[-1], flush=True)
  rows += _bench_gr_sharded(queries)
  return rows


def _bench_gr_sharded(queries: int) -> list[dict]:
  """The same T-step constrained decoding on 8 fake CPU devices (queries over `data`, the DocID
  index replicated), in a subprocess (the device count is fixed when JAX starts)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = f"""
import json, time, jax, numpy as np
from diffrag.bench import synthetic_docids
from diffrag.experiment.timing import Stopwatch
from diffrag.gr import decode as D
from diffrag.gr.docids import DocIDTable
from diffrag.models import MaskedDiffusionTransformer, init_params, preset
from diffrag.parallel.mesh import MeshConfig, make_mesh
from diffrag.sampling.sampler import generate
n, q = 100_000, {queries}
codes = synthetic_docids(n, "title")
table = DocIDTable(codes, tuple(map(str, range(n))), "title")
cfg = preset("tiny-bert", vocab_size=int(codes.max()) + 2, mask_token_id=int(codes.max()) + 1, eos_token_id=102,
             max_position_embeddings=64)
model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
prompts = np.random.default_rng(0).integers(1000, 20000, (q, 16)).astype(np.int32)
mesh = make_mesh(MeshConfig(data=8))
chain = D.diffusion_chain(table)
run = lambda: jax.device_get(generate(model, params, prompts, chain, jax.random.key(0), gen_length=table.length,
                                      steps=4, extras={{"docid_index": table.index}}, mesh=mesh))
sw = Stopwatch()
with sw.warmup():
  out = run()
with sw.timed():
  out = run()
print(json.dumps({{"ms_per_query": 1000 * sw.timing.seconds / q, "invalid": int((table.decode(out.tokens[:, -table.length:]) < 0).sum()),
                  "compile_s": sw.timing.compile_seconds, "compiles_in_timed": sw.timing.compiles_in_timed,
                  "forward_passes": int(out.num_forward)}}))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
  got = json.loads(res.stdout.strip().splitlines()[-1])
  return [{"docids": "title", "N": 100_000, "Lc": 16, "mode": "T-step constrained, T=4 (8 fake devices, data=8)",
           "ms_per_query": round(got["ms_per_query"], 1), "forward_passes": got["forward_passes"],
           "invalid": got["invalid"], "compile_s": round(got["compile_s"], 1),
           "compiles_in_timed": got["compiles_in_timed"], "compiled_temp_MB": "", "index_MB": "",
           "index_build_s": "", "devices": 8}]


READER_CONFIG = "configs/rag_minilm_squad_long.yaml"


def bench_reader(out: Path, data_dir: str | None = None) -> list[dict]:
  """Fast-dLLM threshold decoding against the exact sampler on the trained long reader (SQuAD
  dev and MuSiQue-100): F1/EM paired with exact, tokens/s and forward passes
  (`diffrag.rag.parallel`). The reader is the artefact `diffrag rag --config READER_CONFIG`
  trains; without it, it is trained first (about 31 minutes on 2 cores, resumable)."""
  from diffrag.rag.parallel import decoding_sweep  # pylint: disable=import-outside-toplevel
  over = [f"data.data_dir={data_dir}"] if data_dir else []
  return decoding_sweep(READER_CONFIG, over, Path("outputs/bench/reader"))  # runs (predictions) stay out of bench/


def main(out: str = "bench", only: str | None = None, data_dir: str | None = None) -> None:
  out_dir = Path(out)
  sections = {"sampler": bench_sampler, "train": bench_train, "encode": bench_encode, "remat": bench_remat,
              "ar": bench_ar, "gr": bench_gr, "reader": bench_reader}
  if only and only not in sections:
    raise ValueError(f"unknown benchmark section {only!r}; expected one of {list(sections)}")
  walls = {}
  for name, fn in sections.items():
    if only and name != only:
      continue
    t0 = time.perf_counter()
    rows = fn(out_dir, data_dir) if name in ("encode", "reader") else fn(out_dir)
    walls[name] = time.perf_counter() - t0
    print(f"\n## {name}\n")
    print(write_table(rows, out_dir, name))
    # one manifest per section (sections are rerun one at a time with --only)
    write_manifest(out_dir / "manifests" / name, config={"section": name, "data_dir": data_dir},
                   wall_times={name: walls[name]})
