"""The prepared accelerator run, end to end on the CPU at toy sizes.

`python -m experiments.accelerator_run --tiny` runs every part that the GPU
run runs (the bfloat16 benchmark against timm, the study sized from its
step times, the analysis with the CPU study's report code, the files) on
networks of one unit per stage. What a GPU run brings back must be there.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from experiments import accelerator_run, cli, fashion_mnist

needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.FASHION_MNIST_DIR),
    reason="Fashion-MNIST is not installed (apt-get install"
           " dataset-fashion-mnist)")
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "timm"))


@needs_fmnist
def test_tiny_run_writes_every_part(tmp_path):
  out = tmp_path / "acc"
  accelerator_run.main(["--out", str(out), "--minutes", "1", "--tiny",
                        "--seeds", "2"])
  written = sorted(os.listdir(out))
  assert written == ["accelerator.json", "accelerator.md", "curves.png",
                     "fig6_class_gates.png", "fig7_within_class.png"]
  assert len(written) <= 8  # What the device tool brings back.
  with open(out / "accelerator.json") as f:
    result = json.load(f)
  assert result["tiny"] and result["device"]["platform"] == "cpu"
  assert result["provenance"]["command"]

  bench = result["benchmark"]
  train = bench["train"]["times"]
  assert {"se_jax resnet50", "se_jax se_resnet50"} <= set(train)
  if HAS_TORCH:
    assert {"timm resnet50 CL", "timm se_resnet50 CL"} <= set(train)
  assert [r["batch"] for r in bench["inference"]] == [1, 2]
  checks = {(c["what"], c["where"]) for c in result["benchmark_checks"]}
  for where in ("training step, batch 2", "inference, batch 1",
                "inference, batch 2"):
    assert ("SE / plain time", where) in checks
  for c in result["benchmark_checks"]:
    assert c["met"] == (c["value"] <= c["limit"] if c["direction"] == "max"
                        else c["value"] >= c["limit"])

  plan = result["plan"]
  assert plan["epochs"] >= 1
  assert [tuple(p) for p in plan["models"]] == list(
      accelerator_run.STUDY_MODELS)
  runs = result["study"]["runs"]
  assert sorted((r["name"], r["seed"]) for r in runs) == sorted(
      (n, s) for pair in accelerator_run.STUDY_MODELS for n in pair
      for s in range(2))
  for r in runs:
    assert len(r["errors"]) == plan["epochs"]
    assert 0.0 <= r["top1_err"] <= 100.0 and np.isfinite(r["losses"]).all()
  for _, model in accelerator_run.STUDY_MODELS:
    comparison = result["analysis"]["comparisons"][model]
    assert comparison["comparison"]["seeds"] == [0, 1]
    assert model in comparison["verdict"]
    stability = result["analysis"]["stability"][model]
    assert stability and all(
        "cross_seed_similarity" in row for row in stability.values())

  report = (out / "accelerator.md").read_text()
  assert "## Benchmark, bfloat16" in report
  assert "## Fashion-MNIST at GPU scale" in report
  assert "Toy sizes (--tiny)" in report
  for fig in ("curves.png", "fig6_class_gates.png", "fig7_within_class.png"):
    assert f"]({fig})" in report


def test_the_schedule_is_the_cifar_recipe():
  total = 400
  lrs = [accelerator_run.learning_rate(s, total) for s in range(total)]
  assert lrs[0] == lrs[199] == pytest.approx(0.1)
  assert lrs[200] == lrs[299] == pytest.approx(0.01)
  assert lrs[300] == lrs[-1] == pytest.approx(0.001)


@pytest.mark.parametrize("argv, message", [
    (["--minutes", "0"], "argument --minutes: 0 is not allowed"),
    (["--seeds", "1"], "argument --seeds: 1 is not allowed: an integer >= 2"),
])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main_guard(accelerator_run.main)(["--out", str(tmp_path)] + argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err
