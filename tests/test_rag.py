"""RAG: QA metrics, retrieval, prompts, SPREAD as a transform, the pipeline end to end."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrag.models import from_pretrained, load_tokenizer, minilm_path
from diffrag.rag import metrics as M
from diffrag.rag import pipeline as P
from diffrag.rag.prompts import PromptSpec, build_prompt
from diffrag.rag.spread import query_representation, relevance, spread
from diffrag.retrieval import (BM25Retriever, Corpus, DenseRetriever, HybridRetriever, MiniLMEncoder, ParentRetriever,
                               cut_passages, parents_of, reciprocal_rank_fusion)
from diffrag.sampling import transforms as T
from diffrag.sampling.sampler import generate
from tests import hf_fixtures as hf

# ---------------------------------------------------------------------------- metrics


def test_squad_normalisation_and_scores_by_hand():
  assert M.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
  assert M.normalize_answer("an apple a day") == "apple day"
  s = M.qa_scores("the cat sat on the mat", ["a cat on a mat"])
  # pred tokens: cat sat on mat (4); gold: cat on mat (3); common 3
  assert s["precision"] == pytest.approx(3 / 4) and s["recall"] == pytest.approx(1.0)
  assert s["f1"] == pytest.approx(2 * 0.75 / 1.75) and s["em"] == 0.0 and s["length"] == 4
  # Counter (multiset) intersection, as the official script: "the the" style repeats count once each
  s = M.qa_scores("paris paris paris", ["paris"])
  assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == 1.0
  # max over aliases, EM after normalisation
  s = M.qa_scores("The Beatles", ["Rolling Stones", "beatles"])
  assert s["em"] == 1.0 and s["f1"] == 1.0
  assert M.qa_scores("", ["x"])["f1"] == 0.0
  with pytest.raises(ValueError, match="without gold answers"):
    M.qa_scores("x", [])


def test_official_squad_v1_examples():
  """Cases worked through the official evaluate-v1.1 logic (f1 with Counter overlap)."""
  cases = [("Denver Broncos", ["Denver Broncos", "Denver Broncos"], 1.0, 1.0),
           ("the Broncos", ["Denver Broncos"], 0.0, 2 * 1 * 0.5 / 1.5),
           ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"], 0.0, 2 * (2 / 3) * 1 / (2 / 3 + 1))]
  for pred, golds, em, f1 in cases:
    s = M.qa_scores(pred, golds)
    assert s["em"] == em and s["f1"] == pytest.approx(f1)


def test_cut_short_answers():
  assert M.cut_short("Denver", ["Denver Broncos", "the Broncos"])            # a strict part of an alias
  assert not M.cut_short("the Denver Broncos", ["Denver Broncos"])          # exact after normalisation
  assert not M.cut_short("Den", ["Denver Broncos"])                         # not word-aligned
  assert not M.cut_short("Broncos", ["Broncos", "Denver Broncos"])          # exact with one alias
  assert not M.cut_short("", ["Denver"]) and not M.cut_short("Carolina", ["Denver Broncos"])


def test_error_kind_sorts_each_answer_by_where_it_went_wrong():
  passages = ["The Broncos beat the Panthers in Denver.", "Super Bowl 50 was played at Levi's Stadium."]
  kind = lambda pred, in_prompt=True: M.error_kind(pred, ["Denver Broncos", "Broncos"], passages, in_prompt)
  assert kind("Broncos", in_prompt=False) == "answer not in prompt"  # a retrieval miss comes first
  assert kind("the Broncos") == "exact"
  assert kind("Broncos beat") == "overlap"
  assert kind("") == "empty"
  assert kind("Panthers") == "other span, answer's passage"
  assert kind("Levi's Stadium") == "span of another passage"
  assert kind("Panthers Stadium") == "not a span of the prompt"   # words of the prompt, not one phrase of it
  assert kind("Panth") == "not a span of the prompt"             # occurrence is word-aligned
  assert set(M.ERROR_KINDS) >= {kind(p) for p in ("Panthers", "Stadium", "x")}


def test_copy_rate_and_rsd():
  assert M.copy_rate("Paris is nice", ["I like Paris.", "It is big"]) == pytest.approx(2 / 3)
  r = M.rsd([np.nan, 0.2, 0.8, 0.6, 0.4])
  assert r["rsd"] == pytest.approx(0.5) and r["first_last"] == pytest.approx(-0.2)
  assert r["area"] == pytest.approx(np.mean([0, 0, 0.2, 0.4])) and r["final_distance"] == pytest.approx(0.6)
  emb = lambda texts: np.stack([np.eye(3)[len(t) % 3] for t in texts])
  curves = M.drift_curves(np.eye(3)[[1, 2]], [["", "a", "ab", "abc"], ["ab", ""]], emb)
  assert np.isnan(curves[0][0]) and curves[0][1:].tolist() == [1.0, 0.0, 0.0]
  assert curves[1][0] == 1.0 and np.isnan(curves[1][1])


# -------------------------------------------------------------------------- retrieval

DOCS = [{"id": "d1", "title": "Volcanoes", "text": "Magma erupts from volcanoes as lava and ash."},
        {"id": "d2", "title": "Bees", "text": "Honey bees make honey from the nectar of flowers."},
        {"id": "d3", "title": "Rivers", "text": "The Nile is a long river that flows north into the sea."},
        {"id": "d4", "title": "Chess", "text": "A chess king moves one square in any direction."}]


def test_bm25_and_dense_return_the_right_documents(tmp_path, monkeypatch):
  corpus = Corpus.from_records(DOCS)
  queries = ["which insects produce honey from nectar", "lava erupting from a volcano", "how does the king move"]
  idx, scores = BM25Retriever(corpus).search(queries, k=2)
  assert [corpus.ids[i[0]] for i in idx] == ["d2", "d1", "d4"] and (np.diff(scores, axis=1) <= 0).all()
  dense = DenseRetriever(corpus, MiniLMEncoder(), cache_dir=tmp_path, progress=False)
  idx, scores = dense.search(queries, k=4)
  assert [corpus.ids[i[0]] for i in idx] == ["d2", "d1", "d4"] and (np.diff(scores, axis=1) <= 1e-6).all()
  assert list(tmp_path.glob("emb-*.npy"))  # cached, keyed by corpus and encoder
  again = DenseRetriever(corpus, dense.encoder, cache_dir=tmp_path, progress=False)
  np.testing.assert_array_equal(again.embeddings, dense.embeddings)
  from diffrag.retrieval import dense as dense_lib
  edited = {**dense_lib.code_version(dense_lib.ENCODER_CODE), "source": "0" * 16}  # as after an encoder edit
  monkeypatch.setattr(dense_lib, "code_version", lambda modules: edited)
  DenseRetriever(corpus, dense.encoder, cache_dir=tmp_path, progress=False)
  assert len(list(tmp_path.glob("emb-*.npy"))) == 2  # encoded again, not read from the old code's cache


def test_reciprocal_rank_fusion_by_hand():
  """score(d) = sum_r 1 / (c + rank_r(d)), ranks from 1; absent documents add nothing."""
  a = np.array([[0, 1, 2], [5, 4, 3]])
  b = np.array([[2, 1], [3, 9]])
  idx, s = reciprocal_rank_fusion([a, b], k=4, c=1.0)
  # query 0: d0 = 1/2, d1 = 1/3 + 1/3, d2 = 1/4 + 1/2; query 1: d3 = 1/4 + 1/2, d5 = 1/2, d4 = d9 = 1/3
  assert idx.shape == (2, 3)  # k is capped by the row with the fewest distinct documents (3)
  assert idx[0].tolist() == [2, 1, 0] and s[0] == pytest.approx([0.75, 2 / 3, 0.5])
  assert idx[1].tolist() == [3, 5, 4] and s[1] == pytest.approx([0.75, 0.5, 1 / 3])
  idx, _ = reciprocal_rank_fusion([a[1:], b[1:]], k=4, c=1.0)
  assert idx[0].tolist() == [3, 5, 4, 9]  # the d4/d9 tie goes to the smaller index
  with pytest.raises(ValueError, match="same queries"):
    reciprocal_rank_fusion([a, b[:1]], k=2)


def test_hybrid_retriever_fuses_bm25_and_dense(tmp_path):
  corpus = Corpus.from_records(DOCS)
  bm25 = BM25Retriever(corpus)
  dense = DenseRetriever(corpus, MiniLMEncoder(), cache_dir=tmp_path, progress=False)
  queries = ["which insects produce honey from nectar", "lava erupting from a volcano", "how does the king move"]
  hybrid = HybridRetriever([bm25, dense])
  idx, scores = hybrid.search(queries, k=3)
  assert [corpus.ids[i[0]] for i in idx] == ["d2", "d1", "d4"] and (np.diff(scores, axis=1) <= 0).all()
  # the same as fusing the two full rankings by hand
  ref, _ = reciprocal_rank_fusion([bm25.search(queries, 4)[0], dense.search(queries, 4)[0]], k=3)
  np.testing.assert_array_equal(idx, ref)
  with pytest.raises(ValueError, match="different sizes"):
    HybridRetriever([bm25, BM25Retriever(Corpus.from_records(DOCS[:2]))])
  # the RAG pipeline's `retrieval.retriever=hybrid`
  cfg = P.RagConfig(retrieval=P.RetrievalSpec(retriever="hybrid", k=2, max_chars=12, cache_dir=str(tmp_path)))
  got = P.retrieve(cfg, [{"id": "q", "question": queries[0]}], corpus)
  assert [p["id"] for p in got["q"]] == [corpus.ids[i] for i in idx[0, :2]] and len(got["q"][0]["text"]) == 12
  with pytest.raises(ValueError, match="expected dense, bm25, hybrid or gold"):
    P.retrieve(P.RagConfig(retrieval=P.RetrievalSpec(retriever="splade")), [], corpus)



def test_parents_of_regroups_chunks_into_their_passages_in_chunk_order():
  corpus = Corpus(("a#1", "b", "a#0", "c#x", "a#10"), ("A", "B", "A", "C", "A"),
                  ("second.", "whole b.", "first.", "own parent.", "third."))
  parents, parent = parents_of(corpus)
  assert parents.ids == ("a", "b", "c#x") and parents.titles == ("A", "B", "C")
  assert parents.texts[0] == "first. second. third."  # chunk 10 after chunk 1: numeric order, not string order
  assert parent.tolist() == [0, 1, 0, 2, 0]


class _Fixed:
  """A retriever with a fixed ranking of its corpus for every query."""

  def __init__(self, corpus, order):
    self.corpus, self.order = corpus, np.asarray(order)

  def search(self, queries, k=10):
    k = min(k, len(self.order))
    return np.tile(self.order[:k], (len(queries), 1)), np.tile(-np.arange(k, dtype=float), (len(queries), 1))


def test_parent_retriever_gives_every_chunk_its_passage_rank_and_fusion_uses_shared_ranks():
  chunks = Corpus(("p#0", "p#1", "q#0", "r#0", "r#1"), ("",) * 5, ("a", "b", "c", "d", "e"))
  parents, parent = parents_of(chunks)                       # p, q, r
  by_parent = ParentRetriever(_Fixed(parents, [2, 0, 1]), chunks, parent)   # r, then p, then q
  idx, ranks = by_parent.search_ranked(["x"], k=5)
  assert idx.tolist() == [[3, 4, 0, 1, 2]] and ranks.tolist() == [[1, 1, 2, 2, 3]]
  idx, ranks = by_parent.search_ranked(["x"], k=3)           # cut at k chunks
  assert idx.tolist() == [[3, 4, 0]] and ranks.tolist() == [[1, 1, 2]]
  # fused with a chunk ranking, by hand: score = 1/(c + chunk rank) + 1/(c + passage rank), c = 1
  hybrid = HybridRetriever([_Fixed(chunks, [2, 0, 1, 3, 4]), by_parent], c=1.0)
  got, score = hybrid.search(["x"], k=5)
  want = {2: 1 / 2 + 1 / 4, 0: 1 / 3 + 1 / 3, 1: 1 / 4 + 1 / 3, 3: 1 / 5 + 1 / 2, 4: 1 / 6 + 1 / 2}
  assert got[0].tolist() == sorted(want, key=lambda d: (-want[d], d))
  assert score[0] == pytest.approx(sorted(want.values(), reverse=True))
  # padding (fewer chunks than asked for) counts for nothing
  fused, _ = reciprocal_rank_fusion([np.array([[0, -1]]), np.array([[1, 0]])], k=2, c=1.0,
                                      ranks=[np.array([[1, np.inf]]), None])
  assert fused.tolist() == [[0, 1]]
  with pytest.raises(ValueError, match="parent must map"):
    ParentRetriever(_Fixed(parents, [0]), chunks, parent[:2])
  with pytest.raises(ValueError, match="one per ranking"):
    reciprocal_rank_fusion([np.array([[0]])], k=1, ranks=[None, None])


def test_parent_fusion_lifts_a_chunk_whose_passage_matches_the_question():
  """The answer chunk shares no rare word with the question; its passage does."""
  corpus = Corpus(("curie#0", "curie#1", "nobel#0", "warsaw#0"), ("",) * 4,
                  ("Marie Curie was born in Warsaw.", "She won the Nobel prize twice.",
                   "The Nobel prize is a prize, a famous prize.", "Warsaw is the capital of Poland."))
  question = [{"id": "q", "question": "Which prize did Marie Curie win?"}]
  cfg = lambda fused: P.RagConfig(retrieval=P.RetrievalSpec(retriever="bm25", k=2, chunk_words=40, rrf_c=3.0,
                                                            parent_fusion=fused))
  plain = [p["id"] for p in P.retrieve(cfg(False), question, corpus)["q"]]
  fused = [p["id"] for p in P.retrieve(cfg(True), question, corpus)["q"]]
  assert plain == ["curie#0", "nobel#0"] and fused == ["curie#0", "curie#1"]
  with pytest.raises(ValueError, match="chunk_words > 0"):
    P.retrieve(P.RagConfig(retrieval=P.RetrievalSpec(retriever="bm25", parent_fusion=True)), question, corpus)

@pytest.mark.parametrize("tokens_per_pass", [None, 32])
def test_minilm_embeddings_match_sentence_transformers_recipe(monkeypatch, tokens_per_pass):
  """Mean pooling of BertModel's last hidden state over real tokens, L2-normalised (PyTorch),
  whether a batch runs in one pass or in sub-batches of one sequence (32 tokens per pass)."""
  import torch
  from transformers import BertModel
  from diffrag.retrieval import dense
  if tokens_per_pass:
    monkeypatch.setattr(dense, "ENCODE_TOKENS_PER_PASS", tokens_per_pass)
    assert dense.sub_batch(4, 32) == 1
  texts = ["a short one", "a somewhat longer sentence about rivers and seas"]
  ours = MiniLMEncoder(batch_size=4).encode(texts)
  tok = load_tokenizer(minilm_path())
  bert = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
  enc = tok(texts, padding=True, return_tensors="pt")
  with torch.no_grad():
    h = bert(**enc).last_hidden_state
  m = enc["attention_mask"][..., None].float()
  ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
  assert np.abs(ours - ref).max() < 1e-4


def test_encode_sub_batches_divide_the_batch():
  from diffrag.retrieval.dense import sub_batch
  assert sub_batch(64, 256) == 4 and sub_batch(64, 32) == 32 and sub_batch(64, 96) == 8
  assert sub_batch(6, 256) == 3 and sub_batch(7, 256) == 1 and sub_batch(64, 4096) == 1


def test_corpus_and_query_errors():
  with pytest.raises(ValueError, match="duplicate document ids"):
    Corpus.from_records(DOCS + [DOCS[0]])
  with pytest.raises(ValueError, match="empty"):
    Corpus.from_records([])
  with pytest.raises(ValueError, match="neither title nor text"):
    Corpus.from_records([{"id": "x", "title": "", "text": " "}])
  with pytest.raises(ValueError, match="empty query"):
    BM25Retriever(Corpus.from_records(DOCS)).search(["  "])
  assert cut_passages(["abcdef", "gh", "ij"], k=2, max_chars=3) == ["abc", "gh"]


# ---------------------------------------------------------------------------- prompts


def test_prompt_fits_the_window_by_cutting_the_lowest_ranked_passage_first():
  tok = load_tokenizer(minilm_path())
  spec = PromptSpec(chat=False, max_prompt_tokens=40)
  passages = ["first passage " * 5, "second passage " * 30, "third passage " * 30]
  ids, kept, cut = build_prompt(tok, spec, "what is it?", passages)
  assert len(ids) <= 40 and kept == 2 and cut > 30
  text = tok.decode(ids)
  assert "first passage" in text and "question : what is it?" in text and text.endswith("answer :")
  with pytest.raises(ValueError, match="question alone"):
    build_prompt(tok, PromptSpec(chat=False, max_prompt_tokens=5), "a question that is much too long", [])
  with pytest.raises(ValueError, match="empty question"):
    build_prompt(tok, spec, " ", passages)


# ----------------------------------------------------------------------------- SPREAD


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
  path, _ = hf.llada_checkpoint(tmp_path_factory.mktemp("llada"), kv_heads=2, seed=5)
  return from_pretrained(path)


def _spread_run(model, params, alpha, steps=12):
  prompt = np.random.default_rng(0).integers(2, 300, (2, 9))
  query = np.random.default_rng(1).integers(2, 300, (2, 5))
  h_q = query_representation(model, params, query, np.ones_like(query))
  tr = T.chain(T.greedy(), T.low_confidence(), *([spread(alpha)] if alpha is not None else []), T.commit_top_k())
  return generate(model, params, prompt, tr, jax.random.key(0), gen_length=12, steps=steps,
                  extras={"query_hidden": h_q}), prompt, h_q


def test_spread_alpha_zero_is_exactly_the_baseline(llada):
  model, params = llada
  base, _, _ = _spread_run(model, params, None)
  zero, _, _ = _spread_run(model, params, 0.0)
  half, _, _ = _spread_run(model, params, 0.5)
  np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(zero.tokens))
  np.testing.assert_array_equal(np.asarray(base.commit_step), np.asarray(zero.commit_step))
  assert not np.array_equal(np.asarray(base.commit_step), np.asarray(half.commit_step))


def test_spread_alpha_one_commits_in_order_of_relevance(llada):
  """One token per step: each step commits the masked position whose hidden state is most query-relevant."""
  model, params = llada
  out, prompt, h_q = _spread_run(model, params, 1.0)
  mask_id = model.config.mask_token_id
  tokens, cs = np.asarray(out.tokens), np.asarray(out.commit_step)
  for t in range(4):
    canvas = np.concatenate([prompt, np.where(cs < t, tokens[:, 9:], mask_id)], axis=1)
    _, hidden = model.apply({"params": params}, canvas, return_hidden=True)
    r = np.array(relevance(hidden[:, 9:], h_q))
    r[canvas[:, 9:] != mask_id] = -np.inf
    np.testing.assert_array_equal(np.argmax(r, -1), np.argmax(cs == t, -1))


@pytest.mark.parametrize("family", ["bert", "llada"])
def test_query_representation_does_not_depend_on_padding(family, tmp_path):
  """The same question gives the same h_q (within 1e-5) however it is left-padded or batched,
  for absolute positions (BERT) and RoPE alike."""
  if family == "bert":
    model, params = from_pretrained(hf.bert_checkpoint(tmp_path)[0])
  else:
    model, params = from_pretrained(hf.llada_checkpoint(tmp_path, seed=3)[0])
  q = [5, 17, 23, 42, 8]
  ref = None
  for length, other in ((5, None), (16, [9, 10]), (32, [11] * 20), (64, [12, 13, 14])):
    rows = [q] + ([other] if other else [])
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
      ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    for pooling in ("mean", "max_token"):
      h = np.asarray(P._query_fn(model, -1, pooling, 0)(params, ids, mask))[0]  # the pipeline's jitted h_q
      if pooling == "max_token":
        h = h[mask[0] == 1]
      if ref is None or pooling not in ref:
        ref = {**(ref or {}), pooling: h}
      np.testing.assert_allclose(h, ref[pooling], atol=1e-5)


def test_dream_hidden_switch_reads_the_state_at_i_minus_1(tmp_path):
  """spread.dream_hidden=i_minus_1: the relevance of position i uses the state at i - 1 (the one
  whose logits predict i in a shifted-logit model); rejected for unshifted models."""
  from diffrag.sampling.sampler import generate
  dream, dparams = from_pretrained(hf.dream_checkpoint(tmp_path / "d", seed=4)[0])
  llada, lparams = from_pretrained(hf.llada_checkpoint(tmp_path / "l", seed=4)[0])
  prompt = np.random.default_rng(0).integers(2, 300, (1, 6))
  seen = {}

  def probe(offset):
    def fn(view, key):
      jax.debug.callback(lambda h: seen.__setitem__(offset, np.asarray(h)), view.hidden)
      return view
    return T.chain(T.stateless(fn, needs=("hidden",)), T.greedy(), T.low_confidence(), T.commit_top_k())

  for offset in (0, 1):
    generate(dream, dparams, prompt, probe(offset), jax.random.key(0), gen_length=4, steps=1, hidden_offset=offset)
  canvas = np.concatenate([prompt, np.full((1, 4), dream.config.mask_token_id)], 1)
  _, full = dream.apply({"params": dparams}, jnp.asarray(canvas), return_hidden=True)
  np.testing.assert_allclose(np.asarray(seen[0])[0], np.asarray(full)[0, 6:10], atol=1e-5)
  np.testing.assert_allclose(np.asarray(seen[1])[0], np.asarray(full)[0, 5:9], atol=1e-5)
  with pytest.raises(ValueError, match="shifted-logit"):
    generate(llada, lparams, prompt, T.llada(), jax.random.key(0), gen_length=4, steps=4, hidden_offset=1)


def test_eos_first_reads_the_first_forward_pass_only():
  from diffrag.rag.pipeline import eos_first
  eos = (9,)
  assert eos_first([5, 9, 9], [2, 1, 0], eos)              # the padding end first
  assert not eos_first([5, 9, 9], [0, 1, 2], eos)          # an answer token first
  assert not eos_first([5, 9, 9], [0, 0, 1], eos)          # EOS and a word together
  assert eos_first([5, 9, 9], [1, 0, 0], eos)
  assert not eos_first([5, 9, 9], [-1, -1, -1], eos)       # nothing committed


def test_spread_bad_switches():
  with pytest.raises(ValueError, match="alpha must be in"):
    spread(1.5)
  with pytest.raises(ValueError, match="pooling"):
    spread(0.5, pooling="sum")


# --------------------------------------------------------------------------- pipeline


PARAS = [("The Nile is the longest river in Africa and flows north into the Mediterranean Sea.",
          [("Which sea does the Nile flow into?", "the Mediterranean Sea"), ("Where is the Nile?", "Africa")]),
         ("Honey bees collect nectar from flowers and turn it into honey inside the hive.",
          [("What do bees collect from flowers?", "nectar"), ("Where is honey made?", "inside the hive")]),
         ("Mount Etna is an active volcano on the island of Sicily in Italy.",
          [("Which island is Mount Etna on?", "Sicily"), ("Is Etna active?", "")]),
         ("The Amazon river carries more water than any other river and flows east to the Atlantic.",
          [("Where does the Amazon flow?", "the Atlantic"), ("Which river carries the most water?", "The Amazon")])]


def test_span_candidates_follow_words_and_skip_special_tokens():
  from diffrag.rag.spans import span_candidates, word_starts
  tokens = ["[PAD]", "[CLS]", "the", "play", "##wright", "was", "born", "[SEP]"]
  starts = word_starts(tokens)
  assert starts.tolist() == [True, True, True, True, False, True, True, True]
  assert word_starts(["\u2581the", "\u2581play", "wright"]).tolist() == [True, True, False]
  ids = np.arange(8)[None]
  mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1]])
  special = np.array([[True, True, False, False, False, False, False, True]])
  got = span_candidates(ids, mask, starts[None], special, max_len=3)[0]
  spans = {(j, l + 1) for j, l in zip(*np.nonzero(got))}
  # words: "the" (2), "playwright" (3-4), "was" (5), "born" (6); never "play" alone or "##wright" first
  assert spans == {(2, 1), (2, 3), (3, 2), (3, 3), (5, 1), (5, 2), (6, 1)}


def test_phrase_continuations_by_hand():
  """Left-to-right phrase decoding: the tokens that continue the answer so far as a run of the
  prompt, starting at a word start and ending at a word end, by hand."""
  from diffrag.rag.spans import phrase_continuations
  #        PAD CLS the play ##wright was the born SEP
  prompt = [0, 1, 10, 11, 12, 13, 10, 14, 2]
  ok = np.array([[False, False, True, True, True, True, True, True, False]])
  starts = np.array([[True, True, True, True, False, True, True, True, True]])
  p, g, mask_id = len(prompt), 4, 99

  def allowed(answer):
    canvas = np.array([prompt + answer + [mask_id] * (g - len(answer))])
    nxt, end = phrase_continuations(jnp.asarray(canvas), p + len(answer), jnp.asarray(ok), jnp.asarray(starts), 20)
    return set(np.nonzero(np.asarray(nxt)[0])[0].tolist()), bool(end[0])

  assert allowed([]) == ({10, 11, 13, 14}, True)     # any word start ("##wright" is not one)
  assert allowed([10]) == ({11, 14}, True)           # "the" is followed by "play" and by "born"
  assert allowed([11]) == ({12}, False)              # "play" must go on to "##wright": no end mid-word
  assert allowed([11, 12]) == ({13}, True)
  assert allowed([10, 14]) == (set(), True)          # "the born" is followed by [SEP]: it can only end
  assert allowed([13, 10, 14]) == (set(), True)
  assert allowed([14, 10]) == (set(), False)         # not a phrase of the prompt: nothing continues it


def test_span_decode_is_the_best_span_by_hand():
  """One pass scores every candidate span by the summed log-probabilities (tokens then EOS) of
  the fully masked canvas: the arg max equals a brute-force enumeration."""
  from diffrag.models import MaskedDiffusionTransformer, init_params, preset
  from diffrag.models.transformer import positions_from_mask
  from diffrag.rag.spans import span_candidates, span_decode
  cfg = preset("tiny-bert").replace(copy_head=True)
  model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(5))
  rng = np.random.default_rng(1)
  b, p, g = 3, 10, 4
  ids = rng.integers(10, cfg.vocab_size, size=(b, p)).astype(np.int32)
  mask = np.ones((b, p), np.int32)
  mask[1, :3] = 0
  ids[1, :3] = cfg.pad_token_id
  starts = rng.random((b, p)) < 0.7
  special = np.zeros((b, p), bool)
  special[0, 5] = True
  valid = span_candidates(ids, mask, starts, special, g - 1)
  valid[2] = False                                                   # a prompt with no candidate: EOS only
  eos = 0  # tiny-bert has no EOS id: the copy head's EOS logit sits at token 0
  out = span_decode(model, params, ids, mask, valid, eos)
  assert int(out.num_forward) == 1 and out.tokens.shape == (b, p + g)
  full = np.concatenate([ids, np.full((b, g), cfg.mask_token_id, np.int32)], 1)
  fmask = np.concatenate([mask, np.ones((b, g), np.int32)], 1)
  logits = model.apply({"params": params}, jnp.asarray(full), attention_mask=jnp.asarray(fmask),
                       positions=positions_from_mask(jnp.asarray(fmask)), output_window=(p, g))
  logp = np.asarray(jax.nn.log_softmax(logits.at[..., cfg.mask_token_id].set(-jnp.inf), -1))
  for bi in range(2):
    best, arg = -np.inf, None
    for j, l in zip(*np.nonzero(valid[bi])):
      canvas = list(ids[bi, j:j + l + 1]) + [eos] * (g - l - 1)
      s = sum(logp[bi, q, t] for q, t in enumerate(canvas))
      if s > best:
        best, arg = s, canvas
    np.testing.assert_array_equal(np.asarray(out.tokens[bi, p:]), arg)
  assert (np.asarray(out.tokens[2, p:]) == eos).all()


def test_span_decode_first_token_rescoring_by_hand():
  """first_tokens=k: the k distinct first tokens of the best one-pass spans are each committed at
  canvas position 0 and the spans starting with them rescored under that pass; brute force agrees."""
  from diffrag.models import MaskedDiffusionTransformer, init_params, preset
  from diffrag.models.transformer import positions_from_mask
  from diffrag.rag.spans import span_candidates, span_decode
  cfg = preset("tiny-bert").replace(copy_head=True)
  model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(3))
  params = jax.tree.map(lambda x: 4 * x, params)  # a peaked model: committing the first token changes the answer
  rng = np.random.default_rng(3)
  b, p, g, k, eos = 2, 12, 5, 2, 0
  ids = rng.integers(10, 40, size=(b, p)).astype(np.int32)  # a small range: repeated tokens
  mask = np.ones((b, p), np.int32)
  valid = span_candidates(ids, mask, rng.random((b, p)) < 0.8, np.zeros((b, p), bool), g - 1)
  out = span_decode(model, params, ids, mask, valid, eos, first_tokens=k)
  assert int(out.num_forward) == 1 + k
  plain = span_decode(model, params, ids, mask, valid, eos)
  assert (np.asarray(plain.tokens) != np.asarray(out.tokens)).any()  # the rescoring is exercised

  def logp_of(canvas):
    full = np.concatenate([ids, canvas], 1)
    fmask = np.concatenate([mask, np.ones_like(canvas)], 1)
    logits = model.apply({"params": params}, jnp.asarray(full), attention_mask=jnp.asarray(fmask),
                         positions=positions_from_mask(jnp.asarray(fmask)), output_window=(p, g))
    return np.asarray(jax.nn.log_softmax(logits.at[..., cfg.mask_token_id].set(-jnp.inf), -1))

  masked = np.full((b, g), cfg.mask_token_id, np.int32)
  lp0 = logp_of(masked)
  canvas_of = lambda bi, j, l: list(ids[bi, j:j + l + 1]) + [eos] * (g - l - 1)
  for bi in range(b):
    spans = list(zip(*np.nonzero(valid[bi])))
    one_pass = {(j, l): sum(lp0[bi, q, t] for q, t in enumerate(canvas_of(bi, j, l))) for j, l in spans}
    per_token = {}
    for (j, l), s in one_pass.items():
      per_token[ids[bi, j]] = max(per_token.get(ids[bi, j], -np.inf), s)
    firsts = sorted(per_token, key=per_token.get, reverse=True)[:k]
    best, arg = -np.inf, None
    for c in firsts:
      committed = masked.copy()
      committed[:, 0] = c
      lpc = logp_of(committed)
      for j, l in spans:
        if ids[bi, j] != c:
          continue
        canvas = canvas_of(bi, j, l)
        s = lp0[bi, 0, c] + sum(lpc[bi, q, t] for q, t in enumerate(canvas) if q > 0)
        if s > best:
          best, arg = s, canvas
    np.testing.assert_array_equal(np.asarray(out.tokens[bi, p:]), arg)
  with pytest.raises(ValueError, match="first_tokens"):
    span_decode(model, params, ids, mask, valid, eos, first_tokens=-1)


def _squad_json(paras, prefix):
  return {"data": [{"title": f"{prefix}{i}", "paragraphs": [{"context": c, "qas": [
      {"id": f"{prefix}q{i}{j}", "question": q, "is_impossible": not a,
       "answers": [{"text": a, "answer_start": c.find(a)}] if a else []} for j, (q, a) in enumerate(qs)]}]}
      for i, (c, qs) in enumerate(paras)]}


def _squad_files(root):
  """SQuAD v1.1 layout: train articles T0-T1, dev articles D0-D1 (different texts and titles)."""
  (root / "squad").mkdir(parents=True, exist_ok=True)
  (root / "squad" / "train-v1.1-first44.json").write_text(json.dumps(_squad_json(PARAS[:2], "T")))
  (root / "squad" / "dev-v1.1.json").write_text(json.dumps(_squad_json(PARAS[2:], "D")))
  (root / "squad" / "squad2_dev_small.json").write_text(json.dumps(_squad_json(PARAS, "S")))


def _rag_overrides(tmp_path):
  return [f"data.data_dir={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'tfds'}",
          f"retrieval.cache_dir={tmp_path / 'cache'}", "retrieval.retriever=bm25", "retrieval.k=2",
          "reader.train_steps=2", "reader.batch_size=2", "reader.warmup_steps=1", f"reader.store={tmp_path / 'store'}",
          "prompt.chat=false", "prompt.max_prompt_tokens=48", "generation.gen_length=8", "generation.steps=8",
          "generation.batch_size=2", "spread.alphas=[0.5]", f"out_dir={tmp_path / 'out'}"]


def test_rag_pipeline_end_to_end_and_resume(tmp_path, capsys):
  """Train on SQuAD v1.1 train articles, evaluate on dev articles: no leak, tables with intervals,
  manifest, resume, and the reader reused on an exact match only."""
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, run_rag
  _squad_files(tmp_path / "data")
  over = _rag_overrides(tmp_path) + ["reader.train_data=squad_v1:train", "data.dataset=squad_v1:dev"]
  cfg = config_lib.load(RagConfig, None, over)
  summary = run_rag(cfg, progress=False)
  rep = summary["sets"]["squad_v1:dev"]
  assert rep["counts"]["without_answers_skipped"] == 1 and rep["counts"]["eval"] == 3
  assert rep["leakage"]["questions_shared"] == rep["leakage"]["contexts_shared"] == 0
  assert rep["leakage"]["answers_as_training_targets"] == 0
  lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert len(lines) == 6 and {x["method"] for x in lines} == {"baseline", "spread_a0.5"}
  for x in lines:
    assert len(x["drift_curve"]) == x["forward_passes"] == 8 and len(x["passage_ids"]) == 2
    assert len(x["commit_step"]) == 8 and sorted(x["commit_step"]) == list(range(8))  # one commit per step
    assert isinstance(x["eos_first"], bool)
  assert all(0 <= r["eos_first_%"] <= 100 and 0 <= r["cut_short_%"] <= 100 for r in summary["methods"])
  spread_row = next(r for r in summary["methods"] if r["method"] == "spread_a0.5")
  assert spread_row["n"] == 3 and "[" in spread_row["d_f1"] and spread_row["p_f1"]
  assert spread_row["compiles_in_timed"] == 0 and spread_row["train_steps"] == 2
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["git"]["commit"] and manifest["artefacts"][0]["reused"] is False
  assert manifest["config"]["reader"]["train_data"] == "squad_v1:train"
  assert (tmp_path / "out" / "rag.md").exists() and (tmp_path / "out" / "drift.png").exists()
  assert "building it" in capsys.readouterr().out
  again = run_rag(cfg, progress=False)  # resume: nothing is generated twice; the reader is reused
  assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 6
  assert again["methods"][0]["f1"] == summary["methods"][0]["f1"]
  assert "reusing the artefact" in capsys.readouterr().out
  assert json.loads((tmp_path / "out" / "manifest.json").read_text())["artefacts"][0]["reused"] is True
  # out_dir is bound to what its predictions depend on: another retrieval there is an error that
  # names the field (before any training), and predictions without a recorded spec are not trusted
  with pytest.raises(ValueError, match=r"different run .*retrieval\.k: 2 -> 1.*new folder"):
    run_rag(config_lib.load(RagConfig, None, over + ["retrieval.k=1"]), progress=False)
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "predictions.jsonl").write_text((tmp_path / "out" / "predictions.jsonl").read_text())
  with pytest.raises(ValueError, match="did not record what its predictions depend on"):
    run_rag(config_lib.load(RagConfig, None, over + [f"out_dir={legacy}"]), progress=False)
  # a reader trained elsewhere evaluates another set with everything held out (no training data needed)
  other = config_lib.load(RagConfig, None, over + ["data.dataset=squad", "data.holdout=1.0",
                                                    f"out_dir={tmp_path / 'out2'}"])
  summary2 = run_rag(other, progress=False)
  assert summary2["sets"]["squad:dev"]["counts"]["eval"] == 7
  assert "reusing the artefact" in capsys.readouterr().out


def test_a_tiny_reader_learns_to_read_held_out_articles(tmp_path):
  """Real learning on a written QA set: the reader trains on some articles and answers
  questions about people and cities it never saw far better than a random passage word."""
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, run_rag
  rng = np.random.default_rng(0)
  names = ["alice", "bruno", "carla", "dmitri", "elena", "farid", "greta", "hiro", "ines", "jonas", "kemal", "lucia",
           "marco", "nadia", "oskar", "paula", "quentin", "rosa", "samir", "tanja", "ugo", "vera", "walter", "xenia"]
  cities = ["paris", "lima", "oslo", "cairo", "delhi", "tokyo", "quito", "rome", "berlin", "madrid", "dublin", "seoul"]
  colors = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]

  def article(i, people):
    paras = []
    for n in people:
      c, k = cities[rng.integers(len(cities))], colors[rng.integers(len(colors))]
      paras.append((f"{n.title()} lives in {c.title()} and likes the color {k}.",
                    [(f"Where does {n.title()} live?", c.title()), (f"Which color does {n.title()} like?", k)]))
    return paras

  train = [p for i in range(0, 16, 2) for p in article(i, names[i:i + 2])]
  dev = [p for i in range(16, 24, 2) for p in article(i, names[i:i + 2])]
  root = tmp_path / "data" / "squad"
  root.mkdir(parents=True)
  (root / "train-v1.1-first44.json").write_text(json.dumps(_squad_json(train, "T")))
  (root / "dev-v1.1.json").write_text(json.dumps(_squad_json(dev, "D")))
  over = [f"data.data_dir={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'tfds'}",
          f"retrieval.cache_dir={tmp_path / 'cache'}", "retrieval.retriever=gold", "retrieval.k=1",
          "reader.train_data=squad_v1:train", "data.dataset=squad_v1:dev", "reader.distractors=0",
          "reader.train_steps=80", "reader.batch_size=8", "reader.lr=1e-3", "reader.warmup_steps=5",
          f"reader.store={tmp_path / 'store'}", "prompt.chat=false", "prompt.max_prompt_tokens=32",
          "generation.gen_length=4", "generation.steps=4", "generation.batch_size=8", "spread.alphas=[]",
          "generation.span_decoding=true", "generation.span_first_tokens=2", "generation.left_to_right=true",
          "generation.left_to_right_phrases=true", "drift=false", f"out_dir={tmp_path / 'out'}"]
  summary = run_rag(config_lib.load(RagConfig, None, over), progress=False)
  row, span, span_k, l2r, phrase = summary["methods"]
  assert summary["sets"]["squad_v1:dev"]["leakage"]["contexts_shared"] == 0 and row["n"] == 16
  # a random word of the 10-word passage scores EM 10%: the reader must do much better, and so
  # must one-pass span decoding of the same reader (paired with the sampler, one forward pass)
  assert row["em"] >= 40, row
  assert span["method"] == "span" and span["n"] == 16 and span["em"] >= 40 and "[" in span["d_f1"], span
  assert span_k["method"] == "span_k2" and span_k["n"] == 16 and span_k["em"] >= 40, span_k
  preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert {x["forward_passes"] for x in preds if x["method"] == "span"} == {1}
  assert {x["forward_passes"] for x in preds if x["method"] == "span_k2"} == {3}
  # left to right: position p is committed by pass p until the answer's EOS, and a batch stops
  # once every row has committed one (no more passes than the canvas has positions)
  assert l2r["method"] == "l2r" and l2r["n"] == 16 and l2r["em"] >= 40 and "[" in l2r["d_f1"], l2r
  for x in (x for x in preds if x["method"] == "l2r"):
    ran = sum(s >= 0 for s in x["commit_step"])  # positions after the EOS are filled without a pass (-1)
    assert x["commit_step"] == list(range(ran)) + [-1] * (4 - ran) and 1 <= x["forward_passes"] <= 4, x
  # phrase-constrained l2r: every answer is a run of whole words of its prompt (or empty: EOS first)
  assert phrase["method"] == "l2r_phrase" and phrase["n"] == 16 and phrase["em"] >= 40 and "[" in phrase["d_f1"]
  phrases = [x for x in preds if x["method"] == "l2r_phrase"]
  assert len(phrases) == 16 and all(1 <= x["forward_passes"] <= 4 for x in phrases)
  norm = lambda t: " " + " ".join(re.sub(r"[^\w\s]", " ", t.lower()).split()) + " "
  for x in phrases:  # the prompt: title, passage, "Question: <q>", "Answer:"
    prompts = [norm(f"D{i} {c} question {x['question']} answer") for i, (c, _) in enumerate(dev)]
    assert not x["prediction"].strip() or any(norm(x["prediction"]) in p for p in prompts), x


def test_reader_artefact_key_changes_with_every_determining_field(tmp_path):
  """Each field that determines the reader, changed in turn, gives a different artefact key
  (so a stale reader is never reused); fields that only change decoding do not."""
  from diffrag import config as config_lib
  from diffrag.experiment.provenance import fingerprint
  from diffrag.rag.pipeline import RagConfig, load_set, reader_request
  _squad_files(tmp_path / "data")
  base = _rag_overrides(tmp_path) + ["reader.train_data=squad_v1:train", "retrieval.retriever=dense"]

  def key(*extra):
    cfg = config_lib.load(RagConfig, None, base + list(extra))
    records, info = load_set(cfg, cfg.reader.train_data)
    return fingerprint(reader_request(cfg, records, info, cfg.prompt).spec)

  ref = key()
  changed = [("reader.train_data=squad_v1:dev",), ("prompt.max_prompt_tokens=40",),
             ("prompt.template='Q: {question} C: {passages} A:'",), ("generation.gen_length=12",),
             ("reader.train_steps=3",), ("reader.lr=1e-3",), ("reader.batch_size=4",), ("reader.seed=1",),
             ("reader.distractors=0",), ("reader.extractive=false",), ("retrieval.max_chars=30",),
             ("reader.warmup_steps=2",), ("reader.weighting=flat",), ("reader.schedule=poly0.5",),
             ("reader.distractor_retriever=bm25",), ("reader.prompt_variants=2",)]
  keys = [key(*c) for c in changed]
  assert ref not in keys and len(set(keys)) == len(keys)
  assert key("generation.steps=4", "spread.alphas=[0.3]", "data.limit=1") == ref  # decoding only
  with pytest.raises(ValueError, match=r"reader.distractor_retriever='gold'.*'dense', 'bm25', 'hybrid'"):
    key("reader.distractor_retriever=gold")
  with pytest.raises(ValueError, match=r"reader.prompt_variants=0; expected an integer >= 1"):
    key("reader.prompt_variants=0")


def test_prompt_variants_give_each_question_distinct_distractors_and_keep_variant_zero(tmp_path):
  """reader.prompt_variants=2: two prompts per question, the first identical to the single
  prompt of the default, the second beside other distractors; every one holds its answer."""
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, answer_in, load_set, reader_request
  _squad_files(tmp_path / "data")
  base = _rag_overrides(tmp_path) + ["reader.train_data=squad_v1:train", "retrieval.retriever=dense",
                                    "retrieval.chunk_words=12"]  # several chunks per article: distractors to spare

  def request(*extra):
    cfg = config_lib.load(RagConfig, None, base + list(extra))
    records, info = load_set(cfg, cfg.reader.train_data)
    return reader_request(cfg, records, info, cfg.prompt)

  one, two = request(), request("reader.prompt_variants=2")
  n = one.pair_stats["pairs"]
  assert n > 0 and two.pair_stats["pairs"] > n
  tok = one.tokenizer
  for prompt, answer in two.pairs:
    assert answer_in(tok.decode(prompt), [tok.decode(answer)])
  # variant 0 of every question is the default's prompt: the default's pairs, in order, within the new ones
  rest = iter(two.pairs)
  assert all(any(p == q for q in rest) for p in one.pairs)
  for q, ps in two.used.items():
    assert {p["id"] for p in one.used[q]} <= {p["id"] for p in ps}
  distinct = sum(len(two.used[q]) > len(one.used[q]) for q in one.used)
  assert distinct > 0  # second variants brought passages the first did not show


def test_decoding_sweep_pairs_every_setting_with_the_exact_sampler(tmp_path):
  """`--sweep decoding` (diffrag.rag.parallel) on a tiny reader: one row per setting and
  set, paired differences against the reference, forward passes never above exact's."""
  from diffrag.rag import parallel as mod
  _squad_files(tmp_path / "data")
  over = _rag_overrides(tmp_path) + ["reader.train_data=squad_v1:train", "data.dataset=squad_v1:dev"]
  settings = {k: mod.DECODING[k] for k in ("exact", "threshold0.5", "threshold0.9", "threshold0.9+dual",
                                           "left_to_right")}
  rows = mod.decoding_sweep(None, over + ["generation.left_to_right=true"], tmp_path / "abl", settings)
  # the copy-head reader has no KV cache (its pointer needs the prompt in every forward): said, left out
  assert [r["decoding"] for r in rows] == ["exact", "threshold0.5", "threshold0.9", "left_to_right"]
  assert all(r["n"] == 3 for r in rows)
  # only the baseline sampler runs in a sweep's settings, whatever the config adds
  assert {json.loads(x)["method"] for x in (tmp_path / "abl" / "decoding" / "exact" / "predictions.jsonl")
          .read_text().splitlines()} == {"baseline"}
  exact = rows[0]
  assert exact["speedup"] == 1.0 and exact["d_f1"] == "" and exact["forward_passes"] == 8
  for r in rows[1:]:
    assert "[" in r["d_f1"] and r["p_f1"] and 1 <= r["forward_passes"] <= exact["forward_passes"]
    assert r["tokens_per_s"] > 0
  assert (tmp_path / "abl" / "decoding.md").exists() and (tmp_path / "abl" / "decoding.png").exists()


