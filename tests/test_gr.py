"""Generative retrieval: DocIDs, constraints under any commit order, top-k, IR metrics, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffrag.gr.constraints import (DocIDIndex, allowed_tokens_mask, consistent_any, docid_allowed, docid_repair,
                                    repair_commits)
from diffrag.gr.docids import DocIDTable, extend_vocab, kmeans, linguistic_docids, rq_docids
from diffrag.models import load_tokenizer, minilm_path, preset, init_params
from diffrag.retrieval import trec
from diffrag.sampling import transforms as T

TITLES = ["Cats", "Dogs", "Cats", "", "A very long title about the history of the river Nile and its floods", "Cats"]
TEXTS = ["c1", "d", "c2", "Leading words of a document that has no title at all", "n", "c3"]


def test_linguistic_docids_unique_and_invertible():
  tok = load_tokenizer(minilm_path())
  ids = [f"d{i}" for i in range(len(TITLES))]
  table = linguistic_docids(TITLES, TEXTS, ids, tok, max_tokens=8, eos_id=tok.sep_token_id)
  assert table.codes.shape == (6, 8) and table.stats["suffixed_duplicates"] == 2
  assert len({tuple(r) for r in table.codes.tolist()}) == 6
  np.testing.assert_array_equal(table.decode(table.codes), np.arange(6))
  texts = [tok.decode([t for t in r if t != tok.sep_token_id]) for r in table.codes]
  assert texts[0] == "cats" and texts[2] == "cats [ 2 ]" and texts[5] == "cats [ 3 ]"
  assert texts[3].startswith("leading words")  # no title: leading tokens
  assert (table.codes[:, -1] == tok.sep_token_id).all()  # always ends in EOS
  assert table.decode([[1] * 8])[0] == -1
  with pytest.raises(ValueError, match="neither title nor text"):
    linguistic_docids(["", "x"], ["  ", "y"], ["a", "b"], tok, eos_id=102)


def test_rq_docids_unique_with_collision_level():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(200, 16)).astype(np.float32)
  emb[1] = emb[0]  # identical documents collide on every level
  table = rq_docids(emb, [f"d{i}" for i in range(200)], levels=2, codes=8, base_token=1000, iters=10)
  assert table.codes.shape == (200, 3)
  assert len({tuple(r) for r in table.codes.tolist()}) == 200
  assert (table.codes[:, 0] >= 1000).all() and (table.codes[:, 0] < 1008).all()
  assert (table.codes[:, 1] >= 1008).all() and (table.codes[:, 2] >= 1016).all()
  np.testing.assert_array_equal(table.codes[0, :2], table.codes[1, :2])
  assert sorted(table.codes[[0, 1], 2] - 1016) == [0, 1]
  assert 0 < table.stats["collision_rate"] <= 1 and len(table.stats["codebook_usage"]) == 2
  np.testing.assert_array_equal(table.decode(table.codes[::-1]), np.arange(200)[::-1])


def test_kmeans_finds_separated_clusters():
  rng = np.random.default_rng(1)
  centers = np.array([[0, 0], [10, 10], [-10, 10]], np.float32)
  x = np.concatenate([c + rng.normal(scale=0.1, size=(30, 2)) for c in centers]).astype(np.float32)
  cen, a = kmeans(x, 3, iters=10)
  assert len(set(a[:30])) == len(set(a[30:60])) == len(set(a[60:])) == 1 and len(set(a)) == 3


def test_extend_vocab_adds_mean_rows():
  cfg = preset("tiny-bert")
  params = init_params(cfg, jax.random.key(0))
  new_cfg, new = extend_vocab(cfg, params, 5)
  assert new_cfg.vocab_size == cfg.vocab_size + 5 and new["embed"]["embedding"].shape[0] == cfg.vocab_size + 5
  np.testing.assert_allclose(new["embed"]["embedding"][-1], params["embed"]["embedding"].mean(0), atol=0.01)
  assert new["mlm_bias"].shape == (cfg.vocab_size + 5,)


# ------------------------------------------------------------------------ constraints


def _view(canvas, logits, mask_id):
  canvas = jnp.asarray(canvas, jnp.int32)
  return T.StepView(logits=logits, hidden=None, canvas=canvas, is_masked=canvas == mask_id, candidates=canvas,
                    score=jnp.full(canvas.shape, -jnp.inf), commit=jnp.zeros(canvas.shape, bool),
                    step=jnp.int32(0), num_steps=canvas.shape[1], extras={})


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), per_step=st.integers(1, 4), score=st.sampled_from(["conf", "random"]))
def test_constrained_decoding_always_yields_a_valid_docid(seed, per_step, score):
  """Random logits, random or confidence commit order, several commits per step: always a DocID."""
  rng = np.random.default_rng(seed)
  vocab, mask_id, lc = 12, 11, 5
  codes = np.unique(rng.integers(0, 6, size=(40, lc)), axis=0)
  table = DocIDTable(codes, tuple(f"d{i}" for i in range(len(codes))), "test")
  object.__setattr__(table, "index", DocIDIndex.build(codes, chunk=int(rng.integers(1, 16))))  # several chunks
  chain = T.chain(docid_allowed(table), T.greedy(), T.low_confidence() if score == "conf" else T.random_score(),
                  T.commit_top_k(lambda v: jnp.full((v.canvas.shape[0],), per_step)), docid_repair(table))
  canvas = jnp.full((3, lc), mask_id, jnp.int32)
  key = jax.random.key(seed)
  for _ in range(lc * 2):
    if not bool(jnp.any(canvas == mask_id)):
      break
    key, k1, k2 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (3, lc, vocab)) * 3
    view, _ = chain.update(_view(canvas, logits, mask_id), chain.init(None), k2)
    assert bool(jnp.all(jnp.any(view.commit, -1) | ~jnp.any(view.is_masked, -1)))  # progress
    canvas = jnp.where(view.commit, view.candidates, canvas)
    # the partial canvas always stays consistent with at least one DocID
    assert bool(jnp.all(consistent_any(table.index, canvas, canvas == mask_id)))
  assert (table.decode(np.asarray(canvas)) >= 0).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 64))
def test_index_equals_brute_force(seed, chunk):
  """Segment search over the sorted table == the dense definition, for any chunk size: the
  allowed tokens, whether a canvas is consistent, and the greedy repair of a step's commits."""
  rng = np.random.default_rng(seed)
  lc, vocab = int(rng.integers(2, 7)), int(rng.integers(3, 9))
  mask_id, rows = vocab, 5
  codes = np.unique(rng.integers(0, vocab, (int(rng.integers(5, 200)), lc)), axis=0)
  index = DocIDIndex.build(codes, chunk=chunk)
  canvas = np.where(rng.random((rows, lc)) < 0.5, codes[rng.integers(0, len(codes), rows)], mask_id)
  canvas[0] = np.where(rng.random(lc) < 0.3, rng.integers(0, vocab, lc), mask_id)  # maybe inconsistent
  masked = canvas == mask_id
  cons = np.all((codes[None] == canvas[:, None]) | masked[:, None], -1)          # [R, N], dense
  ref = np.zeros((rows, lc, vocab + 1), bool)
  for r in range(rows):
    for d in np.flatnonzero(cons[r]):
      ref[r, np.arange(lc), codes[d]] = True
  got = np.asarray(allowed_tokens_mask(index, jnp.asarray(canvas), jnp.asarray(masked), vocab + 1))
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(consistent_any(index, jnp.asarray(canvas), jnp.asarray(masked))),
                                cons.any(-1))
  cand = rng.integers(0, vocab, (rows, lc))
  commit, score = masked & (rng.random((rows, lc)) < 0.7), rng.random((rows, lc))
  keep = np.asarray(repair_commits(index, jnp.asarray(canvas), jnp.asarray(masked), jnp.asarray(cand),
                                   jnp.asarray(commit), jnp.asarray(score)))
  for r in range(rows):
    docs, accept = set(np.flatnonzero(cons[r])), np.zeros(lc, bool)
    for pos in np.argsort(-np.where(commit[r], score[r], -np.inf), kind="stable"):
      narrowed = {d for d in docs if codes[d, pos] == cand[r, pos]}
      if commit[r, pos] and narrowed:
        docs, accept[pos] = narrowed, True
    np.testing.assert_array_equal(keep[r], accept)


