"""Shared pieces of the experiment configs.

Every config file calls one of the builders here and documents, in its own
docstring, the exact command and the paper's number. A config file takes an
optional argument after a colon (``--config=FILE.py:ARG``): ``smoke`` gives
a run of a few steps on a few examples, used by the tests; files with
variants (the ablations) take the variant, e.g. ``:8`` or ``:8,smoke``.
"""

from __future__ import annotations

import argparse

import ml_collections
from ml_collections import config_dict

from se_jax.models import option_types

# Set by the run itself: the dataset decides the input channels, and
# compute_dtype the model's dtype.
_SET_BY_RUN = ("in_channels", "dtype")


def model_option_placeholders() -> ml_collections.ConfigDict:
  """A typed placeholder (None: the model's default) for every option of
  `se_jax.models.create`, from the dataclasses and signatures that define
  them (`se_jax.models.option_types`)."""
  return ml_collections.ConfigDict({
      k: config_dict.placeholder(t) for k, t in option_types().items()
      if k not in _SET_BY_RUN})


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every run; builders and files override what they need."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.data_dir = config_dict.placeholder(str)
  c.model = "cifar_se_resnet20"
  # Options passed to se_jax.models.create; None leaves the model's default.
  c.model_options = model_option_placeholders()
  c.compute_dtype = "float32"  # or "bfloat16"; parameters stay float32.

  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 164.0
  c.num_train_steps = -1  # > 0 overrides num_epochs.
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.schedule = "step"  # "step", "step_every", "cosine" or "constant".
  c.decay_fractions = (0.5, 0.75)  # "step": at these fractions of training.
  c.decay_every_epochs = 30.0  # "step_every".
  c.decay_factor = 0.1
  c.warmup_epochs = 0.0
  c.label_smoothing = 0.0

  c.augment_flip = config_dict.placeholder(bool)  # None: recipe default.
  c.augment_pad = config_dict.placeholder(int)
  c.image_size = config_dict.placeholder(int)  # ImageNet crop size.
  c.max_train_examples = config_dict.placeholder(int)
  c.max_eval_examples = config_dict.placeholder(int)
  # Input threads; None: 0 on CPUs, 8 with accelerators (data.input_threads).
  c.num_threads = config_dict.placeholder(int)

  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  # Also keep every checkpoint whose step is a multiple of this (snapshots
  # along the run, e.g. to follow its gates); None keeps only the latest.
  c.keep_checkpoint_every_steps = config_dict.placeholder(int)
  c.progress = True
  c.distributed = "auto"  # "auto", "on" or "off", see trainer.py.
  # Runs of several processes; None: from JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS or the cluster.
  c.coordinator_address = config_dict.placeholder(str)  # "HOST:PORT".
  c.num_processes = config_dict.placeholder(int)
  c.process_id = config_dict.placeholder(int)
  c.local_device_ids = config_dict.placeholder(tuple)  # This process's.
  return c


def parse_arg(arg: str | None) -> tuple[str | None, bool]:
  """Splits a config argument into (variant, smoke)."""
  parts = [p for p in (arg or "").split(",") if p]
  smoke = "smoke" in parts
  parts = [p for p in parts if p != "smoke"]
  if len(parts) > 1:
    raise ValueError(f"expected at most one variant and 'smoke', got {arg!r}.")
  return (parts[0] if parts else None), smoke


