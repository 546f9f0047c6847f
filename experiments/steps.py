"""The training step, its optimizer and schedule: what every run computes.

Pure JAX, optax and Flax (no data pipeline, checkpointing or config
library), so that the trainer, the benchmark and the accelerator run share
one step. A `config` here is anything with the recipe's attributes
(``learning_rate``, ``schedule``, ``momentum``, ``weight_decay``, ...): an
ml_collections ConfigDict, or a ``types.SimpleNamespace``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["init_state", "make_optimizer", "make_schedule",
           "make_train_step"]


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