def test_allowed_mask_by_hand():
  index = DocIDIndex.build(np.asarray([[1, 2, 3], [1, 4, 5], [6, 2, 3]]))
  canvas = jnp.asarray([[9, 2, 9]])
  assert consistent_any(index, canvas, canvas == 9).tolist() == [True]
  allowed = allowed_tokens_mask(index, canvas, canvas == 9, 10)
  assert np.nonzero(np.asarray(allowed[0, 0]))[0].tolist() == [1, 6]
  assert np.nonzero(np.asarray(allowed[0, 2]))[0].tolist() == [3]
  empty = jnp.asarray([[9, 9, 9]])  # nothing committed: every position's own token set
  assert np.nonzero(np.asarray(allowed_tokens_mask(index, empty, empty == 9, 10)[0, 1]))[0].tolist() == [2, 4]


# ---------------------------------------------------------------------------- metrics


def test_trec_run_and_metrics_by_hand(tmp_path):
  run = {"q1": [("a", 3.0), ("b", 2.0), ("c", 1.0)], "q2": [("x", 1.0), ("y", 0.5)], "q9": [("a", 1.0)]}
  trec.write_run(tmp_path / "run.trec", run)
  lines = (tmp_path / "run.trec").read_text().splitlines()
  assert lines[0] == "q1 Q0 a 1 3.000000 diffrag" and len(lines) == 6
  got = trec.read_run(tmp_path / "run.trec")
  qrels = {"q1": {"b": 1, "c": 1}, "q2": {"z": 1}, "q3": {"a": 1}}
  m = trec.evaluate(got, qrels, (1, 2, 10), (1, 10), known_docs={"a", "b", "c", "x", "y"})
  # q1: R@1 0, R@2 1/2, R@10 1, MRR 1/2; q2: 0; q3 missing: 0
  assert m["recall@1"] == 0 and m["recall@2"] == pytest.approx(0.5 / 3) and m["recall@10"] == pytest.approx(1 / 3)
  assert m["mrr@10"] == pytest.approx(0.5 / 3) and m["mrr@1"] == 0
  assert m["queries_missing_from_run"] == 1 and m["run_queries_without_qrels"] == 1
  assert m["unknown_docids_in_run"] == 0
  # cross-check with ranx
  import ranx
  r = ranx.Run({q: {d: float(10 - i) for i, d in enumerate(ds)} for q, ds in got.items() if q in qrels})
  q = ranx.Qrels({k: v for k, v in qrels.items() if k in got})
  ref = ranx.evaluate(q, r, ["recall@2", "mrr@10"])
  ours = trec.evaluate({k: v for k, v in got.items() if k in qrels}, {k: v for k, v in qrels.items() if k in got},
                       (2,), (10,))
  assert ours["recall@2"] == pytest.approx(ref["recall@2"]) and ours["mrr@10"] == pytest.approx(ref["mrr@10"])
  (tmp_path / "bad.trec").write_text("q1 a 1 2\n")
  with pytest.raises(ValueError, match="6 columns"):
    trec.read_run(tmp_path / "bad.trec")


