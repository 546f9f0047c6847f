"""Command lines: one clean line per bad input, and the checks of a config.

Every entry point wraps its ``main(argv)`` with `main_guard`: a bad input
(a config value out of range, an unknown key, a missing dataset, a workdir in
use...) ends the program with one line on stderr, ``PROG: error: ...``, and
exit status 2, without a traceback; ``--debug`` on the command line (or
``SE_JAX_DEBUG=1`` in the environment) shows the traceback instead.

`validate_config` checks a training config before anything is written:
types and ranges of every setting, the dataset and its data_dir, and the
model with its options (built abstractly, so that se_jax's own checks run).

This module imports no JAX at import time, so that light entry points stay
light.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ConfigError", "DEBUG_ENV", "UsageError", "at_least",
           "main_guard", "one_line", "positive", "validate_config"]

DEBUG_ENV = "SE_JAX_DEBUG"


class UsageError(Exception):
  """A command line that cannot be parsed (unknown flag, missing value)."""


class ConfigError(ValueError):
  """A setting that is not allowed: names the key, the value and the rule.

  Attributes:
    key: the setting, e.g. ``"batch_size"`` or ``"$JAX_NUM_PROCESSES"``.
    value: the value given.
    allowed: what is allowed, e.g. ``"an integer >= 1"``.
  """

  def __init__(self, key: str, value: Any, allowed: str):
    self.key, self.value, self.allowed = key, value, allowed
    super().__init__(
        f"{key}={value!r} is not allowed: {allowed.rstrip('.')}.")


# Errors that say what the user should change, by qualified class name, so
# that this module need not import the modules that define them. Anything
# else is a bug and keeps its traceback.
_USER_ERRORS = {
    "experiments.cli.UsageError": 2,
    "experiments.data.DataUnavailableError": 2,
    "experiments.trainer.WorkdirLockedError": 2,
    "experiments.trainer.WorkdirError": 2,
    "experiments.trainer.CheckpointError": 1,
    "experiments.trainer.NonFiniteLossError": 1,
    "experiments.convert_timm.ConversionError": 2,
    "builtins.ValueError": 2,
    "builtins.FileNotFoundError": 2,
    "builtins.NotADirectoryError": 2,
    "builtins.IsADirectoryError": 2,
    "builtins.PermissionError": 2,
}


def exit_status(error: BaseException) -> int | None:
  """The exit status for a user error, or None for a bug."""
  for cls in type(error).__mro__:
    status = _USER_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
    if status is not None:
      return status
  return None


def one_line(error: BaseException) -> str:
  """The message of `error` on one line."""
  text = " ".join(str(error).split())
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = repr(error.args[0])
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.strerror}: {error.filename}"
  return text or type(error).__name__


def at_least(minimum: int) -> Callable[[str], int]:
  """An argparse ``type``: an integer >= `minimum`."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not an integer") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(
          f"{value} is not allowed: an integer >= {minimum}")
    return value

  return parse


