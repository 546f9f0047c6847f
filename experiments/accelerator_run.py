"""One prepared run on one GPU: the accelerator benchmark and the converged
Fashion-MNIST study at GPU scale.

  python -m experiments.accelerator_run --out DIR [--minutes 9]
      [--data-dir DIR] [--seeds 3] [--tiny]

In the given minutes, on the default JAX device:

1. Benchmarks in bfloat16 (parameters float32): ResNet-50 and SE-ResNet-50,
   the training step at batch 256 and inference at batch 1, 32 and 256,
   under a plain ``jax.jit``; SE / plain; against timm's resnet50 and
   seresnet50 on the same card, in channels_last under bfloat16 autocast,
   eager and through ``torch.compile`` where it works.
2. Trains, in the time left and sized from the throughput it measures,
   CIFAR ResNet-20 and ResNet-110 with and without SE on Fashion-MNIST
   with the CIFAR recipe (SGD momentum 0.9, weight decay 1e-4, batch 128,
   lr 0.1 divided by 10 at 50% and 75% of training; 2-pixel pad and crop),
   several seeds each, the whole data set on the device; then compares the
   networks over the seeds and repeats the role-of-excitation analysis on
   every SE network, with the report code of the CPU study
   (`experiments.study_report`).
3. Writes DIR/accelerator.json (every number, the card, driver and
   versions), DIR/accelerator.md, and the figures curves.png,
   fig6_class_gates.png and fig7_within_class.png: five files.

It needs jax, flax, optax, matplotlib and, for the comparison, torch and
timm; not the data pipeline (grain, tensorflow-datasets) nor ml_collections.
Fashion-MNIST comes from Debian's files (--data-dir, default
/usr/share/datasets/fashion-mnist). ``--tiny`` runs every part at toy
sizes (one unit per stage, 32-pixel images, 512 training images, one
epoch whatever --minutes says), on any device, for the tests.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import benchmark, cli, fashion_mnist, files, steps
from experiments import study_report
from experiments.provenance import markdown_header, provenance
from se_jax.models import capture_gates, create

__all__ = ["main"]

STUDY_MODELS = (("cifar_resnet20", "cifar_se_resnet20"),
                ("cifar_resnet110", "cifar_se_resnet110"))
# The CIFAR recipe of the ResNet papers (experiments/configs/common.py).
RECIPE = dict(learning_rate=0.1, momentum=0.9, nesterov=False,
              weight_decay=1e-4, schedule="step", decay_fractions=(0.5, 0.75),
              decay_factor=0.1, warmup_epochs=0.0)
BATCH = 128
PAD = 2
TARGET_SE_OVERHEAD = 1.03


class _Clock:
  """Minutes left of the run's budget."""

  def __init__(self, minutes: float):
    self.end = time.perf_counter() + 60 * minutes

  def left(self) -> float:
    return self.end - time.perf_counter()


def device_description() -> dict:
  """The accelerator, its driver and the versions of what runs on it."""
  device = jax.devices()[0]
  out = {"platform": device.platform, "device_kind": device.device_kind,
         "device_count": jax.device_count(), "jax": jax.__version__,
         "python": platform.python_version()}
  try:
    import flax
    out["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
         "--format=csv,noheader"], capture_output=True, text=True,
        timeout=30)
    if smi.returncode == 0 and smi.stdout.strip():
      name, driver, memory = [v.strip() for v in
                              smi.stdout.splitlines()[0].split(",")]
      out.update(gpu=name, driver=driver, gpu_memory=memory)
  except (OSError, subprocess.SubprocessError):
    pass
  try:
    import timm
    import torch
    out.update(torch=torch.__version__, timm=timm.__version__,
               cuda_available=bool(torch.cuda.is_available()))
  except ImportError:
    pass
  return out


# ------------------------------------------------------------------ benchmark


def _compiled_torch(model):
  """``torch.compile`` of `model`, or None where it fails here."""
  import torch
  try:
    compiled = torch.compile(model)
  except Exception as e:  # torch.compile's failures have no common type.
    print(f"[accelerator] torch.compile unavailable: {e}", file=sys.stderr)
    return None
  return compiled


