"""The diffusion math against direct NumPy computations and exact enumeration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrag.diffusion import schedule as schedules
from diffrag.diffusion.objective import (diffusion_loss, forward_process, masked_nll, mc_log_likelihood,
                                         prefix_process, sample_times, stratified_mask_counts)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_nll_matches_numpy():
  rng = np.random.default_rng(0)
  b, l, v = 3, 7, 11
  logits = rng.normal(size=(b, l, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, l))
  maskable = np.ones((b, l), bool)
  maskable[1, :3] = False  # a prompt in row 1
  is_masked = maskable & (rng.random((b, l)) < 0.5)
  p_mask = np.array([0.3, 0.6, 0.9], np.float32)
  got = masked_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(is_masked), jnp.asarray(1 / p_mask),
                   jnp.asarray(maskable))
  ce = -np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  want = np.mean([(ce[i] * is_masked[i]).sum() / p_mask[i] / maskable[i].sum() for i in range(b)])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Pretraining: every position maskable -> LLaDA's sum / (B * L).
  full = np.ones((b, l), bool)
  got = masked_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(is_masked), jnp.asarray(1 / p_mask),
                   jnp.asarray(full))
  want = sum((ce[i] * is_masked[i]).sum() / p_mask[i] for i in range(b)) / (b * l)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_forward_process_rates_and_prompt():
  x0 = jnp.arange(4000, dtype=jnp.int32).reshape(2, 2000) % 50
  maskable = jnp.ones_like(x0, bool).at[:, :100].set(False)
  xt, is_masked = forward_process(jax.random.key(0), x0, jnp.array([0.2, 0.8]), maskable, 99)
  assert not bool(is_masked[:, :100].any())
  rates = np.asarray(is_masked[:, 100:].mean(-1))
  np.testing.assert_allclose(rates, [0.2, 0.8], atol=0.04)
  np.testing.assert_array_equal(np.asarray(xt)[np.asarray(is_masked)], 99)


def test_prefix_process_keeps_a_clean_prefix_up_to_the_first_eos():
  """Left-to-right corruption: a clean prefix of the response, everything after it masked, the
  prefix length uniform over 0..(rank of the first EOS); prompts never masked."""
  eos, mask = 7, 99
  # 3 prompt tokens, then a response: row 0 "a b EOS EOS EOS", row 1 no EOS at all, row 2 nothing maskable
  x0 = jnp.array([[1, 2, 3, 10, 11, 7, 7, 7], [1, 2, 3, 10, 11, 12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  maskable = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]] * 2 + [[0] * 8], bool)
  draw = jax.jit(jax.vmap(lambda k: prefix_process(k, x0, maskable, mask, eos)))
  xt, is_masked = (np.asarray(a) for a in draw(jax.random.split(jax.random.key(0), 3000)))
  assert not is_masked[:, :, :3].any() and not is_masked[:, 2].any()
  np.testing.assert_array_equal(xt[is_masked], mask)
  np.testing.assert_array_equal(xt[~is_masked], np.broadcast_to(np.asarray(x0), xt.shape)[~is_masked])
  resp = is_masked[:, :2, 3:]
  assert (np.diff(resp.astype(int), axis=-1) >= 0).all()          # once masked, masked to the end
  k = 5 - resp.sum(-1)                                              # clean prefix length per draw
  assert set(k[:, 0]) == {0, 1, 2}                                 # the answer "a b", then its EOS
  assert set(k[:, 1]) == {0, 1, 2, 3, 4}                           # no EOS: any prefix leaving one masked
  np.testing.assert_allclose(np.bincount(k[:, 0]) / len(k), 1 / 3, atol=0.04)
  # without an eos_id every rank can start the masked suffix
  _, m = prefix_process(jax.random.key(1), x0, maskable, mask)
  assert int(np.asarray(m)[0].sum()) >= 1


def test_prefix_share_mixes_rows_and_zero_is_the_iid_draw():
  """prefix_share=0 is the i.i.d. draw bit for bit; 1 corrupts every row left to right with
  weight 1; a share outside [0, 1] is an error."""
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, 20, (64, 12)), jnp.int32).at[:, 9:].set(7)
  maskable = jnp.zeros((64, 12), bool).at[:, 4:].set(True)
  logits = jnp.asarray(rng.normal(size=(64, 12, 20)), jnp.float32)
  seen = {}

  def logits_fn(xt):
    seen["xt"] = xt
    return logits

  sched = schedules.get("linear", 1e-3)
  ref = diffusion_loss(logits_fn, jax.random.key(4), x0, maskable, 99, sched)
  zero = diffusion_loss(logits_fn, jax.random.key(4), x0, maskable, 99, sched, prefix_share=0.0, eos_id=7)
  assert float(ref[0]) == float(zero[0])
  loss, aux = diffusion_loss(logits_fn, jax.random.key(4), x0, maskable, 99, sched, prefix_share=1.0, eos_id=7)
  masked = np.asarray(seen["xt"]) == 99
  resp = masked[:, 4:]
  assert (np.diff(resp.astype(int), axis=-1) >= 0).all() and resp[:, -3:].all()  # the EOS tail always masked
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(x0)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), np.mean((nll * masked).sum(-1) / 8), rtol=1e-5)  # weight 1, not 1/t
  assert int(aux["masked_tokens"]) == masked.sum()
  with pytest.raises(ValueError, match="prefix_share=1.5"):
    diffusion_loss(logits_fn, jax.random.key(4), x0, maskable, 99, sched, prefix_share=1.5)


def test_antithetic_times_are_stratified():
  t = np.sort(np.asarray(sample_times(jax.random.key(3), 8, antithetic=True)))
  np.testing.assert_allclose(np.diff(t), 1 / 8, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "poly2"])
def test_schedules_are_monotone_and_clipped(name):
  s = schedules.get(name, eps=1e-3)
  t = jnp.linspace(0, 1, 101)
  p = np.asarray(s.mask_prob(t))
  assert p[0] == pytest.approx(1e-3, rel=1e-4) and p[-1] == pytest.approx(1.0)
  assert np.all(np.diff(p) >= 0) and np.all(np.asarray(s.weight(t[1:-1])) > 0)
  with pytest.raises(ValueError, match="unknown masking schedule"):
    schedules.get("zigzag")


def test_flat_weighting_keeps_the_masking_and_drops_the_elbo_weight():
  elbo, flat = schedules.get("poly0.5"), schedules.get("poly0.5", weighting="flat")
  t = jnp.linspace(0.01, 1, 50)
  np.testing.assert_array_equal(np.asarray(flat.mask_prob(t)), np.asarray(elbo.mask_prob(t)))
  np.testing.assert_array_equal(np.asarray(flat.weight(t)), 1.0)
  assert float(elbo.weight(t[0])) > 10  # the ELBO weight ~ k / t blows up at small t; flat does not
  assert flat.name == "poly0.5-flat"
  with pytest.raises(ValueError, match="unknown loss weighting 'uniform'"):
    schedules.get("linear", weighting="uniform")


def test_stratified_counts_follow_llada():
  counts = np.asarray(stratified_mask_counts(jax.random.key(0), jnp.array([5, 16]), 4))
  assert counts.min() >= 1 and counts[0].max() <= 5 and counts[1].max() <= 16
  # Spread evenly around the circle 1..n: consecutive differences are n/group mod n.
  assert sorted(np.diff(np.sort(counts[1]))) == [4, 4, 4]


def test_mc_elbo_converges_to_enumerated_value():
  """2-token answer after a 1-token prompt; the model is a fixed table of the canvas."""
  vocab, mask = 5, 4
  rng = np.random.default_rng(0)
  table = rng.normal(size=(vocab,) * 3 + (3, vocab)).astype(np.float32)  # logits for every canvas
  logits_fn = lambda x: jnp.asarray(table)[x[:, 0], x[:, 1], x[:, 2]]
  tokens = jnp.array([[2, 1, 3]])
  maskable = jnp.array([[False, True, True]])
  # Exact: (1/n) sum_m (n/m) E_{|S|=m} sum_{i in S} -log p(x_i | x_S masked), n = 2.
  logp = _np_log_softmax(table.astype(np.float64))
  x = [2, 1, 3]
  total = 0.0
  for m in (1, 2):
    subsets = list(itertools.combinations([1, 2], m))
    acc = 0.0
    for s in subsets:
      xt = [mask if i in s else x[i] for i in range(3)]
      acc += sum(-logp[xt[0], xt[1], xt[2], i, x[i]] for i in s)
    total += (2 / m) * acc / len(subsets) / 2
  est = mc_log_likelihood(logits_fn, jax.random.key(0), tokens, maskable, mask, mc_num=4096, group=16)
  assert abs(float(est[0]) - (-total)) < 0.02 * abs(total)