def test_rag_split_by_article_and_bad_inputs(tmp_path):
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, load_set, run_rag, split_records
  _squad_files(tmp_path / "data")
  cfg = config_lib.load(RagConfig, None, _rag_overrides(tmp_path) + ["data.dataset=squad", "data.holdout=0.5"])
  records, _ = load_set(cfg, "squad")
  train, evals = split_records(cfg, records)
  assert train and evals and not {r["group"] for r in train} & {r["group"] for r in evals}
  with pytest.raises(ValueError, match="the sets that exist are"):
    run_rag(config_lib.load(RagConfig, None, _rag_overrides(tmp_path) + ["reader.train_data=webqa"]), progress=False)
  with pytest.raises(ValueError, match="no answerable question"):
    run_rag(config_lib.load(RagConfig, None, _rag_overrides(tmp_path) + ["data.dataset=squad", "data.holdout=1.0"]),
            progress=False)
  with pytest.raises(ValueError, match="context limit"):
    run_rag(config_lib.load(RagConfig, None, _rag_overrides(tmp_path) + [
        "reader.train_data=squad_v1:train", "prompt.max_prompt_tokens=510"]), progress=False)
  with pytest.raises(ValueError, match="set generation.span_decoding=true"):
    run_rag(config_lib.load(RagConfig, None, _rag_overrides(tmp_path) + ["generation.span_first_tokens=4"]),
            progress=False)


