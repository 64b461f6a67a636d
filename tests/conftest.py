"""Test setup: 8 fake CPU devices, so sharded code paths run on one machine, and a compilation
cache for this run only.

The cache: many tests compile the same programs (a pipeline test runs its pipeline again to
check reuse; the tiny presets recur across files). XLA's persistent cache lets a later
compilation of an identical program load the executable instead (programs that took 0.5 s or
more to compile are kept). The directory is new for
each `pytest` run and removed at its end, so no test sees a previous run's state; xdist workers
and the tests' subprocesses inherit it through the environment. A JAX_COMPILATION_CACHE_DIR
already set wins (an empty value turns the cache off)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller; its xdist workers inherit the path
  _cache = tempfile.mkdtemp(prefix="diffrag-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
