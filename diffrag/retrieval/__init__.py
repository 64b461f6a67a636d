"""Retrieval shared by rag/ and gr/: corpora, BM25, dense (MiniLM through the BERT family),
hybrid (reciprocal rank fusion of both, and of the passages chunks were cut from),
passage budgets, TREC run files and IR metrics."""

from diffrag.retrieval.corpus import Corpus, cut_passages, parents_of
from diffrag.retrieval.bm25 import BM25Retriever
from diffrag.retrieval.dense import DenseRetriever, MiniLMEncoder, default_encoder
from diffrag.retrieval.fusion import HybridRetriever, ParentRetriever, reciprocal_rank_fusion

__all__ = ["BM25Retriever", "Corpus", "DenseRetriever", "HybridRetriever", "MiniLMEncoder", "ParentRetriever",
           "cut_passages", "default_encoder", "parents_of", "reciprocal_rank_fusion"]