def run_benchmark(cfg: dict, clock: _Clock, budget_s: float) -> dict:
  """The bfloat16 benchmark: se_jax against timm, SE against plain."""
  t0 = time.perf_counter()
  out = {"train": None, "inference": [], "skipped": []}
  dtype = jnp.bfloat16
  names = (("resnet50", "resnet50"), ("se_resnet50", "seresnet50"))
  torch_ok = cfg["torch"]

  units = cfg["units"]
  ours_options = {} if units is None else {"stage_sizes": units}
  theirs_options = {} if units is None else {"layers": list(units)}

  def timm_model(theirs):
    import timm
    return timm.create_model(theirs, pretrained=False, **theirs_options)

  def torch_fns(make, label_suffix=""):
    fns = {}
    if not torch_ok:
      return fns
    for ours, theirs in names:
      fns[f"timm {ours} CL{label_suffix}"] = make(timm_model(theirs))
    return fns

  # Training step.
  b, size = cfg["train_batch"], cfg["size"]
  fns, compile_s = {}, {}
  for ours, _ in names:
    fns[f"se_jax {ours}"], compile_s[ours], _ = benchmark.jax_train_step(
        ours, b, size, 1000, dtype, **ours_options)
  fns.update(torch_fns(lambda m: benchmark.torch_train_step(
      m, b, size, 1000, True, True)))
  if torch_ok and cfg["torch_compile"]:
    for ours, theirs in names:
      model = _compiled_torch(timm_model(theirs))
      if model is not None:
        fns[f"timm {ours} CL compiled"] = benchmark.torch_train_step(
            model, b, size, 1000, True, True)
  fns = _warm(fns, out["skipped"])
  times = benchmark.time_alternating(fns, cfg["repeats"], warmup=1)
  out["train"] = {"batch": b, "times": times, "compile_s": compile_s}
  print(f"[accelerator] training step at batch {b} done"
        f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

  for b in cfg["inference_batches"]:
    if not cfg["tiny"] and (time.perf_counter() - t0 > budget_s
                            or clock.left() < 60):
      out["skipped"].append(f"inference at batch {b}: out of time")
      continue
    fns, compile_s = {}, {}
    for ours, _ in names:
      fns[f"se_jax {ours}"], compile_s[ours], _ = benchmark.jax_inference(
          ours, b, size, dtype, **ours_options)
    fns.update(torch_fns(lambda m: benchmark.torch_inference(
        m, b, size, True, True)))
    if torch_ok and cfg["torch_compile"]:
      for ours, theirs in names:
        model = _compiled_torch(timm_model(theirs))
        if model is not None:
          fns[f"timm {ours} CL compiled"] = benchmark.torch_inference(
              model, b, size, True, True)
    fns = _warm(fns, out["skipped"])
    times = benchmark.time_alternating(fns, cfg["repeats"], warmup=1)
    out["inference"].append({"batch": b, "times": times,
                             "compile_s": compile_s})
    print(f"[accelerator] inference at batch {b} done", file=sys.stderr,
          flush=True)
  out["seconds"] = time.perf_counter() - t0
  return out


def _warm(fns: dict, skipped: list) -> dict:
  """The programs that run once; those that fail are skipped, named."""
  ok = {}
  for k, f in fns.items():
    try:
      f()
    except Exception as e:  # A compiled PyTorch program may fail to run.
      skipped.append(f"{k}: {type(e).__name__}: {str(e)[:200]}")
      continue
    ok[k] = f
  return ok


def benchmark_checks(bench: dict) -> list[dict]:
  """SE / plain and se_jax / best PyTorch, against the issue's targets."""
  checks = []
  rows = ([("training step", bench["train"])] if bench["train"] else []) + [
      ("inference", r) for r in bench["inference"]]
  for what, row in rows:
    t = row["times"]
    where = f"{what}, batch {row['batch']}"
    if "se_jax se_resnet50" in t and "se_jax resnet50" in t:
      v = t["se_jax se_resnet50"]["median_s"] / t["se_jax resnet50"][
          "median_s"]
      checks.append(dict(what="SE / plain time", where=where, value=v,
                         limit=TARGET_SE_OVERHEAD, met=v <= TARGET_SE_OVERHEAD,
                         direction="max"))
    torch_rows = [k for k in t if k.startswith("timm se_resnet50")]
    if torch_rows and "se_jax se_resnet50" in t:
      best = min(t[k]["median_s"] for k in torch_rows)
      v = best / t["se_jax se_resnet50"]["median_s"]
      checks.append(dict(what="SE-ResNet-50 speed, se_jax / best PyTorch",
                         where=where, value=v, limit=1.0, met=v >= 1.0,
                         direction="min"))
  return checks


# ------------------------------------------------------------------ study


def load_data(directory: str, tiny: bool):
  """Fashion-MNIST on the device: uint8 images and int32 labels."""
  out = {}
  for split in ("train", "test"):
    images, labels = fashion_mnist.load_arrays(directory, split)
    if tiny:
      n = 512 if split == "train" else 256
      images, labels = images[:n], labels[:n]
    out[split] = (jax.device_put(images), jax.device_put(
        labels.astype(np.int32)))
  return out


def _normalise(images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) / 255.0
  return (x - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]


def _augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """The recipe's 2-pixel zero pad and random crop, per image."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * PAD + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def learning_rate(step: int, total: int) -> float:
  """The CIFAR recipe's learning rate at `step` of `total` steps."""
  lr = RECIPE["learning_rate"]
  for f in RECIPE["decay_fractions"]:
    if step >= int(round(f * total)):
      lr *= RECIPE["decay_factor"]
  return lr


class Trainer(NamedTuple):
  """One network's compiled programs, for any number of epochs and seeds.

  The learning rate lives in the optimizer state and is set from the host,
  so one compiled step serves every schedule length.
  """

  step: Callable
  evaluate: Callable
  init: Callable
  graphdef: Any


def make_trainer(name: str, steps_per_epoch: int, stage_sizes=None):
  """The jitted training step (batch drawn and augmented on the device, the
  shared `experiments.steps` step) and the jitted evaluation of `name`."""
  options = {} if stage_sizes is None else {"stage_sizes": stage_sizes}
  tx = optax.chain(
      optax.add_decayed_weights(RECIPE["weight_decay"],
                                mask=steps._decay_mask),
      optax.inject_hyperparams(optax.sgd)(
          learning_rate=RECIPE["learning_rate"], momentum=RECIPE["momentum"]))
  build = lambda seed: create(name, num_classes=10, in_channels=1,
                              dtype=jnp.bfloat16, rngs=nnx.Rngs(seed),
                              **options)
  model = build(0)
  graphdef = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
  train_step = steps.make_train_step(
      graphdef, tx, lambda count: jnp.zeros((), jnp.float32),
      num_classes=10)
  eval_graphdef = nnx.split(nnx.view(model, use_running_average=True),
                            nnx.Param, nnx.BatchStat)[0]

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, lr, images, labels, order, key):
    state["opt_state"][1].hyperparams["learning_rate"] = lr
    i = state["step"] % steps_per_epoch
    idx = jax.lax.dynamic_slice(order, (i * BATCH,), (BATCH,))
    x = _normalise(_augment(key, images[idx]))
    return train_step(state, {"image": x, "label": labels[idx]})

  @jax.jit
  def evaluate(state, images, labels):
    m = nnx.merge(eval_graphdef, state["params"], state["batch_stats"])
    logits = m(_normalise(images))
    return jnp.sum(jnp.argmax(logits, -1) != labels)

  def init(seed: int):
    _, p, s = nnx.split(build(seed), nnx.Param, nnx.BatchStat)
    return steps.init_state(p, s, tx, seed)

  return Trainer(step, evaluate, init, graphdef)


