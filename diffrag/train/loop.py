"""The training loop around the pure step: mesh, data, Orbax checkpoints, metrics, resume.

    cfg = config.load(TrainConfig, "configs/minilm_corpus.yaml", ["train.steps=200"])
    result = run(cfg)

Checkpoints (`<out_dir>/checkpoints/<step>/`) hold the train state, and
`<out_dir>/data_state/<step>/process_<i>.json` each process's data iterator state (with
per-host data every process reads different records); re-running the same command resumes
from the latest one and sees exactly the batches an uninterrupted run would have seen (per-step keys are
`fold_in(seed_key, step)`). A non-finite loss stops the run with a clear message before
anything is saved, so the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from diffrag import config as config_lib
from diffrag.diffusion import schedule as schedules
from diffrag.experiment.provenance import write_json_atomic
from diffrag.models import from_pretrained, init_params, load_tokenizer, minilm_path, preset, save_pretrained
from diffrag.models.transformer import MaskedDiffusionTransformer, ModelConfig
from diffrag.parallel import mesh as mesh_lib
from diffrag.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """init: "minilm" (real all-MiniLM-L6-v2 warm start), "preset" (random, `preset` name) or
  "checkpoint" (a Hugging Face directory); overrides: ModelConfig fields to change."""

  init: str = "minilm"
  preset: str = "tiny-llada"
  checkpoint: str | None = None
  tokenizer: str | None = None
  dtype: str = "float32"
  param_dtype: str | None = None
  overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  sources: tuple[str, ...] = ("squad", "musique")
  seq_len: int = 128
  mode: str = "pack"  # pack | pad
  long: str = "error"  # error | truncate (pad mode)
  data_dir: str | None = None
  cache_dir: str = "outputs/cache/tfds"
  per_host: bool = False  # multi-host: each process reads only its share of the records (its rows)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  steps: int = 300
  batch_size: int = 16
  micro_batches: int = 1
  seed: int = 0
  schedule: str = "linear"
  weighting: str = "elbo"          # elbo (w(t) of the schedule: the masked-NLL bound) | flat (w = 1, MaskGIT's loss)
  eps: float = 1e-3
  antithetic: bool = False
  log_every: int = 10
  checkpoint_every: int = 100
  keep: int = 3
  out_dir: str = "outputs/train"
  export: bool = True
  loss_window: list | None = None  # [start, length]: logits and loss on that span only (pairs); start < 0 counts from the end
  objective: str = "diffusion"     # diffusion (masked-NLL) | ar (next-token CE, causal model)
  vocab_tile: int = 0              # > 0: cross-entropy over vocabulary tiles of this size (no [tokens, V] logits)
  remat: str = "none"              # rematerialisation of each layer: none | full | dots_saveable | ...
  loss_tokens: int = 0             # > 0: the output layer on the masked positions only, in this many slots per micro-batch
  layer_loop: str = "auto"         # scan | unroll | auto (unroll on CPU, where it is ~9% faster; scan elsewhere)
  prefix_share: float = 0.0        # share of rows corrupted left to right (a clean prefix, the rest masked: the
                                   # states of one-token-per-pass decoding) instead of i.i.d.; the model's EOS ends
                                   # a response (objective.prefix_process)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  optim: step_lib.OptimConfig = step_lib.OptimConfig()
  train: LoopSpec = LoopSpec()
  mesh: MeshSpec = MeshSpec()


class TrainingDiverged(RuntimeError):
  """The loss became NaN/Inf."""


def build_model(spec: ModelSpec, key: jax.Array) -> tuple[MaskedDiffusionTransformer, dict, Any]:
  """(model, params, tokenizer or None) from a ModelSpec."""
  dtypes = {"dtype": spec.dtype, "param_dtype": spec.param_dtype or spec.dtype}
  if spec.init == "minilm":
    model, params = from_pretrained(minilm_path(), init_missing_head=True, **dtypes, **spec.overrides)
    return model, params, load_tokenizer(spec.tokenizer or minilm_path())
  if spec.init == "checkpoint":
    if not spec.checkpoint:
      raise ValueError("model.init=checkpoint needs model.checkpoint=<directory>")
    model, params = from_pretrained(spec.checkpoint, **dtypes, **spec.overrides)
    return model, params, load_tokenizer(spec.tokenizer or spec.checkpoint)
  if spec.init == "preset":
    cfg = preset(spec.preset, **dtypes, **spec.overrides)
    tok = load_tokenizer(spec.tokenizer) if spec.tokenizer else None
    return MaskedDiffusionTransformer(cfg), init_params(cfg, key), tok
  raise ValueError(f"model.init={spec.init!r}; expected 'minilm', 'preset' or 'checkpoint'")


def corpus_batches(cfg: TrainConfig, tokenizer, model_cfg: ModelConfig):
  """The Grain iterator of pretraining batches described by cfg.data."""
  from diffrag.data import data_dir  # pylint: disable=import-outside-toplevel
  from diffrag.data.builders import passage_source  # pylint: disable=import-outside-toplevel
  from diffrag.data.pipeline import text_dataset  # pylint: disable=import-outside-toplevel
  if tokenizer is None:
    raise ValueError("training on text needs a tokenizer: set model.tokenizer=<dir> for a preset model")
  src = passage_source(data_dir(cfg.data.data_dir), cfg.data.sources, cfg.data.cache_dir)
  eos = model_cfg.eos_token_id if model_cfg.eos_token_id is not None else tokenizer.sep_token_id
  return iter(text_dataset(src, tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                           seed=cfg.train.seed, eos_id=eos, mode=cfg.data.mode, long=cfg.data.long,
                           shard=host_shard(cfg)))


def host_shard(cfg: TrainConfig) -> tuple[int, int]:
  """(process index, process count) when each host reads its own share (data.per_host), else (0, 1)."""
  return (jax.process_index(), jax.process_count()) if cfg.data.per_host else (0, 1)


def compile_step(model: MaskedDiffusionTransformer, params: dict, cfg: TrainConfig, mesh, rules, output_ids=None):
  """Places params on `mesh`, builds the train state there and jits the step once.

  Returns (state, step(state, batch, key) -> (state, metrics), batch sharding).
  """
  loop = cfg.train.layer_loop
  if loop not in ("auto", "scan", "unroll"):
    raise ValueError(f"train.layer_loop={loop!r}; expected 'auto', 'scan' or 'unroll'")
  if loop == "auto":
    loop = "unroll" if jax.default_backend() == "cpu" else "scan"
  if (cfg.train.remat, loop) != (model.config.remat, model.config.layer_loop):  # training settings, same params
    model = type(model)(model.config.replace(remat=cfg.train.remat, layer_loop=loop))
  tx = step_lib.make_optimizer(cfg.optim, cfg.train.steps)
  key = jax.random.fold_in(jax.random.key(cfg.train.seed), 2)
  with mesh_lib.activate(mesh, rules):
    params = jax.device_put(params, mesh_lib.param_shardings(model.config, mesh, rules))
    state = jax.jit(lambda p: step_lib.init_state(p, tx, cfg.optim, key))(params)
  state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  window = None if cfg.train.loss_window is None else tuple(int(v) for v in cfg.train.loss_window)
  step_fn = step_lib.make_train_step(step_lib.model_apply_fn(model), tx, cfg.optim,
                                     mask_id=model.config.mask_token_id,
                                     schedule=schedules.get(cfg.train.schedule, cfg.train.eps, cfg.train.weighting),
                                     micro_batches=cfg.train.micro_batches, antithetic=cfg.train.antithetic,
                                     loss_window=window, objective=cfg.train.objective,
                                     vocab_tile=cfg.train.vocab_tile, output_ids=output_ids,
                                     loss_tokens=cfg.train.loss_tokens, dropout=model.config.dropout > 0,
                                     prefix_share=cfg.train.prefix_share, eos_id=model.config.eos_token_id)
  jitted = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, mesh_lib.replicated(mesh)),
                   out_shardings=(state_sharding, mesh_lib.replicated(mesh)), donate_argnums=0)

  def step(state, batch, key):
    with mesh_lib.activate(mesh, rules):
      return jitted(state, batch, key)

  return state, step, batch_sharding


def _global_batch(batch: dict, sharding, per_host: bool = False) -> dict:
  """Host batch -> global arrays laid out by `sharding`: the whole global batch, identical on
  every process, or (per_host) this process's rows of it, assembled across processes."""
  if per_host:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def _data_state_file(out: Path, step: int) -> Path:
  return out / "data_state" / str(step) / f"process_{jax.process_index()}.json"


