"""diffrag: masked diffusion language models for retrieval, in JAX."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _xla_defaults() -> None:
  """GPU GEMMs through cuBLAS rather than XLA's Triton GEMMs: on an H200 an LLaDA-8B forward at
  batch 1 x 512 went from 19.1 to 12.3 ms. Read when JAX starts its backend, so it is set on
  import; an explicit choice in XLA_FLAGS wins, and DIFFRAG_XLA_DEFAULTS=0 turns this off."""
  flags = _os.environ.get("XLA_FLAGS", "")
  if _os.environ.get("DIFFRAG_XLA_DEFAULTS", "1") != "0" and "xla_gpu_enable_triton_gemm" not in flags:
    _os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_enable_triton_gemm=false").strip()


def _malloc_defaults() -> None:
  """Keeps large freed blocks in the process's heap (glibc: no mmap, no trim, one arena), so XLA's CPU
  backend, which allocates each call's temporary buffer afresh, stops page-faulting it in every
  step: blocks over 32 MB are otherwise mapped and unmapped by every call (a MiniLM layer's
  train step at 8 x 128: 14k page faults and 25-30 ms of kernel time per call, about a fifth of
  its wall time). The heap then keeps its high-water mark instead of returning memory to the
  OS. glibc on Linux only; set on import, so every later allocation, PyTorch's in the same
  process too, gets it; MALLOC_MMAP_MAX_ or GLIBC_TUNABLES in the environment win, and
  DIFFRAG_MALLOC_DEFAULTS=0 turns this off."""
  env = _os.environ
  if (env.get("DIFFRAG_MALLOC_DEFAULTS", "1") == "0" or "MALLOC_MMAP_MAX_" in env or "GLIBC_TUNABLES" in env
      or not _sys.platform.startswith("linux")):
    return
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc, not musl)
  except (OSError, AttributeError):
    return
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  libc.mallopt(m_arena_max, 1)
  libc.mallopt(m_mmap_max, 0)
  libc.mallopt(m_trim_threshold, 2 ** 31 - 1)


_xla_defaults()
_malloc_defaults()
