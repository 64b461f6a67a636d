"""Model families: Hugging Face config <-> `ModelConfig`, parameter name maps, presets.

Each family knows three things about its published checkpoints:
  * how its `config.json` maps onto `ModelConfig` (and back, for export);
  * which tensor name holds which parameter leaf, in which layout (`TensorSpec`);
  * which published tensors are buffers or unused heads that are safe to skip.

LLaDA  (model_type "llada"): Llama-like, mask id 126336, logits at the same position.
Dream  (model_type "Dream"): Qwen2-like, GQA, q/k/v biases, logits shifted by one.
Llama  (model_type "llama") and Qwen2 ("qwen2"): causal LMs (the AR baselines), HF's
                             convention: logits[:, i] predicts token i + 1; no mask token.
BERT   (model_type "bert"):  post-LN encoder + MLM head tied to the word embeddings; its
                             [MASK] is the absorbing token (the CPU demo model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

from diffrag.models.transformer import ConfigError, ModelConfig

LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666


class TensorSpec(NamedTuple):
  """One published tensor and the parameter leaf it fills.

  path: keys into the params pytree; layer: index into the leading (scanned) layer axis,
  or None; n_in: for a torch Linear weight [out, in], how many leading axes of the flax
  kernel are input axes (the kernel is W.T reshaped); None means a plain reshape.
  """

  name: str
  path: tuple[str, ...]
  layer: int | None = None
  n_in: int | None = None


class Family(NamedTuple):
  name: str
  from_hf: Callable[[dict, Path | None], ModelConfig]
  to_hf: Callable[[ModelConfig], dict]
  specs: Callable[[ModelConfig, frozenset | None], list[TensorSpec]]  # None: export names
  ignore: re.Pattern  # published tensors that hold no parameter of ours (buffers, unused heads)
  head_paths: tuple[tuple[str, ...], ...] = ()  # leaves a fresh head may initialise


def _require(hf: dict, field: str, allowed, default=None):
  value = hf.get(field, default)
  if value not in allowed:
    raise ConfigError(f"config.json field {field!r} = {value!r} is not supported; expected one of {list(allowed)}")


def _get(hf: dict, field: str, *alternatives, default=None, required=True):
  for key in (field, *alternatives):
    if hf.get(key) is not None:
      return hf[key]
  if default is None and required:
    raise ConfigError(f"config.json is missing the field {field!r}")
  return default


def _layer_specs(cfg: ModelConfig, per_layer: list[tuple[str, tuple[str, ...], int | None]]) -> list[TensorSpec]:
  return [TensorSpec(name.format(i=i), ("layers",) + path, i, n_in)
          for i in range(cfg.num_layers) for name, path, n_in in per_layer]


# ----------------------------------------------------------------------------- LLaDA


def _llada_from_hf(hf: dict, path: Path | None) -> ModelConfig:
  del path
  _require(hf, "block_type", ("llama",), "llama")
  _require(hf, "layer_norm_type", ("rms",), "rms")
  _require(hf, "activation_type", ("silu", "swiglu"), "silu")
  for flag in ("alibi", "include_bias", "scale_logits", "input_emb_norm", "attention_layer_norm",
               "multi_query_attention"):
    _require(hf, flag, (False, None), False)
  _require(hf, "rope", (True,), True)
  _require(hf, "clip_qkv", (None,), None)
  d_model = _get(hf, "d_model")
  n_heads = _get(hf, "n_heads")
  mlp = hf.get("mlp_hidden_size") or _get(hf, "mlp_ratio") * d_model
  return ModelConfig(
      family="llada", vocab_size=_get(hf, "embedding_size", "vocab_size"), hidden_size=d_model,
      num_layers=_get(hf, "n_layers"), num_heads=n_heads, num_kv_heads=hf.get("n_kv_heads") or n_heads,
      head_dim=d_model // n_heads, mlp_dim=mlp, mask_token_id=hf.get("mask_token_id", LLADA_MASK_ID),
      pad_token_id=hf.get("pad_token_id"), eos_token_id=hf.get("eos_token_id"), bos_token_id=hf.get("bos_token_id"),
      norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-5), positions="rope", rope_theta=float(hf.get("rope_theta", 10000.0)),
      rope_fp32=bool(hf.get("rope_full_precision", True)), max_position_embeddings=hf.get("max_sequence_length", 4096),
      mlp="swiglu", qkv_bias=bool(hf.get("include_qkv_bias", False)),
      head="tied" if hf.get("weight_tying") else "linear", shift_logits=False)


def _llada_to_hf(cfg: ModelConfig) -> dict:
  return {
      "architectures": ["LLaDAModelLM"], "model_type": "llada",
      "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                   "AutoModel": "modeling_llada.LLaDAModelLM",
                   "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
      "d_model": cfg.hidden_size, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
      "n_layers": cfg.num_layers, "mlp_hidden_size": cfg.mlp_dim, "mlp_ratio": max(1, cfg.mlp_dim // cfg.hidden_size),
      "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.max_position_embeddings,
      "rope": True, "rope_theta": cfg.rope_theta, "rope_full_precision": cfg.rope_fp32, "alibi": False,
      "layer_norm_type": "rms", "rms_norm_eps": cfg.norm_eps, "layer_norm_with_affine": True,
      "bias_for_layer_norm": False, "block_type": "llama", "activation_type": "silu",
      "include_bias": False, "include_qkv_bias": cfg.qkv_bias, "weight_tying": cfg.head == "tied",
      "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
      "scale_logits": False, "input_emb_norm": False, "attention_layer_norm": False, "clip_qkv": None,
      "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
      "bos_token_id": cfg.bos_token_id, "use_cache": False, "init_device": "cpu",
  }


def _llada_specs(cfg: ModelConfig, present: frozenset) -> list[TensorSpec]:
  del present
  p = "model.transformer."
  layer = [
      (p + "blocks.{i}.attn_norm.weight", ("attn_norm", "scale"), None),
      (p + "blocks.{i}.ff_norm.weight", ("mlp_norm", "scale"), None),
      (p + "blocks.{i}.q_proj.weight", ("attn", "q", "kernel"), 1),
      (p + "blocks.{i}.k_proj.weight", ("attn", "k", "kernel"), 1),
      (p + "blocks.{i}.v_proj.weight", ("attn", "v", "kernel"), 1),
      (p + "blocks.{i}.attn_out.weight", ("attn", "o", "kernel"), 2),
      (p + "blocks.{i}.ff_proj.weight", ("mlp", "gate", "kernel"), 1),
      (p + "blocks.{i}.up_proj.weight", ("mlp", "up", "kernel"), 1),
      (p + "blocks.{i}.ff_out.weight", ("mlp", "down", "kernel"), 1),
  ]
  if cfg.qkv_bias:
    layer += [(p + f"blocks.{{i}}.{n}_proj.bias", ("attn", n, "bias"), None) for n in "qkv"]
  specs = [TensorSpec(p + "wte.weight", ("embed", "embedding")), TensorSpec(p + "ln_f.weight", ("final_norm", "scale"))]
  if cfg.head == "linear":
    specs.append(TensorSpec(p + "ff_out.weight", ("lm_head", "kernel"), None, 1))
  return specs + _layer_specs(cfg, layer)


# ----------------------------------------------------------------------------- Dream


def _dream_from_hf(hf: dict, path: Path | None) -> ModelConfig:
  del path
  _require(hf, "hidden_act", ("silu",), "silu")
  _require(hf, "rope_scaling", (None,), None)
  _require(hf, "use_sliding_window", (False, None), False)
  hidden = _get(hf, "hidden_size")
  heads = _get(hf, "num_attention_heads")
  return ModelConfig(
      family="dream", vocab_size=_get(hf, "vocab_size"), hidden_size=hidden, num_layers=_get(hf, "num_hidden_layers"),
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hidden // heads, mlp_dim=_get(hf, "intermediate_size"),
      mask_token_id=hf.get("mask_token_id", DREAM_MASK_ID), pad_token_id=hf.get("pad_token_id"),
      eos_token_id=hf.get("eos_token_id"), bos_token_id=hf.get("bos_token_id"),
      norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rope", rope_theta=float(_get(hf, "rope_theta")),
      rope_fp32=False, max_position_embeddings=hf.get("max_position_embeddings", 32768), mlp="swiglu",
      qkv_bias=True, head="tied" if hf.get("tie_word_embeddings") else "linear", shift_logits=True)


def _dream_to_hf(cfg: ModelConfig) -> dict:
  return {
      "architectures": ["DreamModel"], "model_type": "Dream",
      "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.head == "tied",
      "use_sliding_window": False, "attention_dropout": 0.0, "mask_token_id": cfg.mask_token_id,
      "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
      "use_cache": False, "torch_dtype": cfg.param_dtype,
  }


def _hf_decoder_specs(cfg: ModelConfig, present: frozenset) -> list[TensorSpec]:
  """Tensor names of Hugging Face Llama / Qwen2 decoders (Dream uses Qwen2's names)."""
  del present
  p = "model.layers.{i}."
  layer = [
      (p + "input_layernorm.weight", ("attn_norm", "scale"), None),
      (p + "post_attention_layernorm.weight", ("mlp_norm", "scale"), None),
      (p + "self_attn.o_proj.weight", ("attn", "o", "kernel"), 2),
      (p + "mlp.gate_proj.weight", ("mlp", "gate", "kernel"), 1),
      (p + "mlp.up_proj.weight", ("mlp", "up", "kernel"), 1),
      (p + "mlp.down_proj.weight", ("mlp", "down", "kernel"), 1),
  ]
  for n in "qkv":
    layer.append((p + f"self_attn.{n}_proj.weight", ("attn", n, "kernel"), 1))
    if cfg.qkv_bias:
      layer.append((p + f"self_attn.{n}_proj.bias", ("attn", n, "bias"), None))
  specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding")),
           TensorSpec("model.norm.weight", ("final_norm", "scale"))]
  if cfg.head == "linear":
    specs.append(TensorSpec("lm_head.weight", ("lm_head", "kernel"), None, 1))
  return specs + _layer_specs(cfg, layer)