def _test_error(evaluate, state, test, batch: int = 1000) -> float:
  images, labels = test
  wrong = sum(int(evaluate(state, images[i:i + batch], labels[i:i + batch]))
              for i in range(0, len(labels), batch))
  return 100.0 * wrong / len(labels)


def train_one(trainer: Trainer, name: str, seed: int, data_, epochs: int):
  """Trains `name` with `seed` for `epochs`; its curve, error and state."""
  train_images, train_labels = data_["train"]
  spe = len(train_labels) // BATCH
  state = trainer.init(seed)
  key = jax.random.key(seed)
  total = spe * epochs
  curve, losses, t0 = [], [], time.perf_counter()
  for epoch in range(epochs):
    key, k_perm = jax.random.split(key)
    order = jax.random.permutation(k_perm, len(train_labels))
    for i in range(spe):
      key, k = jax.random.split(key)
      lr = jnp.float32(learning_rate(epoch * spe + i, total))
      state, metrics = trainer.step(state, lr, train_images, train_labels,
                                    order, k)
    losses.append(float(metrics["loss"]))
    curve.append(_test_error(trainer.evaluate, state, data_["test"]))
  return {"name": name, "seed": seed, "epochs": list(range(1, epochs + 1)),
          "errors": curve, "losses": losses, "top1_err": curve[-1],
          "train_seconds": time.perf_counter() - t0}, state