def parse_seeds(text: str) -> list[int]:
  """Comma-separated seeds, for command lines (an argparse ``type``)."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"seeds must be comma-separated integers, got {text!r}") from None
  if not seeds:
    raise argparse.ArgumentTypeError(f"no seed in {text!r}")
  return seeds


def short_run(*, dataset: str, model: str, seed: int, epochs: float,
              batch_size: int, learning_rate: float,
              max_train_examples: int | None = None,
              max_eval_examples: int | None = None):
  """The recipe of the CPU-scale studies: SGD with a cosine decay.

  Returned unlocked, for the study to add its own settings.
  """
  c = base_config()
  c.dataset = dataset
  c.model = model
  c.seed = seed
  c.num_epochs = float(epochs)
  c.batch_size = batch_size
  c.learning_rate = learning_rate
  c.schedule = "cosine"
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 1
  c.max_train_examples = max_train_examples
  c.max_eval_examples = max_eval_examples
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps on a few examples: checks that a config runs end to end.

  The network keeps its family, layout and SE options but has one unit per
  stage, so that compiling it takes seconds; the full-depth networks are
  exercised by the model tests.
  """
  c.num_train_steps = 3
  # The linear scaling rule keeps the short run stable at the small batch.
  c.learning_rate = c.learning_rate * 8 / c.batch_size
  c.batch_size = 8
  c.eval_batch_size = 8
  c.max_train_examples = 64
  c.max_eval_examples = 16
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.progress = False
  if c.dataset == "imagenet2012":
    c.image_size = 64
  n_stages = 4 if c.dataset == "imagenet2012" else 3
  c.model_options.stage_sizes = (1,) * n_stages
  return c


def finish(c: ml_collections.ConfigDict, is_smoke: bool):
  if is_smoke:
    smoke(c)
  c.lock()
  return c


def cifar(dataset: str, model: str, arg: str | None, **model_options):
  """The CIFAR recipe of the ResNet papers (docs/reference/facts.md, CIFAR).

  SGD momentum 0.9, batch 128, lr 0.1 divided by 10 at 50% and 75% of
  training, weight decay 1e-4 (5e-4 for WRN), 164 epochs; pad-4 crop, flip,
  per-channel normalisation.
  """
  variant, is_smoke = parse_arg(arg)
  if variant is not None:
    raise ValueError(f"this config has no variants, got {variant!r}.")
  c = base_config()
  c.dataset = dataset
  c.model = model
  for k, v in model_options.items():
    c.model_options[k] = v
  if "wrn" in model:
    c.weight_decay = 5e-4
  return finish(c, is_smoke)


def imagenet(model: str, variant_arg: str | None = None, **model_options):
  """The paper's ImageNet recipe (Sec. 5.1).

  SGD momentum 0.9, batch 1024, lr 0.6 divided by 10 every 30 epochs, 100
  epochs, weight decay 1e-4, random-size 224 crops and flips; evaluation on
  the centre 224 crop of the image resized to 256.
  """
  _, is_smoke = parse_arg(variant_arg)
  c = base_config()
  c.dataset = "imagenet2012"
  c.model = model
  for k, v in model_options.items():
    c.model_options[k] = v
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 100.0
  c.learning_rate = 0.6
  c.schedule = "step_every"
  c.decay_every_epochs = 30.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  return finish(c, is_smoke)


# The ablations of Tables 10-16: SE-ResNet-50 in the Caffe layout, C // r,
# no FC biases (paper, Sec. 6), on the Table 2 recipe. Each maps a variant
# name to the model options it sets.
ABLATIONS = {
    "reduction": {str(r): dict(reduction=float(r)) for r in (2, 4, 8, 16, 32)},
    "squeeze": {op: dict(squeeze=op) for op in ("avg", "max")},
    "excitation": {g: dict(gate=g) for g in ("sigmoid", "tanh", "relu")},
    "stages": {"2": dict(se_stages=(2,)), "3": dict(se_stages=(3,)),
               "4": dict(se_stages=(4,)), "all": dict(se_stages=(2, 3, 4, 5))},
    "integration": {i: dict(integration=i)
                    for i in ("standard", "pre", "post", "identity")},
    "se_3x3": {"3x3": dict(position="3x3")},
    "no_squeeze": {"no_squeeze": dict(no_squeeze=True)},
}


def ablation(group: str, arg: str | None):
  """SE-ResNet-50 with the `group` option set to the variant in `arg`."""
  variants = ABLATIONS[group]
  variant, is_smoke = parse_arg(arg)
  if variant is None:
    if len(variants) > 1:
      raise ValueError(
          f"choose a variant with --config=FILE.py:VARIANT, one of"
          f" {sorted(variants)}."
      )
    variant = next(iter(variants))
  if variant not in variants:
    raise ValueError(
        f"unknown {group} variant {variant!r}; one of {sorted(variants)}."
    )
  return imagenet("legacy_se_resnet50", "smoke" if is_smoke else None,
                  rounding="paper", se_bias=False, **variants[variant])
