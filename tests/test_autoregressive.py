"""Causal LM generation: greedy and beam search token-identical to transformers, KV cache == no cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffrag.models import from_pretrained, positions_from_mask
from diffrag.sampling import transforms as T
from diffrag.sampling.autoregressive import ar_sampler, beam_search_ar, generate_ar, stop_ids_of
from tests import hf_fixtures as hf

EOS, PAD = 2, 0


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def causal(request, tmp_path_factory):
  path, ref = hf.causal_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)
  model, params = from_pretrained(path)
  return path, ref, model, params


def _left_padded_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, hf.VOCAB, (3, 7))
  mask = np.ones_like(ids)
  mask[1, :3], mask[2, :1] = 0, 0
  return np.where(mask == 1, ids, PAD), mask


def test_greedy_equals_transformers_generate(causal):
  path, ref, model, params = causal
  ids, mask = _left_padded_batch()
  with torch.no_grad():
    want = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12, do_sample=False,
                        pad_token_id=PAD, eos_token_id=EOS).numpy()
  out = generate_ar(model, params, ids, jax.random.key(0), max_new_tokens=12, attention_mask=mask,
                    stop_ids=stop_ids_of(path, model.config))
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :want.shape[1]], want)
  # a second call with the same settings runs the compiled loop (the default transform is one object)
  from diffrag.experiment.timing import count_compiles
  with count_compiles() as compiled:
    jax.block_until_ready(generate_ar(model, params, ids, jax.random.key(1), max_new_tokens=12, attention_mask=mask,
                                      stop_ids=stop_ids_of(path, model.config)).tokens)
  assert compiled["count"] == 0


def test_beam_search_equals_transformers(causal):
  _, ref, model, params = causal
  ids, mask = _left_padded_batch()
  with torch.no_grad():
    want = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6, num_beams=3,
                        num_return_sequences=3, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                        output_scores=True, return_dict_in_generate=True)
  seqs, scores = beam_search_ar(model, params, ids, num_beams=3, max_new_tokens=6, attention_mask=mask, stop_ids=(EOS,))
  got = np.asarray(seqs)
  hf_seqs = want.sequences.numpy()[:, ids.shape[1]:].reshape(3, 3, -1)
  np.testing.assert_array_equal(got[:, :, :hf_seqs.shape[-1]], hf_seqs)
  np.testing.assert_allclose(np.asarray(scores), want.sequences_scores.numpy().reshape(3, 3), atol=1e-4)


def test_kv_cached_generation_equals_recomputing_everything(causal):
  _, _, model, params = causal
  ids, mask = _left_padded_batch()
  out = generate_ar(model, params, ids, jax.random.key(0), max_new_tokens=8, attention_mask=mask)
  seq, m = jnp.asarray(ids), jnp.asarray(mask)
  forward = jax.jit(lambda s, m: model.apply({"params": params}, s, attention_mask=m, positions=positions_from_mask(m)))
  for _ in range(8):  # no cache: the whole sequence every step, next token = argmax at the last position
    logits = forward(seq, m)
    nxt = jnp.argmax(logits[:, -1], -1)
    seq, m = jnp.concatenate([seq, nxt[:, None]], 1), jnp.concatenate([m, jnp.ones_like(m[:, :1])], 1)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(seq))


def test_sampling_stops_at_eos_and_uses_the_transform_pieces(causal):
  _, _, model, params = causal
  ids, mask = _left_padded_batch()
  out = generate_ar(model, params, ids, jax.random.key(3), max_new_tokens=16, attention_mask=mask,
                    transform=ar_sampler(temperature=5.0, top_k=50, top_p=0.95), stop_ids=(EOS, 7))
  gen = np.asarray(out.tokens)[:, ids.shape[1]:]
  for row, n in zip(gen, np.asarray(out.lengths)):
    stops = [i for i, t in enumerate(row) if t in (EOS, 7)]
    assert n == (stops[0] + 1 if stops else 16) and (row[n:] == PAD).all()
  # allowed tokens: only 5 and EOS may be emitted
  allow = T.chain(T.allowed_tokens(lambda v: (jnp.arange(v.logits.shape[-1]) == 5) | (jnp.arange(v.logits.shape[-1]) == EOS)),
                  T.greedy())
  gen = np.asarray(generate_ar(model, params, ids, jax.random.key(0), max_new_tokens=5, attention_mask=mask,
                               transform=allow, stop_ids=(EOS,)).tokens)[:, ids.shape[1]:]
  assert set(gen.ravel()) <= {5, EOS, PAD}


def test_ar_errors_are_clear(causal, tmp_path):
  _, _, model, params = causal
  with pytest.raises(ValueError, match="exceeds the model's context"):
    generate_ar(model, params, np.ones((1, 8), np.int32), jax.random.key(0), max_new_tokens=600)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    generate_ar(model, params, np.ones((1, 8), np.int32), jax.random.key(0), max_new_tokens=0)
  llada, lparams = from_pretrained(hf.llada_checkpoint(tmp_path / "l")[0])
  with pytest.raises(ValueError, match="bidirectional"):
    generate_ar(llada, lparams, np.ones((1, 8), np.int32), jax.random.key(0), max_new_tokens=4)
  from diffrag.sampling.sampler import generate
  with pytest.raises(ValueError, match="autoregressive"):
    generate(model, params, np.ones((1, 8), np.int32), T.llada(), jax.random.key(0), gen_length=4, steps=4)


# ------------------------------------------------------------------------- CLI and pipelines


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory):
  path, _ = hf.causal_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen2", seed=2, tie=True)
  return hf.word_tokenizer(path, eos_ids=(EOS, 7))


def test_cli_sample_runs_ar_generation(ar_checkpoint, capsys):
  import json
  from diffrag.cli import main
  assert main(["sample", "--checkpoint", str(ar_checkpoint), "--prompt-ids", "5,6,8", "--gen-length", "16",
               "--temperature", "0", "--json"]) == 0
  got = json.loads(capsys.readouterr().out)["generated_ids"][0]
  model, params = from_pretrained(ar_checkpoint)
  ref = generate_ar(model, params, np.array([[5, 6, 8]]), jax.random.key(0), max_new_tokens=16, stop_ids=(EOS, 7))
  n = int(ref.lengths[0])
  assert got == np.asarray(ref.tokens)[0, 3:3 + n].tolist()  # up to and including the first stop id
  assert len(got) == 16 or got[-1] in (EOS, 7)
  for flag in (["--steps", "8"], ["--block-length", "8"], ["--alg", "entropy"], ["--cache", "dual"]):
    assert main(["sample", "--checkpoint", str(ar_checkpoint), "--prompt-ids", "5,6", "--gen-length", "8", *flag]) == 2
    assert "masked diffusion models only" in capsys.readouterr().err


def test_rag_with_an_ar_reader(ar_checkpoint, tmp_path):
  import json
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig, run_rag
  from tests.test_rag import _squad_files
  _squad_files(tmp_path / "data")
  over = [f"data.data_dir={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'tfds'}", "data.dataset=squad",
          "data.holdout=1.0", "retrieval.retriever=bm25", "retrieval.k=1", f"reader.checkpoint={ar_checkpoint}",
          "prompt.chat=false", "prompt.max_prompt_tokens=48", "generation.gen_length=6", "generation.batch_size=4",
          "spread.alphas=[]", f"out_dir={tmp_path / 'out'}"]
  summary = run_rag(config_lib.load(RagConfig, None, over), progress=False)
  assert [r["method"] for r in summary["methods"]] == ["baseline"] and summary["methods"][0]["n"] == 7
  rec = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
  n = sum(c >= 0 for c in rec["commit_step"])
  assert rec["commit_step"][:n] == list(range(n)) and len(rec["drift_curve"]) == rec["forward_passes"]
  with pytest.raises(ValueError, match="masked diffusion readers only"):
    run_rag(config_lib.load(RagConfig, None, over + ["spread.alphas=[0.5]"]), progress=False)
  with pytest.raises(ValueError, match=r"generation.left_to_right.*masked diffusion readers only"):
    run_rag(config_lib.load(RagConfig, None, over + ["generation.left_to_right=true"]), progress=False)


def test_gr_with_an_ar_checkpoint_trains_and_decodes_the_ar_row(ar_checkpoint, tmp_path):
  from diffrag import config as config_lib
  from diffrag.gr.pipeline import GRConfig, run_gr
  from tests.test_gr import _beir
  _beir(tmp_path / "data" / "toy")
  over = [f"data.data_dir={tmp_path / 'data'}", "data.dataset=toy", f"model.checkpoint={ar_checkpoint}",
          "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.query_tokens=8",
          f"train.store={tmp_path / 'store'}", "docids.max_tokens=6", "decode.beam=2", "baselines=[bm25]",
          f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"]
  summary = run_gr(config_lib.load(GRConfig, None, over), progress=False)
  rows = {r["method"]: r for r in summary["methods"]}
  assert set(rows) == {"bm25", "ar_beam_B2"} and rows["ar_beam_B2"]["model"] == "autoregressive (qwen2)"
  assert rows["ar_beam_B2"]["invalid_%"] == 0 and rows["ar_beam_B2"]["train_steps"] == 2
