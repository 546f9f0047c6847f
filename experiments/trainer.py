"""The training engine: `train_and_evaluate(config, workdir)`.

One engine for two CPU cores and for a TPU pod. The batch is sharded over a
1-D mesh of all devices (``data``), parameters and optimizer state are
replicated, and XLA inserts the cross-device reductions (BatchNorm statistics
included, so a run gives the same losses on 1 or N devices). With several
hosts (``jax.distributed``), each host feeds its own slice of every global
batch and Orbax writes the checkpoints collectively.

A run's workdir holds everything it produces: ``config.json``,
``metrics.jsonl``, TensorBoard events in ``tb/``, and Orbax checkpoints in
``checkpoints/``. Running the same command again resumes from the last
checkpoint (parameters, optimizer, step, RNG; the data position is the step)
and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import data, files
from experiments.provenance import provenance
from se_jax.models import create

__all__ = ["EXECUTION_KEYS", "NonFiniteLossError", "WorkdirLockedError",
           "build_model", "finished_result", "init_state", "make_optimizer",
           "make_schedule", "make_train_step", "recipe", "restore_model",
           "train_and_evaluate"]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


# ------------------------------------------------------------ pieces


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
  """The config's model, for its dataset's classes and channels."""
  info = data.DATASETS[config.dataset]
  options = {k: v for k, v in config.model_options.items() if v is not None}
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(config.compute_dtype)
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(
        f"compute_dtype must be 'float32' or 'bfloat16', got"
        f" {config.compute_dtype!r}."
    )
  return create(config.model, num_classes=info.num_classes,
                in_channels=info.channels, dtype=dtype, rngs=rngs, **options)


def make_schedule(config, steps_per_epoch: int, total_steps: int):
  """The learning-rate schedule of `config`, as a function of the step."""
  base = config.learning_rate
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.schedule == "step":
    bounds = [int(round(f * total_steps)) for f in config.decay_fractions]
  elif config.schedule == "step_every":
    every = int(round(config.decay_every_epochs * steps_per_epoch))
    if every < 1:
      raise ValueError(
          f"decay_every_epochs={config.decay_every_epochs} is under one step."
      )
    bounds = list(range(every, total_steps, every))
  elif config.schedule in ("cosine", "constant"):
    bounds = []
  else:
    raise ValueError(
        "schedule must be 'step', 'step_every', 'cosine' or 'constant', got"
        f" {config.schedule!r}."
    )
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, max(1, total_steps - warmup))
  else:
    main = optax.piecewise_constant_schedule(
        base, {b - warmup: config.decay_factor for b in bounds if b > warmup})
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), main], [warmup])


def _decay_mask(params):
  # L2 on convolution and fully connected weights only; not on biases and
  # BatchNorm scales and offsets.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """SGD with momentum (optionally Nesterov) and masked L2 weight decay."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )


def _cross_entropy(logits, labels, num_classes, smoothing):
  targets = jax.nn.one_hot(labels, num_classes)
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _top_k_correct(logits, labels, k):
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *,
                    num_classes: int, label_smoothing: float = 0.0):
  """The training step of every run, a pure function to jit.

  Args:
    graphdef: the model's graph, from ``nnx.split(model, nnx.Param,
      nnx.BatchStat)``.
    tx: the optimizer, e.g. `make_optimizer`.
    schedule: the learning rate as a function of the step (logged).
    num_classes: classifier outputs.
    label_smoothing: of the cross-entropy targets.

  Returns:
    ``train_step(state, batch) -> (state, metrics)``: one SGD step on a
    ``{"image", "label"}`` batch in training mode (batch statistics), with
    `state` a dict of ``step``, ``rng``, ``params``, ``batch_stats`` and
    ``opt_state``, and metrics ``loss``, ``top1_err`` (%), ``lr`` and
    ``params_finite`` (1.0 while every parameter is finite).
  """

  def train_step(state, batch):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, state["batch_stats"], copy=True)
      logits = m(batch["image"])
      loss = _cross_entropy(logits, batch["label"], num_classes,
                            label_smoothing).mean()
      return loss, (nnx.state(m, nnx.BatchStat), logits)

    (loss, (stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {
        "step": state["step"] + 1,
        "rng": state["rng"],
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": stats,
        "opt_state": opt_state,
    }
    top1 = 1.0 - _top_k_correct(logits, batch["label"], 1).mean()
    params_finite = jnp.all(jnp.stack([
        jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new["params"])]))
    return new, {"loss": loss, "top1_err": 100.0 * top1,
                 "lr": schedule(state["step"]),
                 "params_finite": params_finite.astype(jnp.float32)}

  return train_step


def init_state(params, batch_stats, tx: optax.GradientTransformation,
               seed: int) -> dict:
  """The training state `make_train_step`'s step takes, at step 0."""
  return {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed)),
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
  }


# ------------------------------------------------------------ workdir


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise WorkdirLockedError(
        f"workdir {workdir} is in use by another run ({holder}); wait for it"
        " to finish or use another --workdir."
    ) from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
  f.flush()
  try:
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


