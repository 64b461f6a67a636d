"""Generative retrieval by masked diffusion (DiffuGR): DocIDs, constraints, decoding, pipeline."""
