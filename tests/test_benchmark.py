"""The benchmark's timing, target checks and report, on small inputs."""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import se_jax
from experiments import allocator, benchmark
from se_jax.models import create


def test_each_runtime_runs_together_and_takes_turns_after_the_other():
  names = ["se_jax a", "PyTorch a", "timm b", "se_jax b", "se_jax c"]
  orders = [benchmark.call_order(names, r) for r in range(6)]
  for r, order in enumerate(orders):
    assert sorted(order) == sorted(names)
    kinds = [benchmark.runtime(n) for n in order]
    # One switch between the runtimes per repeat, the side alternating.
    assert kinds == sorted(kinds, reverse=r % 2 == 1)
  # Each se_jax program leads its runtime's calls equally often.
  firsts = [next(n for n in o if n.startswith("se_jax")) for o in orders]
  assert sorted(firsts) == sorted(["se_jax a", "se_jax b", "se_jax c"] * 2)


def test_calls_alternate_and_medians_are_reported():
  calls = []
  fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
  times = benchmark.time_alternating(fns, repeats=4, warmup=1)
  assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
  assert set(times) == {"a", "b"} and times["a"]["n"] == 4
  assert times["a"]["min_s"] <= times["a"]["median_s"] <= times["a"]["max_s"]
  assert len(times["a"]["times_s"]) == 4
  assert min(times["a"]["times_s"]) == times["a"]["min_s"]


def _binomial_tail(n, k):
  """P(X < k) for X ~ Binomial(n, 1/2), by summing the distribution."""
  p = np.zeros(n + 1)
  p[0] = 1.0
  for _ in range(n):
    p = 0.5 * p + 0.5 * np.concatenate([[0.0], p[:-1]])
  return p[:k].sum()


@pytest.mark.parametrize("n", [6, 7, 9, 12, 20, 31])
def test_median_interval_has_the_coverage_it_claims(n):
  values = list(np.random.default_rng(n).permutation(n) + 100.0)
  lo, hi = benchmark.median_interval(values)
  k = int(lo - 100.0) + 1  # the rank of the lower end
  assert hi == 100.0 + n - k  # symmetric ranks
  assert 1 - 2 * _binomial_tail(n, k) >= 0.95
  # The next narrower interval would cover less than 95%.
  assert k + 1 > n - k or 1 - 2 * _binomial_tail(n, k + 1) < 0.95
  # Nine calls: the 2nd and 8th of them (coverage 96.1%).
  assert benchmark.median_interval(range(9)) == (1, 7)


def test_median_interval_needs_enough_values():
  assert benchmark.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
  assert benchmark.median_interval([]) is None


def test_ratios_pair_the_calls_of_one_repeat():
  # The machine slows down over the run; a takes twice b's time in every
  # repeat, which the ratio of medians of the shuffled calls would blur.
  b = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
  times = {"a": benchmark._summary([2 * x for x in b]),
           "b": benchmark._summary(b)}
  r = benchmark.paired_ratio(times, "a", "b")
  assert r["value"] == pytest.approx(2.0)
  assert r["interval"] == pytest.approx((2.0, 2.0))
  # Without the calls kept, the ratio of the medians and no interval.
  r = benchmark.paired_ratio({"a": _t(300), "b": _t(100)}, "a", "b")
  assert r == {"value": pytest.approx(3.0), "interval": None}


@pytest.mark.parametrize("interval, want", [
    ((1.00, 1.10), "within noise"), ((1.06, 1.10), "missed"),
    ((0.95, 1.04), "met"), (None, "met")])
def test_a_target_is_decided_only_when_its_interval_is(interval, want):
  value = 1.07 if want == "missed" else 1.03
  check = {"value": value, "interval": interval, "limit": 1.05,
           "direction": "max", "met": value <= 1.05}
  assert benchmark.verdict(check) == want
  # The same for a lower limit.
  flipped = {"value": 1 / value, "limit": 1 / 1.05, "direction": "min",
             "met": value <= 1.05,
             "interval": (1 / interval[1], 1 / interval[0])
             if interval else None}
  assert benchmark.verdict(flipped) == want


def _t(ms):
  return {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms / 1e3, "n": 1}


def test_targets_are_checked_from_the_measured_ratios():
  results = {
      "inference": {"rows": [{"batch": 8, "times": {
          "se_jax resnet50": _t(100), "se_jax se_resnet50": _t(101),
          "se_jax se_resnet50, XLA conv + option": _t(98),
          "timm se_resnet50": _t(120), "timm se_resnet50 CL": _t(100)},
          "compile_s": {}}]},
      "cifar": {"matmul_flops_per_s": 100e9, "rows": [{
          "depth": 20, "batch": 128, "times": {
              "se_jax cifar_resnet20": _t(100),
              "se_jax cifar_se_resnet20": _t(110),
              "se_jax cifar_se_resnet20, README path": _t(121),
              "se_jax cifar_se_resnet20, XLA conv + option": _t(104.5),
              "PyTorch cifar_se_resnet20": _t(99),
              "PyTorch cifar_se_resnet20 CL": _t(88)},
          "flops": {"cifar_se_resnet20": 4.4e9, "cifar_resnet20": 4.3e9},
          "compile_s": {}, "params": {}}]},
      "memory": {"rows": [{
          "plain": "resnet50", "se": "se_resnet50", "batch": 8,
          "ratio": 1.08, "argument_ratio": 1.1, "temp_ratio": 1.02,
          "peak_bytes": {"resnet50": 100, "se_resnet50": 108}}]},
      "tuning": {"batch": 128, "times": {
          "default": _t(110), benchmark.OPTION_VARIANT: _t(108),
          benchmark.ONEDNN_VARIANT: _t(100), "fold_norm=False": _t(130)}},
  }
  checks = benchmark.check_targets(results, {"bf16": False})
  got = {(c["target"], c["where"]): (round(c["value"], 3), c["met"])
         for c in checks}
  assert got == {
      ("default_within_fastest_inference", "SE-ResNet-50, batch 8, against"
       " se_resnet50, XLA conv + option"): (1.031, True),
      ("se_overhead_inference", "ResNet-50, batch 8"): (1.01, True),
      ("speed_vs_timm_inference", "batch 8"): (0.99, False),
      ("default_within_fastest_train",
       "CIFAR SE-ResNet-20, batch 128, trainer step against XLA conv +"
       " option"): (1.053, False),
      ("default_within_fastest_train",
       "CIFAR SE-ResNet-20, batch 128, README path against XLA conv +"
       " option"): (1.158, False),
      ("se_overhead_train", "CIFAR ResNet-20, batch 128"): (1.1, False),
      ("speed_vs_torch_cifar", "SE-ResNet-20, batch 128"): (0.8, False),
      ("peak_fraction_cifar", "SE-ResNet-20: 40.0 of 100.0 GFLOP/s"):
          (0.4, False),
      ("memory_se_over_plain", "resnet50, batch 8"): (1.08, False),
      ("default_within_fastest_train",
       "CIFAR SE-ResNet-20, batch 128, trainer step against"
       f" {benchmark.ONEDNN_VARIANT} (tuning section)"): (1.1, False),
  }
  # A README path faster than the trainer's step is a lighter program, not
  # a faster configuration of the step: the step is held to its own
  # configurations, the README path to all of them.
  results["cifar"]["rows"][0]["times"][
      "se_jax cifar_se_resnet20, README path"] = _t(100)
  where = {c["where"]: round(c["value"], 3)
           for c in benchmark.check_targets(results, {"bf16": False})
           if c["target"] == "default_within_fastest_train"}
  assert where["CIFAR SE-ResNet-20, batch 128, trainer step against XLA conv"
               " + option"] == 1.053
  assert where["CIFAR SE-ResNet-20, batch 128, README path against XLA conv"
               " + option"] == 0.957
  # The synthetic tuning section has too few programs for its own report.
  del results["tuning"]
  md = benchmark.to_markdown(results, checks, {
      "command": "c", "date": "d", "commit": "x", "machine": "m",
      "devices": "1 x cpu", "versions": {"jax": "j", "flax": "f"}},
      {"repeats": 1, "bf16": False})
  assert "| 0.990 | - | >= 1.1 | missed (by 10.0%) |" in md
  assert "2048 x 2048 float32 product in XLA in the same run: 100.0" in md
  assert "one in every repeat of the CIFAR rounds" not in md


