"""diffrag: masked diffusion language models for retrieval, in JAX."""

__version__ = "0.1.0"
