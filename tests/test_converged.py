"""The converged study: runs exported and reused, parameters, the report."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import converged, trainer
from se_jax.analysis import class_gate_profiles


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("converged")
  argv = ["--seeds", "0,1", "--smoke", "--no-progress", "--workdir",
          str(tmp / "wd"), "--results", str(tmp / "results")]
  runs = converged.main(argv + ["--train-only"])
  return tmp, argv, runs


def test_runs_are_exported_and_not_trained_again(study, monkeypatch):
  tmp, argv, runs = study
  assert [(r["model"], r["seed"]) for r in runs] == [
      ("cifar_resnet20", 0), ("cifar_se_resnet20", 0),
      ("cifar_resnet20", 1), ("cifar_se_resnet20", 1)]
  for r in runs:
    files = set(os.listdir(r["run_dir"]))
    assert set(converged.RUN_FILES) <= files
    # Only the SE networks' parameters are kept, for the gate analysis.
    assert (converged.PARAMS_FILE in files) == ("_se_" in r["model"])
    assert (converged.TRAJECTORY_FILE in files) == ("_se_" in r["model"])

  # The trajectory holds the gates of every snapshot; its last is the
  # exported network's.
  traj = converged.load_trajectory(
      os.path.join(runs[1]["run_dir"], converged.TRAJECTORY_FILE))
  assert traj["steps"].tolist() == [1, 2, 3]
  config = converged.make_config("cifar_se_resnet20", 0, smoke=True)
  sample, _ = converged.gate_analysis(
      config, os.path.join(runs[1]["run_dir"], converged.PARAMS_FILE),
      max_examples=config.max_eval_examples)
  assert sample.top1_err == pytest.approx(traj["top1_err"][-1])
  for block, profiles in traj["profiles"].items():
    assert profiles.shape[0] == 3
    np.testing.assert_allclose(
        profiles[-1], class_gate_profiles(sample.gates[block],
                                          sample.labels)[1], rtol=1e-6)

  # The exported parameters are the final checkpoint's.
  config = converged.make_config("cifar_se_resnet20", 0, smoke=True)
  restored, _ = trainer.restore_model(
      config, str(tmp / "wd" / "cifar_se_resnet20_seed0"))
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
  new = argv[:argv.index("--workdir")] + ["--workdir", str(tmp / "new"),
                                           "--results", str(tmp / "results")]
  again = converged.main(new + ["--train-only"])
  assert [r["top1_err"] for r in again] == [r["top1_err"] for r in runs]


def test_report_from_the_finished_runs(study):
  tmp, argv, runs = study
  out = converged.main(argv + ["--report-only"])
  results = tmp / "results"
  c = out["comparison"]
  assert c["seeds"] == [0, 1] and "welch" in c and "paired" in c
  errs = {(r["model"], r["seed"]): r["top1_err"] for r in runs}
  assert c["welch"]["mean"] == pytest.approx(
      np.mean([errs[("cifar_se_resnet20", s)] for s in (0, 1)])
      - np.mean([errs[("cifar_resnet20", s)] for s in (0, 1)]))
  assert set(out["gate_measures"]) == {0, 1}
  blocks = out["gate_measures"][0]
  assert list(blocks) == ["SE_2_1", "SE_3_1", "SE_4_1"]
  for b, row in out["stability"].items():
    assert 0 <= row["class_share"][0] <= 1
    assert row["cross_seed_similarity"] is not None
  md = (results / "report.md").read_text()
  assert "## Test error" in md and "95% CI" in md and out["verdict"] in md
  assert "## What the gates do, converged (2 seed(s))" in md
  assert "## How soon the gates settle" in md
  traj = out["trajectory"]
  assert traj["epochs"] == pytest.approx([1 / 8, 2 / 8, 3 / 8])
  for s in (0, 1):
    assert traj["min_correlation"][s][-1] == pytest.approx(1.0)
  for f in ("curves.png", "fig6_class_gates.png", "fig7_within_class.png",
            "gate_trajectory.png", "report.json"):
    assert (results / f).stat().st_size > 0
  saved = json.loads((results / "report.json").read_text())
  assert saved["provenance"]["command"].startswith("python -m")


def test_readme_summary_replaces_only_its_section(study, tmp_path):
  _, argv, _ = study
  out = converged.main(argv + ["--report-only"])
  prov = {"date": "2026-01-01 00:00 UTC", "commit": "abc1234"}
  summary = converged.readme_summary(out, prov)
  assert summary.startswith(converged.README_START)
  assert summary.endswith(converged.README_END)
  assert out["verdict"] in summary and "commit abc1234" in summary
  # The smoke recipe stops after 3 of 8 steps per epoch.
  assert "of 0.38 (seeds 0, 1)" in summary
  readme = tmp_path / "README.md"
  before, after = "# t\n\ntext before\n", "\n## next\n"
  readme.write_text(before + converged.README_START + " x -->\nold\n"
                    + converged.README_END + after)
  assert converged.files.replace_section(
      str(readme), converged.README_START, converged.README_END, summary)
  text = readme.read_text()
  assert text == before + summary + after
  (tmp_path / "plain.md").write_text("no markers")
  assert not converged.files.replace_section(
      str(tmp_path / "plain.md"), converged.README_START,
      converged.README_END, summary)
  assert (tmp_path / "plain.md").read_text() == "no markers"


def test_the_readme_summary_is_the_committed_reports():
  with open(os.path.join(converged.RESULTS, "report.json")) as f:
    saved = json.load(f)
  with open(os.path.join(os.path.dirname(converged.RESULTS), "..", "..",
                         "README.md")) as f:
    readme = f.read()
  assert converged.readme_summary(saved, saved["provenance"]) in readme


def test_parameters_that_do_not_fit_are_refused(tmp_path):
  config = converged.make_config("cifar_se_resnet20", 0, smoke=True)
  path = str(tmp_path / "p.npz")
  converged.save_params(trainer.build_model(config, rngs=nnx.Rngs(0)), path)
  other = converged.make_config("cifar_resnet20", 0, smoke=True)
  with pytest.raises(ValueError, match="does not fit the model"):
    converged.load_params(trainer.build_model(other, rngs=nnx.Rngs(0)), path)
