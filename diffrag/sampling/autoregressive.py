"""Autoregressive generation for causal LMs (Llama, Qwen2, and causal twins): one jitted loop with a KV cache.

    out = generate_ar(model, params, prompt, key, max_new_tokens=32, attention_mask=mask,
                      transform=ar_sampler(temperature=0.7, top_p=0.9), stop_ids=(eos,))
    out.tokens      # [B, Lp + G]: prompt, then the generated tokens (pad after a stop id)
    out.lengths     # [B] generated tokens up to and including the first stop id
    beams = beam_search_ar(model, params, prompt, num_beams=4, max_new_tokens=16, stop_ids=(eos,))

The prompt is left-padded ([B, Lp] with attention_mask, 1 = real token): one forward over
the prompt fills the KV cache, then each step runs the model on the last token only,
attending to the cache (positions count real tokens, so left padding changes nothing).
What a step emits is a `ScoreTransform` chain over a one-position `StepView` (logits
[B, 1, V]): the same temperature / top-k / top-p / suppress / allowed-token pieces as the
diffusion sampler, ending in `greedy()` or `categorical()`. Generation stops per row at
its first stop id (the `eos_token_id`s of generation_config.json) and ends when every row
has stopped or `max_new_tokens` is reached (`lax.while_loop`, no Python loop inside jit).

`beam_search_ar` is transformers' beam search (the vectorised implementation: 2 x beams
candidates per step, finished hypotheses scored with the length penalty, the early-stop
heuristic), with an `allowed_fn` hook for constrained decoding (e.g. DocIDs).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffrag.models.transformer import KVCache, positions_from_mask
from diffrag.sampling import transforms as T

Array = jax.Array


class ARSample(NamedTuple):
  """tokens: [B, Lp + G]; logprob: [B, G] log-prob of each emitted token under the transformed
  logits; lengths: [B] tokens generated up to and including the first stop id; num_forward."""

  tokens: Array
  logprob: Array
  lengths: Array
  num_forward: Array


def ar_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> T.ScoreTransform:
  """transformers' sampling order: temperature, top-k, top-p, then categorical (greedy at 0)."""
  if temperature == 0:
    return T.greedy()
  parts = [T.temperature(temperature)]
  if top_k is not None:
    parts.append(T.top_k(top_k))
  if top_p is not None and top_p < 1:
    parts.append(T.top_p(top_p))
  return T.chain(*parts, T.categorical())


def stop_ids_of(checkpoint: str | Path, model_cfg) -> tuple[int, ...]:
  """The stop ids: generation_config.json's eos_token_id (an id or a list), else the model's EOS."""
  path = Path(checkpoint) / "generation_config.json"
  if path.exists():
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is not None:
      return tuple(eos) if isinstance(eos, list) else (int(eos),)
  return () if model_cfg.eos_token_id is None else (int(model_cfg.eos_token_id),)


def check_causal(model) -> None:
  if not model.config.causal:
    raise ValueError(f"this {model.config.family} model is bidirectional (a masked diffusion LM): generate with "
                     "diffrag.sampling.sampler.generate; autoregressive generation needs a causal model")


def _view(logits, extras) -> T.StepView:
  b = logits.shape[0]
  zeros = jnp.zeros((b, 1), jnp.int32)
  return T.StepView(logits=logits, hidden=None, canvas=zeros, is_masked=jnp.ones((b, 1), bool), candidates=zeros,
                    score=jnp.zeros((b, 1), jnp.float32), commit=jnp.ones((b, 1), bool), step=jnp.int32(0),
                    num_steps=1, extras=extras)