# ------------------------------------------------------------------------------ top-k


def _tiny_retriever(n_docs=30, seed=0):
  from diffrag.models import MaskedDiffusionTransformer
  cfg = preset("tiny-llada", vocab_size=300, mask_token_id=299, eos_token_id=1)
  emb = np.random.default_rng(seed).normal(size=(n_docs, 8)).astype(np.float32)
  table = rq_docids(emb, [f"doc{i}" for i in range(n_docs)], levels=2, codes=6, base_token=300, iters=5)
  params = init_params(cfg, jax.random.key(seed))
  cfg, params = extend_vocab(cfg, params, table.stats["new_tokens"])
  return MaskedDiffusionTransformer(cfg), params, table


def test_topk_returns_k_distinct_valid_docids_in_descending_score():
  from diffrag.gr import decode as D
  model, params, table = _tiny_retriever()
  prompts = np.random.default_rng(1).integers(2, 290, (3, 6)).astype(np.int32)
  mask = np.ones_like(prompts)
  for rankings in (D.beam_search(model, params, prompts, mask, table, 5, batch=4).rankings,
                   D.beam_search(model, params, prompts, mask, table, 5, order="left_to_right", batch=4).rankings,
                   D.one_pass(model, params, prompts, mask, table, 7, batch=4).rankings):
    for r in rankings:
      docs, scores = [d for d, _ in r], [s for _, s in r]
      assert len(docs) == len(set(docs)) and len(docs) in (5, 7)
      assert all(0 <= d < 30 for d in docs) and scores == sorted(scores, reverse=True)
  dec = D.t_step(model, params, prompts, mask, table, 3, constrained=True, batch=4)
  assert dec.invalid == 0 and all(len(r) == 1 for r in dec.rankings) and dec.forward >= 3