def _save_data_state(out: Path, step: int, data, keep: set[int]) -> None:
  """This process's iterator state at `step` (per process: with per-host data they differ)."""
  if not hasattr(data, "get_state"):
    return
  path = _data_state_file(out, step)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json_atomic(path, _to_json(data.get_state()))
  for old in (out / "data_state").iterdir():
    if old.name.isdigit() and int(old.name) not in keep:
      for f in old.glob("*.json"):
        f.unlink(missing_ok=True)


@dataclasses.dataclass
class TrainResult:
  state: step_lib.TrainState
  model: MaskedDiffusionTransformer
  history: list[dict]
  out_dir: Path
  export_dir: Path | None


def run(cfg: TrainConfig, *, batches: Iterator[dict] | None = None, stop_after: int | None = None,
        progress: bool = True, initial: tuple | None = None, output_ids=None) -> TrainResult:
  """Trains (or resumes) per `cfg`. `batches` replaces the configured data (tests, pairs);
  `stop_after` ends the run early at that step, as a kill would (after its checkpoint);
  `initial=(model, params, tokenizer)` starts from those instead of `cfg.model` (e.g. a
  model whose vocabulary was extended with DocID tokens); `output_ids` restricts the output
  softmax to those token ids (`make_train_step`)."""
  out = Path(cfg.train.out_dir).resolve()  # Orbax needs absolute paths
  out.mkdir(parents=True, exist_ok=True)
  root_key = jax.random.key(cfg.train.seed)
  model, params, tokenizer = initial if initial is not None else \
      build_model(cfg.model, jax.random.fold_in(root_key, 1))
  data = batches if batches is not None else corpus_batches(cfg, tokenizer, model.config)
  per_host = cfg.data.per_host and jax.process_count() > 1

  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
  rules = mesh_lib.rules_from_config(cfg.mesh.rules)
  state, jitted, batch_sharding = compile_step(model, params, cfg, mesh, rules, output_ids)
  del params
  manager = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(
      max_to_keep=cfg.train.keep, save_interval_steps=1, create=True))
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    state = restored["state"]
    saved = _data_state_file(out, start)
    if hasattr(data, "set_state") and saved.exists():
      data.set_state(_from_json(json.loads(saved.read_text())))
    else:  # a plain iterator: replay the batches the checkpointed steps consumed
      for _ in range(start):
        next(data)
  config_lib.dump(cfg, out / "config.yaml")

  lr_fn = step_lib.lr_schedule(cfg.optim, cfg.train.steps)
  end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
  history: list[dict] = []
  metrics_file = out / "metrics.jsonl"
  bar = tqdm(total=end, initial=start, desc="train", disable=not progress or jax.process_index() != 0)
  writer = _event_writer(out) if jax.process_index() == 0 else None
  tokens_done, t_last, overflows = 0, time.perf_counter(), 0
  split = {"data_s": 0.0, "compute_s": 0.0, "checkpoint_s": 0.0}
  for step in range(start, end):
    t0 = time.perf_counter()
    host_batch = next(data)
    batch = _global_batch({k: np.asarray(v) for k, v in host_batch.items()}, batch_sharding, per_host)
    t1 = time.perf_counter()
    state, metrics = jitted(state, batch, jax.random.fold_in(root_key, step))
    loss = float(metrics["loss"])
    split["data_s"] += t1 - t0
    split["compute_s"] += time.perf_counter() - t1
    if not (math.isfinite(loss) and bool(metrics["params_finite"])):
      last = manager.latest_step()
      manager.close()
      raise TrainingDiverged(
          f"loss became {loss} (updated params finite: {bool(metrics['params_finite'])}) at step {step + 1}; nothing was saved after it. The last good checkpoint is "
          f"{'step ' + str(last) if last is not None else 'none'} in {out / 'checkpoints'}. Lower optim.lr, "
          "raise optim.warmup_steps or check the data, then re-run to resume.")
    tokens_done += batch["tokens"].size  # the global batch
    overflows += int(metrics["loss_overflow"])
    bar.update(1)
    if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == end:
      t0 = time.perf_counter()
      manager.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
      _save_data_state(out, step + 1, data, set(manager.all_steps()) | {step + 1})
      split["checkpoint_s"] += time.perf_counter() - t0
    if (step + 1) % cfg.train.log_every == 0 or step + 1 == end:
      now = time.perf_counter()
      n = (step + 1) - (history[-1]["step"] if history else start)
      row = {"step": step + 1, "loss": loss, "masked_accuracy": float(metrics["masked_accuracy"]),
             "grad_norm": float(metrics["grad_norm"]), "lr": float(lr_fn(step)),
             "tokens_per_s": tokens_done / max(now - t_last, 1e-9),
             **{f"step_{k}": v / max(n, 1) for k, v in split.items()}}
      if cfg.train.loss_tokens > 0:  # micro-batches per step whose masked tokens overflowed the budget (full path)
        row["loss_overflow"] = overflows / max(n, 1)
      tokens_done, t_last, overflows = 0, now, 0
      split = dict.fromkeys(split, 0.0)
      history.append(row)
      bar.set_postfix(loss=f"{loss:.3f}", acc=f"{row['masked_accuracy']:.3f}")
      if jax.process_index() == 0:
        with metrics_file.open("a") as f:
          f.write(json.dumps(row) + "\n")
        for k, v in row.items():
          if k != "step":
            writer.add_scalar(f"train/{k}", v, step + 1)
        writer.flush()
  if writer is not None:
    writer.close()
  bar.close()
  manager.wait_until_finished()
  manager.close()
  export_dir = None
  if cfg.train.export and end == cfg.train.steps and jax.process_index() == 0:
    export_dir = export(model, state, cfg, tokenizer, out / "hf")
  return TrainResult(state, model, history, out, export_dir)