def _step_seconds(trainer: Trainer, data_, repeats=5) -> tuple[float, float]:
  """(compile seconds, seconds per training step) of a trainer."""
  train_images, train_labels = data_["train"]
  t0 = time.perf_counter()
  state = trainer.init(0)
  order = jnp.arange(len(train_labels))
  key, lr = jax.random.key(0), jnp.float32(RECIPE["learning_rate"])
  state, m = trainer.step(state, lr, train_images, train_labels, order, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  for _ in range(repeats):
    state, m = trainer.step(state, lr, train_images, train_labels, order,
                            key)
  jax.block_until_ready(m)
  return compile_s, (time.perf_counter() - t1) / repeats


def plan_study(data_, clock: _Clock, seeds: int, stage_sizes,
               reserve_s: float, at_least_one: bool = False) -> dict:
  """How many epochs fit: each network's step time, measured, times the
  steps of every seed, in the time left after `reserve_s`. Returns the plan
  and the compiled trainers, which the study reuses. With `at_least_one`,
  every network trains one epoch whatever the time left (``--tiny``)."""
  spe = len(data_["train"][1]) // BATCH
  per_epoch, compile_s, models, trainers = {}, {}, [], {}
  for pair in STUDY_MODELS:
    for name in pair:
      if clock.left() < reserve_s + 30 and not at_least_one:
        break
      trainers[name] = make_trainer(name, spe, stage_sizes)
      c, s = _step_seconds(trainers[name], data_)
      compile_s[name], per_epoch[name] = c, s * spe * 1.1
    if all(n in per_epoch for n in pair):
      models.append(pair)
  budget = clock.left() - reserve_s
  epochs = 0
  while models:
    cost = sum(per_epoch[n] for pair in models for n in pair) * seeds
    epochs = int(budget // cost) if cost > 0 else 0
    if epochs >= 1 or at_least_one:
      epochs = max(epochs, 1)
      break
    models = models[:-1]  # Drop the deepest pair before dropping seeds.
  plan = {"models": models, "epochs": min(max(epochs, 0), 200),
          "seconds_per_epoch": per_epoch, "compile_s": compile_s,
          "steps_per_epoch": spe, "budget_s": budget}
  return plan, trainers


def run_study(data_, plan: dict, trainers: dict, seeds: int) -> dict:
  runs, gates_by_model = [], {}
  test_images, test_labels = data_["test"]
  for baseline, model in plan["models"]:
    for name in (baseline, model):
      for seed in range(seeds):
        print(f"[accelerator] training {name}, seed {seed},"
              f" {plan['epochs']} epochs", file=sys.stderr, flush=True)
        run, state = train_one(trainers[name], name, seed, data_,
                               plan["epochs"])
        runs.append(run)
        if name == model:
          m = nnx.merge(trainers[name].graphdef, state["params"],
                        state["batch_stats"])
          gates = {}
          for i in range(0, len(test_labels), 1000):
            x = _normalise(test_images[i:i + 1000])
            for b, g in capture_gates(m, x).items():
              gates.setdefault(b, []).append(np.asarray(g, np.float32))
          gates_by_model.setdefault(name, {})[seed] = {
              b: np.concatenate(v) for b, v in gates.items()}
  return {"runs": runs, "gates": gates_by_model}


def analyse_study(study: dict, plan: dict, labels: np.ndarray,
                  out_dir: str) -> dict:
  """The CPU study's report code on the GPU runs."""
  runs = [{"model": r["name"], "seed": r["seed"], "top1_err": r["top1_err"]}
          for r in study["runs"]]
  out = {"comparisons": {}, "stability": {}, "figures": []}
  for baseline, model in plan["models"]:
    c = study_report.compare(runs, baseline, model)
    out["comparisons"][model] = dict(
        comparison=c, verdict=study_report.verdict(c, baseline, model))
    per_seed = {s: study_report.block_measures(g, labels)
                for s, g in study["gates"].get(model, {}).items()}
    out["stability"][model] = study_report.stability(per_seed)
  series = []
  names = [n for pair in plan["models"] for n in pair]
  for r in study["runs"]:
    series.append(dict(label=r["name"] if r["seed"] == 0 else None,
                       color=f"C{names.index(r['name'])}",
                       epochs=r["epochs"], errors=r["errors"]))
  if series:
    study_report.plot_curves(os.path.join(out_dir, "curves.png"), series,
                             "Fashion-MNIST, CIFAR recipe, every seed")
    out["figures"].append("curves.png")
  deepest = plan["models"][-1][1] if plan["models"] else None
  if deepest and study["gates"].get(deepest):
    gates = study["gates"][deepest][0]
    overall = {b: g.mean(0) for b, g in gates.items()}
    out["figures"] += study_report.draw_figures(
        gates, labels, overall, fashion_mnist.CLASSES, out_dir,
        f"{deepest}, seed 0, Fashion-MNIST")
  return out


# ------------------------------------------------------------------ report


def to_markdown(result: dict, prov: dict) -> str:
  dev = result["device"]
  out = [markdown_header("se_jax on an accelerator", prov), ""]
  out.append(
      f"Device: {dev.get('gpu', dev['device_kind'])} ({dev['platform']}),"
      f" driver {dev.get('driver', '-')}, jax {dev['jax']}, torch"
      f" {dev.get('torch', '-')}, timm {dev.get('timm', '-')}. Budget"
      f" {result['minutes']:g} minutes, used {result['seconds']:.0f} s."
      + (" Toy sizes (--tiny)." if result["tiny"] else "") + "\n")
  bench = result.get("benchmark")
  if bench:
    out.append("## Benchmark, bfloat16 (parameters float32)\n")
    out.append("| target | where | measured | limit | met |\n"
               "|---|---|---|---|---|")
    for c in result["benchmark_checks"]:
      sign = "<=" if c["direction"] == "max" else ">="
      out.append(f"| {c['what']} | {c['where']} | {c['value']:.3f} |"
                 f" {sign} {c['limit']} | {'yes' if c['met'] else 'no'} |")
    rows = ([("Training step", bench["train"])] if bench["train"] else []) \
        + [("Inference", r) for r in bench["inference"]]
    for what, row in rows:
      out.append(f"\n{what}, batch {row['batch']}:\n")
      out.extend(benchmark._times_table(row["times"], row["batch"],
                                        "se_jax se_resnet50"))
    if bench["skipped"]:
      out.append("\nNot measured: " + "; ".join(bench["skipped"]) + ".")
    out.append("")
  plan = result.get("plan")
  analysis = result.get("analysis")
  if plan and analysis:
    out.append(
        f"## Fashion-MNIST at GPU scale: {plan['epochs']} epochs, CIFAR"
        f" recipe, {result['seeds']} seeds\n")
    out.append(
        "Sized from the measured step times (seconds per epoch: " + ", ".join(
            f"{k} {v:.1f}" for k, v in plan["seconds_per_epoch"].items())
        + ").\n")
    for model, c in analysis["comparisons"].items():
      out.append(f"- {c['verdict']}")
    out.append("")
    for model, stab in analysis["stability"].items():
      shown = study_report.selected_blocks(list(stab)) if stab else []
      if not shown:
        continue
      out.append(f"Gates of `{model}` over the seeds (mean +- std),"
                 " selected blocks:\n")
      out.append("| block | " + " | ".join(
          h for _, h in study_report.MEASURES) + " | seed agreement |\n|---|"
                 + "---|" * (len(study_report.MEASURES) + 1))
      for b in shown:
        row = stab[b]
        sim = row["cross_seed_similarity"]
        out.append(f"| {b} | " + " | ".join(
            f"{row[k][0]:.3f} +- {row[k][1]:.3f}"
            for k, _ in study_report.MEASURES)
            + (f" | {sim:.2f} |" if sim is not None else " | - |"))
      out.append("")
    for fig in analysis["figures"]:
      out.append(f"![{fig}]({fig})\n")
  for note in result.get("notes", []):
    out.append(f"- {note}")
  return "\n".join(out) + "\n"


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  return obj


def _write(out_dir: str, result: dict, prov: dict) -> None:
  files.write_json(os.path.join(out_dir, "accelerator.json"),
                   _jsonable({"provenance": prov, **result}))
  files.write_atomic(os.path.join(out_dir, "accelerator.md"),
                     to_markdown(result, prov))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="where the files are written")
  p.add_argument("--minutes", type=cli.positive, default=9.0)
  p.add_argument("--data-dir", default=fashion_mnist.FASHION_MNIST_DIR)
  p.add_argument("--seeds", type=cli.at_least(2), default=3,
                 help="seeds of each network (at least 2, for the intervals)")
  p.add_argument("--tiny", action="store_true",
                 help="toy sizes on any device: checks the run end to end")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  clock = _Clock(args.minutes)
  t0 = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  prov = provenance()
  torch_ok = not args.no_torch
  if torch_ok:
    try:
      import timm  # noqa: F401
      import torch  # noqa: F401
    except ImportError:
      torch_ok = False
  cfg = dict(torch=torch_ok, repeats=2 if args.tiny else 10,
             torch_compile=not args.tiny, tiny=args.tiny,
             units=(1, 1, 1, 1) if args.tiny else None,
             train_batch=2 if args.tiny else 256, size=32 if args.tiny else 224,
             inference_batches=(1, 2) if args.tiny else (1, 32, 256))
  result = {"device": device_description(), "minutes": args.minutes,
            "tiny": args.tiny, "seeds": args.seeds, "notes": []}
  stage_sizes = (1, 1, 1) if args.tiny else None

  data_ = load_data(args.data_dir, args.tiny)
  # The study needs the larger share of the budget.
  bench_budget = 0.35 * clock.left()
  result["benchmark"] = run_benchmark(cfg, clock, bench_budget)
  result["benchmark_checks"] = benchmark_checks(result["benchmark"])
  result["seconds"] = time.perf_counter() - t0
  _write(args.out, result, prov)

  reserve = 20 if args.tiny else 60  # analysis and writing
  plan, trainers = plan_study(data_, clock, args.seeds, stage_sizes, reserve,
                              at_least_one=args.tiny)
  result["plan"] = plan
  if not plan["models"] or plan["epochs"] < 1:
    result["notes"].append(
        "The study did not fit in the time left after the benchmark.")
  else:
    study = run_study(data_, plan, trainers, args.seeds)
    labels = np.asarray(data_["test"][1])
    result["study"] = {"runs": study["runs"]}
    result["analysis"] = analyse_study(study, plan, labels, args.out)
  result["seconds"] = time.perf_counter() - t0
  _write(args.out, result, prov)
  print(to_markdown(result, prov))
  return result


if __name__ == "__main__":
  cli.main_guard(main)()
