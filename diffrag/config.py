"""Typed configs: frozen dataclasses, loaded from YAML with `key=value` overrides.

    cfg = load(TrainConfig, "configs/minilm_corpus.yaml", ["optim.lr=3e-4", "train.steps=50"])

Loading is strict: an unknown key, or a value of the wrong type, raises `ConfigError`
naming the dotted key, the value and the expected type. Override values are parsed as
YAML scalars/lists (`steps=100`, `rates=[0.1,0.5]`, `dir=null`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffrag.models.transformer import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
  """Checks `value` against type `tp` (ints are accepted where floats are expected)."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as e:
        errors.append(e)
    raise ConfigError(f"config key {key!r}: {value!r} is not a {_type_name(tp)}")
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"config key {key!r}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, key)
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    item = args[0] if args else Any
    return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
    return dict(value)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is float and isinstance(value, str):
    try:
      return float(value)  # YAML reads 3e-4 (no dot) as a string
    except ValueError:
      pass
  if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
    raise ConfigError(f"config key {key!r}: {value!r} is a {type(value).__name__}, expected {_type_name(tp)}")
  return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
  """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    where = f" under {prefix!r}" if prefix else ""
    raise ConfigError(f"unknown config key(s) {[f'{prefix}.{k}'.lstrip('.') for k in unknown]}{where}; "
                      f"valid keys: {sorted(names)}")
  kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}".lstrip(".")) for k, v in data.items()}
  return cls(**kwargs)


def to_dict(obj) -> dict:
  return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
  """Applies `a.b.c=value` strings to a nested dict (values parsed as YAML)."""
  data = dict(data)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
      node[p] = dict(node.get(p) or {})
      node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)
  return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
  """YAML file (optional) + overrides -> `cls`."""
  data: dict = {}
  if path is not None:
    path = Path(path)
    if not path.exists():
      raise FileNotFoundError(f"config file {path} does not exist (the shipped configs are in configs/)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: the top level of a config must be a mapping")
  return from_dict(cls, apply_overrides(data, overrides or []))


def of_run(cls: type[T], out_dir: str | Path) -> T:
  """The resolved config a run was made with, read back from its `out_dir/manifest.json` (where
  `provenance.canonical` wrote each dataclass as a mapping tagged `__dataclass__`)."""
  import json  # pylint: disable=import-outside-toplevel
  path = Path(out_dir) / "manifest.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: give the out_dir of a finished run (it writes manifest.json)")
  untag = lambda v: {k: untag(x) for k, x in v.items() if k != "__dataclass__"} if isinstance(v, dict) else v
  return from_dict(cls, untag(json.loads(path.read_text())["config"]))


def dump(obj, path: str | Path) -> None:
  Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
