"""Reference sampling loops in plain PyTorch, written from the published algorithms
(LLaDA `generate`, Dream `diffusion_generate` / `_sample`, Fast-dLLM threshold rule; see
../shared/specs/reference-implementations.md sections 1.4, 1.5, 2.3, 3.1).

`forward(x: LongTensor [B, L]) -> logits [B, L, V]` is the network's raw (unshifted) output.
As in diffrag's sampler, the mask token's logit is set to -inf (so MASK is never committed);
that is the only change from the published loops.
"""

from __future__ import annotations

import torch


def bidirectional_forward(ref):
  """The HF Llama/Qwen2 reference run with an all-visible mask (LLaDA / Dream = no causality)."""

  def forward(x):
    mask = torch.zeros((x.shape[0], 1, x.shape[1], x.shape[1]), dtype=torch.float32)
    with torch.no_grad():
      return ref.lm_head(ref.model(input_ids=x, attention_mask=mask).last_hidden_state)
  return forward


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
  """[B, steps]: floor(m / steps) each, plus one on the first m mod steps steps."""
  m = mask_index.sum(dim=1, keepdim=True)
  out = torch.zeros(m.shape[0], steps, dtype=torch.long) + m // steps
  for b in range(m.shape[0]):
    out[b, : int(m[b, 0] % steps)] += 1
  return out


def llada_generate(forward, prompt, *, steps, gen_length, block_length, cfg_scale=0.0, mask_id,
                   remasking="low_confidence", threshold=None):
  """LLaDA's generate at temperature 0 (Fast-dLLM's threshold rule when `threshold` is set).

  Returns (x [B, Lp + G], number of forward passes).
  """
  prompt = torch.as_tensor(prompt, dtype=torch.long)
  b, lp = prompt.shape
  x = torch.full((b, lp + gen_length), mask_id, dtype=torch.long)
  x[:, :lp] = prompt
  prompt_index = x != mask_id
  num_blocks = gen_length // block_length
  spb = steps // num_blocks
  nfe = 0
  for nb in range(num_blocks):
    start, end = lp + nb * block_length, lp + (nb + 1) * block_length
    ntt = num_transfer_tokens(x[:, start:end] == mask_id, spb)
    i = 0
    while (x[:, start:end] == mask_id).any():
      mask_index = x == mask_id
      if cfg_scale > 0:
        un_x = x.clone()
        un_x[prompt_index] = mask_id
        both = forward(torch.cat([x, un_x], 0))
        cond, un = both[:b], both[b:]
        logits = un + (cfg_scale + 1) * (cond - un)
      else:
        logits = forward(x)
      logits[..., mask_id] = -float("inf")
      nfe += 1
      x0 = torch.argmax(logits, dim=-1)
      p = torch.softmax(logits, dim=-1)
      x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
      x0_p[:, end:] = -float("inf")
      x0 = torch.where(mask_index, x0, x)
      conf = torch.where(mask_index, x0_p, torch.tensor(-float("inf")))
      for j in range(b):
        if threshold is None:
          k = int(ntt[j, i])
          if k == 0:
            continue
          sel = torch.topk(conf[j], k).indices
        else:
          transfer = mask_index[j] & (conf[j] >= threshold)
          if mask_index[j, start:end].any():
            transfer[torch.argmax(conf[j])] = True
          sel = torch.nonzero(transfer & mask_index[j])[:, 0]
        x[j, sel] = x0[j, sel]
      i += 1
  return x, nfe


def sample_tokens(logits, margin_confidence=False, neg_entropy=False):
  """Dream's sample_tokens at temperature 0: (confidence, x0) per row of logits [n, V]."""
  probs = torch.softmax(logits, dim=-1)
  confidence, x0 = probs.max(dim=-1)
  if margin_confidence:
    top2 = torch.sort(probs, dim=-1, descending=True).values
    confidence = top2[:, 0] - top2[:, 1]
  if neg_entropy:
    confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
  return confidence, x0


def dream_generate(forward, prompt, *, steps, max_new_tokens, mask_id, alg="maskgit_plus", eps=1e-3):
  """Dream's `_sample` (the later, batch-correct HF version) at temperature 0."""
  prompt = torch.as_tensor(prompt, dtype=torch.long)
  b, lp = prompt.shape
  x = torch.cat([prompt, torch.full((b, max_new_tokens), mask_id, dtype=torch.long)], 1)
  timesteps = torch.linspace(1, eps, steps + 1)
  for i in range(steps):
    mask_index = x == mask_id
    logits = forward(x)
    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    logits[..., mask_id] = -float("inf")
    mask_logits = logits[mask_index]
    t, s = timesteps[i], timesteps[i + 1]
    confidence, x0 = sample_tokens(mask_logits, margin_confidence=alg == "topk_margin",
                                   neg_entropy=alg == "entropy")
    num_mask_token = mask_index.sum() / mask_index.shape[0]
    k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
    full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
    full_conf[mask_index] = confidence
    if k > 0:
      idx = torch.topk(full_conf, k).indices
      x_ = torch.full_like(x, mask_id)
      x_[mask_index] = x0.clone()
      rows = torch.arange(b).unsqueeze(1).expand_as(idx)
      x[rows, idx] = x_[rows, idx]
  return x
