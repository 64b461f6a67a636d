"""The controlled-experiment layer: artefact store, provenance, compile-free timing, paired statistics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrag.experiment import stats
from diffrag.experiment.provenance import canonical, code_version, fingerprint, source_fingerprint, write_manifest
from diffrag.experiment.store import ArtefactStore
from diffrag.experiment.timing import Stopwatch, count_compiles


def test_fingerprint_is_stable_and_content_based():
  a = {"train": {"steps": 3, "lr": 1e-4}, "codes": np.arange(6).reshape(2, 3), "name": "x"}
  b = {"name": "x", "codes": np.arange(6).reshape(2, 3), "train": {"lr": 1e-4, "steps": 3}}
  assert fingerprint(a) == fingerprint(b)
  assert fingerprint(a) != fingerprint({**a, "codes": np.arange(6).reshape(3, 2)})  # shape matters
  assert fingerprint(a) != fingerprint({**a, "train": {"steps": 4, "lr": 1e-4}})
  with pytest.raises(TypeError, match="cannot fingerprint"):
    fingerprint({"f": lambda: 0})


def test_store_reuses_only_on_an_exact_match(tmp_path):
  logs = []
  store = ArtefactStore(tmp_path, log=logs.append)
  spec = {"init": "minilm", "train": {"steps": 10, "lr": 1e-3}, "data": "squad_v1:train"}
  art = store.get("reader", spec)
  assert not art.done and (art.path / "spec.json").exists() and "building it" in logs[-1]
  store.finish(art, {"steps": 10, "wall_seconds": 1.5})
  again = store.get("reader", json.loads(json.dumps(spec)))
  assert again.path == art.path and again.done and "reusing" in logs[-1]
  assert again.record(True)["reused"] and again.record(True)["steps"] == 10
  # every determining field, changed in turn, gives a new artefact and says which field differs
  for changed in ({**spec, "init": "bert"}, {**spec, "train": {"steps": 11, "lr": 1e-3}},
                  {**spec, "train": {"steps": 10, "lr": 2e-3}}, {**spec, "data": "squad_v1:dev"}):
    other = store.get("reader", changed)
    assert other.path != art.path and not other.done
    key = next(k for k in ("init", "steps", "lr", "data") if k in logs[-1].split("differs in")[1])
    assert key
  unfinished = store.get("reader", {**spec, "init": "bert"})
  assert "resuming the unfinished build" in logs[-1] and not unfinished.done


def test_source_fingerprint_sees_code_not_comments_or_docstrings(tmp_path):
  f = tmp_path / "m.py"

  def fp(src):
    f.write_text(src)
    return source_fingerprint([f], tmp_path)

  base = fp('"""Module doc."""\n\ndef f(x):\n  """Doc."""\n  return x * 2  # twice\n')
  assert base == fp('"""Another doc."""\n\n\ndef f(x):\n  """Other doc,\n  two lines."""\n\n  return x*2\n')
  assert base == fp('def f(x):\n  return x * 2\n')
  assert base != fp('def f(x):\n  return x * 3\n')  # what runs
  assert base != fp('def f(x):\n  """Doc."""\n  y = 1\n  return x * 2\n')
  g = tmp_path / "g.py"
  g.write_text("")
  assert base != source_fingerprint([f, g], tmp_path)  # another file
  v = code_version()
  assert v["modules"][0] == "diffrag.models" and len(v["source"]) == 16 and v["packages"]["jax"] and v["backend"]
  assert code_version(("diffrag.models",))["source"] != v["source"]
  with pytest.raises(ValueError, match="no diffrag module 'diffrag.nothing'"):
    code_version(("diffrag.nothing",))


def test_store_retrains_when_the_code_that_builds_it_changes(tmp_path, monkeypatch):
  from diffrag.experiment import store as store_lib
  logs = []
  store = ArtefactStore(tmp_path, log=logs.append)
  spec = {"init": "minilm", "train": {"steps": 10}}
  art = store.get("reader", spec)
  assert json.loads((art.path / "spec.json").read_text())["code"] == canonical(code_version())
  store.finish(art, {"steps": 10})
  assert store.get("reader", spec).done  # same code: reused
  edited = {**code_version(), "source": "0" * 16}  # as after an edit to the training code
  monkeypatch.setattr(store_lib, "code_version", lambda modules: edited)
  new = store.get("reader", spec)
  assert new.path != art.path and not new.done
  assert "code.source" in logs[-1] and "only the code that builds it" in logs[-1]
  with pytest.raises(ValueError, match="'code' field is the store's own"):
    store.get("reader", {**spec, "code": "mine"})


def test_manifest_records_provenance(tmp_path):
  from diffrag.rag.pipeline import RagConfig
  path = write_manifest(tmp_path, config=RagConfig(), data={"squad": {"sha256": "abc"}}, seeds={"gen": 0},
                        wall_times={"train": 1.23456}, artefacts=[{"kind": "reader", "reused": True}])
  m = json.loads(path.read_text())
  assert m["config"]["__dataclass__"] == "RagConfig" and m["config"]["data"]["dataset"] == "squad_v1:dev"
  assert set(m["git"]) == {"commit", "dirty"} and m["packages"]["jax"] and m["device"]["backend"] == "cpu"
  assert m["seeds"] == {"gen": 0} and m["wall_times_s"] == {"train": 1.235} and m["artefacts"][0]["reused"]
  assert canonical((1, np.int64(2))) == [1, 2]


def test_manifest_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
  """A commit made while a run goes on does not become the run's commit: the manifest keeps the
  state taken at import and adds the state at writing under "at_write"."""
  from diffrag.experiment import provenance
  now = provenance.git_state()
  started = {"commit": "0" * 40, "dirty": False}
  monkeypatch.setattr(provenance, "_GIT_AT_START", started)
  m = json.loads(write_manifest(tmp_path, config={}).read_text())
  assert m["git"] == {**started, "at_write": now}
  monkeypatch.setattr(provenance, "_GIT_AT_START", now)
  assert json.loads(write_manifest(tmp_path, config={}).read_text())["git"] == now


def test_a_run_config_reads_back_from_its_manifest(tmp_path):
  from diffrag import config as config_lib
  from diffrag.rag.pipeline import RagConfig
  cfg = config_lib.load(RagConfig, "configs/rag_minilm_squad_long.yaml", ["retrieval.rrf_c=7", "data.limit=3"])
  write_manifest(tmp_path, config=cfg, data={}, seeds={}, wall_times={}, artefacts=[])
  back = config_lib.of_run(RagConfig, tmp_path)
  assert back.retrieval.rrf_c == 7.0 and back.data.limit == 3 and back.retrieval.parent_fusion
  assert canonical(back) == canonical(cfg)
  with pytest.raises(FileNotFoundError, match="out_dir of a finished run"):
    config_lib.of_run(RagConfig, tmp_path / "nowhere")


def test_timed_calls_do_not_compile():
  f = jax.jit(lambda x: jnp.tanh(x) * 2)
  sw = Stopwatch()
  with count_compiles() as c:
    with sw.warmup():
      jax.block_until_ready(f(jnp.ones(4)))
  assert c["count"] >= 1 and sw.timing.compile_seconds > 0
  x = jnp.ones(4) * 2  # (an eager op compiles too: keep it out of the timed region)
  for _ in range(3):
    with sw.timed():
      jax.block_until_ready(f(x))
  assert sw.timing.calls == 3 and sw.timing.compiles_in_timed == 0
  y = jnp.ones(5)
  with sw.timed():  # a new shape compiles: the timing says so
    jax.block_until_ready(f(y))
  assert sw.timing.compiles_in_timed >= 1


def test_an_executable_loaded_from_the_persistent_cache_counts_as_a_compile(tmp_path):
  """With JAX's persistent compilation cache (the test suite turns it on), a program compiled
  before is loaded rather than compiled. Loading it inside a timed region still costs time, so the
  timing must still see it (JAX reports the load as a backend compile too)."""
  import subprocess
  import sys
  script = ("import jax, jax.numpy as jnp\n"
            "from diffrag.experiment.timing import Stopwatch\n"
            "f = lambda x: jnp.tanh(x) * 2\n"
            "sw, x = Stopwatch(), jnp.ones(4)\n"
            "with sw.warmup():\n"
            "  jax.block_until_ready(jax.jit(f)(x))\n"
            "jax.clear_caches()  # the in-memory executables go; the next call reads the cache directory\n"
            "with sw.timed():\n"
            "  jax.block_until_ready(jax.jit(f)(x))\n"
            "print(sw.timing.compiles_in_timed)\n")
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True)
  assert any(tmp_path.iterdir()), "the program was not written to the cache"
  assert int(out.stdout.split()[-1]) >= 1, out.stdout + out.stderr


def test_bench_compile_seconds_are_xla_compiles_never_a_noisy_difference():
  from diffrag.bench import _timed
  f = jax.jit(lambda x: jnp.sin(x) * 3)
  x = jnp.ones(7)
  _, fresh, best = _timed(lambda: f(x), repeat=2)
  assert fresh > 0 and best > 0
  _, again, _ = _timed(lambda: f(x), repeat=1)  # already compiled: exactly zero, not first minus best
  assert again == 0.0


def test_sampler_chains_are_built_once_so_the_timed_call_does_not_compile():
  """The RAG/GR decoders cache their chains: a second call with the same settings is the same
  compiled function (the bug this guards against: a fresh chain per call recompiled the sampler)."""
  from diffrag.models import MaskedDiffusionTransformer, init_params, preset
  from diffrag.rag.pipeline import GenerationSpec, make_transform
  from diffrag.sampling.sampler import generate
  cfg = preset("tiny-llada")
  model, params = MaskedDiffusionTransformer(cfg), init_params(cfg, jax.random.key(0))
  gen = GenerationSpec(gen_length=8, steps=4)
  assert make_transform(gen, "llada", 0.5, "mean") is make_transform(GenerationSpec(gen_length=8, steps=4),
                                                                       "llada", 0.5, "mean")
  prompt = np.arange(2, 10).reshape(2, 4)
  extras = {"query_hidden": jnp.ones((2, cfg.hidden_size))}
  call = lambda: jax.block_until_ready(generate(model, params, prompt, make_transform(gen, "llada", 0.5, "mean"),
                                                jax.random.key(0), gen_length=8, steps=4, extras=extras))
  call()
  with count_compiles() as c:
    call()
  assert c["count"] == 0


def test_paired_statistics():
  rng = np.random.default_rng(0)
  base = rng.random(400)
  same = stats.compare(base, base)
  assert same["diff"] == 0 and same["p"] == 1.0 and not same["significant"] and same["n"] == 400
  better = stats.compare(base + 0.1 + rng.normal(0, 0.05, 400), base)
  assert better["significant"] and better["lo"] > 0 and better["p"] < 1e-3
  noise = stats.compare(base + rng.normal(0, 0.3, 400), base)
  assert noise["lo"] < noise["diff"] < noise["hi"]
  assert stats.compare(base + rng.normal(0, 0.3, 400), base) != noise  # different data, different result
  assert stats.compare(*(base + 0.01, base)) == stats.compare(base + 0.01, base)  # seeded: reproducible
  mean, lo, hi = stats.bootstrap_ci(np.r_[np.zeros(50), np.ones(50)])
  assert mean == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # ~ +-1.96 * 0.05
  with pytest.raises(ValueError, match="same items"):
    stats.compare(base, base[:-1])
  with pytest.raises(ValueError, match="NaN"):
    stats.compare(np.r_[base[:-1], np.nan], base)
  assert stats.fmt_diff(better).endswith("*") and stats.fmt_diff(noise).endswith("(n.s.)") or noise["significant"]


def _rag_run(folder, predictions):
  folder.mkdir(parents=True)
  rows = [{"dataset": "squad_v1:dev", "method": m, "id": i, "answers": [gold], "prediction": pred}
          for m, i, gold, pred in predictions]
  (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_compare_pairs_two_runs_on_their_shared_items(tmp_path, capsys):
  from diffrag.cli import main
  from diffrag.experiment.compare import compare_runs
  golds = [f"answer {k}" for k in range(40)]
  _rag_run(tmp_path / "a", [("baseline", f"q{k}", g, "answer" if k % 2 else g) for k, g in enumerate(golds)]
           + [("baseline", "only_a", "x", "x")])
  _rag_run(tmp_path / "b", [("baseline", f"q{k}", g, g) for k, g in enumerate(golds)]
           + [("spread_a1", "q0", "x", "x")])
  rows = {r["metric"]: r for r in compare_runs(tmp_path / "a", tmp_path / "b")}
  assert set(rows) == {"f1", "em", "precision", "answer_words"}  # spread_a1 is in one run only: not compared
  em = rows["em"]
  # 20 of 40 questions go from a one-word partial answer (EM 0) to the exact answer (EM 100)
  assert em["n"] == 40 and em["control"] == 50.0 and em["treatment"] == 100.0 and em["only_control"] == 1
  assert em["d (treatment - control)"].startswith("+50.00") and em["d (treatment - control)"].endswith("*")
  assert rows["answer_words"]["control"] == 1.5 and rows["answer_words"]["treatment"] == 2.0
  # GR: per-query scores from metrics.json, paired by query id whatever their order
  for name, ids, r10 in (("c", ["q1", "q2", "q3"], [1.0, 0.0, 0.5]), ("t", ["q3", "q2", "q1"], [0.5, 1.0, 1.0])):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps(
        {"eval_query_ids": ids, "per_query": {"one_pass_top100": {"recall@10": r10, "ndcg@10": r10}}}))
  (row,) = compare_runs(tmp_path / "c", tmp_path / "t", metrics=["recall@10"])
  assert row["n"] == 3 and row["control"] == 50.0 and row["treatment"] == pytest.approx(83.33)
  assert main(["compare", str(tmp_path / "c"), str(tmp_path / "t"), "--metric", "ndcg@10",
               "--out", str(tmp_path / "out")]) == 0
  assert "one_pass_top100 | ndcg@10 | 3" in capsys.readouterr().out and (tmp_path / "out" / "compare.csv").exists()
  with pytest.raises(ValueError, match="compare runs of one kind"):
    compare_runs(tmp_path / "a", tmp_path / "c")
  with pytest.raises(ValueError, match=r"not in both runs; both have \['squad_v1:dev/baseline'\]"):
    compare_runs(tmp_path / "a", tmp_path / "b", groups=["squad_v1:dev/spread_a1"])
  with pytest.raises(ValueError, match="metric 'f2'"):
    compare_runs(tmp_path / "a", tmp_path / "b", metrics=["f2"])
  with pytest.raises(FileNotFoundError, match="no predictions.jsonl"):
    compare_runs(tmp_path / "a", tmp_path / "missing")
  assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2  # one clear line, no traceback


def test_compare_methods_pairs_the_methods_of_one_run(tmp_path, capsys):
  from diffrag.cli import main
  from diffrag.experiment.compare import compare_methods
  golds = [f"answer {k}" for k in range(30)]
  rows = [("l2r", f"q{k}", g, "answer") for k, g in enumerate(golds)]  # F1 67 (partial), EM 0
  rows += [("l2r_phrase", f"q{k}", g, g if k < 15 else "answer") for k, g in enumerate(golds)]  # 15 exact
  rows += [("baseline", f"q{k}", g, g) for k, g in enumerate(golds[:20])]  # only 20 questions
  _rag_run(tmp_path / "run", rows)
  with open(tmp_path / "run" / "predictions.jsonl", "a") as f:  # a second dataset: paired within it only
    for k, m in ((k, m) for k in range(5) for m in ("l2r", "l2r_phrase")):
      f.write(json.dumps({"dataset": "musique:dev", "method": m, "id": f"m{k}", "answers": ["x"],
                          "prediction": "x" if m == "l2r_phrase" else "y"}) + "\n")
  got = {(r["group"], r["metric"]): r for r in compare_methods(tmp_path / "run", "l2r")}
  assert {g for g, _ in got} == {"squad_v1:dev/l2r_phrase", "squad_v1:dev/baseline", "musique:dev/l2r_phrase"}
  em = got["squad_v1:dev/l2r_phrase", "em"]
  assert em["reference"] == "squad_v1:dev/l2r" and em["n"] == 30 and em["control"] == 0.0 and em["treatment"] == 50.0
  assert em["d (treatment - control)"].startswith("+50.00") and em["only_control"] == 0
  base = got["squad_v1:dev/baseline", "em"]  # paired on the 20 questions both decoded; 10 counted as l2r only
  assert base["n"] == 20 and base["only_control"] == 10 and base["treatment"] == 100.0
  mus = got["musique:dev/l2r_phrase", "f1"]
  assert mus["reference"] == "musique:dev/l2r" and mus["n"] == 5 and mus["treatment"] == 100.0
  # a whole group as the reference pairs within its dataset only
  (row,) = compare_methods(tmp_path / "run", "musique:dev/l2r", metrics=["f1"])
  assert row["group"] == "musique:dev/l2r_phrase"
  assert main(["compare", str(tmp_path / "run"), "--vs", "l2r", "--group", "squad_v1:dev/l2r_phrase",
               "--metric", "em"]) == 0
  assert "squad_v1:dev/l2r | squad_v1:dev/l2r_phrase | em | 30" in capsys.readouterr().out
  with pytest.raises(ValueError, match=r"no method 'beam'; its methods are"):
    compare_methods(tmp_path / "run", "beam")
  with pytest.raises(ValueError, match="cannot be paired with 'l2r'"):
    compare_methods(tmp_path / "run", "l2r", groups=["squad_v1:dev/l2r"])
  # GR: rows of one metrics.json, paired by query id
  (tmp_path / "gr").mkdir()
  (tmp_path / "gr" / "metrics.json").write_text(json.dumps(
      {"eval_query_ids": ["q1", "q2", "q3", "q4"],
       "per_query": {"bm25": {"recall@10": [1.0, 1.0, 0.0, 1.0]}, "one_pass_top100": {"recall@10": [1.0, 0.0, 0.0, 0.0]}}}))
  (gr_row,) = compare_methods(tmp_path / "gr", "bm25", metrics=["recall@10"])
  assert (gr_row["reference"], gr_row["group"], gr_row["n"]) == ("bm25", "one_pass_top100", 4)
  assert gr_row["control"] == 75.0 and gr_row["treatment"] == 25.0 and gr_row["d (treatment - control)"].startswith("-50.00")
  assert main(["compare", str(tmp_path / "run")]) == 2  # neither a second folder nor --vs: one clear line
  assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--vs", "l2r"]) == 2
  assert "not both" in capsys.readouterr().err


def test_summarize_seeds_intervals_over_training_runs(tmp_path):
  from diffrag.experiment.compare import summarize_seeds

  def run(folder, seed, extra=()):
    rows = [("baseline", f"q{k}", f"gold {k}", f"gold {k}" if k < 10 + 5 * seed else "other")
            for k in range(30)]
    rows += [("spread_a1", f"q{k}", f"gold {k}", f"gold {k}" if k < 15 + 5 * seed else "other")
             for k in range(30)]
    _rag_run(folder, rows + list(extra))
    return folder

  control = [run(tmp_path / f"c{s}", s, [("baseline", "only_here", "x", "x")] if s == 0 else ()) for s in range(3)]
  treatment = [run(tmp_path / f"t{s}", s) for s in range(3)]
  levels, diffs = summarize_seeds({"control": control, "treatment": treatment}, metrics=["em"],
                                  reference="baseline")
  base = next(r for r in levels if r["arm"] == "control" and r["group"] == "squad_v1:dev/baseline")
  assert base["n"] == 30 and base["seeds"] == 3  # the question only seed 0 has is left out
  assert base["per_seed"] == "33.33 / 50.00 / 66.67" and base["mean"] == 50.0 and base["sd_seeds"] == 16.67
  half = 4.302653 * 16.6667 / np.sqrt(3)  # t_{2, 0.975} sd / sqrt(3)
  assert base["t_ci_seeds"] == f"50.00 [{50 - half:.2f}, {50 + half:.2f}]"
  lo, hi = (float(v) for v in base["crossed_ci"].split("[")[1].rstrip("]").split(", "))
  assert lo < 50 < hi and base["q_ci_halfwidth"] > 10
  gain = next(r for r in diffs if r["difference"] == "squad_v1:dev/spread_a1 - squad_v1:dev/baseline"
              and r["arm"] == "control")
  assert gain["per_seed"] == "16.67 / 16.67 / 16.67" and gain["sd_seeds"] == 0.0 and gain["significant"]
  arms = next(r for r in diffs if r["difference"] == "squad_v1:dev/baseline: treatment - control")
  assert arms["mean"] == 0.0 and not arms["significant"]
  with pytest.raises(ValueError, match="same number"):
    summarize_seeds({"control": control, "treatment": treatment[:2]})
  with pytest.raises(ValueError, match=r"\(>= 2\) of seeds"):
    summarize_seeds({"control": control[:1]})
  with pytest.raises(ValueError, match="not in every run"):
    summarize_seeds({"control": control}, groups=["squad_v1:dev/spread_a9"])


def test_randomization_test_agrees_with_ranx_fisher():
  """Our sign-flip test is the test ranx.compare runs (Fisher's randomization): same p within MC error."""
  from ranx.statistical_tests import fisher_randomization_test
  rng = np.random.default_rng(1)
  a = rng.random(200)
  for shift in (0.0, 0.02, 0.05):
    b = a + shift + rng.normal(0, 0.2, 200)
    ours = stats.randomization_p(b - a, n_perm=4000)
    ref, _ = fisher_randomization_test(a, b, 4000, 0.05, 42)
    assert abs(ours - ref) < 0.04, (shift, ours, ref)


def test_every_shipped_config_loads():
  """configs/*.yaml parse into their typed configs (unknown keys and wrong types would raise)."""
  from pathlib import Path
  from diffrag import config as config_lib
  from diffrag.gr.pipeline import GRConfig
  from diffrag.rag.pipeline import RagConfig
  from diffrag.train.loop import TrainConfig
  files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
  assert len(files) >= 10
  for f in files:
    cls = RagConfig if f.name.startswith("rag_") else GRConfig if f.name.startswith("gr_") else TrainConfig
    config_lib.load(cls, f)


def test_intervals_over_training_runs():
  mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and np.isclose(hi - mean, 4.302653 / np.sqrt(3))  # t_{2, 0.975} * sd / sqrt(S)
  with pytest.raises(ValueError, match="at least 2 runs"):
    stats.t_interval([1.0])
  rng = np.random.default_rng(0)
  items = rng.normal(50, 20, 300)
  same_runs = np.tile(items, (4, 1))  # training runs that agree: only the questions vary
  m, lo, hi = stats.crossed_bootstrap_ci(same_runs)
  m1, lo1, hi1 = stats.bootstrap_ci(items)
  assert np.isclose(m, m1) and abs((hi - lo) - (hi1 - lo1)) < 0.1 * (hi1 - lo1)
  offsets = np.array([-6.0, -2.0, 2.0, 6.0])[:, None]  # runs far apart: the interval must widen with them
  m2, lo2, hi2 = stats.crossed_bootstrap_ci(same_runs + offsets)
  assert np.isclose(m2, m) and hi2 - lo2 > 2 * (hi - lo)
  assert stats.crossed_bootstrap_ci(same_runs + offsets) == (m2, lo2, hi2)  # seeded
  with pytest.raises(ValueError, match=r"\[runs, items\]"):
    stats.crossed_bootstrap_ci(items)


def test_compiled_memory_counts_a_donated_buffer_once():
  """An output that reuses a donated argument's buffer is not a second allocation: a step that
  updates its 4 MiB state in place needs 4 MiB, the same step without donation 8 MiB."""
  from diffrag.experiment.timing import compiled_memory
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
  donated = compiled_memory(jax.jit(lambda a: a * 2 + 1, donate_argnums=0).lower(x))
  kept = compiled_memory(jax.jit(lambda a: a * 2 + 1).lower(x))
  assert donated["alias"] == 4 << 20 and donated["total"] == (4 << 20) + donated["temp"]
  assert kept["alias"] == 0 and kept["total"] == (8 << 20) + kept["temp"]