# ----------------------------------------------------------------- Llama and Qwen2 (AR)
# Causal LMs from Hugging Face: logits[:, i] predicts token i + 1, as in `transformers`
# (no re-alignment, unlike Dream), so the autoregressive baselines of both papers (Llama-3,
# Qwen2.5) load as they were published. They have no mask token (mask_token_id = -1).

ROPE_TYPES = ("default", "linear", "llama3")


def _rope_params(hf: dict) -> dict:
  """RoPE settings of a config.json: `rope_theta` + `rope_scaling` (transformers 4), or one
  `rope_parameters` dict (transformers 5)."""
  params = dict(hf.get("rope_parameters") or {})
  params.update(hf.get("rope_scaling") or {})
  if hf.get("rope_theta") is not None:
    params["rope_theta"] = hf["rope_theta"]
  return params


def _rope_scaling(hf: dict):
  """config.json rope scaling -> ModelConfig.rope_scaling (a hashable tuple) or None."""
  rs = _rope_params(hf)
  if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
    return None
  kind = rs.get("rope_type", rs.get("type"))
  if kind not in ROPE_TYPES:
    raise ConfigError(f"config.json rope_scaling type {kind!r} is not supported; expected one of {list(ROPE_TYPES)}")
  if kind == "default":
    return None
  if kind == "linear":
    return ("linear", float(rs["factor"]))
  return ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
          float(rs["original_max_position_embeddings"]))