def _prefill(model, params, prompt, mask, total: int):
  """Logits [B, V] of the last prompt position (HF convention: they predict the next token),
  a KV cache sized for `total` positions, and the next position ids [B]."""
  positions = positions_from_mask(mask)
  lp = prompt.shape[1]
  logits, cache = model.apply({"params": params}, prompt, attention_mask=mask, positions=positions,
                              return_cache=True, output_window=(lp - 1, 1))
  if model.config.shift_logits:  # an aligned causal twin: position i's logits are about token i
    raise ValueError("autoregressive generation expects HF's convention (logits[:, i] predicts token i + 1); "
                     "this model re-aligns its logits (shift_logits=True)")
  pad = total - lp
  k = jnp.pad(cache.k, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(cache.v, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
  valid = jnp.pad(mask.astype(bool), ((0, 0), (0, pad)))
  return logits[:, 0].astype(jnp.float32), KVCache(k, v, valid), jnp.sum(mask, axis=1).astype(jnp.int32)


def _decode_one(model, params, token, position, cache: KVCache, at):
  """Forward of one token per row at `position` [B] against the cache; writes its k/v at index `at`."""
  logits, own = model.apply({"params": params}, token[:, None], positions=position[:, None], cache=cache,
                            return_cache=True)
  k = jax.lax.dynamic_update_slice_in_dim(cache.k, own.k.astype(cache.k.dtype), at, axis=2)
  v = jax.lax.dynamic_update_slice_in_dim(cache.v, own.v.astype(cache.v.dtype), at, axis=2)
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, jnp.ones((token.shape[0], 1), bool), at, axis=1)
  return logits[:, 0].astype(jnp.float32), KVCache(k, v, valid)


@functools.partial(jax.jit, static_argnames=("model", "transform", "max_new", "stop", "pad_id"))
def _generate(params, prompt, mask, key, extras, *, model, transform, max_new, stop, pad_id):
  b, lp = prompt.shape
  total = lp + max_new
  logits, cache, pos = _prefill(model, params, prompt, mask, total)
  state = transform.init(_view(logits[:, None], extras))
  stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)

  def cond(c):
    t, done = c[0], c[4]
    return (t < max_new) & ~jnp.all(done)

  def body(c):
    t, logits, cache, pos, done, tokens, lps, state, key, nfe = c
    key, sub = jax.random.split(key)
    view, state = transform.update(_view(logits[:, None], extras), state, sub)
    tok = view.candidates[:, 0]
    lp_tok = jnp.take_along_axis(jax.nn.log_softmax(view.logits[:, 0].astype(jnp.float32), -1), tok[:, None], 1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    tokens = tokens.at[:, t].set(tok)
    lps = lps.at[:, t].set(jnp.where(done, 0.0, lp_tok))
    done = done | jnp.isin(tok, stop_arr)
    logits, cache = _decode_one(model, params, tok, pos, cache, lp + t)
    return t + 1, logits, cache, pos + 1, done, tokens, lps, state, key, nfe + 1

  init = (jnp.int32(0), logits, cache, pos, jnp.zeros((b,), bool), jnp.full((b, max_new), pad_id, jnp.int32),
          jnp.zeros((b, max_new), jnp.float32), state, key, jnp.int32(1))
  t, _, _, _, _, tokens, lps, _, _, nfe = jax.lax.while_loop(cond, body, init)
  hit = jnp.isin(tokens, stop_arr)
  first = jnp.where(jnp.any(hit, 1), jnp.argmax(hit, 1) + 1, t)
  return ARSample(jnp.concatenate([prompt, tokens], 1), lps, first.astype(jnp.int32), nfe)


def _prepare(model, prompt, attention_mask, max_new_tokens):
  check_causal(model)
  prompt = np.asarray(prompt)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length] token ids, got shape {prompt.shape}")
  mask = np.ones_like(prompt) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != prompt.shape:
    raise ValueError(f"attention_mask must have the prompt's shape {prompt.shape}, got {mask.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  limit = model.config.max_position_embeddings
  if int(mask.sum(1).max()) + max_new_tokens > limit:
    raise ValueError(f"prompt ({int(mask.sum(1).max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {limit} positions")
  return jnp.asarray(prompt, jnp.int32), jnp.asarray(mask, jnp.int32)


_GREEDY = T.greedy()  # one object: the transform is a static argument of the jitted loop


def generate_ar(model, params, prompt, key: Array, *, max_new_tokens: int, transform: T.ScoreTransform | None = None,
                attention_mask=None, stop_ids=(), pad_id: int | None = None, extras: dict | None = None) -> ARSample:
  """Generates up to `max_new_tokens` per row (see the module doc); transform: a chain ending
  in greedy() or categorical() (default greedy); stop_ids: the row stops after emitting one."""
  prompt, mask = _prepare(model, prompt, attention_mask, max_new_tokens)
  pad = pad_id if pad_id is not None else (model.config.pad_token_id if model.config.pad_token_id is not None
                                           else (stop_ids[0] if stop_ids else 0))
  return _generate(params, prompt, mask, key, dict(extras or {}), model=model,
                   transform=transform or _GREEDY, max_new=max_new_tokens, stop=tuple(int(s) for s in stop_ids),
                   pad_id=int(pad))


# ------------------------------------------------------------------------------ beam search


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_new", "stop", "pad_id", "length_penalty",
                                             "early_stopping", "allowed_fn"))
