r"""Trains and evaluates a model from a config file.

  python -m experiments.train --config=experiments/configs/FILE.py[:ARG] \
      --workdir=DIR [--config.KEY=VALUE ...] [--debug]

Rerunning the same command resumes from the last checkpoint in DIR. See
experiments/trainer.py for what a run writes, and experiments/launch.py for
runs of several processes.

A bad input (an unknown key, a value out of range, a missing dataset, a
workdir in use) is one line on stderr and exit status 2, before anything is
written; ``--debug`` (or ``SE_JAX_DEBUG=1``) shows its traceback.
"""

from __future__ import annotations

import re
import sys

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from experiments import cli, trainer

_PROG = "experiments.train"


def _unknown_key(error: Exception, argv: list[str]) -> str:
  """The message for an override of a key the config does not have."""
  text = str(error.args[0] if error.args else error)
  match = re.match(r"""\W*'?([\w.]+)'?""", text)
  key = match.group(1) if match else text
  given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  flag = next((g for g in given if g == f"--config.{key}"
               or g.endswith(f".{key}")), f"--config.{key}")
  hint = re.search(r"Did you mean \"?([\w.]+)\"?", text)
  return (f"{flag}: the config has no key {key!r}"
          + (f"; did you mean {hint.group(1)!r}?" if hint else
             "; see experiments/configs/common.py for the keys."))


def parse(argv: list[str]):
  """The config and workdir of a command line.

  Args:
    argv: the arguments after the program name.

  Returns:
    ``(config, workdir)``, the config locked.

  Raises:
    cli.UsageError: for a command line that cannot be parsed, naming the
      flag.
  """
  # Flags of their own for each call, so that a command line never sees
  # values left by another (the tests parse many in one process).
  fv = flags.FlagValues()
  workdir = flags.DEFINE_string("workdir", None, "Directory for all outputs.",
                                flag_values=fv)
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file (with an optional :ARG).", flag_values=fv,
      lock_config=True, sys_argv=[_PROG, *argv])
  try:
    rest = fv([_PROG, *argv], known_only=True)
  except flags.Error as e:
    raise cli.UsageError(_flag_error(e, argv)) from e
  except (AttributeError, KeyError) as e:
    raise cli.UsageError(_unknown_key(e, argv)) from e
  # What is left goes to absl's own flags (--verbosity, --logtostderr...).
  absl_flags = flags.FLAGS
  absl_flags.unparse_flags()
  try:
    rest = absl_flags(rest, known_only=False)
  except flags.Error as e:
    raise cli.UsageError(f"{cli.one_line(e)}; this command takes --config,"
                         " --config.KEY=VALUE, --workdir and --debug.") from e
  if len(rest) > 1:
    raise cli.UsageError(f"unexpected arguments {rest[1:]}; this command"
                         " takes only flags.")
  if config.value is None:
    raise cli.UsageError("--config is required, e.g. --config=experiments/"
                         "configs/fashion_mnist_se_resnet20.py")
  if not isinstance(config.value, ml_collections.ConfigDict):
    # ml_collections defers a config file's errors to the config's first use.
    try:
      config.value["dataset"]
    except Exception as e:  # noqa: BLE001 - whatever the config file raised.
      raise cli.UsageError(_flag_error(e, argv)) from e
    raise cli.UsageError(f"--config: {type(config.value).__name__} is not"
                         " a ConfigDict.")
  if not workdir.value:
    raise cli.UsageError("--workdir is required: the directory for the"
                         " run's outputs.")
  return config.value, workdir.value


def _flag_error(error: Exception, argv: list[str]) -> str:
  text = str(error)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if "config file" in text and len(lines) > 1:
    # The cause is the last line; the lines above are where ml_collections
    # looked, or the config file's traceback.
    given = next((a for a in argv if a.startswith("--config=")), "--config")
    return f"{given}: cannot load the config: {lines[-1]}"
  return cli.one_line(error)


def main(argv: list[str] | None = None) -> dict:
  """Trains the command line's config; returns the final metrics."""
  if argv is None:
    argv = sys.argv[1:]
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    print(__doc__)
    return {}
  config, workdir = parse(argv)
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; the progress bar says what matters.
    logging.set_verbosity(logging.WARNING)
  return trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  logging.use_absl_handler()
  cli.main_guard(main, prog=_PROG)()