def test_one_pass_prior_is_the_content_free_score_subtracted():
  """docid_prior is every DocID's one-pass score under one prompt (checked against one-pass top-N of
  that prompt), and one_pass with a prior ranks by s(d | q) - prior(d) (checked by hand)."""
  from diffrag.gr import decode as D
  model, params, table = _tiny_retriever()
  n = len(table.doc_ids)
  empty = np.full((1, 6), 0, np.int32)
  empty[0, -1] = 2
  emask = (empty != 0).astype(np.int32)
  prior = D.docid_prior(model, params, empty, emask, table)
  full = D.one_pass(model, params, empty, emask, table, n, batch=1).rankings[0]
  np.testing.assert_allclose(prior[[d for d, _ in full]], [s for _, s in full], rtol=1e-5, atol=1e-5)
  prompts = np.random.default_rng(2).integers(2, 290, (3, 6)).astype(np.int32)
  mask = np.ones_like(prompts)
  plain = D.one_pass(model, params, prompts, mask, table, n, batch=4).rankings
  calibrated = D.one_pass(model, params, prompts, mask, table, 5, batch=4, prior=0.5 * prior).rankings
  for before, after in zip(plain, calibrated):
    want = sorted(((d, s - 0.5 * prior[d]) for d, s in before), key=lambda x: -x[1])[:5]
    assert [d for d, _ in after] == [d for d, _ in want]
    np.testing.assert_allclose([s for _, s in after], [s for _, s in want], rtol=1e-5, atol=1e-5)


def test_elbo_rerank_scores_the_first_candidates_by_their_mc_elbo():
  """Re-ranking permutes the first `top` one-pass candidates by the MC ELBO of the DocID given the
  (left-padded) query, the same value mc_log_likelihood gives for that pair; the rest keep their place."""
  from diffrag.diffusion.objective import mc_log_likelihood
  from diffrag.gr import decode as D
  from diffrag.models.transformer import positions_from_mask
  model, params, table = _tiny_retriever()
  prompts = np.random.default_rng(1).integers(2, 290, (2, 6)).astype(np.int32)
  mask = np.ones_like(prompts)
  prompts[1, :2], mask[1, :2] = 0, 0  # left padding
  first = D.one_pass(model, params, prompts, mask, table, 7, batch=2)
  dec = D.elbo_rerank(model, params, prompts, mask, table, first, top=4, mc_num=4)
  assert dec.forward == first.forward + 4
  for qi, (before, after) in enumerate(zip(first.rankings, dec.rankings)):
    assert sorted(d for d, _ in after[:4]) == sorted(d for d, _ in before[:4]) and after[4:] == before[4:]
    assert [s for _, s in after[:4]] == sorted((s for _, s in after[:4]), reverse=True)
    cands = [d for d, _ in before[:4]]  # the batch elbo_rerank scores, in its order
    tokens = np.concatenate([np.repeat(prompts[qi:qi + 1], 4, 0), table.codes[cands]], 1)
    m = np.concatenate([np.repeat(mask[qi:qi + 1], 4, 0), np.ones((4, table.length), mask.dtype)], 1)
    maskable = np.zeros_like(tokens, bool)
    maskable[:, -table.length:] = True
    rep = jnp.repeat(jnp.asarray(m), 4, 0)
    fn = lambda x: model.apply({"params": params}, x, attention_mask=rep, positions=positions_from_mask(rep))
    want = mc_log_likelihood(fn, jax.random.key(qi), jnp.asarray(tokens), jnp.asarray(maskable),
                             model.config.mask_token_id, mc_num=4, group=4)
    want = dict(zip(cands, np.asarray(want).tolist()))
    for d, score in after[:4]:
      np.testing.assert_allclose(score, want[d], rtol=1e-5)


