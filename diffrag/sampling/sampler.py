"""The denoising sampler: one jit-compiled function, a loop over blocks around a loop over steps.

    canvas = [prompt | MASK * gen_length], split into gen_length / block_length blocks
    for each block (lax.fori_loop):
      while the block has a MASK and i < max steps (lax.while_loop):
        logits, hidden = model(canvas)                 (or a cached forward, Fast-dLLM)
        view = transform(StepView(block logits, ...))  (a ScoreTransform chain)
        canvas[block] <- view.candidates where view.commit

Steps that have nothing left to do are not run (the while condition), so threshold
decoding and stop-at-EOS save forward passes without any Python loop in the jitted region.
The sampler owns the loop and nothing else: what to commit is entirely the transform's.

The mask token's logit is set to -inf before the transforms, so MASK is never committed:
the only departure from the published loops (which can re-commit MASK with an untrained
model and end with holes); with trained checkpoints its probability is ~0 anyway.

The per-step trajectory costs O(B * L) memory: `commit_step[b, j]` is the forward pass at
which position j was committed (committed tokens never change), so the canvas after any
step t is `where(commit_step <= t, tokens, MASK)` (`canvas_at`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.models.transformer import KVCache, positions_from_mask
from diffrag.sampling.transforms import ScoreTransform, StepView

Array = jax.Array
CACHE_MODES = ("none", "prefix", "dual")


class Sample(NamedTuple):
  """Output of `generate`.

  tokens: [B, Lp + G] the whole canvas; commit_step: [B, G] int32, forward pass (0-based)
  at which each generated position was committed (-1: filled with EOS after the row
  stopped); logprob: [B, G] float32, log-probability of the committed token under the
  step's transformed logits; num_forward: int32, forward passes run (NFE, each over the
  whole batch; a CFG step counts once).
  """

  tokens: Array
  commit_step: Array
  logprob: Array
  num_forward: Array


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """Static shape of a run: validated once at the edge (`check`)."""

  prompt_len: int
  gen_length: int
  block_length: int
  steps: int
  cache: str = "none"
  stop_at_eos: bool = False
  max_steps_per_block: int | None = None
  hidden_layer: int = -1
  hidden_offset: int = 0

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def max_iters(self) -> int:
    """Bound of the per-block loop: the scheduled steps, or block_length for threshold rules."""
    return self.max_steps_per_block or max(self.steps_per_block, self.block_length)


def check_spec(spec: SampleSpec, model_cfg, transform: ScoreTransform) -> None:
  """Raises ValueError naming the bad argument and the valid range."""
  g, bl, s = spec.gen_length, spec.block_length, spec.steps
  if g < 1:
    raise ValueError(f"gen_length must be >= 1, got {g}")
  if bl < 1 or g % bl:
    raise ValueError(f"gen_length ({g}) must be divisible by block_length ({bl}); "
                     f"valid block lengths divide {g}")
  if s < 1 or s % spec.num_blocks:
    raise ValueError(f"steps ({s}) must be a positive multiple of the number of blocks "
                     f"(gen_length / block_length = {spec.num_blocks})")
  if spec.steps_per_block > bl:
    raise ValueError(f"steps ({s}) exceeds the number of tokens to generate: at most block_length "
                     f"({bl}) steps per block, i.e. steps <= gen_length ({g})")
  if spec.cache not in CACHE_MODES:
    raise ValueError(f"cache must be one of {CACHE_MODES}, got {spec.cache!r}")
  if spec.cache != "none" and model_cfg.copy_head:
    raise ValueError("a copy-head reader copies from the prompt, which a cached forward does not see: use cache='none'")
  if spec.cache != "none" and "uncond_logits" in transform.needs:
    raise ValueError("classifier-free guidance (cfg_scale > 0) cannot be combined with a KV cache: use cache='none'")
  if spec.prompt_len < 1 and model_cfg.shift_logits:
    raise ValueError("the prompt is empty: shifted-logit models (Dream) predict position j from j - 1, "
                     "so give at least one prompt token (e.g. BOS)")
  total = spec.prompt_len + g
  if model_cfg.positions == "learned" and total > model_cfg.max_position_embeddings:
    raise ValueError(f"prompt ({spec.prompt_len}) + gen_length ({g}) = {total} tokens exceeds the model's "
                     f"{model_cfg.max_position_embeddings} positions: shorten the prompt or gen_length")
  if not -1 <= spec.hidden_layer < model_cfg.num_layers:
    raise ValueError(f"hidden_layer={spec.hidden_layer}; expected -1 (last) or a layer index in "
                     f"[0, {model_cfg.num_layers})")
  if spec.hidden_offset not in (0, 1) or (spec.hidden_offset and not model_cfg.shift_logits):
    raise ValueError(f"hidden_offset={spec.hidden_offset}; expected 0, or 1 for a shifted-logit model (Dream: the "
                     "state at i - 1 predicts position i)")
  if spec.stop_at_eos and model_cfg.eos_token_id is None:
    raise ValueError("stop_at_eos=True needs the model config's eos_token_id")


def canvas_at(sample: Sample, step: int, mask_id: int) -> Array:
  """The generated part of the canvas after forward pass `step` (0-based): [B, G]."""
  gen = sample.tokens[:, sample.tokens.shape[1] - sample.commit_step.shape[1]:]
  done = (sample.commit_step >= 0) & (sample.commit_step <= step)
  return jnp.where(done, gen, mask_id)


def truncate_at_eos(ids, eos_id: int) -> list[list[int]]:
  """Generated ids [B, G] as lists cut before the first EOS (how LLaDA/Dream read answers)."""
  out = []
  for row in np.asarray(ids).tolist():
    out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out


def _positions(attention_mask: Array | None, batch: int, length: int) -> Array:
  """0..L-1, or with left padding the count of real tokens before each one (Dream's tok_idx)."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return positions_from_mask(attention_mask)


def _step_view(logits, hidden, canvas, s, bl, mask_id, step, spec, extras) -> StepView:
  blk = jax.lax.dynamic_slice_in_dim(canvas, s, bl, axis=1)
  is_masked = blk == mask_id
  # The mask token is never a candidate (trained models give it ~zero mass; untrained ones
  # could "commit" MASK and leave holes). The one deliberate departure from LLaDA/Dream.
  logits = logits.at[..., mask_id].set(-jnp.inf)
  return StepView(logits=logits, hidden=hidden, canvas=blk, is_masked=is_masked, candidates=blk,
                  score=jnp.full(blk.shape, -jnp.inf, jnp.float32), commit=jnp.zeros(blk.shape, bool),
                  step=step, num_steps=spec.steps_per_block,
                  extras={**extras, "canvas": canvas, "block_start": s})


def _run(params, canvas, attention_mask, key, extras, *, model, transform, spec: SampleSpec):
  cfg = model.config
  mask_id, eos_id = cfg.mask_token_id, cfg.eos_token_id
  batch, length = canvas.shape
  lp, bl, g = spec.prompt_len, spec.block_length, spec.gen_length
  lb = 1 if cfg.shift_logits else 0
  needs_hidden = "hidden" in transform.needs
  needs_uncond = "uncond_logits" in transform.needs
  positions = _positions(attention_mask, batch, length)
  key_valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
  prompt_index = jnp.arange(length)[None, :] < lp

  def forward(ids, s, **kw):
    return model.apply({"params": params}, ids, return_hidden=True, output_window=(s, bl),
                       hidden_layer=spec.hidden_layer, hidden_offset=spec.hidden_offset, **kw)

  def full_forward(canvas, s):
    """Forward over the whole canvas; logits of the block [s, s + bl)."""
    if needs_uncond:
      un = jnp.where(prompt_index, mask_id, canvas)
      both = jnp.concatenate([canvas, un], 0)
      am = None if attention_mask is None else jnp.concatenate([attention_mask] * 2, 0)
      logits, hidden = forward(both, s, attention_mask=am, positions=jnp.concatenate([positions] * 2, 0))
      return logits[:batch], hidden[:batch], logits[batch:]
    logits, hidden = forward(canvas, s, attention_mask=attention_mask, positions=positions)
    return logits, hidden, None

  # Cached forwards (Fast-dLLM): the query window has a static size and a traced start.
  pad = g if spec.cache == "prefix" else 0
  win = {"prefix": g + lb, "dual": bl + lb}.get(spec.cache, 0)

  def refresh(canvas, s, cache):
    del cache
    logits, hidden, new_cache = model.apply({"params": params}, canvas, attention_mask=attention_mask,
                                            positions=positions, return_hidden=True, return_cache=True,
                                            output_window=(s, bl), hidden_layer=spec.hidden_layer,
                                            hidden_offset=spec.hidden_offset)
    return logits, hidden, new_cache

  def cached(canvas, s, cache):
    qs = s - lb
    padded = jnp.pad(canvas, ((0, 0), (0, pad)), constant_values=mask_id)
    pos = jnp.pad(positions, ((0, 0), (0, pad)), mode="edge")
    valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    ids = jax.lax.dynamic_slice_in_dim(padded, qs, win, axis=1)
    q_pos = jax.lax.dynamic_slice_in_dim(pos, qs, win, axis=1)
    q_valid = jax.lax.dynamic_slice_in_dim(valid, qs, win, axis=1)
    idx = jnp.arange(length)[None, :]
    if spec.cache == "prefix":
      c_valid = key_valid & (idx < qs)
    else:
      c_valid = key_valid & ((idx < qs) | (idx >= qs + win))
    logits, hidden = model.apply({"params": params}, ids, attention_mask=q_valid, positions=q_pos,
                                 return_hidden=True, cache=KVCache(cache.k, cache.v, c_valid),
                                 output_window=(lb, bl), hidden_layer=spec.hidden_layer,
                                 hidden_offset=spec.hidden_offset)
    return logits, hidden, cache

  def block(b, carry):
    canvas, commit_step, logprob, nfe, state, key, cache = carry
    s = lp + b * bl
    if spec.stop_at_eos:  # a row whose earlier blocks hold an EOS is finished: fill with EOS
      done = jnp.any((canvas == eos_id) & (jnp.arange(length) >= lp) & (jnp.arange(length) < s), axis=1)
      in_blk = (jnp.arange(length) >= s) & (jnp.arange(length) < s + bl)
      canvas = jnp.where(done[:, None] & in_blk & (canvas == mask_id), eos_id, canvas)

    def cond(c):
      canvas, i = c[0], c[-1]
      blk = jax.lax.dynamic_slice_in_dim(canvas, s, bl, axis=1)
      return (i < spec.max_iters) & jnp.any(blk == mask_id)

    def body(c):
      canvas, commit_step, logprob, nfe, state, key, cache, i = c
      key, step_key = jax.random.split(key)
      if spec.cache == "none":
        logits, hidden, uncond = full_forward(canvas, s)
      else:
        logits, hidden, cache = jax.lax.cond(i == 0, refresh, cached, canvas, s, cache)
        uncond = None
      ex = dict(extras)
      if uncond is not None:
        ex["uncond_logits"] = uncond
      view = _step_view(logits, hidden if needs_hidden else None, canvas, s, bl, mask_id, i, spec, ex)
      view, state = transform.update(view, state, step_key)
      commit = view.commit & view.is_masked
      new_blk = jnp.where(commit, view.candidates, view.canvas).astype(canvas.dtype)
      lp_all = jax.nn.log_softmax(view.logits.astype(jnp.float32), axis=-1)
      lp_tok = jnp.take_along_axis(lp_all, view.candidates[..., None], -1)[..., 0]
      g0 = s - lp
      old_cs = jax.lax.dynamic_slice_in_dim(commit_step, g0, bl, axis=1)
      old_lp = jax.lax.dynamic_slice_in_dim(logprob, g0, bl, axis=1)
      canvas = jax.lax.dynamic_update_slice_in_dim(canvas, new_blk, s, axis=1)
      commit_step = jax.lax.dynamic_update_slice_in_dim(commit_step, jnp.where(commit, nfe, old_cs), g0, axis=1)
      logprob = jax.lax.dynamic_update_slice_in_dim(logprob, jnp.where(commit, lp_tok, old_lp), g0, axis=1)
      return canvas, commit_step, logprob, nfe + 1, state, key, cache, i + 1

    out = jax.lax.while_loop(cond, body, (canvas, commit_step, logprob, nfe, state, key, cache, jnp.int32(0)))
    return out[:-1]

  # Transform state is initialised on a view of the right shapes (stateless chains ignore it).
  logits0, hidden0 = jax.eval_shape(lambda: forward(canvas, lp, attention_mask=attention_mask, positions=positions))
  zeros = lambda a: jnp.zeros(a.shape, a.dtype)
  ex0 = dict(extras)
  if needs_uncond:
    ex0["uncond_logits"] = zeros(logits0)
  state = transform.init(_step_view(zeros(logits0), zeros(hidden0) if needs_hidden else None, canvas, lp, bl,
                                    mask_id, jnp.int32(0), spec, ex0))
  if spec.cache != "none":
    kv = jax.eval_shape(lambda: refresh(canvas, lp, None)[2])
    cache = KVCache(zeros(kv.k), zeros(kv.v), zeros(kv.valid))
  else:
    cache = None
  commit_step = jnp.full((batch, g), -1, jnp.int32)
  logprob = jnp.zeros((batch, g), jnp.float32)
  carry = (canvas, commit_step, logprob, jnp.int32(0), state, key, cache)
  canvas, commit_step, logprob, nfe, _, _, _ = jax.lax.fori_loop(0, spec.num_blocks, block, carry)
  return Sample(canvas, commit_step, logprob, nfe)


@functools.partial(jax.jit, static_argnames=("model", "transform", "spec"))
def _run_jit(params, canvas, attention_mask, key, extras, *, model, transform, spec):
  return _run(params, canvas, attention_mask, key, extras, model=model, transform=transform, spec=spec)


def generate(model, params, prompt, transform: ScoreTransform, key: Array, *, gen_length: int, steps: int,
             block_length: int | None = None, attention_mask=None, cache: str = "none",
             stop_at_eos: bool = False, max_steps_per_block: int | None = None, hidden_layer: int = -1,
             hidden_offset: int = 0, extras: dict[str, Any] | None = None, mesh=None, rules=None,
             _lower: bool = False) -> Sample:
  """Denoises [prompt | MASK * gen_length] with `transform` deciding every step.

  model: a MaskedDiffusionTransformer (any flax module with its call signature); params:
  its parameters; prompt: [B, Lp] int (left-pad rows of different lengths and pass
  attention_mask [B, Lp], 1 = real token; LLaDA's reference ignores the mask, so parity
  runs pass None); transform: a ScoreTransform chain ending in a commit policy; key: PRNG
  key; gen_length, steps, block_length: as in LLaDA's generate (block_length defaults to
  gen_length; steps are split evenly over the blocks); cache: "none", "prefix" or "dual"
  (Fast-dLLM's approximate KV cache, refreshed at every block start); stop_at_eos: once a
  row's finished blocks contain EOS, its later blocks are filled with EOS without running
  (the text up to the first EOS is unchanged); extras: arrays the transforms read (e.g. a
  query embedding, [B, ...]); hidden_layer: which layer's states transforms see as
  `view.hidden` (-1: the last, after the final norm); hidden_offset: 1 gives each position the
  state at i - 1 (shifted-logit models: the state whose logits predict i); mesh/rules: run under a device mesh (batch over `data`,
  parameters by the logical-axis rules; shard params beforehand with `param_shardings`).
  Returns a `Sample`.
  """
  cfg = model.config
  if cfg.causal or cfg.mask_token_id < 0:
    raise ValueError(f"this {cfg.family} model is autoregressive (causal, no mask token): generate with "
                     "diffrag.sampling.autoregressive.generate_ar (or beam_search_ar)")
  prompt = np.asarray(prompt) if not isinstance(prompt, jax.Array) else prompt
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}")
  batch, lp = prompt.shape
  block_length = gen_length if block_length is None else block_length
  spec = SampleSpec(lp, gen_length, block_length, steps, cache, stop_at_eos, max_steps_per_block, hidden_layer,
                    hidden_offset)
  check_spec(spec, cfg, transform)
  if not isinstance(prompt, jax.core.Tracer):
    host = np.asarray(prompt)
    if (host == cfg.mask_token_id).any():
      raise ValueError(f"the prompt contains the mask token id {cfg.mask_token_id}; only generated positions "
                       "are denoised: remove it from the prompt")
    if (host < 0).any() or (host >= cfg.vocab_size).any():
      raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got min {host.min()} max {host.max()}")
  if attention_mask is not None:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (batch, lp):
      raise ValueError(f"attention_mask must have the prompt's shape {(batch, lp)}, got {attention_mask.shape}")
    attention_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((batch, gen_length), jnp.int32)], 1)
  canvas = jnp.concatenate([jnp.asarray(prompt, jnp.int32), jnp.full((batch, gen_length), cfg.mask_token_id,
                                                                      jnp.int32)], axis=1)
  extras = {} if extras is None else dict(extras)
  run = _run_jit.lower if _lower else _run_jit
  if mesh is None:
    return run(params, canvas, attention_mask, key, extras, model=model, transform=transform, spec=spec)
  from diffrag.parallel import mesh as mesh_lib
  rules = mesh_lib.DEFAULT_RULES if rules is None else rules
  with mesh_lib.activate(mesh, rules):
    sharding = mesh_lib.batch_sharding(mesh, rules)
    canvas = jax.device_put(canvas, sharding)
    if attention_mask is not None:
      attention_mask = jax.device_put(attention_mask, sharding)
    return run(params, canvas, attention_mask, key, extras, model=model, transform=transform, spec=spec)


def lower(model, params, prompt, transform: ScoreTransform, key: Array, **kwargs):
  """`generate`'s jitted function lowered for these arguments (same validation), e.g.
  `lower(...).compile().memory_analysis()` for the memory one run needs."""
  return generate(model, params, prompt, transform, key, _lower=True, **kwargs)