def _calls(ms_list):
  return {"median_s": float(np.median(ms_list)) / 1e3,
          "min_s": min(ms_list) / 1e3, "max_s": max(ms_list) / 1e3,
          "n": len(ms_list), "times_s": [m / 1e3 for m in ms_list]}


def test_se_overhead_is_checked_from_the_overhead_section():
  # The cifar section's round says SE / plain 1.1; the two programs alone,
  # in more repeats, say 1.01 with an interval below the limit.
  se = [101 + (i % 3) for i in range(12)]
  plain = [100] * 12
  results = {
      "inference": {"rows": [{"batch": 1, "times": {
          "se_jax resnet50": _t(100), "se_jax se_resnet50": _t(120)},
          "compile_s": {}}]},
      "cifar": {"rows": [{
          "depth": 20, "batch": 128, "times": {
              "se_jax cifar_resnet20": _t(100),
              "se_jax cifar_se_resnet20": _t(110)},
          "flops": {}, "compile_s": {}, "params": {}}]},
      "overhead": {"repeats": 12, "rows": [
          {"kind": "inference", "plain": "resnet50", "se": "se_resnet50",
           "batch": 1, "times": {"se_jax resnet50": _calls(plain),
                                 "se_jax se_resnet50": _calls(se)}},
          {"kind": "train", "plain": "cifar_resnet20",
           "se": "cifar_se_resnet20", "batch": 128,
           "times": {"se_jax cifar_resnet20": _calls(plain),
                     "se_jax cifar_se_resnet20": _calls(se)}}]},
  }
  checks = [c for c in benchmark.check_targets(results, {"bf16": False})
            if c["target"].startswith("se_overhead")]
  got = {(c["target"], c["where"]): (round(c["value"], 3), c["verdict"])
         for c in checks}
  assert got == {
      ("se_overhead_inference", "ResNet-50, batch 1"): (1.02, "within noise"),
      ("se_overhead_train", "CIFAR ResNet-20, batch 128"): (1.02, "met")}
  assert checks[0]["interval"] == pytest.approx((1.01, 1.03))
  md = "\n".join(benchmark._overhead_table(results["overhead"]))
  assert "| cifar_se_resnet20 train | 128 | 100.0 | 102.0 | 1.020 |" in md
  # Fastest calls: 101 / 100.
  assert md.rstrip().endswith("| 1.010 |")
  # Without the section the other sections' rounds give the ratios.
  del results["overhead"]
  got = {c["where"]: round(c["value"], 3)
         for c in benchmark.check_targets(results, {"bf16": False})
         if c["target"].startswith("se_overhead")}
  assert got == {"ResNet-50, batch 1": 1.2, "CIFAR ResNet-20, batch 128": 1.1}


def test_overhead_section_times_each_pair_alone(monkeypatch):
  built = []

  def fake(kind):
    def build(name, batch, size, *args, **kwargs):
      built.append((kind, name, batch, size))
      return (lambda: None), 0.0, None
    return build

  monkeypatch.setattr(benchmark, "jax_inference", fake("inference"))
  monkeypatch.setattr(benchmark, "jax_train_step", fake("train"))
  timed = []
  real = benchmark.time_alternating
  monkeypatch.setattr(
      benchmark, "time_alternating",
      lambda fns, repeats: timed.append((sorted(fns), repeats)) or real(
          fns, repeats, warmup=0, settle_s=0))
  cfg = {"inference_batches": (1, 8), "train_batch": 8, "cifar_batch": 128,
         "cifar_depths": (20,), "dtype": None, "overhead_repeats": 5}
  out = benchmark.section_overhead(cfg)
  assert timed == [
      (["se_jax resnet50", "se_jax se_resnet50"], 5),
      (["se_jax resnet50", "se_jax se_resnet50"], 5),
      (["se_jax resnet50", "se_jax se_resnet50"], 5),
      (["se_jax cifar_resnet20", "se_jax cifar_se_resnet20"], 5)]
  assert built == [
      ("inference", "resnet50", 1, 224), ("inference", "se_resnet50", 1, 224),
      ("inference", "resnet50", 8, 224), ("inference", "se_resnet50", 8, 224),
      ("train", "resnet50", 8, 224), ("train", "se_resnet50", 8, 224),
      ("train", "cifar_resnet20", 128, 32),
      ("train", "cifar_se_resnet20", 128, 32)]
  assert [(r["kind"], r["batch"]) for r in out["rows"]] == [
      ("inference", 1), ("inference", 8), ("train", 8), ("train", 128)]
  assert all(t["n"] == 5 for r in out["rows"] for t in r["times"].values())
  assert out["repeats"] == 5


def test_peak_memory_counts_arguments_outputs_and_temporaries():
  stats = types.SimpleNamespace(
      argument_size_in_bytes=100, output_size_in_bytes=30,
      alias_size_in_bytes=20, temp_size_in_bytes=7)
  assert benchmark.peak_bytes(stats) == 117
  x = jnp.ones((256, 256), jnp.float32)
  compiled = jax.jit(lambda x: jnp.tanh(x @ x) @ x).lower(x).compile()
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes >= x.nbytes
  assert benchmark.peak_bytes(stats) >= 2 * x.nbytes + stats.temp_size_in_bytes


