"""Tiny random checkpoints in Hugging Face layout, built with PyTorch `transformers`.

LLaDA and Dream ship their own modelling code (not available offline), but their
architectures are Llama / Qwen2 with the causal mask removed, so the references here are
`LlamaForCausalLM` / `Qwen2ForCausalLM` run with an all-visible 4-D attention mask, and
the checkpoints are written under the LLaDA / Dream tensor names and config keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

VOCAB = 320
LLADA_MASK = VOCAB - 1
DREAM_MASK = VOCAB - 2

_LLAMA_TO_LLADA = [
    ("model.embed_tokens.", "model.transformer.wte."),
    ("model.norm.", "model.transformer.ln_f."),
    ("lm_head.", "model.transformer.ff_out."),
    ("model.layers.", "model.transformer.blocks."),
    ("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"), ("self_attn.v_proj", "v_proj"),
    ("self_attn.o_proj", "attn_out"), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"),
    ("mlp.down_proj", "ff_out"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ff_norm"),
]


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
  """Random weights everywhere (norm scales and biases too), so every mapping is exercised."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p + scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def llama_reference(layers=2, hidden=64, heads=4, kv_heads=4, mlp=160, seed=0, tie=False, rope_scaling=None):
  from transformers import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                    rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=tie,
                    attention_bias=False, attn_implementation="eager", rope_scaling=rope_scaling,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  return _perturb(LlamaForCausalLM(cfg), seed)


def qwen2_reference(layers=2, hidden=64, heads=4, kv_heads=2, mlp=160, seed=0, tie=False):
  from transformers import Qwen2Config, Qwen2ForCausalLM
  cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                    rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=tie,
                    attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  return _perturb(Qwen2ForCausalLM(cfg), seed)


def bert_reference(layers=2, hidden=64, heads=4, mlp=128, seed=0):
  from transformers import BertConfig, BertForMaskedLM
  cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=mlp, max_position_embeddings=128, type_vocab_size=2,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
  torch.manual_seed(seed)
  return _perturb(BertForMaskedLM(cfg), seed)


def llada_config_json(ref) -> dict:
  c = ref.config
  return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": c.hidden_size,
          "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads, "n_layers": c.num_hidden_layers,
          "mlp_ratio": 4, "mlp_hidden_size": c.intermediate_size, "vocab_size": c.vocab_size,
          "embedding_size": c.vocab_size, "max_sequence_length": 512, "rope": True, "rope_theta": c.rope_parameters["rope_theta"],
          "rope_full_precision": True, "rms_norm_eps": c.rms_norm_eps, "layer_norm_type": "rms",
          "block_type": "llama", "activation_type": "silu", "include_bias": False, "include_qkv_bias": False,
          "weight_tying": False, "alibi": False, "mask_token_id": LLADA_MASK, "eos_token_id": 1, "pad_token_id": 1}


def dream_config_json(ref) -> dict:
  c = ref.config
  return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
          "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
          "vocab_size": c.vocab_size, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
          "rope_theta": c.rope_parameters["rope_theta"], "rope_scaling": None, "max_position_embeddings": 512,
          "tie_word_embeddings": False, "mask_token_id": DREAM_MASK, "pad_token_id": 1, "eos_token_id": 1}


def llada_name(llama_name: str) -> str:
  for a, b in _LLAMA_TO_LLADA:
    llama_name = llama_name.replace(a, b)
  return llama_name


def write_checkpoint(path: Path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
  """Writes config.json and the tensors as one file or `shards` files with an index."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  names = sorted(tensors)
  if shards == 1:
    save_file({n: tensors[n].contiguous() for n in names}, path / "model.safetensors", metadata={"format": "pt"})
    return path
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.array(names), shards)):
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({n: tensors[n].contiguous() for n in chunk}, path / fname, metadata={"format": "pt"})
    weight_map.update({n: fname for n in chunk})
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return path


def llada_checkpoint(path: Path, shards: int = 1, **kw):
  """(checkpoint dir, reference Llama model) for a tiny LLaDA."""
  ref = llama_reference(**kw)
  tensors = {llada_name(n): t for n, t in ref.state_dict().items()}
  return write_checkpoint(path, llada_config_json(ref), tensors, shards), ref


def dream_checkpoint(path: Path, shards: int = 1, **kw):
  ref = qwen2_reference(**kw)
  return write_checkpoint(path, dream_config_json(ref), dict(ref.state_dict()), shards), ref


def bert_checkpoint(path: Path, **kw):
  ref = bert_reference(**kw)
  ref.config.mask_token_id = 4
  ref.save_pretrained(path, safe_serialization=True)
  return path, ref


def bidirectional_logits(ref, ids: np.ndarray, hidden: bool = False):
  """Reference forward with an all-visible 4-D mask (LLaDA/Dream = Llama/Qwen2 without causality).

  Returns logits [B, L, V] (unshifted, as the network emits them), and with `hidden` the
  last hidden state after the final norm [B, L, D].
  """
  ids_t = torch.tensor(ids, dtype=torch.long)
  mask = torch.zeros((ids.shape[0], 1, ids.shape[1], ids.shape[1]), dtype=torch.float32)
  with torch.no_grad():
    h = ref.model(input_ids=ids_t, attention_mask=mask).last_hidden_state
    logits = ref.lm_head(h)
  return (logits.numpy(), h.numpy()) if hidden else logits.numpy()


def causal_checkpoint(path: Path, family: str = "llama", **kw):
  """(checkpoint dir, reference model) of a tiny causal LM saved by `transformers` itself."""
  ref = (llama_reference if family == "llama" else qwen2_reference)(**kw)
  ref.save_pretrained(path, safe_serialization=True)
  return path, ref


WORDS = ("the a of in is on and to what which where who does did from into flows river sea nile africa bees honey "
         "nectar flowers hive mount etna volcano island sicily italy amazon atlantic water cats purr dogs bark "
         "strangers rivers document title make why question answer passage [ ] 0 1 2 3 4 5 6 7 8 9").split()


def word_tokenizer(path: Path, eos_ids=(2,)) -> Path:
  """A word-level tokenizer of VOCAB ids ([PAD] 0, [BOS] 1, [EOS] 2, [UNK] 3, then words) saved
  with `transformers`, plus a generation_config.json naming the stop ids."""
  import json as json_lib
  from tokenizers import Tokenizer, normalizers, pre_tokenizers
  from tokenizers.models import WordLevel
  from transformers import PreTrainedTokenizerFast
  vocab = {t: i for i, t in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + list(dict.fromkeys(WORDS)))}
  for i in range(len(vocab), VOCAB):
    vocab[f"w{i}"] = i
  tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                 unk_token="[UNK]")
  fast.save_pretrained(str(path))
  (Path(path) / "generation_config.json").write_text(json_lib.dumps({"eos_token_id": list(eos_ids)}))
  return Path(path)
