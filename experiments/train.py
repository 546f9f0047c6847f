"""Trains and evaluates a model from a config file.

  python -m experiments.train --config=experiments/configs/FILE.py[:ARG] \
      --workdir=DIR [--config.KEY=VALUE ...]

Rerunning the same command resumes from the last checkpoint in DIR. See
experiments/trainer.py for what a run writes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.",
                               required=True)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (with an optional :ARG).", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; the progress bar says what matters.
    logging.set_verbosity(logging.WARNING)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
