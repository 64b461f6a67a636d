"""The masked diffusion transformer: one `flax.linen` module for every family.

LLaDA (Llama-like), Dream (Qwen2-like) and BERT differ only in fields of `ModelConfig`
(norm type and placement, position encoding, MLP kind, biases, output head, logit
shift); `families.py` builds the right config for each published checkpoint.

    model = MaskedDiffusionTransformer(cfg)
    logits = model.apply({"params": params}, input_ids)                   # [B, L, V]
    logits, hidden = model.apply({"params": params}, ids, return_hidden=True)

`logits[:, i]` is always the distribution over token i (Dream's one-position shift is
undone inside the module); `hidden[:, i]` is the last-layer state at input position i
after the final norm (the Hugging Face `hidden_states[-1]` convention), unshifted.

Parameters and activations carry logical axis names (`batch, length, embed, heads, kv,
mlp, vocab, kv_heads, layers`); `diffrag.parallel` maps them to mesh axes by a rules table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_CHOICES = {
    "norm": ("rms", "layer"),
    "positions": ("rope", "learned"),
    "mlp": ("swiglu", "gelu"),
    "head": ("linear", "tied", "mlm"),
    "attention_impl": ("auto", "xla", "cudnn", "heads_major"),
    "layer_loop": ("scan", "unroll"),
}
# Rematerialisation of the scanned layer: what the backward pass keeps from the forward
# ("none": everything, no recomputation; "full": nothing, each layer is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
}


class ConfigError(ValueError):
  """A model configuration or checkpoint that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a masked diffusion transformer (hashable: safe as a static arg).

  family: a label ("llada", "dream", "bert") that selects the checkpoint name map.
  norm: "rms" (RMSNorm, pre-norm blocks + final norm) or "layer" (LayerNorm, BERT's
    post-norm blocks and a normed embedding).
  positions: "rope" (rotate-half RoPE with `rope_theta`) or "learned" (absolute).
  mlp: "swiglu" (down(silu(gate x) * up x)) or "gelu" (BERT's two-layer MLP).
  head: "linear" (untied output layer), "tied" (word embeddings), or "mlm" (BERT's
    transform + LayerNorm + tied decoder with a bias).
  shift_logits: the network predicts token i+1 at position i (Dream); the module
    re-aligns so that logits[:, i] is always about token i.
  rope_fp32: rotate q/k in float32 (LLaDA) or in the compute dtype (Dream).
  dtype / param_dtype: compute and storage dtypes; norm statistics, attention softmax
    and RoPE tables are always float32.
  attention_impl: "auto" (cuDNN flash attention on GPU for unmasked 16-bit attention;
    `heads_major_attention` on a one-device CPU run; XLA otherwise), "xla", "cudnn" or
    "heads_major".
  copy_head: the output distribution copies tokens of the input instead of projecting on the
    vocabulary (an extractive reader; see `copy_logits`): a token's logit is the log-sum-exp
    of attention scores to the context positions holding it, EOS keeps the vocabulary head's.
  remat: rematerialisation of each scanned layer in the backward pass (`REMAT_POLICIES`:
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"); not architecture:
    the same weights load under any policy.
  layer_loop: how the stacked layers run: "scan" (one XLA while loop: compile time independent
    of depth) or "unroll" (the same scan unrolled: no per-iteration slicing and stacking of
    activations and gradients; on CPU a train step of the LLaDA-shaped 4x256 bench model is
    about 9% faster, a sampling step about 10% slower). Not architecture: the parameters are
    stacked [layers, ...] either way; training picks it with `train.layer_loop`.
  dropout: the rate of BERT-style hidden dropout (after the embeddings, on each attention and
    MLP output before its residual add), active only in a forward with `deterministic=False`
    and a "dropout" rng; not architecture: a training setting, never written to checkpoints.
  """

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mask_token_id: int
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  bos_token_id: int | None = None
  norm: str = "rms"
  norm_eps: float = 1e-5
  positions: str = "rope"
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  rope_fp32: bool = True
  max_position_embeddings: int = 4096
  type_vocab_size: int = 0
  mlp: str = "swiglu"
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  head: str = "linear"
  shift_logits: bool = False
  causal: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  remat: str = "none"
  layer_loop: str = "scan"
  copy_head: bool = False
  dropout: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"ModelConfig.dropout={self.dropout}; expected a rate in [0, 1)")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat policy {self.remat!r} does not exist; valid policies: {list(REMAT_POLICIES)}")
    for field, choices in _CHOICES.items():
      if getattr(self, field) not in choices:
        raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {choices}")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {tuple(_DTYPES)}")
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      if getattr(self, field) <= 0:
        raise ConfigError(f"ModelConfig.{field}={getattr(self, field)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.positions == "rope" and self.head_dim % 2:
      raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    if not 0 <= self.mask_token_id < self.vocab_size and not (self.causal and self.mask_token_id == -1):
      raise ConfigError(f"ModelConfig.mask_token_id={self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})"
                        " (-1, no mask token, is for causal models only)")

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ModelConfig":
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **changes)


class Dense(nn.Module):
  """y = x . W (+ b), contracting the last `n_in` axes of x with the first `n_in` of W.

  W: [in..., out...] with logical names `axes`; b: [out...]. Parameters are created at
  their real shape (not flattened), so logical partitioning applies at init under a mesh.
  """

  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  use_bias: bool
  n_in: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    shape = tuple(x.shape[-self.n_in:]) + tuple(self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                        shape, cfg.weight_dtype)
    y = matmul(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), self.n_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in:]),
                        tuple(self.features), cfg.weight_dtype)
      y = y + bias.astype(cfg.compute_dtype)
    return y


def matmul(x: Array, w: Array, n_in: int = 1) -> Array:
  """x . w contracting the last `n_in` axes of x with the first `n_in` of w, as one 2-D GEMM.

  x: [..., in...]; w: [in..., out...] -> [..., out...]. Leading and trailing axes are folded
  (free reshapes) so the product, and both products of its backward pass, are plain
  [M, K] x [K, N] matrix multiplies: XLA's CPU backend runs a dot over [B, L, D] whose
  weight gradient contracts two axes through a slow generic path (about 3x slower at
  8 x 128 tokens, V = 8192; `make bench` --only train).
  """
  lead, inner, out = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
  k = int(np.prod(inner))
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(lead + out)


def _dense(cfg: ModelConfig, features, axes: tuple[str | None, ...], use_bias: bool, name: str, n_in: int = 1):
  features = features if isinstance(features, tuple) else (features,)
  return Dense(cfg, features, axes, use_bias, n_in, name=name)


class Norm(nn.Module):
  """RMSNorm or LayerNorm with float32 statistics.

  rms:   y = cast(x / sqrt(mean(x^2) + eps)) * scale        (LLaDA / Qwen2 order: cast, then scale)
  layer: y = cast((x - mean(x)) / sqrt(var(x) + eps) * scale + bias)
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,), cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rms":
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
      return y.astype(cfg.compute_dtype) * scale.astype(cfg.compute_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,), cfg.weight_dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.compute_dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
  """inv_freq_j = theta^(-2j / head_dim), j = 0 .. head_dim/2 - 1, then the checkpoint's scaling:

  ("linear", f): inv_freq / f.
  ("llama3", f, low, high, L0) (Llama 3.1+): wavelengths 2 pi / inv_freq longer than L0 / low
  are divided by f, shorter than L0 / high kept, and in between smoothly interpolated with
  s = (L0 / wavelen - low) / (high - low): (1 - s) inv_freq / f + s inv_freq.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling[0] == "linear":
    return (inv_freq / scaling[1]).astype(np.float32)
  _, factor, low, high, old_len = scaling
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: Array, head_dim: int, theta: float, scaling: tuple | None = None) -> tuple[Array, Array]:
  """Rotate-half RoPE tables (NeoX / HF Llama convention, not interleaved).

  emb = concat(pos * inv_freq, pos * inv_freq) (`rope_inv_freq`); returns cos(emb), sin(emb):
  [B, L, head_dim] float32.
  """
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(u: Array, cos: Array, sin: Array, fp32: bool) -> Array:
  """u' = u * cos + rotate_half(u) * sin, rotate_half(u) = concat(-u[d/2:], u[:d/2]).

  u: [B, L, N, hd]; cos, sin: [B, L, hd]. `fp32` rotates in float32 (LLaDA); otherwise the
  tables are cast to u's dtype first (Dream / HF Qwen2).
  """
  dtype = u.dtype
  if fp32:
    u = u.astype(jnp.float32)
  else:
    cos, sin = cos.astype(dtype), sin.astype(dtype)
  half = u.shape[-1] // 2
  rotated = jnp.concatenate([-u[..., half:], u[..., :half]], axis=-1)
  out = u * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(dtype)


def largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of n that is <= at_most (1 if at_most < 1)."""
  d = max(1, min(n, at_most))
  while n % d:
    d -= 1
  return d


def heads_major_attention(q: Array, k: Array, v: Array, mask, scale: float, is_causal: bool) -> Array:
  """The arithmetic of `jax.nn.dot_product_attention`'s XLA implementation, laid out heads-major.

  q: [B, L, N, hd]; k, v: [B, Lk, K, hd] (K divides N: grouped-query heads); mask: [B, 1, L, Lk]
  bool or None -> [B, L, N, hd]. q, k and v are transposed to [B, heads, L, hd] before the two
  batched matmuls, so every head's scores [L, Lk] and both dots are contiguous, and the mask
  enters as an additive bias (0 or jax's large negative number, so a row with every key
  masked is uniform, as there):
    logits = scale * q k^T (float32) + bias,  out = softmax(logits) v.
  On 2 CPU cores one layer's attention ran 1.5-1.9x faster forward and backward than jax's
  layout, whole or in chunks of sequences (MiniLM heads, 16 x 144 to 32 x 512 tokens); a
  whole train step about as fast (README "CPU attention"). Outputs within 1e-6 of jax's
  (tested with padding, grouped-query heads, causal masks and a KV cache).
  """
  b, l, n, hd = q.shape
  kv = k.shape[2]
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh = jnp.swapaxes(q, 1, 2).reshape(b, kv, n // kv, l, hd)                        # [B, K, G, L, hd]
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                            # [B, K, Lk, hd]
  logits = jnp.einsum("bkgth,bksh->bkgts", qh, kh, preferred_element_type=logits_dtype)
  logits = logits * jnp.array(scale, logits_dtype)
  keep = mask
  if is_causal:
    tril = jnp.tril(jnp.ones((l, k.shape[1]), bool))[None, None]
    keep = tril if keep is None else keep & tril
  if keep is not None:
    big = 0.7 * float(jnp.finfo(jnp.float32).max)
    logits = logits + jnp.where(keep, 0.0, -big).astype(logits_dtype)[:, :, None]   # [B, 1, 1, L, Lk]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, vh).reshape(b, n, l, hd)
  return jnp.swapaxes(out, 1, 2)


def _attention_impl(cfg: ModelConfig, q: Array, mask) -> str | None:
  """"cudnn" (fused flash attention) on GPU for 16-bit unmasked attention when
  attention_impl="auto" (on an H200, LLaDA-8B shape, batch 8 x 512: 96 -> 83 ms per forward);
  "heads_major" on CPU when no mesh of more than one device is active (a sharded heads axis
  is left in jax's layout); XLA's implementation otherwise."""
  if cfg.attention_impl in ("xla", "cudnn", "heads_major"):
    return cfg.attention_impl
  if (jax.default_backend() == "gpu" and mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
      and q.shape[-1] <= 128):
    return "cudnn"
  if jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().size <= 1:
    return "heads_major"
  return None


class KVCache(NamedTuple):
  """Keys/values of earlier positions, reused by a forward over a window of the canvas.

  k, v: [layers, B, Lc, kv_heads, hd] (after RoPE); valid: [B, Lc] bool, which cached
  keys the window's queries may attend to (Fast-dLLM's prefix / dual cache).
  """

  k: Array
  v: Array
  valid: Array


class Attention(nn.Module):
  """Multi-head / grouped-query attention, bidirectional unless `cfg.causal`.

  x: [B, L, D]; rope: (cos, sin) [B, L, hd] or None; mask: [B, 1, L, Lk] bool or None;
  cache: optional (k, v) [B, Lc, kv_heads, hd] of this layer, prepended to the window's
  own keys (then Lk = Lc + L). Returns (out [B, L, D], (k, v) of the window).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, rope, mask, cache=None):
    cfg = self.cfg
    q = _dense(cfg, (cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), cfg.qkv_bias, "q")(x)
    k = _dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg.qkv_bias, "k")(x)
    v = _dense(cfg, (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), cfg.qkv_bias, "v")(x)
    if rope is not None:
      q = apply_rope(q, *rope, fp32=cfg.rope_fp32)
      k = apply_rope(k, *rope, fp32=cfg.rope_fp32)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))
    keys, values = k, v
    if cache is not None:
      keys = jnp.concatenate([cache[0].astype(k.dtype), k], axis=1)
      values = jnp.concatenate([cache[1].astype(v.dtype), v], axis=1)
    # with a cache, causality comes from the mask (jax's is_causal aligns the window's first
    # query with the first cached key)
    impl, causal, scale = _attention_impl(cfg, q, mask), cfg.causal and cache is None, cfg.head_dim ** -0.5
    if impl == "heads_major":
      out = heads_major_attention(q, keys, values, mask, scale, causal)
    else:
      out = jax.nn.dot_product_attention(q, keys, values, mask=mask, is_causal=causal, scale=scale,
                                         implementation=impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), cfg.out_bias, "o", n_in=2)(out), (k, v)


def gelu_erf(x: Array) -> Array:
  """Exact GELU, y = x/2 * (1 + erf(x / sqrt(2))): BERT's and PyTorch's formula.

  Equal to `jax.nn.gelu(x, approximate=False)` within float32 rounding, but jax writes it
  with erfc, which XLA's CPU backend lowers to three elementwise passes with selects; erf is
  one polynomial pass (alone, at [1024, 1536]: 0.90 -> 0.36 ms forward; inside a MiniLM
  layer's train step the difference is within the noise).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


class Mlp(nn.Module):
  """swiglu: down(silu(gate(x)) * up(x));  gelu: wo(gelu_erf(wi(x))) (BERT)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    if cfg.mlp == "swiglu":
      gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.mlp_bias, "gate")(x)
      up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.mlp_bias, "up")(x)
      h = nn.silu(gate) * up
    else:
      h = gelu_erf(_dense(cfg, cfg.mlp_dim, ("embed", "mlp"), cfg.mlp_bias, "wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    name = "down" if cfg.mlp == "swiglu" else "wo"
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, name)(h)


class Block(nn.Module):
  """One transformer layer; pre-norm for RMSNorm families, post-norm for BERT.

  pre:  x += attn(norm1(x));  x += mlp(norm2(x))
  post: x = norm1(x + attn(x));  x = norm2(x + mlp(x))
  """

  cfg: ModelConfig
  collect_kv: bool = False
  collect_hidden: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, rope, mask, cache=None):
    cfg = self.cfg
    attn, mlp = Attention(cfg, name="attn"), Mlp(cfg, name="mlp")
    norm1, norm2 = Norm(cfg, name="attn_norm"), Norm(cfg, name="mlp_norm")
    drop = lambda h: nn.Dropout(cfg.dropout, deterministic=self.deterministic)(h)
    if cfg.norm == "rms":
      a, kv = attn(norm1(x), rope, mask, cache)
      x = x + drop(a)
      x = x + drop(mlp(norm2(x)))
    else:
      a, kv = attn(x, rope, mask, cache)
      x = norm1(x + drop(a))
      x = norm2(x + drop(mlp(x)))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, (kv if self.collect_kv else None, x if self.collect_hidden else None)


class MaskedDiffusionTransformer(nn.Module):
  """Bidirectional transformer over a token canvas, returning per-position logits.

  input_ids: [B, L] int; attention_mask: optional [B, L] (1 = real token), applied as a
  key-padding mask (LLaDA's reference ignores masks: pass None for parity);
  positions: optional [B, L] position ids (default 0..L-1).
  Returns logits [B, L, V], or (logits, hidden [B, L, D]) with `return_hidden=True`.

  For cached decoding (Fast-dLLM), `input_ids` is a window of the canvas, `positions` its
  absolute positions, `cache` a `KVCache` of other positions (attended where `valid`);
  `return_cache=True` appends this forward's own KVCache (the window's keys/values) to the
  outputs. `output_window=(start, n)` computes the head only for window positions
  [start, start + n) (start may be traced, n static): logits [B, n, V], hidden [B, n, D].
  With shifted logits (Dream) position start's logits come from position start - 1, so
  start must be >= 1. `hidden_layer=k` returns the output of layer k (0-based, before any
  final norm) as `hidden` instead of the last layer after the final norm (-1).
  `hidden_offset=1` (with `output_window`) returns the states of positions [start - 1,
  start + n - 1): for a shifted-logit model, the states whose logits predict the window.
  `return_features=True` returns, in place of the logits, the features f the output layer
  projects (after BERT's MLM transform, already aligned for shifted logits), so that
  logits = f @ W + b with (W, b) = `output_projection(config, params)`: a loss can then
  project in vocabulary tiles, or onto a subset of the vocabulary, without [.., V] logits.
  `deterministic=False` turns on `config.dropout` (training; needs rngs={"dropout": key}).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids: Array, *, attention_mask: Array | None = None,
               positions: Array | None = None, return_hidden: bool = False,
               cache: KVCache | None = None, return_cache: bool = False,
               output_window: tuple[Any, int] | None = None, hidden_layer: int = -1, hidden_offset: int = 0,
               return_features: bool = False, deterministic: bool = True):
    cfg = self.config
    if not -1 <= hidden_layer < cfg.num_layers:
      raise ValueError(f"hidden_layer={hidden_layer}; expected -1 (last layer, after the final norm) "
                       f"or a layer index in [0, {cfg.num_layers})")
    check_input_ids(cfg, input_ids)
    batch, length = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed")
    x = embed(input_ids)
    rope = None
    if cfg.positions == "rope":
      rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    else:
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
      x = x + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.compute_dtype,
                       param_dtype=cfg.weight_dtype, embedding_init=init, name="pos_embed")(positions)
      if cfg.type_vocab_size:
        x = x + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                         param_dtype=cfg.weight_dtype, embedding_init=init,
                         name="type_embed")(jnp.zeros_like(input_ids))
    if cfg.norm == "layer":
      x = Norm(cfg, name="embed_norm")(x)
    x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = None
    if attention_mask is not None or cache is not None:
      keep = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
      if cache is not None:
        keep = jnp.concatenate([cache.valid.astype(bool), keep], axis=1)
      mask = jnp.broadcast_to(keep[:, None, None, :], (batch, 1, length, keep.shape[1]))
      if cfg.causal and cache is not None:  # the cache holds earlier positions; the window is causal in itself
        lc = cache.valid.shape[1]
        own = jnp.concatenate([jnp.ones((length, lc), bool), jnp.tril(jnp.ones((length, length), bool))], axis=1)
        mask = mask & own[None, None]
    block = Block
    if REMAT_POLICIES[cfg.remat] is not None:
      block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[cfg.remat]),
                       static_argnums=(), prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"}, unroll=True if cfg.layer_loop == "unroll" else 1)
    layer_cache = None if cache is None else (cache.k, cache.v)
    x, (kv, per_layer) = layers(cfg, collect_kv=return_cache, collect_hidden=hidden_layer >= 0,
                                deterministic=deterministic, name="layers")(x, rope, mask, layer_cache)
    if cfg.norm == "rms":
      x = Norm(cfg, name="final_norm")(x)
    full_x = x
    keep_keys = None if attention_mask is None else attention_mask.astype(bool)
    chosen = x if hidden_layer < 0 else per_layer[hidden_layer]
    if output_window is not None:
      start, n = output_window
      hidden = jax.lax.dynamic_slice_in_dim(chosen, start - hidden_offset, n, axis=1)
      # with shifted logits position start's prediction comes from position start - 1
      x = jax.lax.dynamic_slice_in_dim(x, start - 1 if cfg.shift_logits else start, n, axis=1)
    else:
      hidden = chosen
      if cfg.shift_logits:
        x = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
    mlm_dense, mlm_norm, bias = None, None, None
    if cfg.head == "mlm":
      mlm_dense = _dense(cfg, cfg.hidden_size, ("embed", None), True, "mlm_dense")
      mlm_norm = Norm(cfg, name="mlm_norm")
      x = mlm_norm(gelu_erf(mlm_dense(x)))
      bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), cfg.weight_dtype)
    if cfg.copy_head:
      if return_features:
        raise ValueError("a copy head has no vocabulary projection to tile: train it with vocab_tile=0")
      keys = full_x if mlm_dense is None else mlm_norm(gelu_erf(mlm_dense(full_x)))
      start = 0 if output_window is None else output_window[0]
      copyable = (input_ids != cfg.mask_token_id) & (jnp.arange(length)[None, :] < (start if output_window is not None
                                                                                   else length))
      copyable = copyable & (keep_keys if attention_mask is not None else True)
      for special in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        if special is not None:
          copyable = copyable & (input_ids != special)
      q = _dense(cfg, cfg.hidden_size, ("embed", None), False, "copy_q")(x)
      k = _dense(cfg, cfg.hidden_size, ("embed", None), False, "copy_k")(keys)
      eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
      # the vocabulary head's logit, for EOS only (the rest of the vocabulary is not computed)
      eos_logit = jnp.einsum("bnd,d->bn", x, embed.embedding[eos].astype(x.dtype))
      if bias is not None:
        eos_logit = eos_logit + bias[eos].astype(eos_logit.dtype)
      logits = copy_logits(q, k, input_ids, copyable, eos_logit, eos, cfg.vocab_size)
    elif return_features:
      # what the output projection (`output_projection`) multiplies: [B, L or n, D]
      logits = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    elif cfg.head == "linear":
      logits = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), False, "lm_head")(x)
    else:
      logits = matmul(x.astype(cfg.compute_dtype), embed.embedding.T.astype(cfg.compute_dtype))
      if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if not return_features:
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    outputs = (logits, hidden) if return_hidden else (logits,)
    if return_cache:
      outputs = outputs + (KVCache(kv[0], kv[1], jnp.ones((batch, length), bool)
                                   if attention_mask is None else attention_mask.astype(bool)),)
    return outputs if len(outputs) > 1 else outputs[0]


