"""The pure training step: (state, batch, key) -> (state, metrics), built on Optax.

batch: {"tokens": [B, L] int32 clean x_0, "maskable": [B, L] bool} - prompt positions
(and anything the loss must not corrupt) are not maskable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffrag.diffusion import schedule as schedules
from diffrag.diffusion.objective import Projected, ar_loss, diffusion_loss
from diffrag.models.transformer import output_projection, positions_from_mask, prediction_window

# Kernels that LoRA adapts, with the number of input axes of each (after the layer axis).
LORA_TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "wi": 1, "wo": 1}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay (or constant), global-norm clipping."""

  lr: float = 3e-4
  schedule: str = "cosine"  # cosine | constant
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  lora_rank: int = 0  # 0 = full fine-tuning; > 0 trains only LoRA adapters of attention/MLP kernels
  lora_alpha: float = 16.0


class TrainState(flax.struct.PyTreeNode):
  """step: scalar int32; params: what trains (the model params, or the LoRA adapters);
  opt_state: Optax state of `params`; frozen: the base model params under LoRA, else None."""

  step: jax.Array
  params: Any
  opt_state: Any
  frozen: Any = None


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """lr(s) = lr * s / warmup for s < warmup, then cosine from lr to lr * min_lr_ratio (or constant)."""
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1),
                                              max(total_steps, cfg.warmup_steps + 1), cfg.lr * cfg.min_lr_ratio)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
                                 optax.constant_schedule(cfg.lr)], [max(cfg.warmup_steps, 1)])
  raise ValueError(f"optim.schedule={cfg.schedule!r}; expected 'cosine' or 'constant'")


def _decay_mask(params):
  return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(lr schedule, decay on matrices only).

  Under LoRA the optimizer only ever sees the adapters (the base params live in
  `TrainState.frozen`), so no gradient, moment or update of the base model is materialised.
  """
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(lr_schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay,
                  mask=_decay_mask))


# ----------------------------------------------------------------------------- LoRA


def lora_init(key: jax.Array, params: dict, rank: int) -> dict:
  """Adapters for every targeted kernel W [nl, in..., out...]: A [nl, in, r] ~ N(0, 1/in), B = 0."""
  adapters = {}
  layers = params["layers"]
  for group in ("attn", "mlp"):
    for name, sub in layers.get(group, {}).items():
      if name not in LORA_TARGETS:
        continue
      w = sub["kernel"]
      n_in = LORA_TARGETS[name]
      d_in, d_out = math.prod(w.shape[1:1 + n_in]), math.prod(w.shape[1 + n_in:])
      key, sub_key = jax.random.split(key)
      a = jax.random.normal(sub_key, (w.shape[0], d_in, rank), jnp.float32) / jnp.sqrt(d_in)
      adapters.setdefault(group, {})[name] = {"a": a.astype(w.dtype), "b": jnp.zeros((w.shape[0], rank, d_out), w.dtype)}
  return adapters


def lora_merge(base: dict, adapters: dict, scale: float) -> dict:
  """W' = W + scale * reshape(A @ B): the model runs on merged kernels (pure, no module changes)."""
  layers = dict(base["layers"])
  for group, subs in adapters.items():
    layers[group] = dict(layers[group])
    for name, ab in subs.items():
      w = layers[group][name]["kernel"]
      delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]).reshape(w.shape)
      layers[group][name] = dict(layers[group][name], kernel=w + (scale * delta).astype(w.dtype))
  return dict(base, layers=layers)


def model_params(trainable, frozen, cfg: OptimConfig):
  """The model's parameter tree: the trainable params, or the base merged with its adapters."""
  if frozen is None:
    return trainable
  return lora_merge(frozen, trainable, cfg.lora_alpha / cfg.lora_rank)