def positive(text: str) -> float:
  """An argparse ``type``: a finite number > 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(
        f"{text} is not allowed: a finite number > 0")
  return value


def _raise_usage_error(self, message):
  raise UsageError(message)


@contextlib.contextmanager
def _argparse_raises():
  # argparse prints its usage and exits; the guard prints one line instead.
  original = argparse.ArgumentParser.error
  argparse.ArgumentParser.error = _raise_usage_error
  try:
    yield
  finally:
    argparse.ArgumentParser.error = original


def _default_prog() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    return spec.name.removesuffix(".__main__")
  return os.path.basename(sys.argv[0]) or "se_jax"


def main_guard(main: Callable[[list[str]], Any],
               prog: str | None = None) -> Callable[..., Any]:
  """Wraps ``main(argv)`` so that a user error is one line and status 2.

  The wrapped function takes ``argv`` (default ``sys.argv[1:]``), removes
  ``--debug`` from it (setting ``SE_JAX_DEBUG=1``, which processes started
  from here inherit) and calls ``main(argv)``, returning what it returns.
  argparse errors, `ConfigError` and the other errors that name a bad input
  (``ValueError``, missing files, a missing dataset, a workdir in use) print
  ``PROG: error: MESSAGE`` and exit with status 2; a training run that stops
  (non-finite loss, no restorable checkpoint) exits with status 1 the same
  way. Other exceptions are bugs and keep their traceback. With ``--debug``
  or ``SE_JAX_DEBUG=1`` every exception keeps its traceback.

  Args:
    main: the entry point, taking the arguments after the program name.
    prog: the program name in messages; default the running module's.

  Returns:
    The guarded entry point, ``guarded(argv=None)``.

  Example, at the end of an entry point::

    if __name__ == "__main__":
      cli.main_guard(main)()
  """

  @functools.wraps(main)
  def guarded(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
      # Through the environment, the processes this one starts debug too.
      os.environ[DEBUG_ENV] = "1"
      argv = [a for a in argv if a != "--debug"]
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
      with _argparse_raises():
        return main(argv)
    except KeyboardInterrupt:
      if debug:
        raise
      print(f"{prog or _default_prog()}: interrupted", file=sys.stderr)
      sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted by exit_status below.
      status = exit_status(e)
      if status is None:
        raise
      if debug:
        traceback.print_exc()
      print(f"{prog or _default_prog()}: error: {one_line(e)}",
            file=sys.stderr, flush=True)
      sys.exit(status)

  return guarded


# ------------------------------------------------------------ config checks


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def _int(config, key, minimum, *, optional=False, what=None):
  v = config[key]
  if optional and v is None:
    return
  if not _is_int(v) or v < minimum:
    rule = what or f"an integer >= {minimum}"
    raise ConfigError(key, v, rule + (" or None" if optional else ""))


def _number(config, key, low, high=None, *, low_open=False, high_open=True):
  v = config[key]
  ok = _is_number(v) and (v > low if low_open else v >= low)
  if high is not None:
    ok = ok and (v < high if high_open else v <= high)
  if not ok:
    rule = f"a finite number {'>' if low_open else '>='} {low}"
    if high is not None:
      rule += f" and {'<' if high_open else '<='} {high}"
    raise ConfigError(key, v, rule)


def _choice(config, key, choices):
  v = config[key]
  if v not in choices:
    raise ConfigError(key, v, "one of " + ", ".join(map(repr, choices)))


def _bool(config, key, *, optional=False):
  v = config[key]
  if not (isinstance(v, bool) or (optional and v is None)):
    raise ConfigError(key, v, "True or False" + (" or None" if optional
                                                  else ""))


def check_address(key: str, v) -> None:
  """Checks a HOST:PORT setting; raises ConfigError naming `key`."""
  host, sep, port = (v or "").rpartition(":")
  if not (isinstance(v, str) and sep and host and port.isdigit()
          and 0 < int(port) < 65536):
    raise ConfigError(key, v, "HOST:PORT, e.g. 10.0.0.1:1234")


def validate_distributed(config) -> None:
  """Checks the multi-process settings of `config` (not the environment)."""
  _choice(config, "distributed", ("auto", "on", "off"))
  if config.get("coordinator_address") is not None:
    check_address("coordinator_address", config.coordinator_address)
  if "num_processes" in config:
    _int(config, "num_processes", 1, optional=True)
  if "process_id" in config:
    _int(config, "process_id", 0, optional=True)
    n, p = config.get("num_processes"), config.process_id
    if n is not None and p is not None and p >= n:
      raise ConfigError("process_id", p,
                        f"an integer from 0 to num_processes - 1 = {n - 1}")
  ids = config.get("local_device_ids")
  if ids is not None and (not isinstance(ids, (tuple, list)) or not ids
                          or not all(_is_int(i) and i >= 0 for i in ids)):
    raise ConfigError("local_device_ids", ids,
                      "a tuple of device indices >= 0, e.g. (0,1), or None")


def validate_config(config) -> None:
  """Checks a training config before a run writes anything.

  Types and ranges of every setting of experiments/configs/common.py's
  `base_config`, the dataset and its data_dir, and the model: it is built
  abstractly (``nnx.eval_shape``, no memory and no JAX backend), so that
  se_jax's checks of the model name and options run now rather than after
  the workdir is set up. Settings a study adds of its own are not checked.

  Args:
    config: a training ConfigDict.

  Raises:
    ConfigError: naming the first setting that is not allowed, its value and
      what is allowed.
  """
  from experiments import data  # Imports grain; kept off the import path.

  _choice(config, "dataset", tuple(sorted(data.DATASETS)))
  data_dir = config.data_dir
  if data_dir is not None and not (isinstance(data_dir, str)
                                   and os.path.isdir(data_dir)):
    raise ConfigError("data_dir", data_dir,
                      "an existing directory (TFDS's data_dir) or None")
  _choice(config, "compute_dtype", ("float32", "bfloat16"))
  _int(config, "batch_size", 1)
  _int(config, "eval_batch_size", 1)
  steps = config.num_train_steps
  if not _is_int(steps) or (steps < 1 and steps != -1):
    raise ConfigError("num_train_steps", steps,
                      "an integer >= 1, or -1 to train for num_epochs")
  if steps == -1:
    _number(config, "num_epochs", 0, low_open=True)
  _number(config, "learning_rate", 0, low_open=True)
  _number(config, "momentum", 0, 1)
  _bool(config, "nesterov")
  _number(config, "weight_decay", 0)
  _choice(config, "schedule", ("step", "step_every", "cosine", "constant"))
  fractions = config.decay_fractions
  if config.schedule == "step" and not (
      isinstance(fractions, (tuple, list))
      and all(_is_number(f) and 0 < f < 1 for f in fractions)
      and list(fractions) == sorted(fractions)):
    raise ConfigError("decay_fractions", fractions,
                      "increasing fractions of training between 0 and 1,"
                      " e.g. (0.5,0.75)")
  if config.schedule == "step_every":
    _number(config, "decay_every_epochs", 0, low_open=True)
  _number(config, "decay_factor", 0, 1, low_open=True, high_open=False)
  _number(config, "warmup_epochs", 0)
  _number(config, "label_smoothing", 0, 1)
  _bool(config, "augment_flip", optional=True)
  _int(config, "augment_pad", 0, optional=True)
  _int(config, "image_size", 1, optional=True)
  _int(config, "max_train_examples", 1, optional=True)
  _int(config, "max_eval_examples", 1, optional=True)
  _int(config, "num_threads", 0, optional=True)
  _int(config, "seed", 0)
  _int(config, "log_every_steps", 1)
  _number(config, "eval_every_epochs", 0, low_open=True)
  _int(config, "checkpoint_every_steps", 1)
  _int(config, "keep_checkpoints", 1)
  _int(config, "keep_checkpoint_every_steps", 1, optional=True)
  _bool(config, "progress")
  validate_distributed(config)
  _validate_model(config)


def _validate_model(config) -> None:
  from flax import nnx

  from experiments import trainer

  options = {k: v for k, v in config.model_options.items() if v is not None}
  try:
    # The Rngs are made inside eval_shape, so no key (and no JAX backend,
    # which jax.distributed must find uninitialised) is created.
    nnx.eval_shape(lambda: trainer.build_model(config, rngs=nnx.Rngs(0)))
  except (ValueError, TypeError, ArithmeticError) as e:
    message = one_line(e)
    # se_jax's messages start with the option they reject.
    named = [k for k in options if message.startswith(k)]
    if named:
      key, value = f"model_options.{named[0]}", options[named[0]]
      rule = f"{message.rstrip('.')} (model {config.model!r})"
    elif options and not message.startswith("unknown model"):
      key, value = "model_options", options
      rule = (f"model {config.model!r} cannot be built with them:"
              f" {type(e).__name__}: {message}")
    else:
      key, value, rule = "model", config.model, message
    raise ConfigError(key, value, rule) from e
