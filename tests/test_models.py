"""Model parity against PyTorch `transformers`, checkpoint round trips, and bad input."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffrag.models import (ConfigError, MaskedDiffusionTransformer, from_pretrained, init_params, load_tokenizer,
                            minilm_path, preset, save_pretrained)
from tests import hf_fixtures as hf

TOL = 1e-4


def _ids(batch=2, length=11, seed=0, vocab=hf.VOCAB):
  return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llada_matches_bidirectional_llama(tmp_path, kv_heads):
  path, ref = hf.llada_checkpoint(tmp_path / "llada", kv_heads=kv_heads)
  model, params = from_pretrained(path)
  assert model.config.family == "llada" and model.config.mask_token_id == hf.LLADA_MASK
  assert model.config.num_kv_heads == kv_heads
  ids = _ids()
  logits, hidden = model.apply({"params": params}, ids, return_hidden=True)
  ref_logits, ref_hidden = hf.bidirectional_logits(ref, ids, hidden=True)
  chex.assert_shape(logits, (2, 11, hf.VOCAB))
  chex.assert_shape(hidden, (2, 11, 64))
  assert np.abs(np.asarray(logits) - ref_logits).max() <= TOL
  assert np.abs(np.asarray(hidden) - ref_hidden).max() <= TOL
  # The reference really is bidirectional: a causal forward differs.
  with torch.no_grad():
    causal = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.abs(causal - ref_logits).max() > 1e-2


def test_dream_matches_bidirectional_qwen2_with_shift(tmp_path):
  path, ref = hf.dream_checkpoint(tmp_path / "dream")
  model, params = from_pretrained(path)
  assert model.config.shift_logits and model.config.qkv_bias
  ids = _ids()
  logits, hidden = model.apply({"params": params}, ids, return_hidden=True)
  ref_logits, ref_hidden = hf.bidirectional_logits(ref, ids, hidden=True)
  logits = np.asarray(logits)
  # logits[:, i] is about token i: the network's output at position i - 1.
  assert np.abs(logits[:, 1:] - ref_logits[:, :-1]).max() <= TOL
  assert np.abs(logits[:, 0] - ref_logits[:, 0]).max() <= TOL
  assert np.abs(np.asarray(hidden) - ref_hidden).max() <= TOL


@pytest.mark.parametrize("family,tie,scaling", [
    ("llama", False, None), ("llama", True, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ("qwen2", True, None), ("qwen2", False, None)])
def test_causal_families_match_transformers(tmp_path, family, tie, scaling):
  """Llama (GQA, Llama-3 rope scaling, tied or untied head) and Qwen2 (q/k/v biases) against
  LlamaForCausalLM / Qwen2ForCausalLM: causal logits, HF's convention (logits[:, i] predicts
  i + 1), also with left padding; export and reload round-trip."""
  kw = {"tie": tie} | ({"rope_scaling": scaling} if scaling else {}) | ({"kv_heads": 2} if family == "llama" else {})
  path, ref = hf.causal_checkpoint(tmp_path / "ckpt", family, **kw)
  model, params = from_pretrained(path)
  assert model.config.family == family and model.config.causal and not model.config.shift_logits
  assert model.config.head == ("tied" if tie else "linear") and model.config.mask_token_id == -1
  ids = np.random.default_rng(0).integers(3, hf.VOCAB, (2, 12))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
  assert np.max(np.abs(got - want)) < 1e-4
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padding: positions count real tokens, padded keys are masked
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
               position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
  from diffrag.models import positions_from_mask
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                               positions=positions_from_mask(jnp.asarray(mask))))
  assert np.max(np.abs(got - want)[mask == 1]) < 1e-4
  save_pretrained(model.config, params, tmp_path / "export")
  again, p2 = from_pretrained(tmp_path / "export")
  assert again.config == model.config
  np.testing.assert_allclose(np.asarray(again.apply({"params": p2}, jnp.asarray(ids))),
                             np.asarray(model.apply({"params": params}, jnp.asarray(ids))), atol=1e-6)


def test_bert_matches_transformers(tmp_path):
  path, ref = hf.bert_checkpoint(tmp_path / "bert")
  model, params = from_pretrained(path)
  ids = _ids(length=17, vocab=hf.VOCAB)
  logits, hidden = model.apply({"params": params}, ids, return_hidden=True)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  assert np.abs(np.asarray(hidden) - out.hidden_states[-1].numpy()).max() <= TOL
  assert np.abs(np.asarray(logits) - out.logits.numpy()).max() <= TOL


def test_bert_padding_mask_matches_transformers(tmp_path):
  path, ref = hf.bert_checkpoint(tmp_path / "bert")
  model, params = from_pretrained(path)
  ids = _ids(length=9)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  _, hidden = model.apply({"params": params}, ids, attention_mask=mask, return_hidden=True)
  with torch.no_grad():
    out = ref.bert(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
  ref_h = out.last_hidden_state.numpy()
  assert np.abs(np.asarray(hidden)[mask == 1] - ref_h[mask == 1]).max() <= TOL


def test_real_minilm_matches_transformers_bert():
  from transformers import BertModel
  path = minilm_path()
  model, params = from_pretrained(path, init_missing_head=True)
  assert model.config.mask_token_id == 103 and model.config.num_layers == 6
  tok = load_tokenizer(path)
  ids = tok(["Diffusion language models denoise a masked canvas."], return_tensors="np")["input_ids"]
  _, hidden = model.apply({"params": params}, ids, return_hidden=True)
  ref = BertModel.from_pretrained(str(path), local_files_only=True).eval()
  with torch.no_grad():
    ref_h = ref(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  assert np.abs(np.asarray(hidden) - ref_h).max() <= TOL


def test_gelu_erf_matches_torch_exact_gelu_and_its_gradient():
  from diffrag.models.transformer import gelu_erf
  x = np.linspace(-9.0, 9.0, 4001, dtype=np.float32)
  t = torch.tensor(x, requires_grad=True)
  ref = torch.nn.functional.gelu(t, approximate="none")
  ref.sum().backward()
  y = gelu_erf(jnp.asarray(x))
  grad = jax.grad(lambda v: jnp.sum(gelu_erf(v)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), ref.detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), t.grad.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)), atol=1e-6)


def test_minilm_without_head_needs_explicit_flag():
  with pytest.raises(ConfigError, match="init_missing_head=True"):
    from_pretrained(minilm_path())


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream", "tiny-bert"])
@pytest.mark.parametrize("shard_bytes", [2**31, 40_000])
def test_export_reload_round_trip(tmp_path, name, shard_bytes):
  cfg = preset(name)
  params = init_params(cfg, jax.random.key(1))
  save_pretrained(cfg, params, tmp_path / name, max_shard_bytes=shard_bytes)
  assert (tmp_path / name / "model.safetensors.index.json").exists() == (shard_bytes < 2**31)
  model, loaded = from_pretrained(tmp_path / name)
  assert model.config == cfg
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, loaded)


def test_export_loads_in_pytorch_bert_for_masked_lm(tmp_path):
  from transformers import BertForMaskedLM
  cfg = preset("tiny-bert")
  params = init_params(cfg, jax.random.key(2))
  save_pretrained(cfg, params, tmp_path / "b")
  ref = BertForMaskedLM.from_pretrained(str(tmp_path / "b"), local_files_only=True).eval()
  ids = _ids(length=12, vocab=cfg.vocab_size)
  with torch.no_grad():
    ref_logits = ref(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  logits = MaskedDiffusionTransformer(cfg).apply({"params": params}, ids)
  assert np.abs(np.asarray(logits) - ref_logits).max() <= TOL


def test_export_of_llada_loads_into_reference_names(tmp_path):
  path, ref = hf.llada_checkpoint(tmp_path / "src")
  model, params = from_pretrained(path)
  save_pretrained(model.config, params, tmp_path / "out")
  from safetensors.torch import load_file
  exported = load_file(tmp_path / "out" / "model.safetensors")
  original = load_file(path / "model.safetensors")
  assert set(exported) == set(original)
  for name, tensor in original.items():
    torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
  hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf_cfg["model_type"] == "llada" and hf_cfg["mask_token_id"] == hf.LLADA_MASK


def test_bfloat16_params_and_compute(tmp_path):
  path, ref = hf.llada_checkpoint(tmp_path / "llada")
  model, params = from_pretrained(path, dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  ids = _ids()
  logits = model.apply({"params": params}, ids)
  assert logits.dtype == jnp.bfloat16
  ref_logits = hf.bidirectional_logits(ref, ids)
  err = np.abs(np.asarray(logits, np.float32) - ref_logits).max()
  assert err < 0.1 * np.abs(ref_logits).max()


def test_hidden_states_come_from_the_same_forward():
  cfg = preset("tiny-llada")
  params = init_params(cfg, jax.random.key(0))
  model = MaskedDiffusionTransformer(cfg)
  ids = _ids(vocab=cfg.vocab_size)
  logits, hidden = model.apply({"params": params}, ids, return_hidden=True)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.apply({"params": params}, ids)))
  head = params["lm_head"]["kernel"]
  np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(logits), atol=1e-5)


def test_logical_axis_names_cover_every_param():
  from diffrag.models import logical_axes
  names = {"batch", "length", "embed", "heads", "kv_heads", "kv", "mlp", "vocab", "layers", None}
  for cfg_name in ("tiny-llada", "tiny-dream", "tiny-bert"):
    for spec in jax.tree_util.tree_leaves(logical_axes(preset(cfg_name)), is_leaf=lambda x: isinstance(x, tuple)):
      assert set(spec) <= names, spec


# ----------------------------------------------------------------------------- bad input


def test_missing_tensor_is_named(tmp_path):
  ref = hf.llama_reference()
  tensors = {hf.llada_name(n): t for n, t in ref.state_dict().items()}
  del tensors["model.transformer.blocks.1.up_proj.weight"]
  hf.write_checkpoint(tmp_path, hf.llada_config_json(ref), tensors)
  with pytest.raises(ConfigError, match=r"missing.*blocks\.1\.up_proj\.weight"):
    from_pretrained(tmp_path)


def test_extra_tensor_is_named(tmp_path):
  ref = hf.llama_reference()
  tensors = {hf.llada_name(n): t for n, t in ref.state_dict().items()}
  tensors["model.transformer.blocks.0.surprise.weight"] = torch.zeros(3)
  hf.write_checkpoint(tmp_path, hf.llada_config_json(ref), tensors)
  with pytest.raises(ConfigError, match=r"surprise\.weight"):
    from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
  ref = hf.qwen2_reference()
  tensors = dict(ref.state_dict())
  tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
  hf.write_checkpoint(tmp_path, hf.dream_config_json(ref), tensors)
  with pytest.raises(ConfigError, match=r"up_proj\.weight.*\(100, 64\).*\(160, 64\)"):
    from_pretrained(tmp_path)


def test_config_weights_mismatch_in_layers(tmp_path):
  ref = hf.llama_reference(layers=3)
  config = hf.llada_config_json(ref)
  config["n_layers"] = 2
  hf.write_checkpoint(tmp_path, config, {hf.llada_name(n): t for n, t in ref.state_dict().items()})
  with pytest.raises(ConfigError, match=r"2 layers.*blocks\.2\."):
    from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ConfigError, match=r"model_type='gpt2'.*llada.*Dream.*bert"):
    from_pretrained(tmp_path)


def test_unsupported_config_value(tmp_path):
  ref = hf.llama_reference()
  config = hf.llada_config_json(ref)
  config["alibi"] = True
  hf.write_checkpoint(tmp_path, config, {hf.llada_name(n): t for n, t in ref.state_dict().items()})
  with pytest.raises(ConfigError, match="'alibi'"):
    from_pretrained(tmp_path)


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    from_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(hf.llada_config_json(hf.llama_reference())))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    from_pretrained(tmp_path)


def test_input_ids_outside_vocabulary():
  cfg = preset("tiny-llada")
  params = init_params(cfg, jax.random.key(0))
  model = MaskedDiffusionTransformer(cfg)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model.apply({"params": params}, np.array([[1, 2, cfg.vocab_size]], np.int32))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    model.apply({"params": params}, np.array([[-1, 2]], np.int32))


def test_bad_model_config_fields():
  with pytest.raises(ConfigError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    preset("tiny-llada", num_heads=6)
  with pytest.raises(ConfigError, match="unknown ModelConfig field"):
    preset("tiny-llada", n_layers=3)
  with pytest.raises(ConfigError, match="unknown model preset"):
    preset("gpt-5")


def test_copy_logits_match_a_pointer_written_out_by_hand():
  from diffrag.models.transformer import copy_logits
  rng = np.random.default_rng(0)
  b, n, l, d, v, eos = 2, 3, 7, 8, 12, 1
  q, k = rng.normal(size=(b, n, d)).astype(np.float32), rng.normal(size=(b, l, d)).astype(np.float32)
  ids = rng.integers(2, 6, size=(b, l)).astype(np.int32)   # repeated tokens: their scores add up
  copyable = rng.random((b, l)) < 0.7
  copyable[:, 0] = True
  eos_logit = rng.normal(size=(b, n)).astype(np.float32)
  got = np.asarray(copy_logits(jnp.asarray(q), jnp.asarray(k), jnp.asarray(ids), jnp.asarray(copyable),
                               jnp.asarray(eos_logit), eos, v))
  for bi in range(b):
    for i in range(n):
      s = q[bi, i] @ k[bi].T / np.sqrt(d)
      for tok in range(v):
        if tok == eos:
          want = eos_logit[bi, i]
        else:
          hit = [j for j in range(l) if copyable[bi, j] and ids[bi, j] == tok]
          want = np.log(np.exp(s[hit]).sum()) if hit else -np.inf
        np.testing.assert_allclose(got[bi, i, tok], want, rtol=1e-5, atol=1e-5)


def test_copy_head_points_only_at_the_context_and_round_trips(tmp_path):
  cfg = preset("tiny-bert").replace(copy_head=True)
  params = init_params(cfg, jax.random.key(3))
  model = MaskedDiffusionTransformer(cfg)
  ids = _ids(batch=2, length=12, seed=4, vocab=cfg.vocab_size)
  ids[:, 8:] = cfg.mask_token_id                 # the answer window
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), output_window=(8, 4)))
  assert logits.shape == (2, 4, cfg.vocab_size)
  for bi in range(2):
    context = set(ids[bi, :8].tolist()) - {cfg.mask_token_id, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id}
    finite = set(np.flatnonzero(np.isfinite(logits[bi, 0])).tolist())
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    assert finite == context | {eos}
  # the weights and the switch survive export (the switch in the sidecar; BERT's config cannot say it)
  save_pretrained(cfg, params, tmp_path / "c")
  assert json.loads((tmp_path / "c" / "diffrag_config.json").read_text())["copy_head"] is True
  loaded_model, loaded = from_pretrained(tmp_path / "c")
  assert loaded_model.config.copy_head
  np.testing.assert_array_equal(np.asarray(loaded_model.apply({"params": loaded}, jnp.asarray(ids), output_window=(8, 4))),
                                logits)


@pytest.mark.parametrize("name,overrides", [("tiny-llada", dict(num_kv_heads=2)), ("tiny-bert", {}),
                                            ("tiny-llada", dict(causal=True))])
def test_heads_major_attention_equals_xla_in_outputs_and_gradients(name, overrides):
  cfg = preset(name, **overrides)
  params = init_params(cfg, jax.random.key(0))
  ids = _ids(batch=4, length=12, vocab=cfg.vocab_size)
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding in one row, a different mask per sequence
  mask[3, :2] = 0

  def loss(p, impl):
    model = MaskedDiffusionTransformer(cfg.replace(attention_impl=impl))
    logits = model.apply({"params": p}, ids, attention_mask=mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1e3, logits

  (l_x, logits_x), g_x = jax.value_and_grad(loss, has_aux=True)(params, "xla")
  (l_h, logits_h), g_h = jax.value_and_grad(loss, has_aux=True)(params, "heads_major")
  np.testing.assert_allclose(np.asarray(logits_h), np.asarray(logits_x), atol=1e-5)
  assert abs(float(l_h) - float(l_x)) <= 1e-6 * max(1.0, abs(float(l_x)))
  for a, b in zip(jax.tree_util.tree_leaves(g_h), jax.tree_util.tree_leaves(g_x)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_heads_major_attention_with_a_kv_cache_window_and_a_fully_masked_row():
  from diffrag.models import KVCache, transformer
  cfg = preset("tiny-llada")
  params = init_params(cfg, jax.random.key(1))
  ids = _ids(batch=2, length=16, vocab=cfg.vocab_size)
  out = {}
  for impl in ("xla", "heads_major"):
    model = MaskedDiffusionTransformer(cfg.replace(attention_impl=impl))
    _, kv = model.apply({"params": params}, ids[:, :10], return_cache=True)
    valid = jnp.ones((2, 10), bool).at[0, :3].set(False)
    out[impl] = model.apply({"params": params}, ids[:, 10:], cache=KVCache(kv.k, kv.v, valid),
                            positions=jnp.broadcast_to(jnp.arange(10, 16), (2, 6)))
  np.testing.assert_allclose(np.asarray(out["heads_major"]), np.asarray(out["xla"]), atol=1e-5)
  # a query whose every key is masked gets the uniform average, as in jax's implementation
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(3))
  m = jnp.ones((2, 1, 5, 5), bool).at[1, :, 2, :].set(False)
  want = jax.nn.dot_product_attention(q, k, v, mask=m, scale=0.3, implementation="xla")
  np.testing.assert_allclose(np.asarray(transformer.heads_major_attention(q, k, v, m, 0.3, False)),
                             np.asarray(want), atol=1e-6)


def test_auto_attention_is_heads_major_on_a_one_device_cpu_run_only():
  from jax.sharding import Mesh
  from diffrag.models import transformer
  cfg = preset("tiny-bert")
  q = jax.ShapeDtypeStruct((64, 256, 12, 32), jnp.float32)
  assert transformer._attention_impl(cfg, q, None) == "heads_major"
  assert transformer._attention_impl(cfg.replace(attention_impl="xla"), q, None) == "xla"
  with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
    assert transformer._attention_impl(cfg, q, None) is None