def test_qa_readers_for_every_released_format(tmp_path):
  from diffrag.data.readers import QA_SETS, read_qa
  files = {
      "musique": [{"id": "m1", "question": "Q?", "answer": "A", "answer_aliases": ["a1"],
                   "paragraphs": [{"idx": 0, "title": "T", "paragraph_text": "P", "is_supporting": True}]}],
      "hotpotqa": [{"_id": "h1", "question": "Q?", "answer": "yes", "context": [["T", ["s1 ", "s2"]]]}],
      "2wikimultihopqa": [{"_id": "w1", "question": "Q?", "answer": "B", "context": [["T", ["x"]]]}],
      "triviaqa": {"Data": [{"QuestionId": "t1", "Question": "Q?", "Answer": {"Value": "V", "Aliases": ["v", "V"]}}]},
  }
  first = lambda name: tmp_path / next(iter(QA_SETS[name].values()))[0]
  for name, data in files.items():
    path = first(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
  first("nq_open").parent.mkdir()
  first("nq_open").write_text('{"question": "q", "answer": ["a", "b"]}\n')
  first("popqa").parent.mkdir()
  first("popqa").write_text('id\tquestion\tpossible_answers\n7\twho?\t["x", "y"]\n')
  got = {name: read_qa(tmp_path, name)[0] for name in list(files) + ["nq_open", "popqa"]}
  assert got["musique"]["answers"] == ["A", "a1"] and got["musique"]["passages"][0]["text"] == "P"
  assert got["hotpotqa"]["passages"][0]["text"] == "s1 s2" and got["2wikimultihopqa"]["answers"] == ["B"]
  assert got["triviaqa"]["answers"] == ["V", "v"] and got["nq_open"]["answers"] == ["a", "b"]
  assert got["popqa"] == {"id": "7", "question": "who?", "answers": ["x", "y"], "passages": [], "group": "7"}
  with pytest.raises(ValueError, match="unknown QA data set 'webqa'; the sets that exist are"):
    read_qa(tmp_path, "webqa")
  with pytest.raises(ValueError, match="has no split 'test'"):
    read_qa(tmp_path, "squad_v1:test")
  with pytest.raises(FileNotFoundError, match="squad"):
    read_qa(tmp_path, "squad")


def test_out_dir_written_before_a_setting_existed_resumes_only_at_its_default(tmp_path):
  """A setting added to diffrag after out_dir's predictions were written matches them at its
  default (every earlier run had it) and is an error naming it at any other value."""
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, claim_out_dir, prediction_spec
  infos = {"squad_v1:dev": {"file_fingerprint": {"bytes": 1, "sha256": "ab"}}}
  defaults = prediction_spec(RagConfig(), infos)
  written = prediction_spec(RagConfig(), infos)
  del written["config"]["reader"]["distractor_retriever"]  # as stored before the setting existed
  (tmp_path / "predictions.jsonl").write_text('{"id": "q1"}\n')
  (tmp_path / "predictions.spec.json").write_text(json.dumps(written))
  claim_out_dir(tmp_path, prediction_spec(RagConfig(), infos), defaults=defaults)  # resumes
  hybrid = config_lib.load(RagConfig, None, ["reader.distractor_retriever=hybrid"])
  with pytest.raises(ValueError, match=r"reader.distractor_retriever: '<absent>' -> 'hybrid'"):
    claim_out_dir(tmp_path, prediction_spec(hybrid, infos), defaults=defaults)
  k1 = config_lib.load(RagConfig, None, ["retrieval.k=1"])
  with pytest.raises(ValueError, match=r"\(1 field\(s\) differ: config.retrieval.k: 5 -> 1\)"):
    claim_out_dir(tmp_path, prediction_spec(k1, infos), defaults=defaults)
  assert json.loads((tmp_path / "predictions.spec.json").read_text()) == written  # never rewritten
  del written["code"]  # predictions written before the code was recorded are another code's
  (tmp_path / "predictions.spec.json").write_text(json.dumps(written))
  with pytest.raises(ValueError, match=r"differ: code\.\w+: '<absent>' -> "):
    claim_out_dir(tmp_path, prediction_spec(RagConfig(), infos), defaults=defaults)


@pytest.mark.slow  # two tiny trainings and evaluations; summarize_seeds has its fast test in test_experiment.py
def test_seed_sweep_trains_one_reader_per_seed(tmp_path, monkeypatch):
  import importlib.util
  import sys
  from pathlib import Path
  spec = importlib.util.spec_from_file_location("seed_sweep", Path(__file__).parents[1] / "experiments" / "seed_sweep.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  _squad_files(tmp_path / "data")
  over = [o for o in _rag_overrides(tmp_path) if not o.startswith("out_dir=")]
  monkeypatch.setattr(sys, "argv", ["seed_sweep.py", "--config", "configs/rag_minilm_squad.yaml", "--seeds", "0", "1",
                                    "--out", str(tmp_path / "seeds"), "--name", "tiny", "data.also=[]",
                                    "generation.span_decoding=false", "generation.span_first_tokens=0"] + over)
  sweep.main()
  out = tmp_path / "seeds" / "tiny"
  keys = {json.loads((out / "control" / f"seed_{s}" / "manifest.json").read_text())["artefacts"][0]["key"]
          for s in (0, 1)}
  assert len(keys) == 2  # each seed trains its own reader
  table = (out / "seeds.md").read_text()
  assert "squad_v1:dev/baseline" in table and "t_ci_seeds" in table and "crossed_ci" in table
  assert "squad_v1:dev/spread_a0.5 - squad_v1:dev/baseline" in (out / "seed_diffs.md").read_text()
  assert (out / "seeds.png").exists() and (out / "manifest.json").exists()
  first = (out / "seeds.md").read_text()
  (out / "seeds.md").unlink()
  monkeypatch.setattr(sys, "argv", sys.argv + ["--run", "none"])  # summarise the finished runs only
  sweep.main()
  assert (out / "seeds.md").read_text() == first