def test_se_input_bytes_counts_every_se_blocks_map():
  # SE-ResNet-50: 3, 4, 6, 3 units whose outputs are 56^2 x 256,
  # 28^2 x 512, 14^2 x 1024 and 7^2 x 2048 (Table 1 of the paper).
  per_image = sum(n * h * h * c for n, h, c in (
      (3, 56, 256), (4, 28, 512), (6, 14, 1024), (3, 7, 2048)))
  assert benchmark.se_input_bytes("se_resnet50", 2, 224) == 4 * 2 * per_image
  # In inference a unit squeezes its last 1x1 convolution's input, a
  # quarter of the output's channels, and reads that convolution's kernel,
  # where the two are less than the output: at batch 2 in the first three
  # stages, not in the last (98 positions, a 512 x 2048 kernel).
  inference = sum(n * min(2 * h * h * c // 4 + c // 4 * c, 2 * h * h * c)
                  for n, h, c in ((3, 56, 256), (4, 28, 512), (6, 14, 1024),
                                  (3, 7, 2048)))
  assert benchmark.se_input_bytes(
      "se_resnet50", 2, 224, inference=True) == 4 * inference
  assert inference - 3 * 2 * 7 * 7 * 2048 == sum(
      n * (2 * h * h * c // 4 + c // 4 * c)
      for n, h, c in ((3, 56, 256), (4, 28, 512), (6, 14, 1024)))


def test_cifar_conv_counts_cover_every_convolution():
  # ResNet-20 and ResNet-110 have 19 and 109 convolutions besides the
  # classifier (He et al. 2016, Sec. 4.2: 6n + 2 weighted layers, n = 3, 18).
  assert benchmark.cifar_conv_counts(20) == (1, 6, 1, 5, 1, 5)
  assert sum(benchmark.cifar_conv_counts(110)) == 109
  assert sum(benchmark.cifar_conv_counts(56)) == 55
  with pytest.raises(ValueError, match="6n \\+ 2, got 21"):
    benchmark.cifar_conv_counts(21)


def test_conv_totals_weigh_each_shape_by_its_count():
  rows = [{"shape": [8, h, h, cin, cout, s], "times": {
      "a forward": _t(1), "a input grad": _t(10)}}
      for h, cin, cout, s in benchmark.CIFAR_CONV_SHAPES]
  totals = benchmark._conv_totals(rows, 110)
  assert totals["a forward"] == pytest.approx(0.109)
  # No input gradient for the first layer.
  assert totals["a input grad"] == pytest.approx(1.08)


def _conv_totals_110(ours, pytorch):
  """A kernels section's totals for ResNet-110: seconds of se_jax's and
  PyTorch channels_last's (forward, input grad, kernel grad)."""
  kinds = ("forward", "input grad", "kernel grad")
  return {"totals_s": {"110": {
      **{f"se_jax {k}": t for k, t in zip(kinds, ours)},
      **{f"PyTorch CL {k}": t for k, t in zip(kinds, pytorch)}}}}


def test_evidence_compares_the_rest_of_the_step_with_pytorch():
  results = {
      "kernels": _conv_totals_110((1.0, 1.0, 1.0), (0.5, 0.5, 1.0)),
      "cifar": {"rows": [{"depth": 110, "times": {
          "se_jax cifar_se_resnet110": _t(5000),
          "PyTorch cifar_se_resnet110 CL": _t(3000)}}]},
  }
  text = " ".join(benchmark.evidence(results))
  assert ("In se_jax's SE-ResNet-110 step (5000 ms) the convolutions"
          " measured alone account for 3000 ms (timed in the kernels section,"
          " minutes from the step's round, so the split moves with the"
          " machine's speed between the two); the other 2000 ms") in text
  assert ("step 3000 ms, the same convolutions alone 2000 ms, the other"
          " 1000 ms; convolutions 1.50x PyTorch's time, the rest 2.00x."
          ) in text
  # Convolutions timed one by one that add up to more than a whole step
  # give no split, not a ratio of a negative remainder.
  results["cifar"]["rows"][0]["times"][
      "PyTorch cifar_se_resnet110 CL"] = _t(1500)
  text = " ".join(benchmark.evidence(results))
  assert "add up to more than a whole step of PyTorch" in text
  assert "PyTorch's time" not in text
  # Nor a remainder of the se_jax step that would be negative.
  results["cifar"]["rows"][0]["times"]["se_jax cifar_se_resnet110"] = _t(2500)
  text = " ".join(benchmark.evidence(results))
  assert "between the two), more than the whole step" in text
  assert "the other" not in text.split("PyTorch channels_last")[0]


def test_share_of_the_matrix_product_rate_pairs_each_step_with_a_product():
  # The product's calls drift with the steps' (the machine slows down and
  # speeds up): each step's rate over the product's rate of the same repeat
  # is steady at 0.5, while the steps' median over the product's median
  # is not what any repeat saw.
  drift = [1.0, 1.3, 0.9, 1.5, 1.1, 1.2, 0.95, 1.4, 1.05, 1.25, 1.35, 1.15]
  step = [200 * x for x in drift]
  product = [50 * x for x in drift]
  results = {"cifar": {"matmul_flops_per_s": 1e12, "rows": [{
      "depth": 110, "batch": 128,
      "times": {"se_jax cifar_resnet110": _calls(step),
                "se_jax cifar_se_resnet110": _calls(step)},
      "matmul": _calls(product), "matmul_flops": 5e9,
      "flops": {"cifar_se_resnet110": 10e9}, "compile_s": {},
      "params": {}}]}}
  check = {c["target"]: c for c in benchmark.check_targets(
      results, {"bf16": False})}["peak_fraction_cifar"]
  assert check["value"] == pytest.approx(0.5)
  assert check["interval"] == pytest.approx((0.5, 0.5))
  assert check["where"] == "SE-ResNet-110: 42.6 of 85.1 GFLOP/s"
  assert benchmark.verdict(check) == "met"
  # A run saved before the product took its turn in the rounds: its single
  # rate, and the steps' own interval.
  del results["cifar"]["rows"][0]["matmul"]
  check = {c["target"]: c for c in benchmark.check_targets(
      results, {"bf16": False})}["peak_fraction_cifar"]
  assert check["value"] == pytest.approx(10e9 / 0.235 / 1e12)
  assert check["interval"][0] < check["value"] < check["interval"][1]


def test_evidence_bounds_the_share_of_the_matrix_product_rate():
  results = {
      "kernels": _conv_totals_110((0.4, 0.3, 0.3), (0.4, 0.3, 0.3)),
      "cifar": {"rows": [{"depth": 110, "batch": 128,
                          "times": {"se_jax cifar_se_resnet110": _t(2000),
                                    "PyTorch cifar_se_resnet110 CL": _t(2500)},
                          "matmul": _t(100), "matmul_flops": 20e9,
                          "flops": {"cifar_se_resnet110": 200e9}}]},
  }
  text = " ".join(benchmark.evidence(results))
  # 200 GFLOP at 200 GFLOP/s: 1000 ms; convolutions 1000 ms (200 GFLOP/s,
  # 1.00 of the rate); the other 1000 ms hold the step to 1000 / 2000.
  assert ("SE-ResNet-110's step counts 200 GFLOP, which at the matrix"
          " product rate (200.0 GFLOP/s) take 1000 ms: its convolutions,"
          " timed alone, run at 200 GFLOP/s (1.00 of the rate), and the"
          " other 1000 ms") in text
  assert "would hold the step to 0.50 of the rate" in text
  assert "PyTorch channels_last's step reaches 0.40 of the rate" in text
  # Steps and product timed in the kernels section's rounds, beside the
  # convolutions, take the place of the CIFAR section's.
  results["kernels"].update(
      steps={"se_jax cifar_se_resnet110": _t(1500),
             "PyTorch cifar_se_resnet110 CL": _t(2000),
             benchmark.MATMUL: _t(200)}, matmul_flops=20e9)
  text = " ".join(benchmark.evidence(results))
  assert ("In se_jax's SE-ResNet-110 step (1500 ms) the convolutions"
          " measured alone account for 1000 ms (the step timed in the"
          " kernels section's rounds, between the convolutions' calls);"
          " the other 500 ms") in text
  assert ("step 2000 ms, the same convolutions alone 1000 ms, the other"
          " 1000 ms; convolutions 1.00x PyTorch's time, the rest 0.50x."
          ) in text
  assert ("counts 200 GFLOP, which at the matrix product rate (100.0"
          " GFLOP/s, timed in the same rounds) take 2000 ms") in text
  assert "(1.00 of the rate)" not in text
  assert "would hold the step to 0.80 of the rate" in text
  assert ("PyTorch channels_last's step reaches 1.00 of the rate in the"
          " same rounds") in text


def test_evidence_names_what_bounds_the_step():
  results = {
      "kernels": {"totals_s": {"20": {
          "se_jax forward": 0.1, "se_jax input grad": 0.1,
          "se_jax kernel grad": 0.2, "XLA forward": 0.2,
          "XLA input grad": 0.1, "XLA kernel grad": 0.5,
          "PyTorch CL forward": 0.1, "PyTorch CL input grad": 0.1,
          "PyTorch CL kernel grad": 0.1}}},
      "cifar": {"rows": [{"depth": 20, "times": {
          "se_jax cifar_se_resnet20": _t(600)}}]},
      "tuning": {"times": {"default": _t(400),
                           "conv_impl='xla'": _t(800),
                           "conv_impl='xla' + XLA conv option": _t(380),
                           "fold_norm=False": _t(420)},
                 "fold": {"depth": 110, "plain": "p", "se": "s",
                          "times": {"p": _t(1000), "s": _t(1010),
                                    "s, fold_norm=False": _t(1200),
                                    "s, materialize=False": _t(1515)},
                          "peak_bytes": {"p": 100, "s": 101,
                                         "s, fold_norm=False": 120}}},
      "inference": {"rows": [{"batch": 1, "times": {
          "se_jax resnet50": _t(100), "se_jax se_resnet50": _t(95),
          "timm resnet50 CL": _t(90), "timm se_resnet50 CL": _t(110)}}]},
      "se_block": {"rows": [{"shape": [1, 100, 100, 100], "times": {
          "pooling pass": _t(2)}}]},
      "train": {"batch": 8, "times": {
          "timm resnet50": _t(100), "timm se_resnet50": _t(110),
          "timm resnet50 CL": _t(100), "timm se_resnet50 CL": _t(120)}},
  }
  text = " ".join(benchmark.evidence(results))
  assert "400 ms in se_jax (800 ms with XLA's convolution" in text
  assert "300 ms in PyTorch channels_last" in text
  assert "kernel grad 200 vs 100 ms" in text and "0.75x the speed" in text
  # Convolutions no slower than PyTorch's do not bound the step.
  results["kernels"]["totals_s"]["20"]["PyTorch CL kernel grad"] = 0.3
  text = " ".join(benchmark.evidence(results))
  assert "take 0.80x PyTorch's time in this run" in text
  assert "bounds the whole step" not in text
  assert "the convolutions measured alone account for 400 ms (timed" in text
  assert "(`conv_impl='xla'`, YNNPACK" in text and "2.00x as long" in text
  assert "pass, 0.95x;" in text and "(`fold_norm=False`), 1.05x" in text
  assert ("SE-ResNet-110 step takes 1010.0 ms against 1200.0 ms with the BN"
          " apart, SE / plain time 1.010 against 1.200, and SE / plain peak"
          " memory 1.010 against 1.200") in text
  assert ("without it (`materialize=False`) the CIFAR SE-ResNet-110 step"
          " takes 1515.0 ms against 1010.0 ms, paired ratio 1.500, as XLA:CPU"
          " recomputes") in text
  # The cause is named only where the run shows the recomputing step
  # slower; a faster one, or one within noise, is reported as such.
  fold = results["tuning"]["fold"]["times"]
  fold["s, materialize=False"] = _t(960)
  text = " ".join(benchmark.evidence(results))
  assert "paired ratio 0.950: faster without it in this run." in text
  fold["s"] = _calls([1000 + 10 * (i % 4) for i in range(12)])
  fold["s, materialize=False"] = _calls([990 + 15 * (i % 3) for i in range(12)])
  text = " ".join(benchmark.evidence(results))
  assert ": this run cannot tell the two apart." in text
  assert "recomputes" not in text
  assert "ResNet-50 training, batch 8 1.10x, 1.20x CL" in text
  # In inference, at batch 1, 11,280,384 bytes (`se_input_bytes`: a
  # quarter of the first two stages' outputs with conv3's kernels, the last
  # two stages' outputs), pooled at 4e6 bytes in 2 ms.
  assert ("takes 5 ms less than ResNet-50 by the medians (SE / plain"
          " 0.950; the targets' paired ratio 0.950), from the inference"
          " section") in text
  assert "11 MB, 6 ms at the pooling rate" in text
  assert "within the cost of that pass." in text
  assert "At batch 1 SE-ResNet-50 runs faster than ResNet-50" in text
  assert "without SE and with SE, by batch: 1: 0.90 and 1.16." in text
  # 11 ms, more than the squeeze's pass: the rest is not put on the pass.
  results["inference"]["rows"][0]["times"]["se_jax se_resnet50"] = _t(111)
  text = " ".join(benchmark.evidence(results))
  assert "takes 11 ms more than ResNet-50" in text
  assert "2.0x the cost of that pass; the rest is" in text
  # The SE / plain section, where the run has it, gives SE's cost.
  results["overhead"] = {"repeats": 3, "rows": [{
      "kind": "inference", "plain": "resnet50", "se": "se_resnet50",
      "batch": 1, "times": {"se_jax resnet50": _calls([100, 100, 100]),
                            "se_jax se_resnet50": _calls([102, 103, 101])}}]}
  text = " ".join(benchmark.evidence(results))
  assert ("takes 2 ms more than ResNet-50 by the medians (SE / plain"
          " 1.020; the targets' paired ratio 1.020), from the SE / plain"
          " section") in text
  assert "runs faster than ResNet-50" not in text
  # The excitations timed alone: their share of what SE adds, and their
  # place beside the squeeze's pass.
  results["inference"]["rows"][0]["excitations"] = {
      **_t(0.5), "blocks": 16, "param_bytes": 10_123_968}
  text = " ".join(benchmark.evidence(results))
  assert ("besides the excitations (0 ms, timed alone). The extra time is"
          " within the cost of the two.") in text
  assert ("SE's excitations, the FC layers and gates of SE-ResNet-50's 16"
          " SE blocks on their squeezed (N, C) vectors, one block after"
          " another, timed alone in the inference section's rounds, against"
          " the time SE adds to ResNet-50 (medians, from the SE / plain"
          " section): batch 1: 0.5 ms of 2.0 ms (25%). Each pass reads their"
          " 10.1 MB of parameters whatever the batch") in text
  # Read at the pooling rate (4e6 bytes in 2 ms), against ResNet-50's
  # 100 ms pass.
  assert ("At the pooling rate measured in the SE-block section (2.0 GB/s)"
          " they take 5.06 ms to read, 5.1% of ResNet-50's pass at batch 1"
          " (100.0 ms): there SE / plain cannot go below 1.051 without"
          " reading fewer bytes, and the excitations take 0.1x that read."
          ) in text
  results["overhead"]["rows"][0]["times"]["se_jax se_resnet50"] = _calls(
      [99, 99, 99])
  text = " ".join(benchmark.evidence(results))
  assert "batch 1: 0.5 ms of none (SE-ResNet-50 1.0 ms faster)" in text


def test_the_benchmark_times_the_trainers_step():
  from experiments import steps, trainer
  assert trainer.make_train_step is steps.make_train_step
  assert benchmark.steps is steps
  run, _, _ = benchmark.jax_train_step("cifar_resnet20", 4, 16, 10, None,
                                       stage_sizes=(1, 1, 1))
  run()


def test_se_excitations_are_the_se_blocks_fc_layers():
  run, blocks, nbytes = benchmark.se_excitations("se_resnet50", 2)
  run()
  # One per unit: ResNet-50 has 3 + 4 + 6 + 3.
  assert blocks == 16
  # Their parameters are all that SE adds to ResNet-50 (Table 2 of the
  # paper: 28.1M against 25.6M).
  count = lambda name: se_jax.count_params(nnx.eval_shape(
      lambda: create(name)))
  assert nbytes == 4 * (count("se_resnet50") - count("resnet50"))
  with pytest.raises(ValueError, match="resnet50 has no SE blocks"):
    benchmark.se_excitations("resnet50", 1)


def test_each_inference_program_is_compiled_once_per_run():
  # The overhead section times the inference section's programs again.
  args = ("cifar_resnet20", 2, 16, None)
  run, _, compiled = benchmark.jax_inference(*args, stage_sizes=(1, 1, 1))
  assert benchmark.jax_inference(*args, stage_sizes=(1, 1, 1))[2] is compiled
  other = benchmark.jax_inference(*args, stage_sizes=(1, 1, 2))[2]
  assert other is not compiled
  run()


def _code_lines(text: str) -> list[str]:
  return [line.split("#")[0].strip() for line in text.splitlines()
          if line.split("#")[0].strip()]


def test_the_benchmark_times_the_readmes_functional_path():
  import inspect
  import pathlib
  import re
  readme = (pathlib.Path(benchmark.__file__).parent.parent
            / "README.md").read_text()
  (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
              if "def train_step(params, batch_stats" in b]
  step = _code_lines(block[block.index("@jax.jit"):block.index("\nimages, ")])
  source = _code_lines(inspect.getsource(benchmark.readme_train_step))
  start = source.index("@jax.jit")
  assert source[start:start + len(step)] == step
  run, compile_s = benchmark.readme_train_step("cifar_resnet20", 4, 16, 10)
  run()
  assert compile_s > 0


def test_readme_summary_replaces_only_its_section(tmp_path):
  readme = tmp_path / "README.md"
  before, after = "# t\n\ntext before\n", "\n## next\n"
  readme.write_text(before + benchmark._README_START + " x -->\nold\n"
                    + benchmark._README_END + after)
  checks = [{"what": "w", "where": "here", "value": 1.234, "limit": 1.0,
             "direction": "max", "met": False}]
  prov = {"machine": "m", "date": "d", "commit": "c"}
  summary = benchmark.readme_summary({}, checks, prov)
  assert benchmark.update_readme(summary, str(readme))
  text = readme.read_text()
  assert text.startswith(before) and text.endswith(after)
  assert "- w, here: 1.234 (<= 1.0: missed (by 23.4%))" in text
  assert "1 missed and 0 within the run's noise" in text
  assert "old" not in text
  (tmp_path / "plain.md").write_text("no markers")
  assert not benchmark.update_readme(summary, str(tmp_path / "plain.md"))


def test_quick_run_writes_the_report(tmp_path):
  out = benchmark.main(["--quick", "--no-torch", "--sections",
                        "se_block,memory", "--out-dir", str(tmp_path)])
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert saved["targets"] == out["targets"]
  (mem,) = saved["results"]["memory"]["rows"]
  assert mem["plain"] == "cifar_resnet20" and mem["ratio"] > 1.0
  for row in saved["results"]["se_block"]["rows"]:
    # The floor is the one read and one write every SE block makes.
    assert row["floor_s"] == row["times"]["scaling pass"]["median_s"] > 0
    assert row["efficiency"] == pytest.approx(
        row["floor_s"] / row["times"]["se_jax squeeze_excite"]["median_s"])
  assert "## The SE block alone" in (tmp_path / "benchmark.md").read_text()
  # The text again from the saved measurements, measuring nothing.
  again = benchmark.main(["--report-only", "--out-dir", str(tmp_path)])
  assert again["targets"] == out["targets"]
  text = (tmp_path / "benchmark.md").read_text()
  assert "written from benchmark.json by" in text.split("\n\n")[1]
  with pytest.raises(SystemExit, match="run the benchmark first"):
    benchmark.main(["--report-only", "--out-dir", str(tmp_path / "none")])
  with pytest.raises(SystemExit):
    benchmark.main(["--sections", "speed"])


@pytest.mark.parametrize("se", [False, True])
def test_pytorch_cifar_resnet_is_the_same_network(se):
  pytest.importorskip("torch", reason="the torch extra is not installed")
  name = f"cifar_{'se_' if se else ''}resnet20"
  ours = se_jax.count_params(nnx.eval_shape(
      lambda: create(name, num_classes=10)))
  theirs = sum(p.numel() for p in
               benchmark.torch_cifar_resnet(20, se).parameters())
  assert theirs == ours


def test_bfloat16_run_on_any_device(tmp_path):
  # The accelerator configuration (bfloat16 on both sides, PyTorch under
  # autocast) runs here too; the GPU's overhead limit applies on GPUs only.
  argv = ["--quick", "--dtype", "bfloat16", "--sections", "cifar",
          "--repeats", "1", "--out-dir", str(tmp_path)]
  try:
    import torch  # noqa: F401
  except ImportError:
    argv.append("--no-torch")
  out = benchmark.main(argv)
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert saved["config"]["bf16"] and saved["config"]["dtype"] == "bfloat16"
  (row,) = out["results"]["cifar"]["rows"]
  assert all(t["median_s"] > 0 for t in row["times"].values())
  limits = {c["limit"] for c in out["targets"]
            if c["target"] == "se_overhead_train"}
  assert limits == {benchmark.TARGETS["se_overhead_train"][1]}
  assert "bfloat16 compute." in (tmp_path / "benchmark.md").read_text()


def _allocator_results(*rows):
  """An allocator section of (process, calls in ms, page faults per step,
  system ms per step, state) rows."""
  return {"allocator": {
      "model": "m", "batch": 128, "rounds": 3, "tunables": "a=1:b=0",
      "rows": {k: {**_calls(ms), "faults_per_step": faults,
                   "system_s_per_step": system_ms / 1e3, "state": state}
               for k, ms, faults, system_ms, state in rows}}}


def _markdown(results):
  return benchmark.to_markdown(results, [], {
      "command": "c", "date": "d", "commit": "x", "machine": "m",
      "devices": "1 x cpu", "versions": {"jax": "j", "flax": "f"}},
      {"repeats": 1, "bf16": False})


def test_evidence_and_table_of_the_allocator_section():
  # A run saved before se_jax's import kept the heap: the scripts'
  # tunables, huge pages advised alone, glibc's defaults.
  results = _allocator_results(
      (benchmark.KEPT_HEAP, [70], 0.0, 1, "heap kept"),
      ("huge pages advised", [80], 300.0, 50, "advised"),
      ("4 KiB pages", [100], 60000.0, 250, "4 KiB"))
  text = " ".join(benchmark.evidence(results))
  assert ("takes 70.0 ms with the heap kept and huge pages advised (the"
          " experiment scripts' glibc tunables), 80.0 ms with huge pages"
          " advised alone, 100.0 ms with glibc's defaults (1.14x and 1.43x"
          " the first), with 0, 300, 60,000 page faults and 1, 50, 250 ms of"
          " system time per step") in text
  md = _markdown(results)
  assert "| 4 KiB pages | 100.0 | 60,000 | 250 | 4 KiB |" in md
  assert "`GLIBC_TUNABLES=a=1:b=0` (the heap kept" in md
  # A run saved before the section timed the kept heap: its two processes.
  del results["allocator"]["rows"][benchmark.KEPT_HEAP]
  text = " ".join(benchmark.evidence(results))
  assert ("takes 80.0 ms with glibc's huge pages advised and 100.0 ms"
          " without (1.25x), with 300 against 60,000 page faults") in text


def test_evidence_table_and_target_of_the_allocator_section():
  results = _allocator_results(
      (benchmark.KEPT_HEAP, [70, 71, 69], 0.0, 1, "tunables"),
      (benchmark.IMPORT_HEAP, [72, 73, 71], 2.0, 4, "import"),
      (benchmark.GLIBC_DEFAULTS, [90, 91, 89], 50000.0, 120, "defaults"))
  text = " ".join(benchmark.evidence(results))
  assert ("takes 72.0 ms as a program of one's own runs it (the heap kept"
          " by se_jax's import, `se_jax.heap`), 70.0 ms with the experiment"
          " scripts' glibc tunables (the heap kept, huge pages advised), 90.0"
          " ms with glibc's defaults (`SE_JAX_ALLOCATOR=0`) (0.97x and 1.25x"
          " the first), with 2, 0, 50,000 page faults and 4, 1, 120 ms of"
          " system time per step") in text
  md = _markdown(results)
  assert "| se_jax's import | 72.0 | 2 | 4 | import |" in md
  assert "no tunables (the heap kept by se_jax's import" in md
  (check,) = benchmark.check_targets(results, {"bf16": False})
  assert check["target"] == "default_within_fastest_train"
  assert check["value"] == pytest.approx(72 / 70)
  assert check["where"].startswith(
      "CIFAR SE-ResNet-20, batch 128, a program's own process")
  assert benchmark.verdict(check) == "met"


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's tunables")
def test_allocator_section_runs_each_process():
  out = benchmark.section_allocator(
      {"gpu": False, "cifar_batch": 8, "repeats": 2})
  rows = out["rows"]
  kept, own, off = (rows[benchmark.KEPT_HEAP], rows[benchmark.IMPORT_HEAP],
                    rows[benchmark.GLIBC_DEFAULTS])
  assert kept["n"] == own["n"] == off["n"] == 2 and own["median_s"] > 0
  assert kept["state"].startswith("heap kept between calls (GLIBC_TUNABLES)")
  assert own["state"].startswith(
      "heap kept between calls (se_jax's import), ")
  assert off["state"].startswith(
      "glibc's default heap (SE_JAX_ALLOCATOR=0), 4 KiB pages")
  if allocator.thp_mode() == "madvise":
    assert kept["state"].endswith("advised (glibc.malloc.hugetlb=1)")


def test_onednn_ops_counts_the_instructions_that_call_onednn():
  fake = types.SimpleNamespace(as_text=lambda: "\n".join([
      'HloModule m, entry_computation_layout={(f32[2])->f32[2]}',
      '%a = f32[2] custom-call(%p), custom_call_target="__onednn$convolution"',
      '%b = f32[2] fusion(%a), kind=kCustom, calls=%__onednn_fusion',
      '%c = f32[2] add(%b, %b)']))
  assert benchmark.onednn_ops(fake) == 2
  results = {"tuning": {"times": {
      "default": _t(400), "conv_impl='xla'": _t(800),
      "conv_impl='xla' + XLA conv option": _t(380),
      "fold_norm=False": _t(420),
      "conv_impl='xla' + XLA's oneDNN options": _t(410)}, "onednn_ops": 0}}
  text = " ".join(benchmark.evidence(results))
  assert "not reachable through XLA:CPU's options in this jaxlib" in text
  assert "calls oneDNN in 0 instruction(s) and takes 1.02x" in text


def test_time_alternating_settles_before_each_call(monkeypatch):
  slept = []
  monkeypatch.setattr(benchmark.time, "sleep", slept.append)
  benchmark.time_alternating({"a": lambda: 0, "b": lambda: 0}, repeats=3,
                             warmup=0, settle_s=0.5)
  assert slept == [0.5] * 6


def test_a_variant_that_ends_its_process_is_reported_not_fatal(monkeypatch):
  monkeypatch.setattr(benchmark, "_OPTIONS_CHILD",
                      "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
  assert benchmark.runs_in_child("cifar_resnet20", 2, {}, {}) == (
      "the process ended by SIGILL")
  monkeypatch.setattr(benchmark, "_OPTIONS_CHILD",
                      "import sys; sys.exit('no such option')")
  assert benchmark.runs_in_child("cifar_resnet20", 2, {}, {}) == (
      "the process exited with status 1 (no such option)")


def test_the_options_child_runs_the_trainers_step():
  assert benchmark.runs_in_child(
      "cifar_resnet20", 2, benchmark.XLA_CONV_OPTION,
      {"conv_impl": "xla"}) is None


def test_the_onednn_variant_runs_and_calls_onednn():
  # In a child process: before matrix products were named individually, the
  # SE block's first FC layer ended the process by SIGILL.
  assert benchmark.runs_in_child(
      "cifar_se_resnet20", 2, benchmark.XLA_ONEDNN_OPTIONS,
      {"conv_impl": "xla"}) is None
  # Compiled in a fresh process with JAX's compilation cache off, as the
  # benchmark compiles: XLA cannot write oneDNN's thunks into that cache.
  code = ("import jax; jax.config.update('jax_enable_compilation_cache',"
          " False); from experiments import benchmark as b;"
          " print(b.onednn_ops(b.jax_train_step('cifar_se_resnet20', 2, 32,"
          " 10, None, options=b.XLA_ONEDNN_OPTIONS, conv_impl='xla')[2]"
          ".compiled))")
  out = subprocess.run([sys.executable, "-c", code], cwd=benchmark._ROOT,
                       capture_output=True, text=True, check=True)
  assert int(out.stdout.split()[-1]) > 0


def test_a_stopped_run_continues_from_its_finished_sections(tmp_path,
                                                            monkeypatch):
  real = benchmark.provenance
  monkeypatch.setattr(benchmark, "provenance",
                      lambda: {**real(), "commit": "abc1234"})
  real_memory = benchmark.section_memory

  def crash(cfg):
    raise KeyboardInterrupt

  monkeypatch.setattr(benchmark, "section_memory", crash)
  argv = ["--quick", "--no-torch", "--sections", "se_block,memory",
          "--out-dir", str(tmp_path)]
  with pytest.raises(KeyboardInterrupt):
    benchmark.main(argv)
  partial = json.loads((tmp_path / benchmark.PARTIAL).read_text())
  assert list(partial["results"]) == ["se_block"]
  assert not (tmp_path / "benchmark.json").exists()

  def measured_again(cfg):
    raise AssertionError("a finished section was measured again")

  monkeypatch.setattr(benchmark, "section_se_block", measured_again)
  monkeypatch.setattr(benchmark, "section_memory", real_memory)
  out = benchmark.main(argv)
  assert out["results"]["se_block"] == partial["results"]["se_block"]
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert saved["provenance"]["continued"]["sections"] == ["se_block"]
  assert "sections se_block are from that start" in (
      tmp_path / "benchmark.md").read_text()
  assert not (tmp_path / benchmark.PARTIAL).exists()


def test_saved_sections_of_another_commit_or_config_are_not_reused(
    tmp_path, capsys):
  path = str(tmp_path / benchmark.PARTIAL)
  prov = {"commit": "abc1234", "machine": "m", "devices": "1 x cpu",
          "versions": {"jax": "1"}}
  key = benchmark._partial_key(prov, {"repeats": 9, "batches": (1, 8)})
  assert benchmark.load_partial(path, key) is None
  benchmark.files.write_json(path, {"key": key, "started": "then",
                                    "results": {"cifar": {}},
                                    "wall_seconds": {"cifar": 1.0}})
  assert benchmark.load_partial(path, key)["results"] == {"cifar": {}}
  other = benchmark._partial_key(prov, {"repeats": 3, "batches": (1, 8)})
  assert benchmark.load_partial(path, other) is None
  assert "differs in config" in capsys.readouterr().err
  dirty = benchmark._partial_key({**prov, "commit": "abc1234+uncommitted"},
                                 {"repeats": 9, "batches": (1, 8)})
  assert benchmark.load_partial(path, dirty) is None
  assert "is not a commit" in capsys.readouterr().err


def test_resnet50_conv_shapes_are_the_models_convolutions():
  model = nnx.eval_shape(lambda: create("resnet50"))
  kernels = sorted(tuple(p.shape) for _, p in nnx.iter_graph(model)
                   if isinstance(p, nnx.Param) and len(p.shape) == 4)
  listed = sorted((k, k, cin, cout)
                  for (_, cin, cout, k, _), n in benchmark.resnet50_conv_shapes()
                  for _ in range(n))
  assert listed == kernels and len(listed) == 53
  shapes = dict(benchmark.resnet50_conv_shapes(224))
  # The last stage's 3x3 convolutions run on 7 x 7 maps, its first one on
  # the 14 x 14 maps of stage 3 with stride 2.
  assert shapes[(7, 512, 512, 3, 1)] == 2
  assert shapes[(14, 512, 512, 3, 2)] == 1
  assert benchmark.conv_kind(3, 2) == "3x3, stride 2"
  assert benchmark.conv_kind(1, 2) == "1x1"


def test_inference_conv_totals_and_evidence():
  rows = [
      {"batch": 8, "shape": [14, 8, 8, 3, 1], "count": 5,
       "kind": "3x3, stride 1", "ynnpack": False,
       "times": {"se_jax": _t(2), "XLA + option": _t(1)}},
      {"batch": 8, "shape": [14, 8, 8, 3, 2], "count": 1,
       "kind": "3x3, stride 2", "ynnpack": False,
       "times": {"se_jax": _t(4), "XLA + option": _t(3),
                 benchmark.CONV_NO_OPTION: _t(3.5)}},
      {"batch": 8, "shape": [56, 3, 8, 7, 2], "count": 1,
       "kind": "7x7 stem", "ynnpack": True,
       "times": {"se_jax": _t(2), "XLA + option": _t(1)}}]
  totals = benchmark.inference_conv_totals(rows)["8"]
  assert totals["3x3, stride 1"] == {"se_jax": pytest.approx(0.010),
                                     "XLA + option": pytest.approx(0.005)}
  assert totals["3x3, stride 2"][benchmark.CONV_NO_OPTION] == pytest.approx(
      3.5e-3)
  # XLA without options was measured on one shape of the two: no total over
  # all.
  assert set(totals["all"]) == {"se_jax", "XLA + option"}
  assert totals["all"]["se_jax"] == pytest.approx(0.016)
  results = {"inference_convs": {"rows": rows}, "inference": {"rows": [
      {"batch": 8, "times": {"se_jax se_resnet50": _t(30),
                             "se_jax se_resnet50, XLA conv + option": _t(20),
                             benchmark.INFERENCE_OPTION: _t(27)}}
  ]}}
  (line,) = benchmark._inference_conv_evidence(results)
  assert line.startswith("Inference at batch 8: ResNet-50's convolutions")
  assert "take 16 ms per forward pass" in line and "and 9 ms" in line
  assert "differ by 10 ms" in line
  assert "se_jax's own convolutions take 0.900 of the default's time" in line
  assert "(XLA's 0.667)" in line
  assert benchmark._with_interval({"value": 0.9, "interval": (0.8, 0.95)}) == (
      "0.900 (95% interval 0.800-0.950)")
  # 3 ms saved in the whole pass; the stem alone: 2 - 1 = 1 ms.
  assert ("moving them saves 3 ms of the whole pass and saves 1 ms of those"
          " convolutions timed alone") in line
  assert benchmark._saving(-0.0213) == "costs 21 ms"
  assert benchmark._saving(-0.0004) == "changes less than 1 ms"
  # The kind that costs most comes first.
  assert line.index("3x3, stride 1 (one output row") < line.index(
      "3x3, stride 2 (stride-1 convolutions of the input's phases")
  assert "XLA's convolution without options (YNNPACK) 4 ms" in line
  assert "in se_jax's default path (7x7 stem)" in line


def test_inference_convs_section_runs_and_reports(tmp_path, monkeypatch):
  monkeypatch.setattr(benchmark, "resnet50_conv_shapes", lambda size=224: [
      ((16, 8, 24, 3, 1), 2), ((16, 8, 24, 3, 2), 1), ((8, 24, 32, 1, 1), 1)])
  out = benchmark.main(["--quick", "--no-torch", "--sections",
                        "inference_convs", "--out-dir", str(tmp_path)])
  rows = out["results"]["inference_convs"]["rows"]
  assert [r["kind"] for r in rows] == ["3x3, stride 1", "3x3, stride 2", "1x1"]
  assert benchmark.CONV_NO_OPTION in rows[1]["times"]
  assert benchmark.CONV_NO_OPTION not in rows[0]["times"]
  text = (tmp_path / "benchmark.md").read_text()
  assert "## The convolutions of ResNet-50 alone, inference" in text
  assert "| 1 | all |" in text
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert any(e.startswith("Inference at batch 1:") for e in saved["evidence"])


def test_evidence_of_a_run_on_onednns_kernels():
  results = {
      "kernels": {"conv_route": "onednn", "totals_s": {"20": {
          "se_jax forward": 0.05, "se_jax input grad": 0.05,
          "se_jax kernel grad": 0.05, "formulated forward": 0.1,
          "formulated input grad": 0.1, "formulated kernel grad": 0.2,
          "XLA forward": 0.2, "XLA input grad": 0.1, "XLA kernel grad": 0.5,
          "PyTorch CL forward": 0.1, "PyTorch CL input grad": 0.1,
          "PyTorch CL kernel grad": 0.1}}},
      "cifar": {"rows": [{"depth": 20, "times": {
          "se_jax cifar_se_resnet20": _t(250)}}]},
      "tuning": {"times": {"default": _t(250),
                           benchmark.FORMULATED_VARIANT: _t(500),
                           benchmark.OPTION_VARIANT: _t(245),
                           "conv_impl='xla'": _t(800),
                           "conv_impl='xla' + XLA conv option": _t(450),
                           "fold_norm=False": _t(300),
                           benchmark.ONEDNN_VARIANT: _t(400)},
                 "onednn_ops": 12},
  }
  text = " ".join(benchmark.evidence(results))
  assert ("150 ms in se_jax on oneDNN's kernels (`se_jax.onednn`; 400 ms in"
          " its XLA formulation, 800 ms with XLA's convolution") in text
  assert "se_jax's take 0.50x PyTorch's time in this run" in text
  assert "bounds the whole step" not in text
  assert "are BatchNorm, ReLU, SE, and the update" in text
  assert ("(`conv_impl='formulated'`, what runs where oneDNN's handlers are"
          " not built) the SE-ResNet-20 step takes 2.00x as long") in text
  assert "se_jax's default step under that option takes 0.98x" in text
  assert "se_jax's default path calls oneDNN's convolutions itself" in text
  assert "no formulation under a plain `jax.jit` reaches" not in text
  # ResNet-50 in inference: the formulation's totals by kind beside the
  # default's, and the whole pass with it.
  rows = [
      {"batch": 8, "shape": [14, 8, 8, 3, 1], "count": 2,
       "kind": "3x3, stride 1", "ynnpack": False,
       "times": {"se_jax": _t(2), "XLA + option": _t(3),
                 "formulated": _t(4)}},
      {"batch": 8, "shape": [14, 8, 16, 1, 1], "count": 1,
       "kind": "1x1", "ynnpack": False,
       "times": {"se_jax": _t(1), "XLA + option": _t(1)}}]
  results = {"inference_convs": {"rows": rows, "conv_route": "onednn"},
             "inference": {"rows": [{"batch": 8, "times": {
                 "se_jax se_resnet50": _t(30),
                 benchmark.INFERENCE_XLA_OPTION: _t(33),
                 benchmark.INFERENCE_OPTION: _t(30),
                 benchmark.INFERENCE_FORMULATED: _t(36)}}]}}
  (line,) = benchmark._inference_conv_evidence(results)
  assert ("3x3, stride 1 (oneDNN's kernels) 4 vs 6 ms, se_jax's XLA"
          " formulation 8 ms") in line
  assert "1x1 (1-D convolutions over the pixels" in line
  assert "the option moves" not in line
  assert ("with se_jax's XLA formulation of the convolutions"
          " (`conv_impl='formulated'`) the whole pass takes 1.200 of the"
          " default's time") in line
  table = benchmark.inference_conv_totals(rows)["8"]
  assert table["3x3, stride 1"]["formulated"] == pytest.approx(0.008)
  assert "formulated" not in table["all"]


def test_report_only_counts_the_flops_again():
  right = benchmark.training_flops("cifar_resnet20", 2, 32, 10)
  # 6 per multiply-add: ResNet-20 has 40.6M multiply-adds on a 32x32 image.
  assert right / 6 / 2 == pytest.approx(40.6e6, rel=0.01)
  results = {"cifar": {"rows": [{"batch": 2,
                                 "flops": {"cifar_resnet20": right / 5}}]}}
  assert benchmark.recount_flops(results, "abc")
  assert results["cifar"]["rows"][0]["flops"]["cifar_resnet20"] == right
  assert results["flops_recounted_at"] == "abc"
  assert not benchmark.recount_flops(results, "def")
  assert results["flops_recounted_at"] == "abc"


def test_kernels_section_times_the_steps_in_its_rounds(tmp_path, monkeypatch):
  # Two of the shapes, so that the run stays short: the SE-ResNet-20 step
  # and the matrix product take their turn in each shape's round, and the
  # split of the step into its convolutions and the rest is from those
  # calls, not from the CIFAR section's.
  monkeypatch.setattr(benchmark, "CIFAR_CONV_SHAPES",
                      benchmark.CIFAR_CONV_SHAPES[:2])
  out = benchmark.main(["--quick", "--no-torch", "--repeats", "2",
                        "--sections", "kernels", "--out-dir", str(tmp_path)])
  k = out["results"]["kernels"]
  assert len(k["rows"]) == 2
  for row in k["rows"]:
    assert set(row["times"]) == {
        f"{impl} {what}" for impl in ("se_jax", "XLA", "XLA + option")
        + (("formulated",) if k["conv_route"] == "onednn" else ())
        for what in ("forward", "input grad", "kernel grad")}
  assert set(k["steps"]) == {"se_jax cifar_se_resnet20", benchmark.MATMUL}
  assert all(s["n"] == 4 for s in k["steps"].values())
  cifar = {"rows": [{"depth": 20, "batch": 32, "times": {
      "se_jax cifar_se_resnet20": _t(1e6)}, "flops": {
          "cifar_se_resnet20": benchmark.training_flops(
              "cifar_se_resnet20", 32, 32, 10)}}]}
  text = " ".join(benchmark.evidence({"kernels": k, "cifar": cifar}))
  step = k["steps"]["se_jax cifar_se_resnet20"]["median_s"]
  assert (f"In se_jax's SE-ResNet-20 step ({1e3 * step:.0f} ms) the"
          " convolutions measured alone account for") in text
  assert ("(the step timed in the kernels section's rounds, between the"
          " convolutions' calls)") in text
  assert "1000000 ms" not in text
  md = (tmp_path / "benchmark.md").read_text()
  assert (f"In the same rounds, their calls between the convolutions':"
          f" se_jax cifar_se_resnet20 {1e3 * step:.1f} ms") in md
