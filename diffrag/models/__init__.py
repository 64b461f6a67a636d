"""Masked diffusion transformers (LLaDA, Dream, BERT families) and their checkpoints."""

from diffrag.models.convert import from_pretrained, load_tokenizer, minilm_path, read_hf_config, save_pretrained
from diffrag.models.families import PRESETS, config_from_hf, preset
from diffrag.models.transformer import (ConfigError, KVCache, MaskedDiffusionTransformer, ModelConfig, check_input_ids,
                                        init_params, logical_axes, num_params, param_shapes,
                                        positions_from_mask)

__all__ = [
    "ConfigError", "KVCache", "MaskedDiffusionTransformer", "ModelConfig", "PRESETS", "check_input_ids", "config_from_hf",
    "from_pretrained", "init_params", "load_tokenizer", "logical_axes", "minilm_path", "num_params",
    "param_shapes", "positions_from_mask", "preset", "read_hf_config", "save_pretrained",
]
