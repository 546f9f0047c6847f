"""The gate measures on inputs whose answer is known, and the main job."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import se_jax
from experiments import data, recalibration, study_report
from se_jax.analysis import class_gate_profiles, gate_statistics

LABELS = np.repeat(np.arange(5), 40)


def test_class_agnostic_gates_have_no_class_share():
  rng = np.random.default_rng(0)
  profile = rng.uniform(size=16)
  gates = profile + 0.05 * rng.normal(size=(200, 16))  # same for every class
  s = gate_statistics(gates, LABELS)
  assert s.class_share < 0.05
  np.testing.assert_allclose(s.within_class_std, 0.05, rtol=0.15)


def test_class_determined_gates():
  rng = np.random.default_rng(1)
  profiles = rng.uniform(size=(5, 16))
  s = gate_statistics(profiles[LABELS], LABELS)
  assert s.class_share == pytest.approx(1.0)
  assert s.within_class_std == pytest.approx(0.0, abs=1e-12)


def test_between_class_share_matches_a_direct_computation():
  rng = np.random.default_rng(2)
  gates = rng.uniform(size=(200, 8)) + 0.3 * np.eye(5)[LABELS] @ rng.uniform(
      size=(5, 8))
  s = gate_statistics(gates, LABELS)
  # Law of total variance: total = within + between, per channel.
  within = sum((LABELS == k).mean() * gates[LABELS == k].var(0)
               for k in range(5)).sum()
  total = gates.var(0).sum()
  assert s.class_share == pytest.approx(1 - within / total)


def test_identity_and_saturation():
  ones = gate_statistics(np.ones((200, 4)), LABELS)
  assert ones.mean_abs_from_one == 0.0 and ones.near_one_share == 1.0
  assert ones.class_share == 0.0
  half = gate_statistics(np.full((200, 4), 0.5), LABELS)
  assert half.mean_abs_from_one == 0.5 and half.near_one_share == 0.0
  off = gate_statistics(np.full((200, 4), 0.01), LABELS)
  assert off.near_zero_share == 1.0


def test_scale_r2_separates_scaled_from_reshuffled_profiles():
  rng = np.random.default_rng(3)
  base = rng.uniform(0.2, 0.8, size=32)
  scales = np.array([0.5, 0.8, 1.0, 1.2, 1.4])
  scaled = gate_statistics(scales[LABELS, None] * base, LABELS)
  assert scaled.scale_r2 == pytest.approx(1.0)
  shuffled = np.stack([rng.permutation(base) for _ in range(5)])
  assert gate_statistics(shuffled[LABELS], LABELS).scale_r2 < 0.3


def test_profiles_and_bad_input():
  gates = np.array([[0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
  classes, mean, std = class_gate_profiles(gates, np.array([2, 2, 7]))
  assert classes.tolist() == [2, 7]
  np.testing.assert_allclose(mean, [[0.5, 1.0], [0.5, 0.0]])
  np.testing.assert_allclose(std, [[0.5, 0.0], [0.0, 0.0]])
  with pytest.raises(ValueError, match=r"labels must be \(3,\)"):
    gate_statistics(gates, np.array([0, 1]))
  with pytest.raises(ValueError, match=r"gates must be \(N, C\)"):
    gate_statistics(gates[None], np.array([0]))
  with pytest.raises(ValueError, match="at least two classes"):
    gate_statistics(gates, np.zeros(3, int))
  with pytest.raises(TypeError, match="labels must be integers"):
    gate_statistics(gates, np.zeros(3))


def test_the_papers_blocks_are_selected():
  names = [f"SE_{s}_{u}" for s, n in zip((2, 3, 4, 5), (3, 4, 6, 3))
           for u in range(1, n + 1)]
  assert study_report.selected_blocks(names) == [
      "SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"]


def test_gate_trajectory_on_constructed_snapshots():
  rng = np.random.default_rng(0)
  final = {"SE_2_1": rng.uniform(size=(3, 4)),
           "SE_3_1": rng.uniform(size=(3, 8))}
  noise = {b: rng.normal(size=(5,) + p.shape) for b, p in final.items()}
  # Snapshot i is the converged profile plus noise shrinking to zero;
  # SE_3_1 stays noisy for one snapshot longer than SE_2_1.
  scale = {"SE_2_1": [3.0, 1.0, 0.0, 0.0, 0.0],
           "SE_3_1": [3.0, 3.0, 1.0, 0.0, 0.0]}
  profiles = {b: np.stack([p + s * n for s, n in zip(scale[b], noise[b])])
              for b, p in final.items()}
  steps = np.array([10, 20, 30, 40, 50])
  run = {"steps": steps, "top1_err": np.array([50.0, 30, 20, 15, 10]),
         "profiles": profiles}
  t = study_report.trajectory({0: run, 1: run}, steps_per_epoch=10)
  assert t["epochs"] == [1.0, 2.0, 3.0, 4.0, 5.0]
  for b, p in profiles.items():
    expected = [np.corrcoef(x.ravel(), p[-1].ravel())[0, 1] for x in p]
    np.testing.assert_allclose(t["correlation"][0][b], expected, rtol=1e-12)
  np.testing.assert_allclose(
      t["min_correlation"][1],
      np.minimum(t["correlation"][1]["SE_2_1"], t["correlation"][1]["SE_3_1"]))
  assert t["min_correlation"][0][-1] == pytest.approx(1.0)
  low = t["min_correlation"][0]
  first = next(i for i in range(5) if all(v >= study_report.REACH
                                          for v in low[i:]))
  assert t["reach_epoch"] == {0: float(first + 1), 1: float(first + 1)}
  assert t["reach_epoch"][0] >= 3.0
  # A snapshot that falls back out of reach moves the epoch past it.
  back = dict(run, profiles={b: p.copy() for b, p in profiles.items()})
  back["profiles"]["SE_2_1"][3] = rng.uniform(size=(3, 4))
  assert study_report.trajectory({0: back}, 10)["reach_epoch"][0] is None
  with pytest.raises(ValueError, match="seed 1 are at steps"):
    study_report.trajectory({0: run, 1: dict(run, steps=steps + 1)}, 10)


def test_equivalent_epoch_places_a_run_on_the_trajectory():
  epochs = [1.0, 2.0, 3.0, 4.0]
  along = {"a": [0.2, 0.5, 0.9, 1.0], "b": [0.4, 0.7, 0.7, 1.0],
           "c": [0.0, 0.0, 0.0, 1.0]}
  # Mean over the shared blocks a and b: 0.3, 0.6, 0.8, 1.0.
  assert study_report.equivalent_epoch(epochs, along, {"a": 0.5, "b": 0.6,
                                                       "z": 0.0}) == (2.0,
                                                                      False)
  assert study_report.equivalent_epoch(epochs, along, {"a": 0.8,
                                                       "b": 0.8}) == (3.0,
                                                                      False)
  # Further than the first snapshot (0.2 for block a): placed there, and
  # said so; as close as it: not before it.
  assert study_report.equivalent_epoch(epochs, along, {"a": 0.0}) == (1.0,
                                                                     True)
  assert study_report.equivalent_epoch(epochs, along, {"a": 0.2}) == (1.0,
                                                                     False)
  assert study_report.equivalent_epoch(epochs, along, {"c": 1.0}) == (4.0,
                                                                     False)
  assert study_report.equivalent_epoch(epochs, along, {"z": 0.5}) is None


def test_plain_twins_come_from_the_registry():
  twin = se_jax.models.plain_twin
  assert twin("cifar_se_resnet20") == "cifar_resnet20"
  assert twin("se_resnext50_32x4d") == "resnext50_32x4d"
  assert twin("se_wrn16_8") == "wrn16_8"
  # The Caffe-layout SENets' twins keep the Caffe layout.
  assert twin("legacy_se_resnet50") == "legacy_resnet50"
  assert twin("resnet50") == "resnet50"
  # The twin is the same network without attention: the same parameters but
  # the attention's.
  for name in ("legacy_se_resnet18", "se_resnext26t_32x4d", "eca_resnet50d"):
    with_attention = nnx.eval_shape(lambda: se_jax.models.create(name))
    plain = nnx.eval_shape(lambda: se_jax.models.create(twin(name)))
    no_attention = nnx.eval_shape(
        lambda: se_jax.models.create(name, attention=None))
    assert se_jax.count_params(plain) == se_jax.count_params(no_attention)
    assert se_jax.count_params(with_attention) > se_jax.count_params(plain)


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_main_job_writes_a_report_and_reuses_finished_runs(tmp_path, capsys):
  # The report goes to the run's own workdir, never over the committed one.
  args = ["--quick", "--epochs", "0.05", "--workdir", str(tmp_path / "wd"),
          "--converged", str(tmp_path / "no_study")]
  results = recalibration.main(args)
  report = tmp_path / "wd" / "quick" / "report"
  for name in ("report.md", "report.json", "fig6_class_gates.png",
               "fig7_within_class.png", "curves.png"):
    assert (report / name).stat().st_size > 0
  with open(report / "report.json") as f:
    saved = json.load(f)
  assert saved["blocks"] == ["SE_2_3", "SE_3_3", "SE_4_1", "SE_4_2", "SE_4_3"]
  assert [r["model"] for r in saved["table"]] == ["cifar_resnet20",
                                                  "cifar_se_resnet20"]
  assert saved["images"] == 1000 and "command" in saved["provenance"]
  assert saved["table"][1]["params"] > saved["table"][0]["params"]
  assert all(0 <= saved["gate_stats"][b]["class_share"] <= 1
             for b in saved["blocks"])
  assert "no converged study at" in saved["converged"]["missing"]
  assert any("No comparison with a converged study" in line
             for line in saved["summary"])
  capsys.readouterr()
  again = recalibration.main(args)
  assert "finished earlier" in capsys.readouterr().err
  assert again["table"] == results["table"]


def test_the_main_job_is_compared_with_the_converged_study(tmp_path):
  # A study's report without parameters: errors and measures, no
  # correlations.
  study = tmp_path / "study"
  study.mkdir()
  blocks = ["SE_2_1", "SE_4_3"]
  (study / "report.json").write_text(json.dumps({
      "model": "cifar_se_resnet20", "verdict": "The study's verdict.",
      "comparison": {"seeds": [0, 1, 2], "baseline_mean": 7.0,
                     "baseline_std": 0.2, "attention_mean": 6.8,
                     "attention_std": 0.1},
      "stability": {b: {"class_share": [0.5, 0.1], "within_class_std":
                        [0.05, 0.01], "mean_abs_from_one": [0.4, 0.02]}
                    for b in blocks}}))
  args = recalibration.argparse.Namespace(
      converged=str(study), model="cifar_se_resnet20",
      dataset="fashion_mnist", data_dir=None)
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  gates = {b: rng.uniform(size=(30, 8)) for b in blocks}
  stats = {b: gate_statistics(gates[b], labels)._asdict() for b in blocks}
  table = [dict(kind="baseline", seed=0, test_err=9.0),
           dict(kind="se", seed=0, test_err=9.5)]
  out = recalibration.against_converged(args, 0, gates, labels, stats, table)
  assert out["errors"] == {"baseline": (7.0, 0.2), "attention": (6.8, 0.1)}
  assert out["this_run"] == {"baseline": 9.0, "attention": 9.5}
  assert out["blocks"]["SE_4_3"]["converged"]["class_share"] == [0.5, 0.1]
  assert "correlation" not in out["blocks"]["SE_4_3"]
  results = {"converged": out, "table": [], "blocks": blocks,
             "gate_stats": stats, "dataset": "fashion_mnist"}
  text = " ".join(recalibration.describe(results))
  assert "9.00% without SE and 9.50% with SE, against 7.00 +- 0.20%" in text
  # A study of one seed has no spread.
  one = dict(out, errors={"baseline": (7.0, None), "attention": (6.8, None)})
  text_one = " ".join(recalibration.describe(dict(results, converged=one)))
  assert "against 7.00% and 6.80% converged" in text_one
  assert "The converged study: The study's verdict." in text
  assert "as close to their final values" not in text
  out["equivalent_epoch"] = 2.56
  text = " ".join(recalibration.describe(results))
  assert ("as close to their final values after 2.56 of its 10 epochs"
          in text)
  out["before_first_snapshot"] = True
  text = " ".join(recalibration.describe(results))
  assert "further from them than the converged run's own gates were at its" \
         " first snapshot, after 2.56 of its 10 epochs" in text
  other = recalibration.argparse.Namespace(**{**vars(args),
                                              "model": "cifar_se_resnet56"})
  assert "of cifar_se_resnet20" in recalibration.against_converged(
      other, 0, gates, labels, stats, table)["missing"]


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_ablations_run_resume_and_report(tmp_path, capsys):
  from experiments import ablations
  args = ["--groups", "baseline,squeeze", "--seeds", "0", "--quick",
          "--epochs", "0.1", "--no-progress", "--workdir",
          str(tmp_path / "wd"), "--report-dir", str(tmp_path / "report")]
  rows = ablations.main(args)
  assert [(r["group"], r["variant"]) for r in rows] == [
      ("baseline", "no SE"), ("squeeze", "avg"), ("squeeze", "max")]
  assert rows[0]["params"] < rows[1]["params"] == rows[2]["params"]
  assert rows[2]["paper_top1"] == 22.57
  text = (tmp_path / "report" / "ablations.md").read_text()
  assert "| squeeze | max |" in text and "(ablations.png)" in text
  assert (tmp_path / "report" / "ablations.png").stat().st_size > 0
  capsys.readouterr()
  again = ablations.main(args)
  assert "->" not in capsys.readouterr().err  # nothing was trained again
  assert [r["test_err"] for r in again] == [r["test_err"] for r in rows]
  with pytest.raises(SystemExit):
    ablations.main(["--groups", "reduction,width"])

  # The report set beside a converged comparison: rewritten from the
  # saved measurements, under the options of the command that made them.
  base, se = rows[0]["mean"], rows[1]["mean"]
  converged = {"comparison": {
      "seeds": [0, 1, 2], "baseline": [7.0, 7.2, 7.1],
      "attention": [6.9, 7.0, 7.05],
      "welch": {"mean": -0.15, "low": -0.40, "high": 0.10, "p": 0.2}}}
  path = tmp_path / "converged.json"
  path.write_text(json.dumps(converged))
  saved = json.loads((tmp_path / "report" / "ablations.json").read_text())
  saved["provenance"]["command"] = "python -m experiments.ablations " + (
      " ".join(a for a in args if a not in ("--report-dir",
                                            str(tmp_path / "report"))))
  (tmp_path / "report" / "ablations.json").write_text(json.dumps(saved))
  again = ablations.main(["--report-only", "--report-dir",
                          str(tmp_path / "report"), "--converged-report",
                          str(path)])
  assert [r["test_err"] for r in again] == [r["test_err"] for r in rows]
  text = (tmp_path / "report" / "ablations.md").read_text()
  assert "--report-only` at commit" in text
  assert f"the standard SE block ends {se - base:+.2f} points" in text
  assert "differ by -0.15 points over 3 seeds (95% CI [-0.40, +0.10])" in text
  assert "This budget cannot rank the variants" in text
  assert "0.1 epoch(s) on 1024 images" in text
  # Without the converged report there is nothing to set beside.
  ablations.main(["--report-only", "--report-dir", str(tmp_path / "report"),
                  "--converged-report", str(tmp_path / "none.json")])
  text = (tmp_path / "report" / "ablations.md").read_text()
  assert "What this budget can show" not in text
  with pytest.raises(SystemExit, match="run the ablations first"):
    ablations.main(["--report-only", "--report-dir", str(tmp_path)])


def test_ablation_variants_of_one_network_share_runs():
  from experiments import ablations
  args = ablations.parse_args(["--quick"])
  key = lambda options, seed=0: ablations.run_key(
      ablations.make_config(args, options, seed))
  same = {key(dict(reduction=16.0)), key(dict(squeeze="avg")),
          key(dict(gate="sigmoid")), key(dict(se_stages=None)),
          key(dict(integration="standard")), key(dict(reduction=16.0), 2)}
  assert len(same) == 1
  others = {key(dict(reduction=8.0)), key(dict(se_stages=(2,))),
            key(dict(squeeze="max")), key(None)}
  assert len(others) == 4 and not others & same


def test_pretrained_weights_follow_the_papers_protocol(tmp_path, monkeypatch):
  # A random-weight SE-ResNet-50 in the paper's layout and a stand-in for
  # ImageNet's validation split: six images of each of the paper's classes
  # and of one other class. Small images keep the test fast.
  from experiments import paper
  from se_jax.models import Preprocessing, capture_gates, create
  from se_jax.models import save_pretrained
  model = create("legacy_se_resnet50", rngs=nnx.Rngs(3))
  pre = Preprocessing((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), (64, 64), 0.875,
                      "bicubic")
  ckpt = save_pretrained(str(tmp_path / "ckpt"), model,
                         name="legacy_se_resnet50", preprocessing=pre)
  classes = list(paper.ROLE_OF_EXCITATION["classes"])
  labels = np.repeat(classes + [5], 6)
  images = np.random.default_rng(0).integers(
      0, 256, (len(labels), 80, 96, 3), dtype=np.uint8)
  source = data.ArraySource(images, labels)
  monkeypatch.setattr(data, "get_source", lambda *a, **k: source)
  results = recalibration.main([
      "--weights", ckpt, "--dataset", "imagenet2012", "--images-per-class",
      "4", "--report-dir", str(tmp_path / "report")])
  assert results["blocks"] == list(paper.ROLE_OF_EXCITATION["blocks"])
  assert results["classes"] == classes and results["kept_images"] == 16
  assert results["images"] == len(labels) and results["table"] == []
  assert results["class_names"] == ["goldfish", "pug", "airliner", "cliff"]
  assert results["fig7_classes"] == ["goldfish", "airliner"]
  # The "all" line is the mean over every evaluated image, other classes
  # included, computed here independently.
  transform = data.pretrained_transform(pre)
  x = np.stack([transform({"image": im, "label": 0})["image"]
                for im in images])
  want = capture_gates(model, x)["SE_5_3"].mean(0)
  np.testing.assert_allclose(results["overall_means"]["SE_5_3"], want,
                             rtol=1e-4, atol=1e-5)
  report = tmp_path / "report"
  text = (report / "report.md").read_text()
  assert "pretrained weights" in text and "goldfish" in text
  assert (report / "fig6_class_gates.png").stat().st_size > 0