def init_state(params: dict, tx: optax.GradientTransformation, cfg: OptimConfig, key: jax.Array) -> TrainState:
  if cfg.lora_rank <= 0:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  adapters = lora_init(key, params, cfg.lora_rank)
  return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters), frozen=params)


# ----------------------------------------------------------------------------- step


def model_apply_fn(model) -> Callable:
  """apply_fn(params, tokens, window=None, attention_mask=None, features=False, dropout_key=None)
  for `make_train_step`: the model's forward with `output_window=window`, the key-padding mask
  and positions that count real tokens only (`positions_from_mask`); logits, or with
  features=True a `Projected` (features + the output projection: logits never built). The
  window's logits are about its own tokens for every family (`prediction_window`). A
  dropout_key turns on the model's dropout (`ModelConfig.dropout`) for this forward."""

  def apply_fn(params, tokens, window=None, attention_mask=None, features=False, dropout_key=None):
    positions = None if attention_mask is None else positions_from_mask(attention_mask)
    if window is not None:
      window = prediction_window(model.config, *window)
    elif model.config.causal and not model.config.shift_logits:
      raise ValueError("training a causal model in Hugging Face's convention needs a loss window (train.loss_window)")
    out = model.apply({"params": params}, tokens, output_window=window, attention_mask=attention_mask,
                      positions=positions, return_features=features, deterministic=dropout_key is None,
                      rngs=None if dropout_key is None else {"dropout": dropout_key})
    if not features:
      return out
    w, b = output_projection(model.config, params)
    return Projected(out, w, b)
  return apply_fn


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, optim: OptimConfig, *, mask_id: int,
                    schedule: schedules.MaskingSchedule, micro_batches: int = 1, antithetic: bool = False,
                    loss_window: tuple[int, int] | None = None, objective: str = "diffusion", vocab_tile: int = 0,
                    output_ids=None, loss_tokens: int = 0, dropout: bool = False, prefix_share: float = 0.0,
                    eos_id: int | None = None):
  """Returns step(state, batch, key) -> (state, metrics); jit it once.

  apply_fn(params, tokens [B, L], window=None, attention_mask=None) -> logits [B, L, V], or
  with `loss_window=(start, n)` the logits [B, n, V] of that span (every maskable position
  must lie inside it: the loss is taken there only; a negative start counts from the end,
  so `(-n, n)` is the last n positions whatever the batch's length, e.g. the response of
  length-bucketed prompt -> response pairs). batch: {"tokens", "maskable"} and optionally
  "attention_mask" [B, L] (1 = real token: left padding is masked out as keys and
  positions count real tokens only) and "allowed_tokens" [B, V] bool (the loss normalises
  over those tokens only: an extractive reader's passage words, the tokens of DocIDs).
  vocab_tile > 0: the output layer is applied in vocabulary tiles inside the loss
  (`objective.projected_nll`), so [tokens, V] logits never exist at once (apply_fn must
  accept features=True, as `model_apply_fn`'s does). loss_tokens > 0 (diffusion objective):
  the output layer runs on the batch's masked positions only, gathered into that many slots
  per micro-batch (`objective.diffusion_loss`; exact: a draw that does not fit takes the full
  path, counted in metrics["loss_overflow"]). output_ids: [S] token ids: the
  softmax, and the output layer's cost, cover those tokens only (every target must be one). objective: "diffusion"
  (masked-NLL ELBO) or "ar" (next-token CE of a causal, shifted-logit model: the
  autoregressive baseline). dropout: the forward runs with the model's dropout on, its key
  split off the step's key (apply_fn must accept dropout_key=, as `model_apply_fn`'s does;
  without dropout the key stream is the same as ever). prefix_share (diffusion objective):
  the share of rows corrupted left to right instead of i.i.d. (`objective.prefix_process`;
  `eos_id` ends a response's content). The batch is split into
  `micro_batches` equal slices whose gradients are averaged (lax.scan), then one update.
  """

  def loss_fn(trainable, frozen, tokens, maskable, attention_mask, allowed, key):
    params = model_params(trainable, frozen, optim)
    drop = {}
    if dropout:
      key, drop["dropout_key"] = jax.random.split(key)
    window = None
    if loss_window is not None:
      start, n = loss_window
      window = (start + tokens.shape[1] if start < 0 else start, n)

    def logits_fn(xt):
      if vocab_tile > 0 or output_ids is not None or loss_tokens > 0:
        return apply_fn(params, xt, window=window, attention_mask=attention_mask, features=True, **drop)._replace(
            allowed=allowed, ids=None if output_ids is None else jnp.asarray(output_ids, jnp.int32))
      logits = apply_fn(params, xt, window=window, attention_mask=attention_mask, **drop)
      if allowed is None:
        return logits
      return jnp.where(allowed[:, None, :], logits, jnp.finfo(logits.dtype).min)
    if objective == "ar":
      return ar_loss(logits_fn, key, tokens, maskable, window, vocab_tile)
    return diffusion_loss(logits_fn, key, tokens, maskable, mask_id, schedule, antithetic, window, vocab_tile,
                          loss_tokens, prefix_share, eos_id)

  if objective not in ("diffusion", "ar"):
    raise ValueError(f"objective={objective!r}; expected 'diffusion' or 'ar'")
  if loss_tokens < 0 or (loss_tokens > 0 and objective != "diffusion"):
    raise ValueError(f"loss_tokens={loss_tokens}: a gathering budget applies to the diffusion objective only and "
                     "must be >= 0 (0: the output layer on every position)")
  if not 0.0 <= prefix_share <= 1.0 or (prefix_share > 0 and objective != "diffusion"):
    raise ValueError(f"prefix_share={prefix_share}: a share of rows in [0, 1] corrupted left to right, for the "
                     "diffusion objective only")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, key: jax.Array):
    tokens, maskable = batch["tokens"], batch["maskable"]
    attention_mask, allowed = batch.get("attention_mask"), batch.get("allowed_tokens")
    use_mask, use_allowed = attention_mask is not None, allowed is not None
    if not use_mask:
      attention_mask = jnp.ones_like(tokens, jnp.int32)
    if not use_allowed:
      allowed = jnp.ones((tokens.shape[0], 1), bool)
    b = tokens.shape[0]
    if b % micro_batches:
      raise ValueError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    split = lambda x: x.reshape((micro_batches, b // micro_batches) + x.shape[1:])
    keys = jax.random.split(key, micro_batches)

    def accumulate(carry, xs):
      grads, loss, aux = carry
      t, m, am, al, k = xs
      (l, a), g = grad_fn(state.params, state.frozen, t, m, am if use_mask else None, al if use_allowed else None, k)
      return (jax.tree_util.tree_map(jnp.add, grads, g), loss + l, jax.tree_util.tree_map(jnp.add, aux, a)), None

    if micro_batches == 1:  # no accumulator: zero-filled gradient buffers cost a pass over the params
      (loss, aux), grads = grad_fn(state.params, state.frozen, tokens, maskable, attention_mask if use_mask else None,
                                   allowed if use_allowed else None, keys[0])
    else:
      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      aux0 = {"masked_tokens": jnp.zeros((), jnp.int32), "correct": jnp.zeros((), jnp.int32),
              "overflow": jnp.zeros((), jnp.int32)}
      (grads, loss, aux), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(()), aux0),
                                           (split(tokens), split(maskable), split(attention_mask), split(allowed),
                                            keys))
      grads = jax.tree_util.tree_map(lambda g: g / micro_batches, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss / micro_batches, "grad_norm": optax.global_norm(grads),
               "masked_accuracy": aux["correct"] / jnp.maximum(aux["masked_tokens"], 1),
               "masked_tokens": aux["masked_tokens"], "loss_overflow": aux["overflow"],
               "params_finite": jnp.isfinite(optax.global_norm(params))}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