class _MetricWriter:
  """JSON lines and TensorBoard, written by the first host only."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    # Records past the restored step belong to a run that was cut off and
    # will be written again.
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [l for l in f if json.loads(l)["step"] <= resume_step]
      files.write_atomic(self.path, "".join(keep))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, split: str, metrics: dict[str, float]):
    if not self.enabled:
      return
    record = {"step": step, "split": split,
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(f"{split}/{k}", float(v), step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _maybe_initialize_distributed(mode: str) -> None:
  """Joins a multi-host run: "on", or "auto" when a coordinator is named."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed must be 'auto', 'on' or 'off', got {mode!r}.")
  if jax.distributed.is_initialized():
    return
  if mode == "on" or (mode == "auto" and "JAX_COORDINATOR_ADDRESS" in
                      os.environ):
    # Cluster environments (Cloud TPU, SLURM, ...) are detected by JAX.
    jax.distributed.initialize()


# ------------------------------------------------------------ checkpoints


def _to_checkpoint(state: dict) -> dict:
  return {
      "step": state["step"],
      "rng": state["rng"],
      "params": nnx.to_pure_dict(state["params"]),
      "batch_stats": nnx.to_pure_dict(state["batch_stats"]),
      "opt_state": {str(i): leaf for i, leaf in
                    enumerate(jax.tree.leaves(state["opt_state"]))},
  }


def _from_checkpoint(template: dict, restored: dict) -> dict:
  params, stats = template["params"], template["batch_stats"]
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(stats, restored["batch_stats"])
  treedef = jax.tree.structure(template["opt_state"])
  leaves = [restored["opt_state"][str(i)] for i in range(treedef.num_leaves)]
  return {"step": restored["step"], "rng": restored["rng"], "params": params,
          "batch_stats": stats,
          "opt_state": jax.tree.unflatten(treedef, leaves)}


