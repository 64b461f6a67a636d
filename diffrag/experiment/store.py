"""The artefact store: trained things live in folders named by a hash of what made them.

    store = ArtefactStore("outputs/artefacts")
    art = store.get("reader", {"init": "minilm", "train": spec, "examples": digest})
    if not art.done:
      ...train into art.path (resumable: an interrupted build resumes there)...
      store.finish(art, {"steps": 300, "train_seconds": 512.0})
    model, params = load_model(art.path / "model")

A spec names everything that determines the artefact (init, data fingerprints and split,
DocID spec, training spec, tokenizer); the store adds the version of the code that builds it
(`provenance.code_version`); `<root>/<kind>-<fingerprint(spec)>/` holds it, with `spec.json`
beside it. An artefact is reused only when the whole spec matches, and `get`
says which happened; when it does not match, the message names the fields that differ
from the closest artefact of the same kind, so a user sees why a new one is trained.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Callable

from diffrag.experiment.provenance import TRAINING_CODE, canonical, code_version, fingerprint, write_json_atomic

DONE = "DONE.json"
SPEC = "spec.json"


@dataclasses.dataclass(frozen=True)
class Artefact:
  kind: str
  key: str
  path: Path
  spec: dict

  @property
  def done(self) -> bool:
    return (self.path / DONE).exists()

  def info(self) -> dict:
    """What `finish` recorded (training budget, wall time, ...); {} while not done."""
    return json.loads((self.path / DONE).read_text()) if self.done else {}

  def record(self, reused: bool) -> dict:
    """The line a manifest keeps for this artefact."""
    return {"kind": self.kind, "key": self.key, "path": str(self.path), "reused": reused, **self.info()}


def _flatten(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def spec_diff(old: dict, new: dict) -> list[str]:
  """['train.steps: 150 -> 300', ...] between two canonical specs."""
  a, b = _flatten(old), _flatten(new)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


class ArtefactStore:
  """Folders `<root>/<kind>-<hash>/` keyed by the spec's fingerprint."""

  def __init__(self, root: str | os.PathLike, log: Callable[[str], None] = print):
    self.root = Path(root).resolve()
    self.log = log

  def get(self, kind: str, spec: dict, code: tuple[str, ...] = TRAINING_CODE) -> Artefact:
    """The artefact for `spec` (created empty if new); logs whether it is reused, resumed or new.

    The key also covers `code_version(code)`: the source of the diffrag modules that build the
    artefact (by default the model, training, diffusion, batching and sharding code), the numerical
    libraries' versions and the backend, so a change to any of them trains a new one."""
    if not kind.replace("_", "").isalnum():
      raise ValueError(f"artefact kind {kind!r} must be alphanumeric (underscores allowed)")
    if "code" in spec:
      raise ValueError("an artefact spec's 'code' field is the store's own (code_version); rename that field")
    spec = canonical({**spec, "code": code_version(tuple(code))})
    key = fingerprint(spec)
    path = self.root / f"{kind}-{key}"
    art = Artefact(kind, key, path, spec)
    if path.exists() and (path / SPEC).exists():
      stored = json.loads((path / SPEC).read_text())
      if stored != spec:  # a 64-bit prefix collision: never reuse on a mismatch
        raise RuntimeError(f"{path}/spec.json does not match the requested spec ({spec_diff(stored, spec)[:3]}); "
                           "remove that folder")
      if art.done:
        info = art.info()
        self.log(f"{kind} {key}: reusing the artefact in {path} (same spec; built {info.get('finished', '?')}, "
                 f"{info.get('wall_seconds', '?')} s)")
      else:
        self.log(f"{kind} {key}: resuming the unfinished build in {path}")
      return art
    closest = self._closest(kind, spec)
    why = f"; the closest existing {kind} differs in {closest[:6]}" if closest else ""
    if closest and all(d.startswith("code.") for d in closest):
      why += (" (only the code that builds it, its libraries or the backend differ: a model another version of "
              "the code trained is not reused; check out the commit that built it to reuse it)")
    self.log(f"{kind} {key}: no artefact with this spec, building it in {path}{why}")
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / SPEC, spec, indent=2, sort_keys=True)
    return art

  def finish(self, art: Artefact, info: dict) -> None:
    """Marks `art` complete; `info` (budget, wall time) is kept in DONE.json and in manifests."""
    info = {"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info}
    write_json_atomic(art.path / DONE, info, indent=2, default=str)

  def _closest(self, kind: str, spec: dict) -> list[str]:
    best = None
    for folder in self.root.glob(f"{kind}-*"):
      try:
        other = json.loads((folder / SPEC).read_text())
      except (OSError, ValueError):
        continue
      diff = spec_diff(other, spec)
      if best is None or len(diff) < len(best):
        best = diff
    return best or []
