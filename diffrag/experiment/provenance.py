"""Provenance: stable content hashes and the `manifest.json` every run writes.

    key = fingerprint({"init": "minilm", "train": dataclasses.asdict(spec), "examples": array_digest(tokens)})
    write_manifest(out_dir, config=cfg, seeds={"generation": 0}, wall_times={"train": 312.4})

`fingerprint` hashes a canonical JSON rendering (dataclasses -> dicts, tuples -> lists, keys
sorted, numpy arrays by content), so two specs hash equal exactly when their contents are
equal. The manifest records what a reader of a table needs to rerun it: the resolved
config, the git commit (and whether the tree was dirty), data fingerprints, package
versions, the device kind, seeds, wall times and the trained artefacts used.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = ("diffrag", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "numpy",
            "grain", "tensorflow-datasets", "ranx", "bm25s", "torch")


def canonical(obj: Any) -> Any:
  """A JSON-able rendering of `obj` whose dump is the same for equal contents."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {"__dataclass__": type(obj).__name__, **{f.name: canonical(getattr(obj, f.name))
                                                    for f in dataclasses.fields(obj)}}
  if isinstance(obj, dict):
    return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
  if isinstance(obj, (list, tuple)):
    return [canonical(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return {"__array__": array_digest(obj)}
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, Path):
    return str(obj)
  if obj is None or isinstance(obj, (str, int, float, bool)):
    return obj
  raise TypeError(f"cannot fingerprint a {type(obj).__name__}: give plain data, dataclasses or arrays")


def fingerprint(obj: Any, length: int = 16) -> str:
  """sha256 of the canonical JSON of `obj`, first `length` hex digits."""
  text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:length]


def array_digest(*arrays: np.ndarray) -> str:
  """sha256 over dtype, shape and bytes of each array."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kw) -> None:
  """Writes `json.dumps(obj, **dump_kw)` to `path` through a temporary file and a rename, so a
  reader never sees half a file (a run killed mid-write leaves the old one or none)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, **dump_kw))
  tmp.rename(path)


def file_fingerprint(path: str | os.PathLike) -> dict:
  """{path, bytes, sha256} of one data file (content hash: a copy elsewhere hashes the same)."""
  path = Path(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": h.hexdigest()[:16]}


# the code that trains an artefact: these modules' source and the numerical libraries (the data
# it trains on enters every artefact key by content, so the code that reads the files is not here)
TRAINING_CODE = ("diffrag.models", "diffrag.train", "diffrag.diffusion", "diffrag.data.pipeline", "diffrag.parallel")
NUMERIC_PACKAGES = ("jax", "jaxlib", "flax", "optax")


def _without_docstrings(tree: ast.AST) -> ast.AST:
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      node.body = body[1:] or [ast.Pass()]
  return tree


def source_fingerprint(files: list[Path], root: Path) -> str:
  """sha256 over each file's path under `root` and its syntax tree less docstrings: comments,
  docstrings, blank lines and formatting do not change it; any change to what runs does."""
  h = hashlib.sha256()
  for f in sorted(files):
    tree = _without_docstrings(ast.parse(f.read_text(), filename=str(f)))
    h.update(f"{f.relative_to(root).as_posix()}\n{ast.dump(tree)}\n".encode())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_version(modules: tuple[str, ...] = TRAINING_CODE) -> dict:
  """What the code that makes an artefact or a prediction is: a `source_fingerprint` of the
  named diffrag modules (packages recursively, or single modules), the versions of the
  numerical libraries and the jax backend. Part of every artefact key, so a model trained
  before a change to that code (even one at the level of float rounding, which moves a
  training run as far as another seed does) is never reused as if the new code had made it."""
  import jax  # pylint: disable=import-outside-toplevel
  root = Path(__file__).resolve().parents[2]
  files = []
  for name in modules:
    if not name.startswith("diffrag"):
      raise ValueError(f"code_version covers diffrag's own modules; got {name!r}")
    path = root.joinpath(*name.split("."))
    if path.is_dir():
      files += path.rglob("*.py")
    elif path.with_suffix(".py").exists():
      files.append(path.with_suffix(".py"))
    else:
      raise ValueError(f"no diffrag module {name!r} (looked for {path}/ and {path}.py)")
  versions = package_versions()
  return {"modules": list(modules), "source": source_fingerprint(files, root),
          "packages": {k: versions.get(k) for k in NUMERIC_PACKAGES}, "backend": jax.default_backend()}


def git_state(root: str | os.PathLike | None = None) -> dict:
  """{commit, dirty} of the repository holding diffrag (None where git is unavailable)."""
  root = Path(root) if root else Path(__file__).resolve().parents[2]
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True, timeout=10).stdout
    return {"commit": commit, "dirty": bool(status.strip())}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def package_versions() -> dict:
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def device_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"backend": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
          "processes": jax.process_count(), "host": platform.node(), "cpu_count": os.cpu_count()}


_GIT_AT_START = git_state()  # taken when the run imports diffrag.experiment, before it does any work


def run_git_state() -> dict:
  """{commit, dirty} of the code this process started from (`git_state` at import), and where the
  tree differs now, "at_write": the state now: a manifest written at the end of an hour-long run
  names the commit that ran, not one committed while it ran."""
  now = git_state()
  return dict(_GIT_AT_START) if now == _GIT_AT_START else {**_GIT_AT_START, "at_write": now}


def write_manifest(out_dir: str | os.PathLike, *, config: Any, data: dict | None = None, seeds: dict | None = None,
                   wall_times: dict | None = None, artefacts: list | None = None, extra: dict | None = None) -> Path:
  """Writes `out_dir/manifest.json` and returns its path."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  manifest = {
      "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
      "command": sys.argv,
      "config": canonical(config),
      "git": run_git_state(),
      "packages": package_versions(),
      "device": device_info(),
      "data": data or {},
      "seeds": seeds or {},
      "wall_times_s": {k: round(float(v), 3) for k, v in (wall_times or {}).items()},
      "artefacts": artefacts or [],
      **(extra or {}),
  }
  path = out / "manifest.json"
  path.write_text(json.dumps(manifest, indent=2, default=str))
  return path