def test_topk_at_10k_docids_every_mode():
  """10,000 title-like DocIDs: every mode returns k distinct valid DocIDs in descending score,
  and the timed calls do not compile."""
  from diffrag.gr import decode as D
  from diffrag.models import MaskedDiffusionTransformer
  rng = np.random.default_rng(0)
  lc, vocab = 6, 300
  codes = np.unique(np.concatenate([rng.integers(2, 60, (12000, 3)), np.ones((12000, 3), int)], 1), axis=0)[:10000]
  codes[:, 3:] = np.where(rng.random((10000, 3)) < 0.5, rng.integers(2, 60, (10000, 3)), 1)  # EOS-padded tails
  codes = np.unique(codes, axis=0)
  table = DocIDTable(codes, tuple(f"d{i}" for i in range(len(codes))), "synthetic")
  cfg = preset("tiny-llada", vocab_size=vocab, mask_token_id=vocab - 1, eos_token_id=1)
  model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
  prompts = rng.integers(2, 290, (6, 5)).astype(np.int32)
  mask = np.ones_like(prompts)
  for dec, k in ((D.beam_search(model, params, prompts, mask, table, 4, batch=3), 4),
                 (D.one_pass(model, params, prompts, mask, table, 50, batch=3), 50),
                 (D.pseudo_beam(model, params, prompts, mask, table, 3, steps=lc, batch=6), None),
                 (D.t_step(model, params, prompts, mask, table, 3, constrained=True, batch=3), 1)):
    assert dec.invalid == 0 and dec.timing.compiles_in_timed == 0
    for r in dec.rankings:
      docs, scores = [d for d, _ in r], [s for _, s in r]
      assert len(docs) == len(set(docs)) and (k is None or len(docs) == k) and docs
      assert scores == sorted(scores, reverse=True) and all(0 <= d < len(codes) for d in docs)


def test_a_tiny_diffusion_retriever_learns_to_retrieve_50_documents():
  """Real learning: query -> DocID pairs for 50 documents, a few hundred steps, then retrieval."""
  from diffrag.diffusion import schedule as schedules
  from diffrag.gr import decode as D
  from diffrag.train import step as step_lib
  from diffrag.train.step import OptimConfig
  model, params, table = _tiny_retriever(n_docs=50, seed=2)
  rng = np.random.default_rng(3)
  queries = rng.integers(2, 290, (50, 6)).astype(np.int32)  # one "query" per document
  tokens = np.concatenate([queries, table.codes.astype(np.int32)], 1)
  maskable = np.zeros_like(tokens, bool)
  maskable[:, 6:] = True
  optim = OptimConfig(lr=3e-3, warmup_steps=20, schedule="constant", weight_decay=0.0)
  tx = step_lib.make_optimizer(optim, 400)
  state = step_lib.init_state(params, tx, optim, jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(step_lib.model_apply_fn(model), tx,
                                          optim, mask_id=model.config.mask_token_id,
                                          schedule=schedules.get("linear", 1e-3), loss_window=(6, table.length)))
  for i in range(400):
    idx = rng.choice(50, 25, replace=False)
    state, m = step(state, {"tokens": tokens[idx], "maskable": maskable[idx]}, jax.random.key(i))
  mask = np.ones_like(queries)
  top1 = [r[0][0] if r else -1 for r in D.beam_search(model, state.params, queries, mask, table, 4, batch=25).rankings]
  hits = np.mean(np.asarray(top1) == np.arange(50))
  first = [r[0][0] for r in D.t_step(model, state.params, queries, mask, table, table.length, constrained=True,
                                       batch=25).rankings]
  assert hits >= 0.8, f"beam top-1 retrieved {hits:.2f} of the documents"
  assert np.mean(np.asarray(first) == np.arange(50)) >= 0.7


# --------------------------------------------------------------------------- pipeline


