"""Retrieval shared by rag/ and gr/: corpora, BM25, dense (MiniLM through the BERT family),
hybrid (reciprocal rank fusion of both),
passage budgets, TREC run files and IR metrics."""

from diffrag.retrieval.corpus import Corpus, cut_passages
from diffrag.retrieval.bm25 import BM25Retriever
from diffrag.retrieval.dense import DenseRetriever, MiniLMEncoder, default_encoder
from diffrag.retrieval.fusion import HybridRetriever, reciprocal_rank_fusion

__all__ = ["BM25Retriever", "Corpus", "DenseRetriever", "HybridRetriever", "MiniLMEncoder", "cut_passages",
           "default_encoder", "reciprocal_rank_fusion"]