def _beam(params, prompt, mask, aux, *, model, beams, max_new, stop, pad_id, length_penalty, early_stopping,
          allowed_fn):
  b, lp = prompt.shape
  nb = beams
  keep = max(2, 1 + len(stop)) * nb
  total = lp + max_new
  rep = lambda x: jnp.repeat(x, nb, axis=0)
  logits, cache, pos = _prefill(model, params, rep(prompt), rep(mask), total)
  vocab = logits.shape[-1]
  stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
  top_mask = jnp.arange(keep) < nb
  neg = -1.0e9

  def gather(x, idx):  # x [B, K, ...], idx [B, J] -> [B, J, ...]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(c):
    t, unsatisfied, finished, hits = c[0], c[7], c[5], c[8]
    improvement = jnp.any(unsatisfied)
    open_beam = ~(jnp.all(finished) & (early_stopping is True))
    return (t < max_new) & improvement & open_beam & ~jnp.all(hits)

  def body(c):
    t, logits, cache, run_seq, run_scores, finished, seqs, unsatisfied, hits, scores = c
    logp = jax.nn.log_softmax(logits, -1)                                       # [B nb, V]
    if allowed_fn is not None:
      logp = jnp.where(allowed_fn(run_seq.reshape(b * nb, max_new), t, aux), logp, -jnp.inf)
    acc = (logp.reshape(b, nb, vocab) + run_scores[:, :, None]).reshape(b, nb * vocab)
    top_lp, top_idx = jax.lax.top_k(acc, keep)
    parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seq = gather(run_seq, parent).at[:, :, t].set(tok)
    hits = jnp.isin(tok, stop_arr) | (t + 1 >= max_new)
    # running beams for the next step: the best nb continuations that did not stop
    nxt = jax.lax.top_k(top_lp + hits * neg, nb)[1]
    run_seq, run_scores = gather(top_seq, nxt), gather(top_lp + hits * neg, nxt)
    run_parent = gather(parent, nxt)
    # finished hypotheses: the stopped ones among the top nb, scored with the length penalty
    just = hits & top_mask[None]
    fin_lp = top_lp / ((t + 1) ** length_penalty)
    full = jnp.all(finished, -1, keepdims=True) & (early_stopping is True)
    fin_lp = fin_lp + full * neg + (~unsatisfied) * neg + (~just) * neg
    merged_seq = jnp.concatenate([seqs, top_seq], 1)
    merged_scores = jnp.concatenate([scores, fin_lp], 1)
    merged_fin = jnp.concatenate([finished, just], 1)
    best = jax.lax.top_k(merged_scores, nb)[1]
    seqs, scores, finished = gather(merged_seq, best), gather(merged_scores, best), gather(merged_fin, best)
    # reorder the cache by parent beam, then run the chosen tokens
    flat_parent = (run_parent + jnp.arange(b)[:, None] * nb).reshape(-1)
    cache = KVCache(jnp.take(cache.k, flat_parent, axis=1), jnp.take(cache.v, flat_parent, axis=1),
                    jnp.take(cache.valid, flat_parent, axis=0))
    tokens = run_seq[:, :, t].reshape(-1)
    logits, cache = _decode_one(model, params, tokens, jnp.take(pos0, flat_parent) + t, cache, lp + t)
    # early-stop heuristic (early_stopping=False: the best running score at the current length)
    best_running = run_scores[:, :1] / ((t + 1) ** length_penalty)
    worst_finished = jnp.where(finished, jnp.min(scores, 1, keepdims=True), neg)
    unsatisfied = unsatisfied & jnp.any(best_running > worst_finished, -1, keepdims=True)
    return t + 1, logits, cache, run_seq, run_scores, finished, seqs, unsatisfied, hits, scores

  pos0 = pos
  run_scores = jnp.where(jnp.arange(nb) == 0, 0.0, neg)[None].repeat(b, 0)
  empty = jnp.full((b, nb, max_new), pad_id, jnp.int32)
  init = (jnp.int32(0), logits, cache, empty, run_scores, jnp.zeros((b, nb), bool), empty,
          jnp.ones((b, 1), bool), jnp.zeros((b, keep), bool), jnp.full((b, nb), neg))
  out = jax.lax.while_loop(cond, body, init)
  return out[6], out[9]


def beam_search_ar(model, params, prompt, *, num_beams: int, max_new_tokens: int, attention_mask=None, stop_ids=(),
                   pad_id: int | None = None, length_penalty: float = 1.0, early_stopping: bool = False,
                   allowed_fn: Callable | None = None, aux=None):
  """(sequences [B, num_beams, G] best first, scores [B, num_beams]): transformers' beam search.

  Scores are summed log-probabilities divided by length ** length_penalty; rows never
  finished keep score -1e9. allowed_fn(generated [B * beams, G], t, aux) -> [B * beams, V]
  bool restricts step t's tokens (constrained decoding); `aux` is its traced data (an index).
  """
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  prompt, mask = _prepare(model, prompt, attention_mask, max_new_tokens)
  pad = pad_id if pad_id is not None else (model.config.pad_token_id if model.config.pad_token_id is not None
                                           else (stop_ids[0] if stop_ids else 0))
  return _beam(params, prompt, mask, aux, model=model, beams=num_beams, max_new=max_new_tokens,
               stop=tuple(int(s) for s in stop_ids), pad_id=int(pad), length_penalty=float(length_penalty),
               early_stopping=early_stopping, allowed_fn=allowed_fn)