def _beir(root):
  import json
  docs = [("d1", "Cats purr", "Cats purr when content."), ("d2", "Dogs bark", "Dogs bark at strangers."),
          ("d3", "Bees", "Bees make honey."), ("d4", "", "A document without a title about rivers."),
          ("d5", "Cats purr", "A second page titled like the first.")]
  (root / "qrels").mkdir(parents=True)
  (root / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": i, "title": t, "text": x}) for i, t, x in docs))
  queries = {"q1": "why do cats purr", "q2": "dogs and strangers", "q3": "who makes honey", "q4": "rivers",
             "q5": "a query about a missing document"}
  (root / "queries.jsonl").write_text("\n".join(json.dumps({"_id": k, "text": v}) for k, v in queries.items()))
  (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n")
  (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td4\t1\nq1\td1\t1\nq5\tnope\t1\n")


def _gr_overrides(tmp_path, dataset="toy"):
  return [f"data.data_dir={tmp_path / 'data'}", f"data.dataset={dataset}", "train.steps=2", "train.batch_size=4",
          "train.warmup_steps=1", "train.query_tokens=8", "train.pseudo_queries=2", f"train.store={tmp_path / 'store'}",
          "docids.max_tokens=6", "decode.steps=[1,6]", "decode.pseudo_beam=2", "decode.beam=2", "decode.one_pass=3", "decode.elbo_rerank=2",
          "decode.one_pass_priors=[0.5]",
          "decode.batch_size=4", "baselines=[bm25]", f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"]


def test_gr_pipeline_end_to_end_counts_bad_records(tmp_path, capsys):
  import json
  from diffrag import config as config_lib
  from diffrag.gr.pipeline import GRConfig, run_gr
  root = tmp_path / "data" / "toy"
  _beir(root)
  with open(root / "queries.jsonl", "a") as f:  # a test query about a document a training query (q2) points at
    f.write("\n" + json.dumps({"_id": "q6", "text": "barking dogs"}))
  with open(root / "qrels" / "test.tsv", "a") as f:
    f.write("q6\td2\t1\n")
  cfg = config_lib.load(GRConfig, None, _gr_overrides(tmp_path))
  summary = run_gr(cfg, progress=False)
  c = summary["counts"]
  assert c["eval_queries"] == 3 and c["eval_queries_dropped_relevant_not_in_corpus"] == 1
  assert c["eval_queries_in_training_removed"] == 1  # q1 is a test query: never trained on
  # seen: q6 (d2 is q2's document); unseen: q1 (its only training query was itself, removed) and q4
  assert c["eval_queries_seen"] == 1 and c["eval_queries_unseen"] == 2
  assert c["training_pairs"] == {"query": 2 * 2, "indexing": 5, "pseudo_query": 4}  # "Bees make honey." < 4 words
  assert json.loads((tmp_path / "out" / "docids.json").read_text())["suffixed_duplicates"] == 1
  rows = {r["method"]: r for r in summary["methods"]}
  assert {"bm25", "diffusion_T1", "diffusion_T6_constrained", "pseudo_beam_B2", "beam_B2", "one_pass_top3",
          "one_pass_elbo_rerank2", "one_pass_top3_prior0.5", "ar_beam_B2"} <= set(rows)
  for name, r in rows.items():
    assert r["recall@10"] == pytest.approx((r["recall@10_seen"] + 2 * r["recall@10_unseen"]) / 3, abs=0.01)
    if name.endswith("_constrained") or name.startswith(("beam", "ar_beam", "one_pass")):
      assert r["invalid_%"] in (0, 0.0)
    if name != "bm25":
      assert r["compiles_in_timed"] == 0 and "[" in r["d_ndcg@10_vs_bm25"] and "ndcg@10_ci" in r
  # equal budgets: the AR twin trains with the same steps and pairs as the diffusion model
  assert rows["ar_beam_B2"]["train_steps"] == rows["beam_B2"]["train_steps"] == 2
  assert rows["ar_beam_B2"]["train_examples_seen"] == rows["beam_B2"]["train_examples_seen"] == 8
  assert rows["diffusion_T6_constrained"]["forward_passes"] >= 6 and summary["index_input"] == "body"
  lines = (tmp_path / "out" / "run.trec").read_text().splitlines()
  assert lines and all(len(x.split()) == 6 for x in lines)
  assert summary["default_run"] == "beam_B2"  # decode.default
  assert (tmp_path / "out" / "run.trec").read_text() == (tmp_path / "out" / "run_beam_B2.trec").read_text()
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert {a["kind"] for a in manifest["artefacts"]} == {"diffusion", "ar"} or len(manifest["artefacts"]) == 2
  m = trec.evaluate({"q1": ["d1", "ghost"]}, {"q1": {"d1": 1}}, known_docs={"d1"})
  assert m["unknown_docids_in_run"] == 1 and m["recall@1"] == 1.0
  # the same training config reuses both retrievers, whatever the decoding (here one mode only, which
  # also keeps this test short); a changed determining field trains a new one
  lean = _gr_overrides(tmp_path) + ["decode.steps=[1]", "decode.unconstrained=false", "decode.pseudo_beam=0",
                                    "decode.beam=0", "decode.one_pass=0", "decode.elbo_rerank=0",
                                    "decode.one_pass_priors=[]"]
  capsys.readouterr()
  again = run_gr(config_lib.load(GRConfig, None, lean), progress=False)
  assert [r["method"] for r in again["methods"]] == ["bm25", "diffusion_T1_constrained", "ar_beam_B1"]
  assert capsys.readouterr().out.count("reusing the artefact") == 2
  run_gr(config_lib.load(GRConfig, None, lean + ["train.ar_steps=0", "train.index_with_title=true"]), progress=False)
  out = capsys.readouterr().out
  assert "building it" in out and "index_with_title" in out
  # no AR twin this time: the first run's AR run file is set aside, not left beside this run's
  assert not (tmp_path / "out" / "run_ar_beam_B2.trec").exists() and "moved to" in out
  assert (tmp_path / "out" / "superseded" / "run_ar_beam_B2.trec").exists()
  # the masking schedule makes a new diffusion retriever; the AR twin (nothing masked) is reused
  run_gr(config_lib.load(GRConfig, None, lean + ["train.schedule=poly0.5"]), progress=False)
  out = capsys.readouterr().out
  assert out.count("building it") == 1 and out.count("reusing the artefact") == 1 and "schedule" in out
  with pytest.raises(ValueError, match="unknown masking schedule 'quadratic'"):
    run_gr(config_lib.load(GRConfig, None, _gr_overrides(tmp_path) + ["train.schedule=quadratic"]), progress=False)
  with pytest.raises(ValueError, match="unknown loss weighting 'none'"):
    run_gr(config_lib.load(GRConfig, None, _gr_overrides(tmp_path) + ["train.weighting=none"]), progress=False)
  with pytest.raises(ValueError, match=r"one_pass_priors=\[0\].*numbers > 0"):
    run_gr(config_lib.load(GRConfig, None, _gr_overrides(tmp_path) + ["decode.one_pass_priors=[0]"]), progress=False)


def test_default_mode_names_the_modes_a_config_runs():
  from diffrag.gr.pipeline import GRDecode, default_mode
  assert default_mode(GRDecode(beam=5)) == "beam_B5"  # auto: the first mode the config runs
  assert default_mode(GRDecode(beam=0, pseudo_beam=0, one_pass=100)) == "one_pass_top100"
  assert default_mode(GRDecode(default="beam", beam=5)) == "beam_B5"
  assert default_mode(GRDecode(default="one_pass", one_pass=100)) == "one_pass_top100"
  assert default_mode(GRDecode(default="one_pass_prior1", one_pass=100, one_pass_priors=[0.5, 1.0])) == \
      "one_pass_top100_prior1"
  assert default_mode(GRDecode(default="T4", steps=[1, 4])) == "diffusion_T4_constrained"
  assert default_mode(GRDecode(default="T4", steps=[4], constrained=False)) == "diffusion_T4"
  # T beyond the DocID canvas runs as T = canvas length, and the default names that row
  assert default_mode(GRDecode(default="T32", steps=[32]), length=16) == "diffusion_T16_constrained"
  with pytest.raises(ValueError, match=r"T4.*not a mode this config runs.*beam"):
    default_mode(GRDecode(default="T4", steps=[4], constrained=False, unconstrained=False, beam=5))
  with pytest.raises(ValueError, match=r"decode.default='beam'.*'one_pass'"):
    default_mode(GRDecode(default="beam", beam=0, pseudo_beam=0, steps=[]))


def test_gr_zero_shot_folder_and_empty_documents(tmp_path):
  import json
  from diffrag import config as config_lib
  from diffrag.gr.pipeline import GRConfig, run_gr
  root = tmp_path / "data" / "toy"
  _beir(root)
  (root / "qrels" / "train.tsv").unlink()  # a new corpus with test qrels only
  with open(root / "corpus.jsonl", "a") as f:
    f.write("\n" + json.dumps({"_id": "d6", "title": "", "text": "  "}))
  with open(root / "qrels" / "test.tsv", "a") as f:
    f.write("q3\td6\t1\n")
  over = _gr_overrides(tmp_path) + ["train.ar_steps=0", "decode.pseudo_beam=0", "decode.beam=0"]
  with pytest.raises(ValueError, match="neither title nor text.*data.empty_docs=drop"):
    run_gr(config_lib.load(GRConfig, None, over), progress=False)
  summary = run_gr(config_lib.load(GRConfig, None, over + ["data.empty_docs=drop"]), progress=False)
  c = summary["counts"]
  assert c["zero_shot"] and c["train_queries"] == 0 and c["training_pairs"]["query"] == 0
  assert c["empty_documents_dropped"] == 1 and c["qrels_pointing_at_dropped_documents"] == 1
  assert c["eval_queries"] == 2  # q1, q4 (q3 pointed only at the dropped document, q5 at a missing one)
  assert c["eval_queries_seen"] == 0 and all(r["recall@10_seen"] == "" for r in summary["methods"])
  with pytest.raises(ValueError, match="no training pairs"):
    run_gr(config_lib.load(GRConfig, None, over + ["data.empty_docs=drop", "train.indexing=false",
                                                   "train.pseudo_queries=0"]), progress=False)


def test_ir_builder_reads_beir_and_tsv_layouts(tmp_path):
  from diffrag.data.builders import ir_records
  _beir(tmp_path / "toy")
  corpus, queries, qrels = ir_records(tmp_path, "toy", "beir", tmp_path / "cache")
  assert len(corpus) == 5 and queries["q3"] == "who makes honey" and qrels["test"]["q5"] == {"nope": 1}
  msm = tmp_path / "msmarco"
  msm.mkdir()
  (msm / "collection.tsv").write_text("0\tThe first passage.\n1\tThe second passage.\n")
  (msm / "queries.dev.tsv").write_text("100\twhat is first\n")
  (msm / "qrels.dev.tsv").write_text("100 0 0 1\n")
  corpus, queries, qrels = ir_records(tmp_path, "msmarco", "tsv", tmp_path / "cache")
  assert sorted(r["id"] for r in corpus) == ["0", "1"] and queries == {"100": "what is first"}
  assert qrels == {"dev": {"100": {"0": 1}}}
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ir_records(tmp_path, "nothing", "beir", tmp_path / "cache")


def test_code_rows_start_learnt_codes_near_their_documents_words():
  from diffrag.gr.docids import code_rows, extend_vocab
  from diffrag.models import init_params, preset
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(40, 8)).astype(np.float32)
  # documents 0-4 use words 0-9, documents 5-9 words 20-29; code token 40 + c
  words = [rng.integers(0, 10, 6).tolist() for _ in range(5)] + [rng.integers(20, 30, 6).tolist() for _ in range(5)]
  codes = np.array([[40 + (d >= 5), 42 + d] for d in range(10)])
  table = DocIDTable(codes, tuple(map(str, range(10))), "rq", {"new_tokens": 13})
  rows = code_rows(table, words, emb, 13, 40)
  assert rows.shape == (13, 8) and np.isnan(rows[12]).all()          # no document carries token 52
  centre = emb.mean(0)
  cos = lambda a, b: float((a - centre) @ (b - centre) / np.linalg.norm(a - centre) / np.linalg.norm(b - centre))
  assert cos(rows[0], emb[0:10].mean(0)) > cos(rows[0], emb[20:30].mean(0))
  assert cos(rows[1], emb[20:30].mean(0)) > cos(rows[1], emb[0:10].mean(0))
  norm = np.linalg.norm(emb - centre, axis=1).mean()
  np.testing.assert_allclose(np.linalg.norm(rows[:12] - centre, axis=1), norm, rtol=1e-5)
  # extend_vocab takes them (noise aside) and keeps the mean where a row is NaN
  cfg = preset("tiny-bert")
  params = init_params(cfg, jax.random.key(0))
  d = cfg.hidden_size
  given = np.full((3, d), np.nan, np.float32)
  given[0] = 5.0
  new_cfg, grown = extend_vocab(cfg, params, 3, rows=given)
  table_ = np.asarray(grown["embed"]["embedding"])
  assert new_cfg.vocab_size == cfg.vocab_size + 3
  assert np.abs(table_[cfg.vocab_size] - 5.0).max() < 0.1
  np.testing.assert_allclose(table_[cfg.vocab_size + 1], np.asarray(params["embed"]["embedding"]).mean(0), atol=0.1)


@pytest.mark.slow  # two tiny trainings; summarize_seeds has its fast test in test_experiment.py
def test_seed_sweep_of_the_retriever(tmp_path, monkeypatch):
  import importlib.util
  import json
  import sys
  from pathlib import Path
  spec = importlib.util.spec_from_file_location("seed_sweep", Path(__file__).parents[1] / "experiments" / "seed_sweep.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  _beir(tmp_path / "data" / "toy")
  over = [o for o in _gr_overrides(tmp_path) if not o.startswith("out_dir=")] + ["train.ar_steps=0"]
  monkeypatch.setattr(sys, "argv", ["seed_sweep.py", "--kind", "gr", "--seeds", "0", "1", "--out",
                                    str(tmp_path / "seeds"), "--name", "toy", "--metric", "recall@10", "decode.default=one_pass"] + over)
  sweep.main()
  out = tmp_path / "seeds" / "toy"
  keys = {json.loads((out / "control" / f"seed_{s}" / "manifest.json").read_text())["artefacts"][-1]["key"]
          for s in (0, 1)}
  assert len(keys) == 2  # each seed trains its own retriever
  assert "recall@10" in (out / "seeds.md").read_text() and (out / "seeds.png").exists()
