"""Timing that excludes compilation, and proof that it did.

    sw = Stopwatch()
    with sw.warmup():                      # compiles: timed apart as compile_seconds
      jax.block_until_ready(fn(batch0))
    for batch in batches:
      with sw.timed():                     # steady state; counts any compilation it sees
        out = jax.device_get(fn(batch))
    sw.timing.seconds, sw.timing.compile_seconds, sw.timing.compiles_in_timed   # the last must be 0

Compilations are counted through `jax.monitoring` (one event per XLA backend compile), so a
timed region that silently recompiles (a fresh static argument, a new shape) shows up as
`compiles_in_timed > 0` in every table that reports the timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_compiles = {"count": 0, "seconds": 0.0}


def _listener(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == _COMPILE_EVENT:
    with _lock:
      _compiles["count"] += 1
      _compiles["seconds"] += duration


jax.monitoring.register_event_duration_secs_listener(_listener)


def compile_count() -> int:
  """XLA backend compilations in this process so far."""
  return _compiles["count"]


@contextlib.contextmanager
def count_compiles():
  """Yields a dict whose "count" / "seconds" are filled with the compilations inside the block."""
  out = {"count": 0, "seconds": 0.0}
  c0, s0 = _compiles["count"], _compiles["seconds"]
  try:
    yield out
  finally:
    out["count"] = _compiles["count"] - c0
    out["seconds"] = _compiles["seconds"] - s0


@dataclasses.dataclass
class Timing:
  """seconds: steady-state wall time summed over the timed calls; compile_seconds: the
  warm-up calls (compilation included); compiles_in_timed: compilations seen while timing."""

  seconds: float = 0.0
  calls: int = 0
  compile_seconds: float = 0.0
  compiles_in_timed: int = 0

  def row(self, prefix: str = "") -> dict:
    return {f"{prefix}seconds": round(self.seconds, 3), f"{prefix}compile_s": round(self.compile_seconds, 2),
            f"{prefix}compiles_in_timed": self.compiles_in_timed}


class Stopwatch:
  """Separates warm-up (compiling) calls from timed steady-state calls; see the module doc."""

  def __init__(self):
    self.timing = Timing()

  @contextlib.contextmanager
  def warmup(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.timing.compile_seconds += time.perf_counter() - t0

  @contextlib.contextmanager
  def timed(self):
    with count_compiles() as c:
      t0 = time.perf_counter()
      try:
        yield
      finally:
        self.timing.seconds += time.perf_counter() - t0
    self.timing.calls += 1
    self.timing.compiles_in_timed += c["count"]


def compiled_memory(lowered) -> dict:
  """Bytes a compiled XLA program needs ({temp, arguments, outputs, alias, total}) from a
  `jax.stages.Lowered` (e.g. `jax.jit(f).lower(*args)`): the device-independent peak
  estimate where the backend keeps no memory statistics (CPU). Outputs that reuse a donated
  argument's buffer (`alias`) are counted once: total = temp + arguments + outputs - alias."""
  m = lowered.compile().memory_analysis()
  if m is None:
    return {}
  out = {"temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes),
         "outputs": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
  out["total"] = out["temp"] + out["arguments"] + out["outputs"] - out["alias"]
  return out