# ------------------------------------------------------------ the loop


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains `config`'s model, evaluating every epoch; resumes if it can.

  Args:
    config: a locked ConfigDict, see experiments/configs/common.py.
    workdir: where everything the run produces is written.

  Returns:
    The final evaluation metrics (``loss``, ``top1_err``, ``top5_err`` in %)
    and the run's ``train_seconds`` (this invocation's time in the loop).

  Raises:
    WorkdirLockedError: if another run holds `workdir`.
    NonFiniteLossError: if the loss becomes NaN or infinite; the last good
      checkpoint is kept.
    data.DataUnavailableError: if the dataset cannot be found.
  """
  _maybe_initialize_distributed(config.distributed)
  os.makedirs(workdir, exist_ok=True)
  with _workdir_lock(workdir):
    return _run(config, workdir)


def _run(config, workdir):
  lead = jax.process_index() == 0
  info = data.DATASETS.get(config.dataset)
  if info is None:
    raise ValueError(
        f"unknown dataset {config.dataset!r}; supported:"
        f" {sorted(data.DATASETS)}."
    )
  if config.image_size is not None:
    info = dataclasses.replace(info, image_size=config.image_size)
  if lead:
    files.write_atomic(os.path.join(workdir, "config.json"),
                       config.to_json_best_effort(indent=2) + "\n")
    # Each invocation (a resume too) records where it ran.
    with open(os.path.join(workdir, "provenance.jsonl"), "a") as f:
      f.write(json.dumps(provenance()) + "\n")

  train_src = data.get_source(config.dataset, info.train_split,
                              data_dir=config.data_dir)
  eval_src = data.get_source(config.dataset, info.eval_split,
                             data_dir=config.data_dir)
  n_train = data.num_examples(train_src, config.max_train_examples)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
        f"batch_size {config.batch_size} exceeds the {n_train} training"
        " examples."
    )
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  if config.batch_size % jax.device_count():
    raise ValueError(
        f"batch_size {config.batch_size} must be divisible by the"
        f" {jax.device_count()} devices."
    )

  model = build_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  eval_graphdef = nnx.split(nnx.view(model, use_running_average=True),
                            nnx.Param, nnx.BatchStat)[0]
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)
  state = jax.device_put(init_state(params, batch_stats, tx, config.seed),
                         replicated)

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True))
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        _to_checkpoint(state))
    restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    state = _from_checkpoint(state, restored)
  start = int(state["step"])
  num_classes = info.num_classes
  smoothing = config.label_smoothing

  train_step = make_train_step(graphdef, tx, schedule,
                               num_classes=num_classes,
                               label_smoothing=smoothing)

  def eval_step(state, batch):
    m = nnx.merge(eval_graphdef, state["params"], state["batch_stats"])
    logits = m(batch["image"])
    mask = batch["mask"]
    loss = _cross_entropy(logits, batch["label"], num_classes, 0.0)
    return {
        "loss": jnp.sum(loss * mask),
        "top1_correct": jnp.sum(_top_k_correct(logits, batch["label"], 1)
                                * mask),
        "top5_correct": jnp.sum(_top_k_correct(logits, batch["label"], 5)
                                * mask),
        "count": jnp.sum(mask),
    }

  train_step = jax.jit(train_step, donate_argnums=0,
                       out_shardings=(replicated, replicated))
  eval_step = jax.jit(eval_step, out_shardings=replicated)

  train_tf, eval_tf = data.make_transforms(info, flip=config.augment_flip,
                                           pad=config.augment_pad)
  threads = data.input_threads(config.num_threads)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  def evaluate():
    totals = None
    for batch in data.eval_batches(
        eval_src, eval_tf, global_batch=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_examples=config.max_eval_examples,
        num_threads=threads):
      out = eval_step(state, to_global(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    return {"loss": float(totals["loss"]) / n,
            "top1_err": 100.0 * (1.0 - float(totals["top1_correct"]) / n),
            "top5_err": 100.0 * (1.0 - float(totals["top5_correct"]) / n)}

  writer = _MetricWriter(workdir, start, lead)
  if lead and start > 0:
    print(f"Resuming from the checkpoint at step {start} of {total_steps}.",
          file=sys.stderr, flush=True)
  batches = data.train_batches(
      train_src, train_tf, global_batch=config.batch_size, seed=config.seed,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(),
      max_examples=config.max_train_examples, num_threads=threads)

  pending: list[tuple[int, dict]] = []

  def flush():
    """Checks and logs the steps since the last flush."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]) or not m["params_finite"]:
        last = manager.latest_step()
        what = (f"training loss is {m['loss']}" if not np.isfinite(m["loss"])
                else "the parameters became non-finite")
        raise NonFiniteLossError(
            f"{what} at step {s}; stopping. The last good checkpoint is"
            " kept: " + (f"step {last} in {ckpt_dir}." if last is not None
                         else "none was saved yet.")
        )
    s, m = pending[-1][0], dict(fetched[-1])
    del m["params_finite"]
    writer.write(s, "train", m)
    if bar is not None:
      bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.4g}")
    pending.clear()

  bar = None
  if lead and config.progress:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, unit="step",
               desc=f"{config.model} on {config.dataset}", dynamic_ncols=True,
               mininterval=1.0)
  t0 = time.perf_counter()
  eval_metrics = None
  try:
    for step in range(start, total_steps):
      state, metrics = train_step(state, to_global(next(batches)))
      pending.append((step + 1, metrics))
      done = step + 1
      if done % config.log_every_steps == 0:
        flush()
      if done % eval_every == 0 or done == total_steps:
        flush()
        eval_metrics = evaluate()
        eval_metrics["epoch"] = done / steps_per_epoch
        writer.write(done, "eval", eval_metrics)
        if lead:
          msg = (f"step {done}/{total_steps} (epoch"
                 f" {eval_metrics['epoch']:.2f}): eval loss"
                 f" {eval_metrics['loss']:.4f}, top-1 err"
                 f" {eval_metrics['top1_err']:.2f}%, top-5 err"
                 f" {eval_metrics['top5_err']:.2f}%")
          (bar.write if bar is not None else print)(msg)
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        flush()
        manager.save(done, args=ocp.args.StandardSave(_to_checkpoint(state)))
      if bar is not None:
        bar.update(1)
    flush()
    manager.wait_until_finished()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    manager.close()
  if eval_metrics is None:
    eval_metrics = evaluate()
  result = {**eval_metrics, "train_seconds": time.perf_counter() - t0,
            "steps": total_steps}
  if lead:
    files.write_json(os.path.join(workdir, "final.json"), result)
  return result


# Settings that change how a run executes, not what it computes: the batches
# are a function of (seed, step) whatever the input threads, and where the
# data lives or whether a progress bar shows changes no number.
EXECUTION_KEYS = ("num_threads", "progress", "distributed", "data_dir")


def recipe(config: ml_collections.ConfigDict | dict) -> dict:
  """What a run of `config` computes, as a dict.

  The config without its `EXECUTION_KEYS`, and without the model options
  left at None (the model's default), so that a model option added later
  does not make earlier runs look different.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
  out["model_options"] = {k: v for k, v in out["model_options"].items()
                          if v is not None}
  return out


def finished_result(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, Any] | None:
  """The final metrics of a finished run of `config`'s recipe, if any.

  Lets a study reuse runs that completed earlier; a run with another recipe
  in the same workdir does not count (settings of `EXECUTION_KEYS` may
  differ).
  """
  try:
    with open(os.path.join(workdir, "final.json")) as f:
      final = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
      same = recipe(json.load(f)) == recipe(config)
  except (OSError, ValueError):
    return None
  return final if same else None


def restore_model(config: ml_collections.ConfigDict, workdir: str,
                  step: int | None = None):
  """The model of a run, with the parameters of its latest checkpoint.

  Args:
    config: the run's config.
    workdir: the run's workdir.
    step: a checkpoint step; default the latest.

  Returns:
    ``(model, step)``, the model in eval mode.

  Raises:
    FileNotFoundError: if the workdir has no checkpoint.
  """
  model = build_model(config, rngs=nnx.Rngs(config.seed))
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}.")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(stats, restored["batch_stats"])
  model = nnx.merge(graphdef, params, stats)
  model.eval()
  return model, step