def _event_writer(out: Path):
  """TensorBoard event files beside metrics.jsonl (`tensorboard --logdir <out_dir>`)."""
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  return SummaryWriter(logdir=str(out / "tensorboard"))


def export(model: MaskedDiffusionTransformer, state: step_lib.TrainState, cfg: TrainConfig, tokenizer,
           path: Path) -> Path:
  """Writes the trained model (LoRA merged) as a Hugging Face directory, tokenizer included."""
  params = jax.device_get(step_lib.model_params(state.params, state.frozen, cfg.optim))
  save_pretrained(model.config, params, path)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path


def _to_json(state: Any) -> Any:
  """Grain iterator state -> JSON (tuples become tagged lists so they round-trip)."""
  if isinstance(state, dict):
    return {k: _to_json(v) for k, v in state.items()}
  if isinstance(state, tuple):
    return {"__tuple__": [_to_json(v) for v in state]}
  if isinstance(state, list):
    return [_to_json(v) for v in state]
  if isinstance(state, (np.integer,)):
    return int(state)
  return state


def _from_json(state: Any) -> Any:
  if isinstance(state, dict):
    if set(state) == {"__tuple__"}:
      return tuple(_from_json(v) for v in state["__tuple__"])
    return {k: _from_json(v) for k, v in state.items()}
  if isinstance(state, list):
    return [_from_json(v) for v in state]
  return state