def copy_logits(q: Array, k: Array, input_ids: Array, copyable: Array, eos_logit: Array, eos_id: int,
                vocab_size: int):
  """Logits of a copy head (a pointer over the input, written as a distribution over the vocabulary).

  s_ij = <q_i, k_j> / sqrt(D) for copyable positions j (the context: not masked, not special,
  before the answer window); logit_i(v) = log sum_{j: x_j = v} exp(s_ij) (-inf for tokens not
  in the context), and logit_i(EOS) = the vocabulary head's EOS logit (eos_logit).
  q: [B, n, D]; k: [B, L, D]; input_ids, copyable: [B, L]; eos_logit: [B, n] -> [B, n, V].
  """
  b, n, d = q.shape
  s = jnp.einsum("bnd,bld->bnl", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(d)
  s = jnp.where(copyable[:, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)                                                          # [B, n, L]
  rows = jnp.arange(b)[:, None, None]
  pos = jnp.arange(n)[None, :, None]
  tok = jnp.broadcast_to(input_ids[:, None, :], e.shape)
  sums = jnp.zeros((b, n, vocab_size), jnp.float32).at[rows, pos, tok].add(e)
  logits = jnp.where(sums > 0, jnp.log(jnp.maximum(sums, 1e-30)) + m, -jnp.inf)
  return logits.at[..., eos_id].set(eos_logit.astype(jnp.float32)).astype(q.dtype)


def output_projection(cfg: ModelConfig, params) -> tuple[Array, Array | None]:
  """(W [D, V], b [V] or None) of the output layer: logits = features @ W + b (see
  `MaskedDiffusionTransformer(..., return_features=True)`)."""
  if cfg.head == "linear":
    return params["lm_head"]["kernel"], None
  w = params["embed"]["embedding"].T
  return w, (params["mlm_bias"] if cfg.head == "mlm" else None)


def prediction_window(cfg: ModelConfig, start, n: int):
  """The `output_window` whose logits are about tokens [start, start + n): a causal model in
  Hugging Face's convention (logits[:, i] predicts token i + 1) reads them one position
  earlier; every other model (Dream re-aligns its shift itself) at the tokens' own positions."""
  return (start - 1, n) if cfg.causal and not cfg.shift_logits else (start, n)


def positions_from_mask(attention_mask: Array) -> Array:
  """Position ids that ignore padding: pos_i = (number of real tokens before i), [B, L] int32.

  With left padding the first real token gets 0 whatever the padding, so absolute-position
  models (BERT) and RoPE models alike see the same positions for the same text (Dream's
  `tok_idx` rule; padded slots get 0 and are masked out as keys).
  """
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0).astype(jnp.int32)


def check_input_ids(cfg: ModelConfig, input_ids) -> None:
  """Raises a clear error for a bad canvas when values are concrete (outside jit)."""
  if getattr(input_ids, "ndim", None) != 2:
    raise ValueError(f"input_ids must be [batch, length]; got shape {getattr(input_ids, 'shape', None)}")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers; got dtype {input_ids.dtype}")
  if cfg.positions == "learned" and input_ids.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f"input length {input_ids.shape[1]} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings} of this {cfg.family} model; shorten the input")
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    raise ValueError(f"input_ids contain {bad.size} id(s) outside the vocabulary [0, {cfg.vocab_size}), "
                     f"e.g. {bad.ravel()[:5].tolist()}; check the tokenizer matches the checkpoint")


def init_params(cfg: ModelConfig, key: Array, length: int = 8):
  """Random parameters (plain arrays, no partitioning boxes) for `cfg`."""
  model = MaskedDiffusionTransformer(cfg)
  with nn.logical_axis_rules(()):
    return nn.meta.unbox(model.init(key, jnp.zeros((1, length), jnp.int32))["params"])


def _abstract_params(cfg: ModelConfig):
  model = MaskedDiffusionTransformer(cfg)
  with nn.logical_axis_rules(()):  # shapes only: no sharding constraints, whatever mesh is active
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]


def param_shapes(cfg: ModelConfig) -> Any:
  """Pytree of jax.ShapeDtypeStruct for the params of `cfg`, computed without allocating."""
  with nn.logical_axis_rules(()):
    return nn.meta.unbox(_abstract_params(cfg))


def logical_axes(cfg: ModelConfig) -> Any:
  """Pytree of logical axis-name tuples (a `PartitionSpec` per param leaf)."""
  return nn.get_partition_spec(_abstract_params(cfg))


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