def _causal_from_hf(family: str):
  def from_hf(hf: dict, path: Path | None) -> ModelConfig:
    del path
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "mlp_bias", (False, None), False)
    _require(hf, "use_sliding_window", (False, None), False)
    if family == "llama":
      _require(hf, "attention_bias", (False, None), False)
    hidden = _get(hf, "hidden_size")
    heads = _get(hf, "num_attention_heads")
    eos = hf.get("eos_token_id")
    return ModelConfig(
        family=family, vocab_size=_get(hf, "vocab_size"), hidden_size=hidden, num_layers=_get(hf, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads, mlp_dim=_get(hf, "intermediate_size"), mask_token_id=-1,
        pad_token_id=hf.get("pad_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        bos_token_id=hf.get("bos_token_id"), norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6 if family == "qwen2" else 1e-5), positions="rope",
        rope_theta=float(_rope_params(hf).get("rope_theta", 10000.0)), rope_scaling=_rope_scaling(hf), rope_fp32=False,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), mlp="swiglu", qkv_bias=family == "qwen2",
        head="tied" if hf.get("tie_word_embeddings") else "linear", shift_logits=False, causal=True)
  return from_hf


def _causal_to_hf(family: str):
  def to_hf(cfg: ModelConfig) -> dict:
    hf = {"architectures": ["LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM"], "model_type": family,
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "vocab_size": cfg.vocab_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
          "tie_word_embeddings": cfg.head == "tied", "attention_dropout": 0.0, "pad_token_id": cfg.pad_token_id,
          "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id, "use_cache": True}
    if family == "llama":
      hf.update(attention_bias=False, mlp_bias=False)
    else:
      hf.update(use_sliding_window=False)
    scaling = cfg.rope_scaling
    if scaling and scaling[0] == "linear":
      hf["rope_scaling"] = {"rope_type": "linear", "factor": scaling[1]}
    elif scaling:
      hf["rope_scaling"] = {"rope_type": "llama3", "factor": scaling[1], "low_freq_factor": scaling[2],
                            "high_freq_factor": scaling[3], "original_max_position_embeddings": int(scaling[4])}
    return hf
  return to_hf


# ----------------------------------------------------------------------------- BERT


def _bert_token_id(hf: dict, path: Path | None, field: str, token: str) -> int | None:
  """A special-token id from config.json, else from the tokenizer.json beside it."""
  if hf.get(field) is not None:
    return hf[field]
  tok = path / "tokenizer.json" if path else None
  if tok and tok.exists():
    return json.loads(tok.read_text())["model"]["vocab"].get(token)
  return None


def _bert_from_hf(hf: dict, path: Path | None) -> ModelConfig:
  _require(hf, "hidden_act", ("gelu",), "gelu")
  _require(hf, "position_embedding_type", ("absolute",), "absolute")
  hidden = _get(hf, "hidden_size")
  heads = _get(hf, "num_attention_heads")
  mask_id = _bert_token_id(hf, path, "mask_token_id", "[MASK]")
  if mask_id is None:
    raise ConfigError("BERT checkpoint: no mask_token_id in config.json and no [MASK] in tokenizer.json; "
                      "add \"mask_token_id\" to config.json")
  return ModelConfig(
      family="bert", vocab_size=_get(hf, "vocab_size"), hidden_size=hidden, num_layers=_get(hf, "num_hidden_layers"),
      num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, mlp_dim=_get(hf, "intermediate_size"),
      mask_token_id=mask_id, pad_token_id=hf.get("pad_token_id", 0),
      eos_token_id=_bert_token_id(hf, path, "eos_token_id", "[SEP]"),
      bos_token_id=_bert_token_id(hf, path, "bos_token_id", "[CLS]"),
      norm="layer", norm_eps=hf.get("layer_norm_eps", 1e-12), positions="learned",
      max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
      mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, head="mlm", shift_logits=False,
      causal=bool(hf.get("is_decoder", False)))


def _bert_to_hf(cfg: ModelConfig) -> dict:
  return {
      "architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
      "hidden_act": "gelu", "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size, "vocab_size": cfg.vocab_size, "layer_norm_eps": cfg.norm_eps,
      "position_embedding_type": "absolute", "pad_token_id": cfg.pad_token_id, "mask_token_id": cfg.mask_token_id,
      "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "tie_word_embeddings": True,
      "is_decoder": cfg.causal,
  }


def _bert_specs(cfg: ModelConfig, present: frozenset | None) -> list[TensorSpec]:
  # BertForMaskedLM names carry a "bert." prefix, BertModel names none; export uses the former.
  p = "bert." if present is None or any(n.startswith("bert.") for n in present) else ""
  e, l = p + "embeddings.", p + "encoder.layer.{i}."
  layer = [
      (l + "attention.self.query.weight", ("attn", "q", "kernel"), 1),
      (l + "attention.self.query.bias", ("attn", "q", "bias"), None),
      (l + "attention.self.key.weight", ("attn", "k", "kernel"), 1),
      (l + "attention.self.key.bias", ("attn", "k", "bias"), None),
      (l + "attention.self.value.weight", ("attn", "v", "kernel"), 1),
      (l + "attention.self.value.bias", ("attn", "v", "bias"), None),
      (l + "attention.output.dense.weight", ("attn", "o", "kernel"), 2),
      (l + "attention.output.dense.bias", ("attn", "o", "bias"), None),
      (l + "attention.output.LayerNorm.weight", ("attn_norm", "scale"), None),
      (l + "attention.output.LayerNorm.bias", ("attn_norm", "bias"), None),
      (l + "intermediate.dense.weight", ("mlp", "wi", "kernel"), 1),
      (l + "intermediate.dense.bias", ("mlp", "wi", "bias"), None),
      (l + "output.dense.weight", ("mlp", "wo", "kernel"), 1),
      (l + "output.dense.bias", ("mlp", "wo", "bias"), None),
      (l + "output.LayerNorm.weight", ("mlp_norm", "scale"), None),
      (l + "output.LayerNorm.bias", ("mlp_norm", "bias"), None),
  ]
  specs = [
      TensorSpec(e + "word_embeddings.weight", ("embed", "embedding")),
      TensorSpec(e + "position_embeddings.weight", ("pos_embed", "embedding")),
      TensorSpec(e + "LayerNorm.weight", ("embed_norm", "scale")),
      TensorSpec(e + "LayerNorm.bias", ("embed_norm", "bias")),
      TensorSpec("cls.predictions.transform.dense.weight", ("mlm_dense", "kernel"), None, 1),
      TensorSpec("cls.predictions.transform.dense.bias", ("mlm_dense", "bias")),
      TensorSpec("cls.predictions.transform.LayerNorm.weight", ("mlm_norm", "scale")),
      TensorSpec("cls.predictions.transform.LayerNorm.bias", ("mlm_norm", "bias")),
      TensorSpec("cls.predictions.bias", ("mlm_bias",)),
  ]
  if cfg.type_vocab_size:
    specs.append(TensorSpec(e + "token_type_embeddings.weight", ("type_embed", "embedding")))
  if cfg.copy_head:  # diffrag's extractive copy head (no transformers counterpart: ignored by BertForMaskedLM)
    specs += [TensorSpec("copy_head.query.weight", ("copy_q", "kernel"), None, 1),
              TensorSpec("copy_head.key.weight", ("copy_k", "kernel"), None, 1)]
  return specs + _layer_specs(cfg, layer)


FAMILIES = {
    "llada": Family("llada", _llada_from_hf, _llada_to_hf, _llada_specs,
                    re.compile(r".*rotary_emb\.inv_freq$")),
    "Dream": Family("dream", _dream_from_hf, _dream_to_hf, _hf_decoder_specs,
                    re.compile(r".*rotary_emb\.inv_freq$")),
    "llama": Family("llama", _causal_from_hf("llama"), _causal_to_hf("llama"), _hf_decoder_specs,
                    re.compile(r".*rotary_emb\.inv_freq$")),
    "qwen2": Family("qwen2", _causal_from_hf("qwen2"), _causal_to_hf("qwen2"), _hf_decoder_specs,
                    re.compile(r".*rotary_emb\.inv_freq$")),
    "bert": Family("bert", _bert_from_hf, _bert_to_hf, _bert_specs,
                   re.compile(r"^(bert\.)?(embeddings\.position_ids|pooler\..*)$|^cls\.(seq_relationship\..*"
                              r"|predictions\.decoder\.(weight|bias))$"),
                   head_paths=(("mlm_dense",), ("mlm_norm",), ("mlm_bias",), ("copy_q",), ("copy_k",))),
}
_BY_LABEL = {f.name: f for f in FAMILIES.values()}


def family_of(hf_config: dict) -> Family:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ConfigError(f"config.json model_type={model_type!r} is not supported; expected one of {list(FAMILIES)}")
  return FAMILIES[model_type]


def family_by_label(label: str) -> Family:
  if label not in _BY_LABEL:
    raise ConfigError(f"unknown model family {label!r}; expected one of {list(_BY_LABEL)}")
  return _BY_LABEL[label]


def config_from_hf(hf_config: dict, path: Path | None = None, **overrides) -> ModelConfig:
  """`config.json` dict -> ModelConfig (family detected from `model_type`)."""
  return family_of(hf_config).from_hf(hf_config, path).replace(**overrides)


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, ModelConfig] = {
    # Published shapes (random weights for benchmarks; real weights through from_pretrained).
    "llada-8b": ModelConfig(family="llada", vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32,
                            num_kv_heads=32, head_dim=128, mlp_dim=12288, mask_token_id=LLADA_MASK_ID,
                            pad_token_id=126081, eos_token_id=126081, bos_token_id=126080, norm_eps=1e-5,
                            rope_theta=500000.0, max_position_embeddings=4096),
    "dream-7b": ModelConfig(family="dream", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                            num_kv_heads=4, head_dim=128, mlp_dim=18944, mask_token_id=DREAM_MASK_ID,
                            pad_token_id=151643, eos_token_id=151643, bos_token_id=151643, norm_eps=1e-6,
                            rope_theta=1e6, rope_fp32=False, max_position_embeddings=131072, qkv_bias=True,
                            shift_logits=True),
    # A ~1B LLaDA-shaped model (MFU / throughput benchmarks).
    "llada-1b": ModelConfig(family="llada", vocab_size=126464, hidden_size=2048, num_layers=16, num_heads=16,
                            num_kv_heads=16, head_dim=128, mlp_dim=5632, mask_token_id=LLADA_MASK_ID,
                            pad_token_id=126081, eos_token_id=126081, rope_theta=500000.0),
    # Tiny shapes for tests and CPU benchmarks.
    "tiny-llada": ModelConfig(family="llada", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=4, head_dim=16, mlp_dim=160, mask_token_id=511, pad_token_id=1,
                              eos_token_id=1, rope_theta=500000.0),
    "tiny-dream": ModelConfig(family="dream", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, mlp_dim=160, mask_token_id=511, pad_token_id=1,
                              eos_token_id=1, norm_eps=1e-6, rope_theta=1e6, rope_fp32=False, qkv_bias=True,
                              shift_logits=True),
    "tiny-bert": ModelConfig(family="bert", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=16, mlp_dim=128, mask_token_id=4, pad_token_id=0,
                             norm="layer", norm_eps=1e-12, positions="learned", max_position_embeddings=128,
                             type_vocab_size=2, mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
                             head="mlm"),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)

