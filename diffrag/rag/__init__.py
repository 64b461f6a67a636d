"""Retrieval-augmented generation with masked diffusion LMs: prompts, SPREAD, QA metrics, drift."""
