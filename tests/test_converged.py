"""The converged study's runs: exported, reused, and their parameters."""

import os

import numpy as np
import jax
import pytest
from flax import nnx

from experiments import converged, trainer


def test_runs_are_exported_and_not_trained_again(tmp_path, monkeypatch):
  argv = ["--seeds", "0", "--smoke", "--no-progress", "--train-only",
          "--workdir", str(tmp_path / "wd"), "--results",
          str(tmp_path / "results")]
  runs = converged.main(argv)
  assert [(r["model"], r["seed"]) for r in runs] == [
      ("cifar_resnet20", 0), ("cifar_se_resnet20", 0)]
  for r in runs:
    files = set(os.listdir(r["run_dir"]))
    assert set(converged.RUN_FILES) <= files
    # Only the SE networks' parameters are kept, for the gate analysis.
    assert (converged.PARAMS_FILE in files) == ("_se_" in r["model"])

  # The exported parameters are the final checkpoint's.
  config = converged.make_config("cifar_se_resnet20", 0, smoke=True)
  restored, _ = trainer.restore_model(
      config, str(tmp_path / "wd" / "cifar_se_resnet20_seed0"))
  fresh = trainer.build_model(config, rngs=nnx.Rngs(1))
  loaded = converged.load_params(fresh, os.path.join(
      runs[1]["run_dir"], converged.PARAMS_FILE))
  for a, b in zip(jax.tree.leaves(nnx.state(restored)),
                  jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(a, b)

  # Without the workdirs, a rerun reuses the exported runs.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(trainer, "train_and_evaluate", refuse)
  again = converged.main(argv[:-4] + ["--workdir", str(tmp_path / "new"),
                                      "--results", str(tmp_path / "results")])
  assert [r["top1_err"] for r in again] == [r["top1_err"] for r in runs]


def test_parameters_that_do_not_fit_are_refused(tmp_path):
  config = converged.make_config("cifar_se_resnet20", 0, smoke=True)
  path = str(tmp_path / "p.npz")
  converged.save_params(trainer.build_model(config, rngs=nnx.Rngs(0)), path)
  other = converged.make_config("cifar_resnet20", 0, smoke=True)
  with pytest.raises(ValueError, match="does not fit the model"):
    converged.load_params(trainer.build_model(other, rngs=nnx.Rngs(0)), path)
