"""Speed and memory of se_jax: what a user gets, SE against the plain
network, and se_jax against PyTorch.

  python -m experiments.benchmark [--sections inference,train,cifar,...]
      [--repeats 9] [--quick] [--update-readme]

Every comparison is measured side by side in one run: the timed calls of the
compared programs alternate, each after its warm-up and compilation, and
the report gives medians, the ratios of calls made in the same repeat, and
a 95% interval for each ratio that decides whether a target is met.
Compilation is timed separately, with JAX's persistent cache off. se_jax's
programs are what a user writes: a plain ``jax.jit`` with no compiler
option, of the model (inference), of the training step that the trainer
runs (`experiments.steps.make_train_step`) and of the README's functional
path.
Other configurations are chosen by explicit arguments: the model options
``conv_impl``, ``fold_norm`` and ``materialize``, and XLA's convolution option
(`XLA_CONV_OPTION`). On CPUs where `se_jax.onednn` is built, se_jax's
convolutions run on oneDNN's kernels by default, and the sections below
also time se_jax's XLA formulation of them (``conv_impl="formulated"``).
Sections:

- ``inference``: ResNet-50 and SE-ResNet-50 at batch 1, 8 and 32 (224 x 224),
  against timm's resnet50 / seresnet50; on CPUs also SE-ResNet-50 under
  `XLA_CONV_OPTION`, with se_jax's convolutions and with XLA's, and with
  se_jax's XLA formulation.
- ``train``: one training step of the same networks at batch 8.
- ``cifar``: the training step of CIFAR ResNet-20 / ResNet-110 with and
  without SE at batch 128, against the same networks written in PyTorch
  here, with the achieved GFLOP/s against the machine's measured matrix
  product rate.
- ``se_block``: `se_jax.squeeze_excite` alone on the feature maps of each
  ResNet-50 stage, against the time of the passes over memory it must make
  (a reduction and a scaling of the same map), measured in the same run.
- ``memory``: XLA's peak memory of a training step, SE against plain.
- ``kernels``: the convolutions of the CIFAR ResNets alone (forward, input
  gradient, kernel gradient): se_jax's `conv2d` (and its XLA formulation),
  XLA's convolution in its default pipeline and with `XLA_CONV_OPTION`, and
  PyTorch.
- ``inference_convs``: the convolutions of ResNet-50 alone in inference, at
  the inference batches: se_jax's `conv2d` without options against XLA's
  convolution with `XLA_CONV_OPTION` (the inference section's fastest other
  configuration), the strided 3x3 ones also as XLA's convolution without
  options (on YNNPACK), and those wider than 1x1 also in se_jax's XLA
  formulation.
- ``tuning``: what se_jax's measures buy: the CIFAR SE-ResNet-20 step with
  XLA's convolution option, with se_jax's XLA formulation of the
  convolutions, with XLA's convolutions (``conv_impl="xla"``),
  with them and that option, and with the last BN apart from SE
  (``fold_norm=False``); the deepest CIFAR SE-ResNet's step with the last
  BN apart and with the units' outputs recomputed (``materialize=False``).

On a CPU the programs run in float32; on a GPU in bfloat16 (se_jax's
``dtype=bfloat16``; timm in channels_last under autocast). The report,
experiments/results/benchmark.md and .json, states the machine, versions,
date and commit, and checks the targets of the performance issue;
``--update-readme`` writes its summary into README.md's performance
section. Each finished section is saved to OUT_DIR/benchmark.partial.json;
a run that stops (a crash, an interruption) continues from it when started
again on the same commit, configuration and machine (``--fresh`` measures
everything again).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import se_jax
from experiments import allocator, cli, files, steps
from experiments.provenance import markdown_header, provenance
from se_jax import onednn
from se_jax.attention.se import SqueezeExcite
from se_jax.conv import conv2d
from se_jax.models import create
from se_jax.models.resnet import squeezes_through_conv3

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
SECTIONS = ("inference", "train", "cifar", "overhead", "se_block", "memory",
            "kernels", "inference_convs", "tuning", "allocator")
# How many more repeats the overhead section makes than the others.
OVERHEAD_REPEATS_FACTOR = 3

# XLA:CPU's option that keeps convolutions off YNNPACK (jaxlib 0.10): what a
# user would have to pass to make XLA's own convolutions fast. Measured as
# the alternative to se_jax's formulations, never used by default.
XLA_CONV_OPTION = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# The `inference_convs` program of XLA's convolution without options.
CONV_NO_OPTION = "XLA, no option"

# XLA:CPU's options that name oneDNN (jaxlib 0.10), with the option that
# keeps convolutions off YNNPACK: measured as the route to oneDNN's
# convolutions, the kernels PyTorch uses on CPUs.
# Matrix products go to oneDNN one by one: with convolutions alone named,
# XLA (jaxlib 0.10.2) still gives oneDNN fusions of a matrix product with the
# elementwise operation that produces its operand (SE's mean before its
# first FC layer), whose oneDNN partition fails to compile, and the process
# ends by SIGILL when it runs.
XLA_ONEDNN_OPTIONS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    **XLA_CONV_OPTION}
# The tuning section's name for the step under those options.
ONEDNN_VARIANT = "conv_impl='xla' + XLA's oneDNN options"
# The tuning section's name for se_jax's own step under XLA_CONV_OPTION.
OPTION_VARIANT = "default + XLA conv option"
# The inference section's SE-ResNet-50 under XLA_CONV_OPTION: se_jax's own
# convolutions, and XLA's.
INFERENCE_OPTION = "se_jax se_resnet50, se_jax conv + option"
INFERENCE_XLA_OPTION = "se_jax se_resnet50, XLA conv + option"
# The inference section's SE-ResNet-50 with se_jax's XLA formulation of the
# convolutions (``conv_impl="formulated"``), where oneDNN's handlers run by
# default.
INFERENCE_FORMULATED = "se_jax se_resnet50, formulated conv"
# The tuning section's name for the step with that formulation.
FORMULATED_VARIANT = "conv_impl='formulated'"
# SE-ResNet-50's excitations alone (`se_excitations`), timed in the
# inference section's rounds.
EXCITATIONS = "se_jax se_resnet50, SE excitations alone"


def onednn_ops(compiled) -> int:
  """Instructions of a compiled XLA:CPU program that call oneDNN."""
  return sum(1 for line in compiled.as_text().splitlines()
             if "onednn" in line.lower() and "=" in line)


# Targets of the performance issue, as (what, limit, direction).
TARGETS = {
    "default_within_fastest_train": (
        "Training step, default path / fastest other se_jax configuration",
        1.05, "max"),
    "default_within_fastest_inference": (
        "Inference, default path / fastest other se_jax configuration",
        1.05, "max"),
    "se_overhead_inference": ("SE overhead, inference (SE / plain time)",
                              1.02, "max"),
    "se_overhead_train": ("SE overhead, training step (SE / plain time)",
                          1.05, "max"),
    "speed_vs_timm_inference": (
        "SE-ResNet-50 inference speed, se_jax / timm channels_last", 1.1,
        "min"),
    "speed_vs_torch_cifar": (
        "CIFAR SE-ResNet training speed, se_jax / PyTorch channels_last",
        1.0, "min"),
    "memory_se_over_plain": ("Peak training memory, SE / plain", 1.05,
                             "max"),
    "peak_fraction_cifar": (
        "CIFAR SE-ResNet training step, share of the matrix product rate",
        0.5, "min"),
}
GPU_SE_OVERHEAD_TARGET = 1.03


# ------------------------------------------------------------------ timing


# Pause before each timed call. A runtime's worker threads keep spinning for
# a moment after its call returns (PyTorch's OpenMP team, XLA's Eigen pool);
# on two cores a call that starts meanwhile runs markedly slower, which
# alternating se_jax with PyTorch would charge to whichever comes second.
SETTLE_S = 0.25


def runtime(name: str) -> str:
  """Which runtime a timed program's label names: ``torch`` for PyTorch
  and timm, ``jax`` otherwise."""
  return "torch" if name.split(" ", 1)[0] in ("PyTorch", "timm") else "jax"


def call_order(names: list[str], r: int) -> list[str]:
  """The order of the calls in repeat `r`: each runtime's programs
  together, the runtimes' order reversing on every other repeat and each
  runtime's programs rotating by one per repeat."""
  groups: dict[str, list[str]] = {}
  for n in names:
    groups.setdefault(runtime(n), []).append(n)
  lists = [g[r % len(g):] + g[:r % len(g)] for g in groups.values()]
  return [n for g in (lists if r % 2 == 0 else lists[::-1]) for n in g]


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 2,
                     settle_s: float = SETTLE_S) -> dict[str, dict]:
  """Median seconds per call of each function, their calls alternating.

  Each repeat runs every function once, in the order of `call_order`.
  On the two-core machine of the committed report an se_jax call right
  after a PyTorch call took a fifth to a third longer than one right after
  an se_jax call, so each runtime's programs run together and take turns
  at following the other runtime, and the ratio of two programs is the
  median over the repeats (`paired_ratio`), which the few calls that
  follow the other runtime do not move.
  Each timed call starts `settle_s` after the previous one ended, when the
  previous runtime's threads have gone idle.
  """
  for f in fns.values():
    for _ in range(warmup):
      f()
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(repeats):
    for k in call_order(names, r):
      if settle_s:
        time.sleep(settle_s)
      t0 = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t0)
  return {k: _summary(v) for k, v in times.items()}


def _summary(times: list[float]) -> dict:
  """Median, extremes, count and the timed calls themselves (in the order
  they ran) of a program, in seconds."""
  return {"median_s": statistics.median(times), "min_s": min(times),
          "max_s": max(times), "n": len(times), "times_s": list(times)}


# Confidence of the intervals given for medians and ratios.
CONFIDENCE = 0.95


def median_interval(values, confidence: float = CONFIDENCE):
  """A distribution-free interval for the median of what `values` sample:
  the k-th smallest and k-th largest value, k the largest rank whose
  binomial tail (n draws, one half) stays within (1 - confidence) / 2;
  its coverage is at least `confidence`. None when too few values give one
  (fewer than 6 at 95%)."""
  xs = sorted(values)
  n, tail, k = len(xs), 0.0, 0
  while k < n:
    p = math.comb(n, k) / 2 ** n
    if tail + p > (1 - confidence) / 2:
      break
    tail += p
    k += 1
  if k == 0 or k > n - k:
    return None
  return xs[k - 1], xs[n - k]


def paired_ratio(times: dict, a: str, b: str) -> dict:
  """The time of program `a` over that of `b`: the median of the ratios of
  their calls in the same repeat (adjacent calls, which drift in the
  machine's speed hits alike) with its interval; the ratio of the medians,
  without interval, where the calls were not kept."""
  ta, tb = times[a].get("times_s"), times[b].get("times_s")
  if not ta or not tb or len(ta) != len(tb):
    return {"value": _ratio(times, a, b), "interval": None}
  ratios = [x / y for x, y in zip(ta, tb)]
  return {"value": statistics.median(ratios),
          "interval": median_interval(ratios)}


class _Compiled:
  """A jitted function, compiled once (with `options` if given), timed."""

  def __init__(self, fn, *args, options=None, donate=()):
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    self.compiled = lowered.compile(compiler_options=options or {})
    self.compile_s = time.perf_counter() - t0

  def __call__(self, *args):
    return self.compiled(*args)


# The timed matrix product's label and size: the machine's practical peak
# for dense arithmetic, timed in the CIFAR rounds beside the steps.
MATMUL = "XLA matmul"
MATMUL_N = 2048


def matmul_call(n: int = MATMUL_N, dtype=jnp.float32):
  """A call of a large matrix product in XLA (`n` x `n`, compiled) and its
  FLOPs."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return (lambda: f(a).block_until_ready()), 2 * n ** 3


def matmul_rate(row: dict) -> float | None:
  """FLOP/s of the matrix product timed in a CIFAR round (`row`), by the
  median of its calls."""
  t = row.get("matmul")
  return row["matmul_flops"] / t["median_s"] if t else None


def training_flops(name: str, batch: int, size: int, num_classes: int,
                   channels: int = 3) -> float:
  """FLOPs of one training step: 2 per multiply-add, three times the
  forward pass's (forward, input gradient, kernel gradient), padding taps
  included as the kernels compute them."""
  model = nnx.eval_shape(lambda: create(name, num_classes=num_classes,
                                        in_channels=channels))
  return 6.0 * batch * se_jax.count_flops(model, (size, size, channels))


# ------------------------------------------------------------------ se_jax


def _jax_images(batch, size, channels=3, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), (batch, size, size, channels),
                           dtype)


_INFERENCES: dict[tuple, tuple] = {}


def jax_inference(name: str, batch: int, size: int, dtype, options=None,
                  **model_options):
  """A zero-argument callable running `name` in eval mode under a plain
  jit, its compile time and the compiled program. Each program is compiled
  once per run of the benchmark."""
  key = (name, batch, size, dtype, tuple(sorted((options or {}).items())),
         tuple(sorted(model_options.items())))
  if key not in _INFERENCES:
    _INFERENCES[key] = _build_inference(name, batch, size, dtype, options,
                                        model_options)
  return _INFERENCES[key]


def _build_inference(name, batch, size, dtype, options, model_options):
  model = create(name, dtype=dtype, **model_options)
  model.eval()
  graphdef, state = nnx.split(model)
  x = _jax_images(batch, size, dtype=dtype or jnp.float32)
  f = _Compiled(lambda s, x: nnx.merge(graphdef, s)(x), state, x,
                options=options)
  return (lambda: f(state, x).block_until_ready()), f.compile_s, f



def se_excitations(name: str, batch: int, dtype=None):
  """A call running the excitations of every SE block of `name`: each
  block's FC layers and gate on an (N, C) vector of descriptors, one block
  after another as in the network (each block's descriptors depend on the
  previous block's gates), compiled; with the count of SE blocks and the
  bytes of their FC layers' parameters, which every pass reads."""
  model = create(name, dtype=dtype)
  blocks = [m for _, m in nnx.iter_graph(model)
            if isinstance(m, SqueezeExcite)]
  if not blocks:
    raise ValueError(f"{name} has no SE blocks")
  params = [b.params for b in blocks]
  keys = jax.random.split(jax.random.key(2), len(blocks))
  zs = [jax.random.normal(k, (batch, b.w1.shape[0]), jnp.float32)
        for k, b in zip(keys, blocks)]

  def run(params, zs):
    gates = None
    for p, z in zip(params, zs):
      if gates is not None:
        z = z + gates[:, :1]
      gates = se_jax.excite(p, z)
    return gates

  f = _Compiled(run, params, zs)
  nbytes = sum(x.nbytes for p in params for x in p if x is not None)
  return (lambda: f(params, zs).block_until_ready()), len(blocks), nbytes


# The CIFAR recipe's optimizer (experiments/configs/common.py, base_config).
_RECIPE = dict(learning_rate=0.1, momentum=0.9, nesterov=False,
               weight_decay=1e-4, schedule="step", decay_fractions=(0.5, 0.75),
               decay_factor=0.1, warmup_epochs=0.0)
_TRAIN_STEPS: dict[tuple, tuple] = {}


def jax_train_step(name: str, batch: int, size: int, num_classes: int, dtype,
                   options=None, **model_options):
  """A zero-argument callable running the trainer's training step of
  `name` in place, its compile time and the compiled program.

  The step is `experiments.steps.make_train_step`, jitted as the trainer
  jits it (the state donated), with the CIFAR recipe's optimizer. Each
  program is compiled once per run of the benchmark.
  """
  key = (name, batch, size, num_classes, dtype,
         tuple(sorted((options or {}).items())),
         tuple(sorted(model_options.items())))
  if key not in _TRAIN_STEPS:
    _TRAIN_STEPS[key] = _build_train_step(name, batch, size, num_classes,
                                          dtype, options, model_options)
  return _TRAIN_STEPS[key]


def _build_train_step(name, batch, size, num_classes, dtype, options,
                      model_options):
  import types
  recipe = types.SimpleNamespace(**_RECIPE)
  model = create(name, num_classes=num_classes, dtype=dtype, **model_options)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  schedule = steps.make_schedule(recipe, 100, 1000)
  tx = steps.make_optimizer(recipe, schedule)
  step = steps.make_train_step(graphdef, tx, schedule,
                               num_classes=num_classes)
  batch_data = {"image": _jax_images(batch, size, dtype=jnp.float32),
                "label": jnp.arange(batch) % num_classes}
  state = [steps.init_state(params, stats, tx, 0)]
  f = _Compiled(step, state[0], batch_data, options=options, donate=(0,))

  def run():
    state[0], metrics = f(state[0], batch_data)
    jax.block_until_ready(metrics)

  return run, f.compile_s, f


def readme_train_step(name: str, batch: int, size: int, num_classes: int):
  """The README's functional path, as a user writes it: one ``jax.jit`` of
  the loss's gradient and a plain SGD update."""
  model = create(name, num_classes=num_classes)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def train_step(params, batch_stats, images, labels):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, batch_stats, copy=True)
      logits = m(images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), nnx.state(m, nnx.BatchStat)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, batch_stats, loss

  images = _jax_images(batch, size)
  labels = jnp.arange(batch) % num_classes
  state = [params, batch_stats]

  def run():
    state[0], state[1], loss = train_step(state[0], state[1], images, labels)
    jax.block_until_ready(loss)

  t0 = time.perf_counter()
  run()
  return run, time.perf_counter() - t0


# ------------------------------------------------------------------ PyTorch


def _torch():
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def _torch_device(torch):
  return "cuda" if jax.default_backend() == "gpu" and \
      torch.cuda.is_available() else "cpu"


def torch_cifar_resnet(depth: int, se: bool, num_classes: int = 10):
  """The CIFAR ResNet of He et al. (6n+2 layers), +/- SE, in PyTorch.

  The same network as se_jax's ``cifar_(se_)resnet{depth}``: 3x3 stem with
  16 channels, basic units, a 1x1 conv + BN projection where the shape
  changes, SE after the second BN with C // 16 hidden units and biases.
  """
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional

  class SE(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.fc1 = nn.Conv2d(c, c // 16, 1)
      self.fc2 = nn.Conv2d(c // 16, c, 1)

    def forward(self, x):
      z = x.mean((2, 3), keepdim=True)
      return x * torch.sigmoid(self.fc2(F.relu(self.fc1(z))))

  class Unit(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.se = SE(cout) if se else nn.Identity()
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      h = F.relu(self.bn1(self.conv1(x)))
      h = self.se(self.bn2(self.conv2(h)))
      return F.relu(h + (x if self.proj is None else self.proj(x)))

  n = (depth - 2) // 6
  units, c = [], 16
  for i, w in enumerate((16, 32, 64)):
    for j in range(n):
      units.append(Unit(c, w, 2 if (j == 0 and i > 0) else 1))
      c = w
  return nn.Sequential(
      nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
      *units, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def _torch_inputs(torch, batch, size, channels_last, device):
  x = torch.randn(batch, 3, size, size, device=device)
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  return x


def torch_inference(model, batch, size, channels_last, bf16):
  torch = _torch()
  device = _torch_device(torch)
  model = model.to(device).eval()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  x = _torch_inputs(torch, batch, size, channels_last, device)

  def run():
    with torch.no_grad(), torch.autocast(device, torch.bfloat16,
                                         enabled=bf16):
      model(x)
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def torch_train_step(model, batch, size, num_classes, channels_last, bf16):
  torch = _torch()
  device = _torch_device(torch)
  model = model.to(device).train()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                        weight_decay=1e-4)
  x = _torch_inputs(torch, batch, size, channels_last, device)
  y = torch.arange(batch, device=device) % num_classes

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=bf16):
      loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def _timm_model(name):
  import timm
  return timm.create_model(name, pretrained=False)


# ------------------------------------------------------------------ sections


def _timm_model(name):
  import timm
  return timm.create_model(name, pretrained=False)


def section_inference(cfg) -> dict:
  rows = []
  for batch in cfg["inference_batches"]:
    fns, compile_s = {}, {}
    for name in ("resnet50", "se_resnet50"):
      fns[f"se_jax {name}"], compile_s[name], _ = jax_inference(
          name, batch, 224, cfg["dtype"])
    if not cfg["gpu"]:
      for label, impl in ((INFERENCE_OPTION, "auto"),
                          (INFERENCE_XLA_OPTION, "xla")):
        fns[label], compile_s[label], _ = jax_inference(
            "se_resnet50", batch, 224, cfg["dtype"], options=XLA_CONV_OPTION,
            conv_impl=impl)
      if cfg.get("onednn"):
        fns[INFERENCE_FORMULATED], compile_s[INFERENCE_FORMULATED], _ = (
            jax_inference("se_resnet50", batch, 224, cfg["dtype"],
                          conv_impl="formulated"))
    if cfg["torch"]:
      for timm_name, ours in (("resnet50", "resnet50"),
                              ("seresnet50", "se_resnet50")):
        for cl in cfg["torch_layouts"]:
          fns[f"timm {ours}{' CL' if cl else ''}"] = torch_inference(
              _timm_model(timm_name), batch, 224, cl, cfg["bf16"])
    fns[EXCITATIONS], blocks, nbytes = se_excitations(
        "se_resnet50", batch, cfg["dtype"])
    print(f"[inference] batch {batch}", file=sys.stderr, flush=True)
    times = time_alternating(fns, cfg["repeats"])
    rows.append({"batch": batch, "times": times, "compile_s": compile_s,
                 "excitations": {**times.pop(EXCITATIONS), "blocks": blocks,
                                 "param_bytes": nbytes}})
  return {"rows": rows}


def section_train(cfg) -> dict:
  batch = cfg["train_batch"]
  fns, compile_s = {}, {}
  for name in ("resnet50", "se_resnet50"):
    fns[f"se_jax {name}"], compile_s[name], _ = jax_train_step(
        name, batch, 224, 1000, cfg["dtype"])
  if cfg["torch"]:
    for timm_name, ours in (("resnet50", "resnet50"),
                            ("seresnet50", "se_resnet50")):
      for cl in cfg["torch_layouts"]:
        fns[f"timm {ours}{' CL' if cl else ''}"] = torch_train_step(
            _timm_model(timm_name), batch, 224, 1000, cl, cfg["bf16"])
  print(f"[train] ResNet-50 at batch {batch}", file=sys.stderr, flush=True)
  times = time_alternating(fns, cfg["repeats"])
  return {"batch": batch, "times": times, "compile_s": compile_s,
          "flops": {n: training_flops(n, batch, 224, 1000)
                    for n in ("resnet50", "se_resnet50")}}


def section_cifar(cfg) -> dict:
  rows = []
  batch = cfg["cifar_batch"]
  matmul, matmul_flops = matmul_call()
  for depth in cfg["cifar_depths"]:
    fns, compile_s, params, flops = {}, {}, {}, {}
    for se in (False, True):
      name = f"cifar_{'se_' if se else ''}resnet{depth}"
      fns[f"se_jax {name}"], compile_s[name], _ = jax_train_step(
          name, batch, 32, 10, cfg["dtype"])
      flops[name] = training_flops(name, batch, 32, 10)
      params[f"se_jax {name}"] = se_jax.count_params(
          nnx.eval_shape(lambda: create(name, num_classes=10)))
      if se and not cfg["bf16"]:
        label = f"se_jax {name}, README path"
        fns[label], compile_s[label] = readme_train_step(name, batch, 32, 10)
        if not cfg["gpu"]:
          label = f"se_jax {name}, XLA conv + option"
          fns[label], compile_s[label], _ = jax_train_step(
              name, batch, 32, 10, cfg["dtype"], options=XLA_CONV_OPTION,
              conv_impl="xla")
      if cfg["torch"]:
        net = torch_cifar_resnet(depth, se)
        params[f"PyTorch {name}"] = sum(p.numel() for p in net.parameters())
        for cl in cfg["torch_layouts"]:
          fns[f"PyTorch {name}{' CL' if cl else ''}"] = torch_train_step(
              torch_cifar_resnet(depth, se), batch, 32, 10, cl, cfg["bf16"])
    print(f"[cifar] ResNet-{depth} at batch {batch}", file=sys.stderr,
          flush=True)
    # The matrix product takes its turn in every repeat, so that the share
    # of its rate a step reaches is a ratio of adjacent calls, not of calls
    # minutes apart on a machine whose speed drifts.
    fns[MATMUL] = matmul
    times = time_alternating(fns, cfg["repeats"])
    rows.append({"depth": depth, "batch": batch, "compile_s": compile_s,
                 "params": params, "flops": flops,
                 "matmul": times.pop(MATMUL), "matmul_flops": matmul_flops,
                 "times": times})
  calls = [x for r in rows for x in r["matmul"]["times_s"]]
  return {"rows": rows, "matmul_flops_per_s":
          matmul_flops / statistics.median(calls) if calls else None}


def overhead_cases(cfg) -> list[tuple[str, str, str, int, int, int]]:
  """(kind, plain, SE, batch, image size, classes) of each SE / plain
  pair whose time ratio is a target: ResNet-50 inference and training, and
  the CIFAR ResNets' training steps."""
  cases = [("inference", "resnet50", "se_resnet50", b, 224, 1000)
           for b in cfg["inference_batches"]]
  cases.append(("train", "resnet50", "se_resnet50", cfg["train_batch"], 224,
                1000))
  cases += [("train", f"cifar_resnet{d}", f"cifar_se_resnet{d}",
             cfg["cifar_batch"], 32, 10) for d in cfg["cifar_depths"]]
  return cases


def section_overhead(cfg) -> dict:
  """SE's own cost: each SE network's program against its plain twin's,
  the two alone, their calls alternating, `cfg["overhead_repeats"]` times.
  Their ratio lies near 1, where the other sections, whose rounds run
  four to eight programs, cannot tell the targets' few percent from the
  machine's noise: the two calls of a repeat here run back to back, after
  one of the same two programs, and the repeats are more."""
  rows = []
  for kind, plain, se, batch, size, classes in overhead_cases(cfg):
    fns = {}
    for name in (plain, se):
      if kind == "inference":
        fns[f"se_jax {name}"] = jax_inference(name, batch, size,
                                              cfg["dtype"])[0]
      else:
        fns[f"se_jax {name}"] = jax_train_step(name, batch, size, classes,
                                               cfg["dtype"])[0]
    print(f"[overhead] {kind} {se} / {plain} at batch {batch}",
          file=sys.stderr, flush=True)
    rows.append({"kind": kind, "plain": plain, "se": se, "batch": batch,
                 "times": time_alternating(fns, cfg["overhead_repeats"])})
  return {"rows": rows, "repeats": cfg["overhead_repeats"]}


def overhead_where(kind: str, plain: str, batch: int) -> str:
  """The `where` of an SE-overhead check, as the sections name it."""
  if plain.startswith("cifar_resnet"):
    return f"CIFAR ResNet-{plain[len('cifar_resnet'):]}, batch {batch}"
  return f"ResNet-50, batch {batch}"


def section_se_block(cfg) -> dict:
  """The SE block alone, against the passes over memory it must make."""
  rows = []
  batch = cfg["se_batch"]
  for size, channels in ((56, 256), (28, 512), (14, 1024), (7, 2048)):
    params = se_jax.init_excite(jax.random.key(0), channels, reduction=16,
                                rounding="timm")
    x = _jax_images(batch, size, channels, cfg["dtype"] or jnp.float32)
    g = jnp.full((batch, channels), 0.5, jnp.float32)
    f = jax.jit(functools.partial(se_jax.squeeze_excite, params))
    # Whatever it does, the block reads its input map and writes its
    # output map: the scaling pass is that one read and one write, the
    # least memory traffic of any SE block. The pooling pass is the extra
    # read, which caches may serve when the map fits in them.
    pool = jax.jit(lambda x: jnp.mean(x, axis=(1, 2), dtype=jnp.float32))
    scale = jax.jit(se_jax.scale)
    fns = {"se_jax squeeze_excite": lambda: f(x).block_until_ready(),
           "pooling pass": lambda: pool(x).block_until_ready(),
           "scaling pass": lambda: scale(x, g).block_until_ready()}
    if cfg["torch"]:
      torch = _torch()
      from timm.layers import SEModule
      device = _torch_device(torch)
      se = SEModule(channels, rd_ratio=1 / 16).to(device).eval()
      xt = torch.randn(batch, channels, size, size, device=device).contiguous(
          memory_format=torch.channels_last)

      def run_torch():
        with torch.no_grad():
          se(xt)
        if device == "cuda":
          torch.cuda.synchronize()

      fns["timm SEModule CL"] = run_torch
    times = time_alternating(fns, cfg["repeats"])
    floor = times["scaling pass"]["median_s"]
    rows.append({"shape": [batch, size, size, channels], "times": times,
                 "floor_s": floor,
                 "efficiency": floor / times["se_jax squeeze_excite"][
                     "median_s"]})
  return {"rows": rows}


def peak_bytes(stats) -> int:
  """Bytes a compiled program holds at once: its arguments, its outputs
  that do not reuse an argument's buffer, and its temporaries (XLA's CPU and
  GPU backends allocate the temporaries as one block for the whole call).
  The backends' own `peak_memory_in_bytes` is not reported on every one
  (on the CPU it counts the arguments only)."""
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def section_memory(cfg) -> dict:
  rows = []
  cases = [("resnet50", "se_resnet50", b, 224, 1000)
           for b in cfg["memory_batches"]]
  cases += [(f"cifar_resnet{d}", f"cifar_se_resnet{d}", cfg["cifar_batch"],
             32, 10) for d in cfg["cifar_depths"]]
  for plain, se, batch, size, classes in cases:
    peak, args, temp = {}, {}, {}
    for name in (plain, se):
      _, _, f = jax_train_step(name, batch, size, classes, cfg["dtype"])
      stats = f.compiled.memory_analysis()
      peak[name] = peak_bytes(stats)
      # Arguments: parameters, BatchNorm statistics, momentum and the batch.
      args[name] = int(stats.argument_size_in_bytes)
      temp[name] = int(stats.temp_size_in_bytes)
    rows.append({"plain": plain, "se": se, "batch": batch,
                 "peak_bytes": peak, "argument_bytes": args,
                 "temp_bytes": temp, "ratio": peak[se] / peak[plain],
                 "argument_ratio": args[se] / args[plain],
                 "temp_ratio": temp[se] / temp[plain]})
  return {"rows": rows}


# The 3x3 convolutions of a CIFAR ResNet, (H, C_in, C_out, stride).
CIFAR_CONV_SHAPES = ((32, 3, 16, 1), (32, 16, 16, 1), (32, 16, 32, 2),
                     (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1))


def cifar_conv_counts(depth: int) -> tuple[int, ...]:
  """How often a CIFAR ResNet of `depth` layers has each shape of
  `CIFAR_CONV_SHAPES`: the stem, then three stages of (depth - 2) / 6
  basic units, the first unit of stages 2 and 3 striding."""
  n = (depth - 2) // 6
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
  return (1, 2 * n, 1, 2 * n - 1, 1, 2 * n - 1)


def _conv_totals(rows: list[dict], depth: int) -> dict[str, float]:
  """Seconds each program's convolutions take in one training step of a
  CIFAR ResNet of `depth`, from the per-shape times of `section_kernels`;
  the first layer's input gradient, which training does not compute, left
  out."""
  counts = dict(zip(CIFAR_CONV_SHAPES, cifar_conv_counts(depth)))
  totals: dict[str, float] = {}
  for r in rows:
    _, h, _, cin, cout, stride = r["shape"]
    count = counts[(h, cin, cout, stride)]
    for name, t in r["times"].items():
      if cin == 3 and "input grad" in name:
        continue
      totals[name] = totals.get(name, 0.0) + count * t["median_s"]
  return totals


def section_kernels(cfg) -> dict:
  """Each convolution of the CIFAR ResNets: forward and both gradients,
  se_jax's `conv2d` against XLA's convolution (in its default pipeline and,
  on CPUs, with `XLA_CONV_OPTION`) and PyTorch's; in every shape's round
  also the SE-ResNets' training steps (se_jax's and PyTorch channels_last's)
  and the matrix product, whose calls over all the rounds are the
  section's ``steps``."""
  batch, dtype = cfg["cifar_batch"], cfg["dtype"] or jnp.float32
  rows = []
  # The SE-ResNets' training steps whose convolutions these are, and the
  # matrix product, take their turn in every round, so that a step is split
  # into its convolutions and the rest by calls of the same minutes.
  whole = {}
  for d in cfg["cifar_depths"]:
    name = f"cifar_se_resnet{d}"
    whole[f"se_jax {name}"] = jax_train_step(name, batch, 32, 10,
                                             cfg["dtype"])[0]
    if cfg["torch"] and True in cfg["torch_layouts"]:
      whole[f"PyTorch {name} CL"] = torch_train_step(
          torch_cifar_resnet(d, True), batch, 32, 10, True, cfg["bf16"])
  whole[MATMUL], matmul_flops = matmul_call()
  whole_calls = {n: [] for n in whole}
  for (h, cin, cout, stride), count in zip(CIFAR_CONV_SHAPES,
                                           cifar_conv_counts(20)):
    ho = h // stride
    k = jax.random.key(1)
    x = _jax_images(batch, h, cin, dtype)
    w = jax.random.normal(k, (3, 3, cin, cout), dtype)
    dy = jax.random.normal(k, (batch, ho, ho, cout), dtype)
    fns = {}
    impls = [("se_jax", "auto", None), ("XLA", "xla", None)]
    if cfg.get("onednn"):
      impls.insert(1, ("formulated", "formulated", None))
    if not cfg["gpu"]:
      impls.append(("XLA + option", "xla", XLA_CONV_OPTION))
    for label, impl, options in impls:
      conv = functools.partial(conv2d, strides=(stride, stride),
                               padding=((1, 1), (1, 1)), impl=impl)
      fwd = _Compiled(conv, x, w, options=options)
      dx = _Compiled(
          lambda x, w, dy, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](dy),
          x, w, dy, options=options)
      dw = _Compiled(
          lambda x, w, dy, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](dy),
          x, w, dy, options=options)
      fns[f"{label} forward"] = lambda f=fwd: f(x, w).block_until_ready()
      fns[f"{label} input grad"] = (
          lambda f=dx: jax.block_until_ready(f(x, w, dy)))
      fns[f"{label} kernel grad"] = (
          lambda f=dw: jax.block_until_ready(f(x, w, dy)))
    if cfg["torch"]:
      torch = _torch()
      device = _torch_device(torch)
      tdtype = torch.bfloat16 if cfg["bf16"] else torch.float32
      cl = torch.channels_last
      xt = torch.randn(batch, cin, h, h, device=device,
                       dtype=tdtype).contiguous(memory_format=cl)
      wt = torch.randn(cout, cin, 3, 3, device=device,
                       dtype=tdtype).contiguous(memory_format=cl)
      dyt = torch.randn(batch, cout, ho, ho, device=device,
                        dtype=tdtype).contiguous(memory_format=cl)
      bwd = functools.partial(
          torch.ops.aten.convolution_backward, dyt, xt, wt, None,
          (stride, stride), (1, 1), (1, 1), False, (0, 0), 1)

      def sync(f):
        def run():
          with torch.no_grad():
            f()
          if device == "cuda":
            torch.cuda.synchronize()
        return run

      fns["PyTorch CL forward"] = sync(lambda: torch.nn.functional.conv2d(
          xt, wt, stride=stride, padding=1))
      fns["PyTorch CL input grad"] = sync(lambda: bwd((True, False, False)))
      fns["PyTorch CL kernel grad"] = sync(lambda: bwd((False, True, False)))
    times = time_alternating({**fns, **whole}, cfg["repeats"])
    for n in whole:
      whole_calls[n] += times.pop(n)["times_s"]
    rows.append({"shape": [batch, h, h, cin, cout, stride], "count": count,
                 "times": times})
  return {"rows": rows, "conv_route": _conv_route(cfg),
          "totals_s": {str(d): _conv_totals(rows, d)
                       for d in cfg["cifar_depths"]},
          "steps": {n: _summary(v) for n, v in whole_calls.items()},
          "matmul_flops": matmul_flops}


def _conv_route(cfg) -> str:
  """How se_jax's `conv2d` computes a float32 3x3 convolution in this run:
  ``"onednn"``, ``"formulated"`` or, off CPUs, ``"xla"``."""
  if cfg["gpu"]:
    return "xla"
  return "onednn" if cfg.get("onednn") else "formulated"


def section_tuning(cfg) -> dict:
  """What se_jax's measures buy, each switched by an explicit argument."""
  name, batch = "cifar_se_resnet20", cfg["cifar_batch"]
  variants = {
      "default": ({}, None),
      OPTION_VARIANT: ({}, XLA_CONV_OPTION),
      **({FORMULATED_VARIANT: (dict(conv_impl="formulated"), None)}
         if cfg.get("onednn") else {}),
      "conv_impl='xla'": (dict(conv_impl="xla"), None),
      "conv_impl='xla' + XLA conv option": (dict(conv_impl="xla"),
                                            XLA_CONV_OPTION),
      "fold_norm=False": (dict(fold_norm=False), None),
      ONEDNN_VARIANT: (dict(conv_impl="xla"), XLA_ONEDNN_OPTIONS),
  }
  crash = None if cfg["gpu"] else runs_in_child(
      name, batch, variants[ONEDNN_VARIANT][1], variants[ONEDNN_VARIANT][0])
  if crash:
    print(f"[tuning] {ONEDNN_VARIANT}: {crash}; left out", file=sys.stderr,
          flush=True)
    del variants[ONEDNN_VARIANT]
  built = {k: jax_train_step(name, batch, 32, 10, cfg["dtype"], options=o,
                             **m) for k, (m, o) in variants.items()}
  fns = {k: v[0] for k, v in built.items()}
  onednn = None if crash else onednn_ops(built[ONEDNN_VARIANT][2].compiled)
  print("[tuning] CIFAR SE-ResNet-20 variants", file=sys.stderr, flush=True)
  times = time_alternating(fns, cfg["repeats"])
  # What folding the last BN into the SE block buys, in the deepest net.
  depth = max(cfg["cifar_depths"])
  plain, se = f"cifar_resnet{depth}", f"cifar_se_resnet{depth}"
  runs = {plain: jax_train_step(plain, batch, 32, 10, cfg["dtype"]),
          se: jax_train_step(se, batch, 32, 10, cfg["dtype"]),
          f"{se}, fold_norm=False": jax_train_step(
              se, batch, 32, 10, cfg["dtype"], fold_norm=False),
          f"{se}, materialize=False": jax_train_step(
              se, batch, 32, 10, cfg["dtype"], materialize=False)}
  print(f"[tuning] CIFAR ResNet-{depth}: BN folded into SE or apart; units'"
        " outputs in buffers or recomputed", file=sys.stderr, flush=True)
  fold_times = time_alternating({k: v[0] for k, v in runs.items()},
                                cfg["repeats"])
  fold_peak = {k: peak_bytes(v[2].compiled.memory_analysis())
               for k, v in runs.items()}
  return {"model": name, "batch": batch, "times": times,
          "onednn_ops": onednn, "onednn_crash": crash,
          "fold": {"depth": depth, "plain": plain, "se": se,
                   "times": fold_times, "peak_bytes": fold_peak}}


# A child process that compiles and runs the trainer's step under XLA
# options: some of XLA:CPU's library options end the process on some CPUs.
_OPTIONS_CHILD = """
import json, sys
from experiments import benchmark
name, batch = sys.argv[1], int(sys.argv[2])
options, model_options = json.loads(sys.argv[3]), json.loads(sys.argv[4])
run = benchmark.jax_train_step(name, batch, 32, 10, None, options=options,
                               **model_options)[0]
run(); run()
"""


def runs_in_child(name: str, batch: int, options: dict,
                  model_options: dict) -> str | None:
  """None if the trainer's step of `name` compiles and runs under the XLA
  `options` in a fresh process; otherwise how that process ended."""
  p = subprocess.run(
      [sys.executable, "-c", _OPTIONS_CHILD, name, str(batch),
       json.dumps(options), json.dumps(model_options)], cwd=_ROOT,
      capture_output=True, text=True)
  if p.returncode == 0:
    return None
  if p.returncode < 0:
    return f"the process ended by {signal.Signals(-p.returncode).name}"
  last = p.stderr.strip().splitlines()[-1:] or ["no message"]
  return f"the process exited with status {p.returncode} ({last[0]})"


# A child process timing the trainer's step: what the allocator section
# runs, once under each setting of glibc's tunables.
_ALLOCATOR_CHILD = """
import json, resource, sys, time
from experiments import allocator, benchmark
name, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
run = benchmark.jax_train_step(name, batch, 32, 10, None)[0]
run(); run()
r0, times = resource.getrusage(resource.RUSAGE_SELF), []
for _ in range(repeats):
  t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"times": times, "state": allocator.state(),
                  "faults": (r1.ru_minflt - r0.ru_minflt) / repeats,
                  "system_s": (r1.ru_stime - r0.ru_stime) / repeats}))
"""


# The allocator section's processes: with the experiment scripts' tunables,
# as a program of one's own runs (the heap kept by se_jax's import), and
# with glibc's defaults.
KEPT_HEAP = "heap kept"
IMPORT_HEAP = "se_jax's import"
GLIBC_DEFAULTS = "glibc's defaults"


def section_allocator(cfg) -> dict:
  """The CIFAR SE-ResNet-20 training step in fresh processes: with the
  experiment scripts' glibc tunables (the heap kept and huge pages advised,
  see `experiments.allocator`), with none (the heap kept by se_jax's import,
  `se_jax.heap`: what a program of one's own gets) and with glibc's
  defaults (``SE_JAX_ALLOCATOR=0``), the three alternating."""
  if cfg["gpu"] or sys.platform != "linux":
    return {"skipped": "glibc's heap concerns CPU buffers on Linux"}
  name, batch = "cifar_se_resnet20", cfg["cifar_batch"]
  base = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
  envs = {KEPT_HEAP: {**base, "GLIBC_TUNABLES": allocator.tunables(
              allocator.thp_mode())},
          IMPORT_HEAP: base,
          GLIBC_DEFAULTS: {**base, allocator.OPT_OUT: "0"}}
  runs = {k: [] for k in envs}
  rounds = 1 if cfg["repeats"] <= 3 else 3
  print(f"[allocator] {name} at batch {batch}, {rounds} rounds",
        file=sys.stderr, flush=True)
  for r in range(rounds):
    for k in (list(envs) if r % 2 == 0 else list(envs)[::-1]):
      out = subprocess.run(
          [sys.executable, "-c", _ALLOCATOR_CHILD, name, str(batch),
           str(cfg["repeats"])], cwd=_ROOT, env=envs[k], check=True,
          capture_output=True, text=True).stdout
      runs[k].append(json.loads(out.strip().splitlines()[-1]))
  rows = {}
  for k, rs in runs.items():
    rows[k] = {**_summary([t for r in rs for t in r["times"]]),
               "faults_per_step": statistics.median(r["faults"] for r in rs),
               "system_s_per_step": statistics.median(
                   r["system_s"] for r in rs),
               "state": rs[0]["state"]}
  return {"model": name, "batch": batch, "rounds": rounds, "rows": rows,
          "tunables": envs[KEPT_HEAP]["GLIBC_TUNABLES"]}


# ------------------------------------------------------------------ report


# ResNet-50 as timm and torchvision build it: bottleneck units of widths 64,
# 128, 256 and 512 (4x as many output channels), 3, 4, 6 and 3 per stage,
# the stride on each stage's first 3x3 convolution and projection, a 7x7
# stride-2 stem and a stride-2 max-pool before the first stage.
_RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def resnet50_conv_shapes(size: int = 224) -> list[tuple[tuple[int, ...], int]]:
  """Each convolution of a ResNet-50 on `size` x `size` images as
  ``((H_in, C_in, C_out, kernel, stride), count)``, in network order."""
  shapes: dict[tuple[int, ...], int] = {}

  def add(*shape):
    shapes[shape] = shapes.get(shape, 0) + 1

  add(size, 3, 64, 7, 2)
  h, cin = size // 4, 64
  for width, units, stride in _RESNET50_STAGES:
    for u in range(units):
      s = stride if u == 0 else 1
      add(h, cin, width, 1, 1)
      add(h, width, width, 3, s)
      add(h // s, width, 4 * width, 1, 1)
      if u == 0:
        add(h, cin, 4 * width, 1, s)
      h, cin = h // s, 4 * width
  return list(shapes.items())


def conv_kind(kernel: int, stride: int) -> str:
  """The group a convolution of `resnet50_conv_shapes` is totalled in."""
  if kernel == 1:
    return "1x1"
  if kernel == 3:
    return f"3x3, stride {stride}"
  return f"{kernel}x{kernel} stem"


def section_inference_convs(cfg) -> dict:
  """Each convolution of a ResNet-50 at 224 x 224, forward only: se_jax's
  `conv2d` in XLA's default pipeline against XLA's convolution with
  `XLA_CONV_OPTION`, the strided 3x3 ones also against XLA's convolution
  without options; on CPUs."""
  if cfg["gpu"]:
    return {"rows": []}
  dtype = cfg["dtype"] or jnp.float32
  rows = []
  for batch in cfg["inference_batches"]:
    for (h, cin, cout, k, s), count in resnet50_conv_shapes():
      x = _jax_images(batch, h, cin, dtype)
      w = jax.random.normal(jax.random.key(1), (k, k, cin, cout), dtype)
      padding = ((k // 2, k // 2),) * 2
      conv = functools.partial(conv2d, strides=(s, s), padding=padding)
      progs = {"se_jax": _Compiled(conv, x, w),
               "XLA + option": _Compiled(
                   functools.partial(conv, impl="xla"), x, w,
                   options=XLA_CONV_OPTION)}
      if k == 3 and s > 1:
        progs[CONV_NO_OPTION] = _Compiled(
            functools.partial(conv, impl="xla"), x, w)
      if cfg.get("onednn") and k > 1:
        progs["formulated"] = _Compiled(
            functools.partial(conv, impl="formulated"), x, w)
      times = time_alternating(
          {n: (lambda f=f: f(x, w).block_until_ready())
           for n, f in progs.items()}, cfg["repeats"])
      rows.append({"batch": batch, "shape": [h, cin, cout, k, s],
                   "count": count, "kind": conv_kind(k, s),
                   "ynnpack": "__ynn" in progs["se_jax"].compiled.as_text(),
                   "times": times})
    print(f"[inference_convs] batch {batch}", file=sys.stderr, flush=True)
  return {"rows": rows, "conv_route": _conv_route(cfg)}


def inference_conv_totals(rows: list[dict]) -> dict:
  """Seconds per forward pass that each program's convolutions take, by
  batch and by kind (and ``"all"``), each shape counted as often as
  ResNet-50 has it; a program is totalled only over groups it measured
  every shape of."""
  groups: dict = {}
  for r in rows:
    for kind in (r["kind"], "all"):
      groups.setdefault(str(r["batch"]), {}).setdefault(kind, []).append(r)
  totals: dict = {}
  for batch, kinds in groups.items():
    for kind, members in kinds.items():
      names = [n for n in members[0]["times"]
               if all(n in m["times"] for m in members)]
      totals.setdefault(batch, {})[kind] = {
          n: sum(m["count"] * m["times"][n]["median_s"] for m in members)
          for n in names}
  return totals


def _config(args) -> dict:
  gpu = jax.default_backend() == "gpu"
  torch_ok = not args.no_torch
  if torch_ok:
    try:
      import timm  # noqa: F401
      import torch  # noqa: F401
    except ImportError as e:
      print(f"PyTorch comparisons skipped: {e}; install the torch extra"
            " (see README).", file=sys.stderr)
      torch_ok = False
  bf16 = (args.dtype or ("bfloat16" if gpu else "float32")) == "bfloat16"
  cfg = {
      "torch": torch_ok, "gpu": gpu, "bf16": bf16,
      "dtype": jnp.bfloat16 if bf16 else None,
      "repeats": args.repeats,
      "overhead_repeats": args.overhead_repeats or (
          OVERHEAD_REPEATS_FACTOR * args.repeats),
      # timm's default memory format, and channels_last (the faster one on
      # GPUs, and often on CPUs).
      "torch_layouts": (True,) if gpu else (False, True),
      "inference_batches": (1, 8, 32) if not gpu else (1, 32, 256),
      "train_batch": 8 if not gpu else 128,
      "cifar_batch": 128,
      "cifar_depths": (20, 110),
      "se_batch": 8 if not gpu else 128,
      "memory_batches": (8, 32) if not gpu else (128, 256),
      # se_jax's convolutions on oneDNN's kernels (`se_jax.onednn`).
      "onednn": not gpu and not bf16 and onednn.available(),
  }
  if args.quick:
    cfg.update(repeats=min(args.repeats, 3),
               overhead_repeats=min(cfg["overhead_repeats"], 3),
               inference_batches=(1,),
               train_batch=2, cifar_depths=(20,), cifar_batch=32,
               se_batch=2, memory_batches=())
  return cfg


def _ratio(times, a, b):
  return times[a]["median_s"] / times[b]["median_s"]


def _fastest_other(times: dict, key: str, keys) -> str | None:
  """Of `keys` in `times`, other than `key`, the one with the least median."""
  others = [k for k in keys if k in times and k != key]
  return min(others, key=lambda k: times[k]["median_s"]) if others else None


def verdict(check: dict) -> str:
  """``met`` or ``missed`` when the check's interval lies wholly on one side
  of its limit (or it has none: a count, or too few calls), otherwise
  ``within noise``, with the measured value on the side it says."""
  lo, hi = check.get("interval") or (check["value"], check["value"])
  good = (lambda v: v <= check["limit"]) if check["direction"] == "max" else (
      lambda v: v >= check["limit"])
  if good(lo) == good(hi):
    return "met" if check["met"] else "missed"
  return "within noise"


def check_targets(results: dict, cfg: dict) -> list[dict]:
  """Each target of the issue with its measured value and, for timings,
  the interval of that value; met or not, and whether the interval
  decides it (`verdict`)."""
  checks = []

  def add(key, measured, where):
    what, limit, direction = TARGETS[key]
    if key.startswith("se_overhead") and cfg.get("gpu", cfg["bf16"]):
      limit = GPU_SE_OVERHEAD_TARGET
    if not isinstance(measured, dict):
      measured = {"value": measured, "interval": None}
    value = measured["value"]
    ok = value <= limit if direction == "max" else value >= limit
    check = {"target": key, "what": what, "where": where, "value": value,
             "interval": measured["interval"], "limit": limit,
             "direction": direction, "met": bool(ok)}
    check["verdict"] = verdict(check)
    checks.append(check)

  # SE / plain from the overhead section where the run has it.
  overheads = results.get("overhead", {}).get("rows", [])
  dedicated = bool(overheads)

  for row in results.get("inference", {}).get("rows", []):
    t, b = row["times"], row["batch"]
    se = "se_jax se_resnet50"
    best = _fastest_other(t, se, [k for k in t if k.startswith(se)])
    if best:
      add("default_within_fastest_inference", paired_ratio(t, se, best),
          f"SE-ResNet-50, batch {b}, against {best[len('se_jax '):]}")
    if not dedicated:
      add("se_overhead_inference", paired_ratio(t, se, "se_jax resnet50"),
          f"ResNet-50, batch {b}")
    if "timm se_resnet50 CL" in t:
      add("speed_vs_timm_inference",
          paired_ratio(t, "timm se_resnet50 CL", se), f"batch {b}")
  if "train" in results and not dedicated:
    t = results["train"]["times"]
    add("se_overhead_train",
        paired_ratio(t, "se_jax se_resnet50", "se_jax resnet50"),
        f"ResNet-50, batch {results['train']['batch']}")
  for row in overheads:
    add(f"se_overhead_{row['kind']}",
        paired_ratio(row["times"], f"se_jax {row['se']}",
                     f"se_jax {row['plain']}"),
        overhead_where(row["kind"], row["plain"], row["batch"]))
  rate = results.get("cifar", {}).get("matmul_flops_per_s")
  for row in results.get("cifar", {}).get("rows", []):
    t, d, b = row["times"], row["depth"], row["batch"]
    se = f"se_jax cifar_se_resnet{d}"
    variants = [k for k in t if k.startswith(se)]
    for k in variants:
      if k.endswith("option"):
        continue
      # The README path is a lighter program (plain SGD, no momentum, weight
      # decay or metrics), not a configuration of the trainer's step: it is
      # held to the trainer's step, not the step to it.
      best = _fastest_other(t, k, [v for v in variants if k != se
                                   or not v.endswith("README path")])
      if best is None:
        continue
      add("default_within_fastest_train", paired_ratio(t, k, best),
          f"CIFAR SE-ResNet-{d}, batch {b}, "
          + ("README path" if k.endswith("README path") else "trainer step")
          + " against " + ("trainer step" if best == se
                           else best[len(se) + 2:]))
    if not dedicated:
      add("se_overhead_train",
          paired_ratio(t, se, f"se_jax cifar_resnet{d}"),
          f"CIFAR ResNet-{d}, batch {b}")
    key = f"PyTorch cifar_se_resnet{d} CL"
    if key in t:
      add("speed_vs_torch_cifar", paired_ratio(t, key, se),
          f"SE-ResNet-{d}, batch {b}")
    flops = row.get("flops", {}).get(f"cifar_se_resnet{d}")
    if flops and row.get("matmul"):
      # The share by the paired ratio: each step's call against the matrix
      # product's call of the same repeat.
      here = matmul_rate(row)
      share = paired_ratio({**t, MATMUL: row["matmul"]}, MATMUL, se)
      scale = flops / row["matmul_flops"]
      add("peak_fraction_cifar",
          {"value": scale * share["value"],
           "interval": tuple(scale * x for x in share["interval"])
           if share["interval"] else None},
          f"SE-ResNet-{d}: {flops / t[se]['median_s'] / 1e9:.1f} of"
          f" {here / 1e9:.1f} GFLOP/s")
    elif flops and rate:
      achieved = flops / t[se]["median_s"]
      iv = median_interval(t[se].get("times_s") or [])
      add("peak_fraction_cifar",
          {"value": achieved / rate,
           "interval": (flops / iv[1] / rate, flops / iv[0] / rate)
           if iv else None},
          f"SE-ResNet-{d}: {achieved / 1e9:.1f} of {rate / 1e9:.1f} GFLOP/s")
  al = results.get("allocator", {})
  if IMPORT_HEAP in al.get("rows", {}):
    # A program of one's own, which restarts with no tunables, against the
    # experiment scripts' process: the i-th calls of the two processes of a
    # round are paired.
    add("default_within_fastest_train",
        paired_ratio(al["rows"], IMPORT_HEAP, KEPT_HEAP),
        f"CIFAR SE-ResNet-20, batch {al['batch']}, a program's own process"
        " (the heap kept by se_jax's import) against the experiment scripts'"
        " glibc tunables, fresh processes (allocator section)")
  tuning = results.get("tuning", {})
  if tuning.get("times"):
    # Every configuration of the tuning section, options included.
    t = tuning["times"]
    best = _fastest_other(t, "default", list(t))
    if best is not None:
      add("default_within_fastest_train", paired_ratio(t, "default", best),
          f"CIFAR SE-ResNet-20, batch {tuning['batch']}, trainer step"
          f" against {best} (tuning section)")
  for row in results.get("memory", {}).get("rows", []):
    add("memory_se_over_plain", row["ratio"],
        f"{row['plain']}, batch {row['batch']}")
  return checks


def _ms(t):
  return f"{1e3 * t['median_s']:.1f}"


def _spread(t):
  return f"{1e3 * t['min_s']:.0f}-{1e3 * t['max_s']:.0f}"


def _times_table(times: dict, batch: int, baseline: str | None = None,
                 flops: dict | None = None):
  head = "| program | median ms | fastest-slowest ms | img/s |" + (
      f" vs {baseline} |" if baseline else "") + (
      " GFLOP/s |" if flops else "")
  out = [head, "|---|---|---|---|" + ("---|" if baseline else "")
         + ("---|" if flops else "")]
  for k, t in times.items():
    line = (f"| {k} | {_ms(t)} | {_spread(t)} |"
            f" {batch / t['median_s']:.1f} |")
    if baseline:
      line += f" {times[baseline]['median_s'] / t['median_s']:.2f}x |"
    if flops:
      name = next((n for n in sorted(flops, key=len, reverse=True)
                   if n in k), None)
      line += (f" {flops[name] / t['median_s'] / 1e9:.1f} |" if name
               else " |")
    out.append(line)
  return out


def se_input_bytes(name: str, batch: int, size: int, itemsize: int = 4,
                   inference: bool = False) -> int:
  """Bytes of all the maps the SE blocks of ImageNet network `name` read,
  for one batch: what the squeeze reads in a pass the plain network does
  not make. Each stage's maps are ``size / 4`` (after the stem) halved per
  stage, with the units' output channels; in `inference` a bottleneck unit
  that folds its last BN into the attention squeezes the input of its last
  1x1 convolution instead, with that convolution's input channels, where
  the unit does (`squeezes_through_conv3`): that map and the kernel."""
  model = nnx.eval_shape(lambda: create(name))
  total = 0
  for i, stage in enumerate(model.stages):
    side = size // 4 // 2 ** i
    for unit in stage:
      if unit.attn is None:
        continue
      positions, channels = batch * side * side, unit.out_channels
      width = unit.conv3.in_features if unit.conv3 is not None else 0
      if (inference and unit.block == "bottleneck" and unit.fold_norm
          and squeezes_through_conv3(positions, width, channels)):
        total += positions * width + width * channels
      else:
        total += positions * channels
  return itemsize * total


def evidence(results: dict) -> list[str]:
  """What bounds the measured ratios, in words from the numbers."""
  lines = []
  k = results.get("kernels")
  if k and "PyTorch CL forward" in k["totals_s"].get("20", {}):
    tot = k["totals_s"]["20"]
    route = k.get("conv_route", "formulated")
    ours = sum(v for n, v in tot.items() if n.startswith("se_jax"))
    xla = sum(v for n, v in tot.items() if n.startswith("XLA ")
              and not n.startswith("XLA + option"))
    pt = sum(v for n, v in tot.items() if n.startswith("PyTorch"))
    form = sum(v for n, v in tot.items() if n.startswith("formulated"))
    parts = ", ".join(
        f"{what} {1e3 * tot['se_jax ' + what]:.0f} vs"
        f" {1e3 * tot['PyTorch CL ' + what]:.0f} ms"
        for what in ("forward", "input grad", "kernel grad"))
    onednn_route = route == "onednn" and form
    lines.append(
        f"The convolutions of one ResNet-20 training step alone take"
        f" {1e3 * ours:.0f} ms in se_jax"
        + (f" on oneDNN's kernels (`se_jax.onednn`; {1e3 * form:.0f} ms in"
           " its XLA formulation, " if onednn_route else " (")
        + f"{1e3 * xla:.0f} ms with XLA's"
        f" convolution in its default pipeline) and {1e3 * pt:.0f} ms in"
        f" PyTorch channels_last ({parts})"
        + ((f": the best convolution kernels XLA:CPU offers (Eigen's) run at"
            f" {pt / ours:.2f}x the speed of PyTorch's oneDNN kernels, which"
            " bounds the whole step.") if pt < ours and route != "onednn"
           else f": se_jax's take {ours / pt:.2f}x PyTorch's time"
           + (" in this run, so they do not explain a step slower than"
              " PyTorch's." if ours <= pt else ".")))
    if "XLA + option forward" in tot:
      opt = sum(v for n, v in tot.items() if n.startswith("XLA + option"))
      parts = ", ".join(
          f"{what} {1e3 * tot['XLA + option ' + what]:.0f} ms"
          for what in ("forward", "input grad", "kernel grad"))
      lines.append(
          "With the compiler option that keeps XLA's convolutions off"
          f" YNNPACK, the same convolutions take {1e3 * opt:.0f} ms on"
          f" Eigen ({parts}), {opt / ours:.2f}x se_jax's time without"
          " options.")
  c = results.get("cifar")
  if c and k:
    for row in c["rows"]:
      d = row["depth"]
      tot = k["totals_s"].get(str(d))
      if tot is None:
        continue
      steps, rate, apart = _split_steps(k, c, row)
      step = steps[f"se_jax cifar_se_resnet{d}"]["median_s"]
      conv = sum(v for n, v in tot.items() if n.startswith("se_jax"))
      line = (
          f"In se_jax's SE-ResNet-{d} step ({1e3 * step:.0f} ms) the"
          f" convolutions measured alone account for {1e3 * conv:.0f} ms"
          + (" (timed in the kernels section, minutes from the step's round,"
             " so the split moves with the machine's speed between the two)"
             if apart else
             " (the step timed in the kernels section's rounds, between the"
             " convolutions' calls)"))
      line += (
          f"; the other {1e3 * (step - conv):.0f} ms are BatchNorm, ReLU, SE,"
          + (" and the update" if k.get("conv_route") == "onednn" else
             " the layout changes of the kernel gradients and the update")
          if step > conv else ", more than the whole step")
      pt_name = f"PyTorch cifar_se_resnet{d} CL"
      if pt_name in steps and "PyTorch CL forward" in tot:
        pt_step = steps[pt_name]["median_s"]
        pt_conv = sum(v for n, v in tot.items() if n.startswith("PyTorch"))
        line += (f". PyTorch channels_last: step {1e3 * pt_step:.0f} ms,"
                 f" the same convolutions alone {1e3 * pt_conv:.0f} ms")
        if pt_step > pt_conv and step > conv:
          line += (
              f", the other {1e3 * (pt_step - pt_conv):.0f} ms; convolutions"
              f" {conv / pt_conv:.2f}x PyTorch's time, the rest"
              f" {(step - conv) / (pt_step - pt_conv):.2f}x")
        else:
          line += (
              ". In this run the convolutions timed one by one add up to"
              " more than"
              " a whole step of "
              + ("PyTorch" if pt_step <= pt_conv else "se_jax")
              + ", so these timings cannot split the steps into"
              " convolutions and the rest")
      lines.append(line + ".")
      flops = row.get("flops", {}).get(f"cifar_se_resnet{d}")
      if rate and flops and step > conv:
        # What the share of the matrix product rate could be with the rest of
        # the step as it is: the counted FLOPs are all the convolutions' and
        # the dense layer's.
        ideal = flops / rate
        line = (
            f"SE-ResNet-{d}'s step counts {flops / 1e9:.0f} GFLOP, which at"
            f" the matrix product rate ({rate / 1e9:.1f} GFLOP/s"
            + ("" if apart else ", timed in the same rounds")
            + f") take {1e3 * ideal:.0f} ms: its convolutions, timed alone,"
            f" run at {flops / conv / 1e9:.0f} GFLOP/s"
            f" ({flops / conv / rate:.2f} of the rate), and the other"
            f" {1e3 * (step - conv):.0f} ms"
            " (BatchNorm, ReLU, SE, the update: passes over the maps, with"
            " almost none of the counted FLOPs) would hold the step to"
            f" {ideal / (ideal + step - conv):.2f} of the rate even with the"
            " convolutions at the full rate")
        if pt_name in steps:
          pt_step = steps[pt_name]["median_s"]
          line += (f". PyTorch channels_last's step reaches"
                   f" {flops / pt_step / rate:.2f} of the rate in the same"
                   + (" run" if apart else " rounds"))
        lines.append(line + ".")
  tu = results.get("tuning")
  if tu:
    t = tu["times"]
    lines.append(
        "se_jax's measures, each switched off in the same run: "
        + (f"with its convolutions in se_jax's XLA formulation"
           f" (`{FORMULATED_VARIANT}`, what runs where oneDNN's handlers are"
           " not built) the SE-ResNet-20 step takes"
           f" {_ratio(t, FORMULATED_VARIANT, 'default'):.2f}x as long; "
           if FORMULATED_VARIANT in t else "")
        + "with XLA's"
        " convolutions (`conv_impl='xla'`, YNNPACK in XLA's default"
        f" pipeline) the SE-ResNet-20 step takes"
        f" {_ratio(t, 'conv_impl=' + repr('xla'), 'default'):.2f}x as long;"
        " with XLA's convolutions and the compiler option that keeps them"
        " off YNNPACK, which a user would have to know to pass,"
        f" {_ratio(t, 'conv_impl=' + repr('xla') + ' + XLA conv option', 'default'):.2f}x;"
        " with the last BN kept apart from SE (`fold_norm=False`),"
        f" {_ratio(t, 'fold_norm=False', 'default'):.2f}x."
        + ((" se_jax's default step under that option takes"
            if FORMULATED_VARIANT in t else
            " se_jax's own formulation under that option (which moves to"
            " Eigen the few convolutions YNNPACK still takes in it) takes")
           + f" {_ratio(t, OPTION_VARIANT, 'default'):.2f}x the"
           " default step's time."
           if OPTION_VARIANT in t else ""))
    if tu.get("onednn_crash"):
      lines.append(
          "With XLA's oneDNN options (`xla_cpu_use_onednn` and oneDNN"
          " fusions of single convolutions and matrix products) the"
          " SE-ResNet-20 step does not run on this"
          f" machine: compiled and run in a child process, {tu['onednn_crash']}"
          "; the variant is left out.")
    if ONEDNN_VARIANT in t and tu.get("onednn_ops") is not None:
      asked = ("with `xla_cpu_use_onednn` and oneDNN fusions of single"
               " convolutions and matrix products asked for (and YNNPACK's"
               " convolutions off), the compiled"
               f" SE-ResNet-20 step calls oneDNN in {tu['onednn_ops']}"
               " instruction(s) and takes"
               f" {_ratio(t, ONEDNN_VARIANT, 'default'):.2f}x the default"
               " step's time")
      lines.append(
          ("oneDNN, whose kernels PyTorch runs, is not reachable through"
           f" XLA:CPU's options in this jaxlib: {asked}.")
          if tu["onednn_ops"] == 0 else (
              f"XLA's oneDNN route: {asked}. These are compiler options of"
              " the whole program (or, through `XLA_FLAGS`, of the whole"
              " process): they move every convolution and matrix product of"
              " it to oneDNN, the user's own included, which changes their"
              " values"
              + ("; se_jax's default path calls oneDNN's convolutions itself"
                 " (`se_jax.onednn`), in a plain `jax.jit`, and leaves the"
                 " rest of the program to XLA." if FORMULATED_VARIANT in t
                 else ", and no formulation under a plain `jax.jit` reaches"
                 " oneDNN, so se_jax's default path cannot take this"
                 " route.")))
    fold = tu.get("fold")
    if fold:
      t, m = fold["times"], fold["peak_bytes"]
      se, plain = fold["se"], fold["plain"]
      apart = f"{se}, fold_norm=False"
      lines.append(
          f"Folding each unit's last BN into its SE block: the CIFAR"
          f" SE-ResNet-{fold['depth']} step takes {_ms(t[se])} ms against"
          f" {_ms(t[apart])} ms with the BN apart, SE / plain time"
          f" {_ratio(t, se, plain):.3f} against {_ratio(t, apart, plain):.3f},"
          f" and SE / plain peak memory {m[se] / m[plain]:.3f} against"
          f" {m[apart] / m[plain]:.3f}.")
      recomputed = f"{se}, materialize=False"
      if recomputed in t:
        r = paired_ratio(t, recomputed, se)
        lo, hi = r["interval"] or (r["value"], r["value"])
        lines.append(
            "Each unit's output in a buffer of its own"
            " (`se_jax.conv.materialized`): without it (`materialize=False`)"
            f" the CIFAR SE-ResNet-{fold['depth']} step takes"
            f" {_ms(t[recomputed])} ms against {_ms(t[se])} ms, paired"
            f" ratio {_with_interval(r)}"
            + (", as XLA:CPU recomputes the earlier units of a stage in every"
               " later unit's shortcut sum." if lo > 1 else
               ": faster without it in this run." if hi < 1 else
               ": this run cannot tell the two apart."))
  al = results.get("allocator", {})
  if "rows" in al:
    lines.append(_allocator_evidence(al))
  lines.extend(_inference_evidence(results))
  lines.extend(_inference_conv_evidence(results))
  torch_se = _torch_se_overheads(results)
  if torch_se:
    lines.append(
        "PyTorch's own SE overhead on this machine, SE / plain time in the"
        " same runs: " + "; ".join(torch_se) + ".")
  return lines


def _split_steps(kernels: dict, cifar: dict, row: dict):
  """The step times and the matrix product rate that split the CIFAR step
  of `row` into its convolutions and the rest: those timed in the kernels
  section's rounds where the run has them, else those of the CIFAR
  section's round, minutes from the convolutions' calls. Returns the
  times, the rate (None if unknown) and whether they were timed apart from
  the convolutions."""
  steps = kernels.get("steps", {})
  if f"se_jax cifar_se_resnet{row['depth']}" in steps:
    rate = (kernels["matmul_flops"] / steps[MATMUL]["median_s"]
            if MATMUL in steps else None)
    return steps, rate, False
  return (row["times"], matmul_rate(row) or cifar.get("matmul_flops_per_s"),
          True)


# How se_jax's default path runs each kind of convolution on CPUs, with its
# XLA formulation (where oneDNN's handlers are not built).
_CONV_ROUTE = {
    "3x3, stride 1": "one output row more than the input has, so that"
                     " Eigen runs them",
    "3x3, stride 2": "stride-1 convolutions of the input's phases, which"
                     " Eigen runs",
    "7x7 stem": "left to YNNPACK, which was faster for it than its phases",
    "1x1": "1-D convolutions over the pixels, which YNNPACK leaves and XLA"
           " computes as its own matrix products",
}


def _route(kind: str, conv_route: str) -> str | None:
  if conv_route == "onednn" and kind != "1x1":
    return "oneDNN's kernels"
  return _CONV_ROUTE.get(kind)


def _saving(seconds: float) -> str:
  """A time saved, as text; a negative one as a cost."""
  ms = round(1e3 * seconds)
  if ms == 0:
    return "changes less than 1 ms"
  return f"saves {ms} ms" if ms > 0 else f"costs {-ms} ms"


def _allocator_evidence(al: dict) -> str:
  rows = al["rows"]
  if IMPORT_HEAP in rows:
    each = [(rows[IMPORT_HEAP], "as a program of one's own runs it (the heap"
             " kept by se_jax's import, `se_jax.heap`)"),
            (rows[KEPT_HEAP], "with the experiment scripts' glibc tunables"
             " (the heap kept, huge pages advised)"),
            (rows[GLIBC_DEFAULTS], "with glibc's defaults"
             f" (`{allocator.OPT_OUT}=0`)")]
    ending = "only a kept heap hands it the same pages again."
  elif KEPT_HEAP in rows:
    # A run saved before se_jax's import kept the heap.
    each = [(rows[KEPT_HEAP], "with the heap kept and huge pages advised (the"
             " experiment scripts' glibc tunables)"),
            (rows["huge pages advised"], "with huge pages advised alone"),
            (rows["4 KiB pages"], "with glibc's defaults")]
    ending = ("only the kept heap hands it the same pages again. A program of"
              " the user's own gets the same by starting Python with"
              " `GLIBC_TUNABLES` set as `experiments/allocator.py` says.")
  else:
    on, off = rows["huge pages advised"], rows["4 KiB pages"]
    return (
        f"Memory pages: in fresh processes, the {al['model']} step at batch"
        f" {al['batch']} takes {_ms(on)} ms with glibc's huge pages advised"
        f" and {_ms(off)} ms without"
        f" ({off['median_s'] / on['median_s']:.2f}x), with"
        f" {on['faults_per_step']:,.0f} against"
        f" {off['faults_per_step']:,.0f} page faults and"
        f" {1e3 * on['system_s_per_step']:.0f} against"
        f" {1e3 * off['system_s_per_step']:.0f} ms of system time per step:"
        " XLA:CPU allocates the step's buffers afresh on every call.")
  first = each[0][0]
  return (
      f"Memory: in fresh processes, the {al['model']} step at batch"
      f" {al['batch']} takes "
      + ", ".join(f"{_ms(r)} ms {what}" for r, what in each)
      + " (" + " and ".join(f"{r['median_s'] / first['median_s']:.2f}x"
                            for r, _ in each[1:])
      + " the first), with "
      + ", ".join(f"{r['faults_per_step']:,.0f}" for r, _ in each)
      + " page faults and "
      + ", ".join(f"{1e3 * r['system_s_per_step']:.0f}" for r, _ in each)
      + " ms of system time per step: XLA:CPU allocates the step's buffers"
      " afresh on every call, and " + ending)


def _with_interval(ratio: dict) -> str:
  """A `paired_ratio` as text, with its interval where it has one."""
  return f"{ratio['value']:.3f}" + (
      f" (95% interval {_interval_text(ratio)})" if ratio["interval"] else "")


def _inference_conv_evidence(results: dict) -> list[str]:
  rows = results.get("inference_convs", {}).get("rows")
  if not rows:
    return []
  whole = {r["batch"]: r["times"]
           for r in results.get("inference", {}).get("rows", [])}
  conv_route = results["inference_convs"].get("conv_route", "formulated")
  # The kinds of convolution that XLA hands to YNNPACK in se_jax's default
  # path.
  left = sorted({r["kind"] for r in rows if r["ynnpack"]})
  lines = []
  for batch, kinds in inference_conv_totals(rows).items():
    tot = kinds.pop("all")
    ours, option = tot["se_jax"], tot["XLA + option"]
    parts = []
    for kind, t in sorted(kinds.items(), key=lambda kv: kv[1]["XLA + option"]
                          - kv[1]["se_jax"]):
      route = _route(kind, conv_route)
      plain = t.get(CONV_NO_OPTION)
      form = t.get("formulated")
      parts.append(
          f"{kind}{f' ({route})' if route else ''}"
          f" {1e3 * t['se_jax']:.0f} vs {1e3 * t['XLA + option']:.0f} ms"
          + (f", se_jax's XLA formulation {1e3 * form:.0f} ms" if form
             else "")
          + (f", XLA's convolution without options (YNNPACK)"
             f" {1e3 * plain:.0f} ms" if plain else ""))
    line = (
        f"Inference at batch {batch}: ResNet-50's convolutions, each timed"
        f" alone, take {1e3 * ours:.0f} ms per forward pass in se_jax's"
        f" default path and {1e3 * option:.0f} ms with XLA's convolution"
        f" under the option ({ours / option:.2f}x)")
    t = whole.get(int(batch), {})
    a, b = "se_jax se_resnet50", INFERENCE_XLA_OPTION
    if a in t and b in t:
      line += (f"; the whole SE-ResNet-50 forward passes differ by"
               f" {1e3 * (t[a]['median_s'] - t[b]['median_s']):.0f} ms")
      if INFERENCE_OPTION in t:
        saved = t[a]["median_s"] - t[INFERENCE_OPTION]["median_s"]
        alone = sum(v["se_jax"] - v["XLA + option"]
                    for kind, v in kinds.items() if kind in left)
        line += (
            f", and under the option se_jax's own convolutions take"
            f" {_with_interval(paired_ratio(t, INFERENCE_OPTION, a))} of the"
            f" default's time (XLA's {_with_interval(paired_ratio(t, b, a))})")
        if left:
          line += (
              ": the option moves to Eigen the"
              " convolutions that XLA hands to YNNPACK in se_jax's"
              f" default path ({', '.join(left)}); moving them"
              f" {_saving(saved)} of the whole pass and {_saving(alone)} of"
              " those convolutions timed alone")
      if INFERENCE_FORMULATED in t:
        line += (
            "; with se_jax's XLA formulation of the convolutions"
            f" (`{FORMULATED_VARIANT}`) the whole pass takes"
            f" {_with_interval(paired_ratio(t, INFERENCE_FORMULATED, a))}"
            " of the default's time")
    lines.append(line + ". By kind, default vs option: " + "; ".join(parts)
                 + ".")
  return lines


def _inference_se_times(results: dict) -> dict[int, dict]:
  """By batch, SE-ResNet-50's and ResNet-50's inference times: from the
  overhead section where the run has it, else from the inference
  section's rounds."""
  se, plain = "se_jax se_resnet50", "se_jax resnet50"
  rows = [r for r in results.get("overhead", {}).get("rows", [])
          if r["kind"] == "inference" and r["se"] == "se_resnet50"]
  source = "the SE / plain section"
  if not rows:
    rows = results.get("inference", {}).get("rows", [])
    source = "the inference section"
  return {r["batch"]: {"se": r["times"][se], "plain": r["times"][plain],
                       "ratio": paired_ratio(r["times"], se, plain)["value"],
                       "source": source} for r in rows}


def _parameter_floor(batch: int, excitations: dict, pair: dict,
                     rate: float) -> str:
  """What reading the excitations' parameters once costs at `batch`, at the
  pooling rate measured in the SE-block section, as a share of ResNet-50's
  pass: the least SE / plain that those bytes allow."""
  read_s = excitations["param_bytes"] / rate
  plain_s = pair["plain"]["median_s"]
  return (
      f" At the pooling rate measured in the SE-block section"
      f" ({rate / 1e9:.1f} GB/s) they take {1e3 * read_s:.2f} ms to read,"
      f" {read_s / plain_s:.1%} of ResNet-50's pass at batch {batch}"
      f" ({1e3 * plain_s:.1f} ms): there SE / plain cannot go below"
      f" {1 + read_s / plain_s:.3f} without reading fewer bytes, and the"
      f" excitations take {excitations['median_s'] / read_s:.1f}x that"
      " read.")


def _inference_evidence(results: dict) -> list[str]:
  lines = []
  rows = results.get("inference", {}).get("rows", [])
  blocks = results.get("se_block", {}).get("rows", [])
  pairs = _inference_se_times(results)
  excitations = {r["batch"]: r["excitations"] for r in rows
                 if "excitations" in r}
  # The pooling pass's measured rate over the SE blocks' maps, in bytes/s.
  rate = None
  if blocks:
    rate = (sum(4 * np.prod(r["shape"]) for r in blocks)
            / sum(r["times"]["pooling pass"]["median_s"] for r in blocks))
  if pairs and blocks:
    b = max(pairs)
    pair = pairs[b]
    extra = pair["se"]["median_s"] - pair["plain"]["median_s"]
    nbytes = se_input_bytes("se_resnet50", b, 224, inference=True)
    pass_s = nbytes / rate
    exc = excitations.get(b)
    # What the run timed of SE's work: the squeeze's pass, and the
    # excitations where they were timed alone.
    known = pass_s + (exc["median_s"] if exc else 0.0)
    cost = "the two" if exc else "that pass"
    others = " and" if exc else ", three small matrix products and"
    lines.append(
        f"SE-ResNet-50 inference at batch {b} takes"
        f" {1e3 * abs(extra):.0f} ms {'more' if extra >= 0 else 'less'}"
        " than ResNet-50 by the medians (SE / plain"
        f" {pair['se']['median_s'] / pair['plain']['median_s']:.3f}; the"
        f" targets' paired ratio {pair['ratio']:.3f}), from"
        f" {pair['source']}. With"
        " the BN folded in, the SE blocks add one pass over a map to the"
        " plain network's work, the squeeze, which in inference reads the"
        " input of each unit's last 1x1 convolution (a quarter of the"
        " output's channels) and that convolution's kernel where these are"
        " less to read than the output, else the output:"
        f" {nbytes / 1e6:.0f} MB, {1e3 * pass_s:.0f} ms"
        " at the pooling rate measured in the SE-block section, besides the"
        + (f" excitations ({1e3 * exc['median_s']:.0f} ms, timed alone)."
           if exc else " small FC layers.")
        + " The extra time is"
        + (f" within the cost of {cost}." if extra <= known else
           f" {extra / known:.1f}x the cost of {cost}; the rest is the SE"
           f" blocks' other operations (per unit the squeeze's reduction"
           f"{others} the gate's product in the unit's output pass), which"
           " this run does not time apart."))
  both = sorted(b for b in excitations if b in pairs)
  if both:
    first = excitations[both[0]]
    parts = []
    for b in both:
      extra = pairs[b]["se"]["median_s"] - pairs[b]["plain"]["median_s"]
      e = excitations[b]["median_s"]
      parts.append(
          f"batch {b}: {1e3 * e:.1f} ms of "
          + (f"{1e3 * extra:.1f} ms ({e / extra:.0%})" if extra > 0 else
             f"none (SE-ResNet-50 {1e3 * -extra:.1f} ms faster)"))
    lines.append(
        f"SE's excitations, the FC layers and gates of SE-ResNet-50's"
        f" {first['blocks']} SE blocks on their squeezed (N, C) vectors, one"
        " block after another, timed alone in the inference section's"
        " rounds, against the time SE adds to ResNet-50 (medians, from"
        f" {pairs[both[0]]['source']}): " + "; ".join(parts) + "."
        f" Each pass reads their {first['param_bytes'] / 1e6:.1f} MB of"
        " parameters whatever the batch, while the network's own work grows"
        " with it."
        + ("" if rate is None else _parameter_floor(
            both[0], first, pairs[both[0]], rate)))
  if 1 in pairs and pairs[1]["ratio"] < 1.0:
    lines.append(
        "At batch 1 SE-ResNet-50 runs faster than ResNet-50 in this run"
        f" (SE / plain {pairs[1]['ratio']:.3f}, from {pairs[1]['source']})."
        " The two programs differ only by the SE blocks, which add work;"
        " at batch 1 a forward pass is a chain of small, latency-bound"
        " kernels whose scheduling on two cores (which independent"
        " operations XLA's runtime overlaps) differs between the two"
        " compiled programs, by more than the SE blocks cost.")
  cl = [(row["batch"], _ratio(row["times"], "timm resnet50 CL",
                              "se_jax resnet50"),
         _ratio(row["times"], "timm se_resnet50 CL", "se_jax se_resnet50"))
        for row in rows if "timm resnet50 CL" in row["times"]]
  if cl:
    lines.append(
        "Against timm in channels_last, se_jax / timm inference speed"
        " without SE and with SE, by batch: "
        + "; ".join(f"{b}: {p:.2f} and {s:.2f}" for b, p, s in cl) + "."
        + (" The SE networks compare at least as well as the plain ones:"
           " whatever gap there is lies in the network both share, not in"
           " SE." if all(s >= p for _, p, s in cl) else ""))
  return lines


def _torch_se_overheads(results: dict) -> list[str]:
  out = []

  def add(where, t, se, plain):
    parts = [f"{_ratio(t, se + cl, plain + cl):.2f}x" + (" CL" if cl else "")
             for cl in ("", " CL") if se + cl in t and plain + cl in t]
    if parts:
      out.append(f"{where} {', '.join(parts)}")

  for row in results.get("inference", {}).get("rows", []):
    add(f"ResNet-50 inference, batch {row['batch']}", row["times"],
        "timm se_resnet50", "timm resnet50")
  if "train" in results:
    add(f"ResNet-50 training, batch {results['train']['batch']}",
        results["train"]["times"], "timm se_resnet50", "timm resnet50")
  for row in results.get("cifar", {}).get("rows", []):
    d = row["depth"]
    add(f"CIFAR ResNet-{d} training", row["times"],
        f"PyTorch cifar_se_resnet{d}", f"PyTorch cifar_resnet{d}")
  return out


def _overhead_table(overhead: dict) -> list[str]:
  out = ["\n## SE / plain, the two programs alone\n",
         "Each SE network's program and its plain twin's, only the two"
         " alternating, in"
         f" {overhead['repeats']} repeats: the SE-overhead targets are"
         " checked from these ratios. Fastest calls: the ratio of the two"
         " programs' fastest calls, the least moved by the machine's slow"
         " spells (no interval).\n",
         "| program | batch | plain ms | SE ms | SE / plain | interval |"
         " fastest calls |\n|---|---|---|---|---|---|---|"]
  for r in overhead["rows"]:
    t = r["times"]
    se, plain = t[f"se_jax {r['se']}"], t[f"se_jax {r['plain']}"]
    ratio = paired_ratio(t, f"se_jax {r['se']}", f"se_jax {r['plain']}")
    iv = ratio["interval"]
    out.append(
        f"| {r['se']} {r['kind']} | {r['batch']} | {_ms(plain)} |"
        f" {_ms(se)} | {ratio['value']:.3f} |"
        + (f" {iv[0]:.3f}-{iv[1]:.3f} |" if iv else " - |")
        + f" {se['min_s'] / plain['min_s']:.3f} |")
  out.append("")
  return out


def to_markdown(results: dict, checks: list[dict], prov: dict,
                cfg: dict, written_by: str | None = None) -> str:
  cont = prov.get("continued")
  if cont:
    cont = (f"\nThe run continued one started {cont['started']} on the same"
            f" commit and machine; its sections {', '.join(cont['sections'])}"
            " are from that start.")
  out = [markdown_header("se_jax benchmark", prov) + (cont or "")
         + (f"\n{written_by}" if written_by else ""), ""]
  out.append(
      f"PyTorch {prov['versions'].get('torch', 'absent')}, timm"
      f" {prov['versions'].get('timm', 'absent')}. Medians of"
      f" {cfg['repeats']} timed calls per program"
      + (f" ({cfg['overhead_repeats']} in the SE / plain section)"
         if "overhead" in results else "")
      + ", the programs' calls"
      " alternating, after warm-up; compilation timed apart. se_jax's"
      " programs are plain `jax.jit`s with no compiler option unless a row"
      " says otherwise."
      + (" bfloat16 compute." if cfg["bf16"] else " float32.")
      + (" se_jax's convolutions wider than 1x1 run on oneDNN's kernels"
         " (`se_jax.onednn`), its 1x1 ones on XLA's matrix product."
         if cfg.get("onednn") else "")
      + " `CL`: PyTorch in channels_last.\n")
  out.append("## Targets\n")
  out.append(
      "A ratio of two programs' times is the median of the ratios of their"
      " calls in the same repeat, with a distribution-free"
      f" {CONFIDENCE:.0%} (or wider) interval for that median from the"
      " repeats' order statistics. A target is met or missed when its"
      " interval lies wholly on one side of the limit; otherwise the run"
      " cannot tell (\"within noise\"), whichever side the value is on.\n")
  out.append("| target | where | measured | interval | limit | verdict |\n"
             "|---|---|---|---|---|---|")
  for c in checks:
    out.append(f"| {c['what']} | {c['where']} | {c['value']:.3f} |"
               f" {_interval_text(c)} | {_sign(c)} {c['limit']} |"
               f" {_verdict_text(c)} |")
  ev = evidence(results)
  if ev:
    out.append("\n## What bounds the targets\n")
    out.extend(f"- {line}" for line in ev)
    out.append("")
  if "inference" in results:
    out.append("\n## Inference, ResNet-50 and SE-ResNet-50 at 224 x 224\n")
    for row in results["inference"]["rows"]:
      out.append(f"Batch {row['batch']} (compile: " + ", ".join(
          f"{k} {v:.1f} s" for k, v in row["compile_s"].items()) + ")\n")
      out.extend(_times_table(row["times"], row["batch"],
                              "se_jax se_resnet50"))
      out.append("")
      if "excitations" in row:
        e = row["excitations"]
        out.append(
            f"In the same rounds, {EXCITATIONS} (the FC layers and gates of"
            f" its {e['blocks']} SE blocks, one after another,"
            f" {e['param_bytes'] / 1e6:.1f} MB of parameters): {_ms(e)} ms"
            f" ({_spread(e)} ms).\n")
  if "train" in results:
    r = results["train"]
    out.append(f"## Training step, ResNet-50 and SE-ResNet-50, batch"
               f" {r['batch']}\n")
    out.append("Compile: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in r["compile_s"].items()) + "\n")
    out.extend(_times_table(r["times"], r["batch"], "se_jax se_resnet50",
                            r.get("flops")))
    out.append("")
  if "cifar" in results:
    rate = results["cifar"].get("matmul_flops_per_s")
    paired = all(r.get("matmul") for r in results["cifar"]["rows"])
    if rate:
      out.append(
          f"The machine's matrix product rate, a {MATMUL_N} x {MATMUL_N}"
          f" float32 product in XLA in the same run: {rate / 1e9:.1f}"
          " GFLOP/s"
          + (", the median of its calls, one in every repeat of the CIFAR"
             " rounds below, between the steps; a step's share of the rate"
             " (the targets) is the median over the repeats of its rate over"
             " the product's rate in the same repeat" if paired else "")
          + ". A training"
          " step's FLOPs are counted as 6 per multiply-add of its forward"
          " pass (`se_jax.count_flops`, padding included)"
          + (f"; counted again at commit {results['flops_recounted_at']}"
             " by `--report-only`, as the count of the measuring commit"
             " differed" if results.get("flops_recounted_at") else "")
          + ".\n")
    for row in results["cifar"]["rows"]:
      d = row["depth"]
      out.append(f"## Training step, CIFAR ResNet-{d} +/- SE, batch"
                 f" {row['batch']}\n")
      out.append("Parameters: " + ", ".join(
          f"{k} {v:,}" for k, v in row["params"].items()) + ". Compile: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in row["compile_s"].items())
          + "\n")
      out.extend(_times_table(row["times"], row["batch"],
                              f"se_jax cifar_se_resnet{d}", row["flops"]))
      if row.get("matmul"):
        m = row["matmul"]
        out.append(
            f"\nThe matrix product in the same repeats: {_ms(m)} ms"
            f" ({_spread(m)} ms), {matmul_rate(row) / 1e9:.1f} GFLOP/s.")
      out.append("")
  if results.get("overhead", {}).get("rows"):
    out.extend(_overhead_table(results["overhead"]))
  if "se_block" in results:
    out.append("## The SE block alone\n")
    out.append(
        "`se_jax.squeeze_excite` on the maps of each ResNet-50 stage,"
        " beside two passes over the same map measured in the same run: a"
        " mean over the map (pooling) and a multiplication by per-channel"
        " gates (scaling). Whatever it does, the block reads its input and"
        " writes its output, which is the scaling pass's traffic, so the"
        " scaling pass bounds it from below; the pooling read comes on top"
        " unless the caches hold the map. Efficiency: the scaling pass's"
        " time over the block's.\n")
    out.append("| map (NHWC) | se_jax ms | timm SEModule CL ms | pooling pass"
               " ms | scaling pass ms | efficiency |\n|---|---|---|---|---|---|")
    for r in results["se_block"]["rows"]:
      t = r["times"]
      timm_ms = _ms(t["timm SEModule CL"]) if "timm SEModule CL" in t else "-"
      out.append(
          f"| {'x'.join(map(str, r['shape']))} |"
          f" {_ms(t['se_jax squeeze_excite'])} | {timm_ms} |"
          f" {_ms(t['pooling pass'])} | {_ms(t['scaling pass'])} |"
          f" {100 * r['efficiency']:.0f}% |")
    out.append("")
  if "memory" in results:
    out.append("## Peak memory of a training step (XLA's buffer"
               " assignment)\n")
    out.append(
        "Peak: arguments, outputs that do not reuse an argument, and"
        " temporaries. Arguments are the parameters, BatchNorm statistics,"
        " momentum and the batch (donated, so the outputs reuse them);"
        " temporaries are activations, gradients and intermediates.\n")
    out.append("| plain | SE | batch | plain peak MB | SE peak MB | SE / plain"
               " peak | SE / plain arguments | SE / plain temporaries |\n"
               "|---|---|---|---|---|---|---|---|")
    for r in results["memory"]["rows"]:
      p = r["peak_bytes"]
      out.append(f"| {r['plain']} | {r['se']} | {r['batch']} |"
                 f" {p[r['plain']] / 1e6:.1f} | {p[r['se']] / 1e6:.1f} |"
                 f" {r['ratio']:.3f} | {r['argument_ratio']:.3f} |"
                 f" {r['temp_ratio']:.3f} |")
    out.append("")
  if "kernels" in results:
    k = results["kernels"]
    out.append("## The convolutions of the CIFAR ResNets alone\n")
    out.append("`se_jax`: `se_jax.conv.conv2d` as the models use it"
               + (" (oneDNN's kernels, `se_jax.onednn`); `formulated`: its"
                  " XLA formulation (`impl='formulated'`)"
                  if k.get("conv_route") == "onednn" else "")
               + "; `XLA`: XLA's convolution in its default pipeline"
               " (`conv_impl='xla'`).\n")
    names = list(k["rows"][0]["times"])
    out.append("| N, H, W, C_in, C_out, stride | x in ResNet-20 | " + " | ".join(
        f"{n} ms" for n in names) + " |\n|---|---|" + "---|" * len(names))
    for r in k["rows"]:
      out.append(f"| {', '.join(map(str, r['shape']))} | {r['count']} | "
                 + " | ".join(_ms(r["times"][n]) for n in names) + " |")
    totals = k["totals_s"]
    for d, tot in totals.items():
      out.append(f"| ResNet-{d} total | | " + " | ".join(
          f"{1e3 * tot[n]:.0f}" for n in names) + " |")
    out.append("")
    others = "; ".join(
        f"ResNet-{d}: " + ", ".join(map(str, cifar_conv_counts(int(d))))
        for d in totals if d != "20")
    out.append("A total counts each shape as often as the network has it"
               + (f" ({others})" if others else "") + " and leaves out the"
               " first layer's input gradient, which training does not"
               " compute.\n")
    if k.get("steps"):
      out.append(
          "In the same rounds, their calls between the convolutions': "
          + ", ".join(f"{n} {_ms(t)} ms" for n, t in k["steps"].items())
          + " (medians over all the rounds).\n")
  if results.get("inference_convs", {}).get("rows"):
    rows = results["inference_convs"]["rows"]
    totals = inference_conv_totals(rows)
    names = list(dict.fromkeys(n for r in rows for n in r["times"]))
    out.append("## The convolutions of ResNet-50 alone, inference\n")
    out.append(
        "`se_jax`: `se_jax.conv.conv2d` as the models use it, in XLA's"
        " default pipeline; `XLA + option`: XLA's convolution with the"
        " option that keeps it off YNNPACK (the convolutions of the"
        f" inference section's `XLA conv + option` row); `{CONV_NO_OPTION}`:"
        " XLA's convolution in its default pipeline, which hands it to"
        " YNNPACK (measured for the strided 3x3 ones, which se_jax's"
        " formulation computes from their input's phases)"
        + ("; `formulated`: se_jax's XLA formulation (`impl='formulated'`),"
           " measured where the default runs oneDNN's kernels"
           if "formulated" in names else "")
        + ". Totals count each shape as often as ResNet-50 has it.\n")
    out.append("| batch | kind | se_jax ms | XLA + option ms | se_jax /"
               f" option | {CONV_NO_OPTION} ms | formulated ms |\n"
               "|---|---|---|---|---|---|---|")
    for batch, kinds in totals.items():
      for kind, tot in sorted(kinds.items(), key=lambda kv: kv[0] == "all"):
        phases, form = tot.get(CONV_NO_OPTION), tot.get("formulated")
        out.append(
            f"| {batch} | {kind} | {1e3 * tot['se_jax']:.1f} |"
            f" {1e3 * tot['XLA + option']:.1f} |"
            f" {tot['se_jax'] / tot['XLA + option']:.2f} |"
            f" {'-' if phases is None else f'{1e3 * phases:.1f}'} |"
            f" {'-' if form is None else f'{1e3 * form:.1f}'} |")
    out.append("")
    out.append("| batch | H, C_in, C_out, kernel, stride | x in ResNet-50 |"
               " YNNPACK in se_jax's program | " + " | ".join(
                   f"{n} ms" for n in names) + " |\n|---|---|---|---|"
               + "---|" * len(names))
    for r in rows:
      out.append(
          f"| {r['batch']} | {', '.join(map(str, r['shape']))} |"
          f" {r['count']} | {'yes' if r['ynnpack'] else 'no'} | "
          + " | ".join(_ms(r["times"][n]) if n in r["times"] else "-"
                       for n in names) + " |")
    out.append("")
  if "rows" in results.get("allocator", {}):
    al = results["allocator"]
    kept = KEPT_HEAP in al["rows"]
    out.append("## Memory: the training step in fresh processes\n")
    scripts = (f"`GLIBC_TUNABLES={al['tunables']}` (the heap kept, huge pages"
               " advised where the kernel takes advice: what the experiment"
               " scripts restart with; `experiments/allocator.py`)")
    out.append(
        f"`{al['model']}`, batch {al['batch']}, the trainer's step in"
        f" {al['rounds']} round(s) of fresh processes, "
        + (f"the rounds alternating: {scripts}, no tunables (the heap kept"
           " by se_jax's import through glibc's `mallopt`,"
           " `se_jax/heap.py`: what a program of one's own gets) and"
           f" `{allocator.OPT_OUT}=0` without tunables (glibc's defaults)"
           if IMPORT_HEAP in al["rows"] else
           "one per setting of glibc's tunables, the rounds alternating: "
           + (f"{scripts}, " if kept else "")
           + "`glibc.malloc.hugetlb=1` (huge pages advised) and"
           " `glibc.malloc.hugetlb=0`")
        + "; page faults and system time per step from `getrusage`.\n")
    out.append("| process | median ms | page faults / step | system ms / step"
               " | allocator |\n|---|---|---|---|---|")
    for k, r in al["rows"].items():
      out.append(f"| {k} | {_ms(r)} | {r['faults_per_step']:,.0f} |"
                 f" {1e3 * r['system_s_per_step']:.0f} | {r['state']} |")
    out.append("")
  if "tuning" in results:
    tu = results["tuning"]
    out.append(f"## What se_jax's measures buy: `{tu['model']}`, batch"
               f" {tu['batch']}\n")
    out.extend(_times_table(tu["times"], tu["batch"], "default"))
    out.append("")
    fold = tu.get("fold")
    if fold:
      out.append(f"## Folding BN into SE: CIFAR ResNet-{fold['depth']},"
                 f" batch {tu['batch']}\n")
      out.append("| program | median ms | vs plain | peak MB | vs plain |\n"
                 "|---|---|---|---|---|")
      t, m = fold["times"], fold["peak_bytes"]
      for key in t:
        out.append(f"| {key} | {_ms(t[key])} |"
                   f" {_ratio(t, key, fold['plain']):.3f} |"
                   f" {m[key] / 1e6:.1f} | {m[key] / m[fold['plain']]:.3f} |")
      out.append("")
  return "\n".join(out) + "\n"


_README_START = "<!-- benchmark summary: written by python -m"
_README_END = "<!-- end of benchmark summary -->"


def _sign(check: dict) -> str:
  return "<=" if check["direction"] == "max" else ">="


def _interval_text(check: dict) -> str:
  iv = check.get("interval")
  return f"{iv[0]:.3f}-{iv[1]:.3f}" if iv else "-"


def _verdict_of(check: dict) -> str:
  """The check's verdict, judged here if it carries none."""
  return check.get("verdict") or verdict(check)


def _verdict_text(check: dict) -> str:
  """The verdict, with by how much a missed target misses and on which
  side of the limit an undecided value lies."""
  v = _verdict_of(check)
  if v == "missed":
    return (f"missed (by {abs(check['value'] / check['limit'] - 1) * 100:.1f}"
            "%)")
  if v == "within noise":
    return f"within noise ({'met' if check['met'] else 'missed'} by the value)"
  return v


def readme_summary(results: dict, checks: list[dict], prov: dict) -> str:
  """The README's performance paragraph, from the measurements."""
  count = {v: sum(1 for c in checks if _verdict_of(c) == v)
           for v in ("met", "missed", "within noise")}
  lines = [
      f"{_README_START} experiments.benchmark --update-readme -->",
      f"On {prov['machine']} ({prov['date']}, commit {prov['commit']}), of"
      f" {len(checks)} target checks {count['met']} are met, {count['missed']}"
      f" missed and {count['within noise']} within the run's noise (the"
      f" {CONFIDENCE:.0%} interval of the value contains the limit);"
      " [experiments/results/benchmark.md](experiments/results/benchmark.md)"
      " has every number, the intervals and what bounds each miss.", ""]
  for c in checks:
    iv = f", interval {_interval_text(c)}" if c.get("interval") else ""
    lines.append(f"- {c['what']}, {c['where']}: {c['value']:.3f}{iv}"
                 f" ({_sign(c)} {c['limit']}: {_verdict_text(c)})")
  lines.append(_README_END)
  return "\n".join(lines)


def update_readme(summary: str, path: str) -> bool:
  """Replaces the summary between the markers in README.md; False if the
  README has no markers."""
  return files.replace_section(path, _README_START, _README_END, summary)


PARTIAL = "benchmark.partial.json"


def _partial_key(prov: dict, cfg: dict) -> dict:
  """What must match for a finished section to stand in a later run."""
  # As it reads back from JSON, so that a saved key compares equal.
  return json.loads(json.dumps(
      {"commit": prov["commit"], "machine": prov["machine"],
       "devices": prov["devices"], "versions": prov["versions"],
       "config": cfg}))


def load_partial(path: str, key: dict) -> dict | None:
  """The sections that an interrupted run finished, if that run measured
  the same commit with the same configuration on the same machine."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      partial = json.load(f)
  except (OSError, ValueError) as e:
    print(f"Ignoring {path}: {e}.", file=sys.stderr)
    return None
  if key["commit"].endswith("+uncommitted") or key["commit"] == "unknown":
    why = f"this checkout ({key['commit']}) is not a commit"
  elif partial.get("key") != key:
    old = partial.get("key", {})
    diff = sorted(k for k in key if old.get(k) != key[k])
    why = "it differs in " + ", ".join(diff)
  else:
    return partial
  print(f"Not reusing the sections in {path}: {why}; measuring them again.",
        file=sys.stderr)
  return None


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--repeats", type=cli.at_least(1), default=9)
  p.add_argument("--overhead-repeats", type=cli.at_least(1), default=None,
                 help="repeats of the overhead section's SE / plain pairs"
                      f" (default {OVERHEAD_REPEATS_FACTOR} x --repeats)")
  p.add_argument("--quick", action="store_true",
                 help="a smoke run: small batches, 3 repeats, ResNet-20 only")
  p.add_argument("--no-torch", action="store_true",
                 help="se_jax only, without the PyTorch comparisons")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="compute dtype of both sides (PyTorch under autocast);"
                      " default bfloat16 on GPUs, float32 elsewhere")
  p.add_argument("--out-dir", default=os.path.join(_HERE, "results"))
  p.add_argument("--report-only", action="store_true",
                 help="measure nothing: write benchmark.md again from the"
                      " measurements in OUT_DIR/benchmark.json")
  p.add_argument("--fresh", action="store_true",
                 help=f"measure every section again, ignoring the sections"
                      f" that an interrupted run of the same commit and"
                      f" configuration saved in OUT_DIR/{PARTIAL}")
  p.add_argument("--update-readme", action="store_true",
                 help="write the summary into README.md's performance"
                      " section")
  args = p.parse_args(argv)
  if args.report_only:
    return rewrite_report(args.out_dir, args.update_readme)
  sections = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
  # Compile times are part of the report: measure them without the cache.
  jax.config.update("jax_enable_compilation_cache", False)
  cfg = _config(args)
  prov = provenance()
  if cfg["torch"]:
    import timm
    import torch
    prov["versions"].update(torch=torch.__version__, timm=timm.__version__)
  serializable = {k: v for k, v in cfg.items() if k != "dtype"}
  serializable["dtype"] = "bfloat16" if cfg["bf16"] else "float32"
  os.makedirs(args.out_dir, exist_ok=True)
  partial_path = os.path.join(args.out_dir, PARTIAL)
  key = _partial_key(prov, serializable)
  partial = (None if args.fresh
             else load_partial(partial_path, key))
  if partial is None:
    partial = {"key": key, "started": prov["date"], "results": {},
               "wall_seconds": {}}
  reused = [s for s in sections if s in partial["results"]]
  if reused:
    print(f"Continuing the run started {partial['started']}: reusing"
          f" {', '.join(reused)} from {partial_path}"
          " (--fresh measures everything again).", file=sys.stderr)
  for s in sections:
    if s in partial["results"]:
      continue
    t0 = time.perf_counter()
    partial["results"][s] = globals()[f"section_{s}"](cfg)
    partial["wall_seconds"][s] = time.perf_counter() - t0
    files.write_json(partial_path, partial)
  results = {s: partial["results"][s] for s in sections}
  if reused:
    prov["continued"] = {"started": partial["started"], "sections": reused}
  checks = check_targets(results, cfg)
  md = to_markdown(results, checks, prov, cfg)
  files.write_json(os.path.join(args.out_dir, "benchmark.json"), {
      "provenance": prov, "config": serializable, "results": results,
      "targets": checks, "evidence": evidence(results),
      "wall_seconds": sum(partial["wall_seconds"][s] for s in sections)})
  files.write_atomic(os.path.join(args.out_dir, "benchmark.md"), md)
  os.remove(partial_path)
  if args.update_readme:
    _write_readme(results, checks, prov)
  print(md)
  return {"results": results, "targets": checks}


def _write_readme(results, checks, prov) -> None:
  path = os.path.join(_ROOT, "README.md")
  if not update_readme(readme_summary(results, checks, prov), path):
    raise SystemExit(
        f"--update-readme: {path} has no benchmark summary markers"
        f" ({_README_START!r} ... {_README_END!r}).")


def recount_flops(results: dict, commit: str) -> bool:
  """Counts the training steps' FLOPs again with this commit's
  `se_jax.count_flops` (counts, not measurements); marks `results` with
  `commit` and returns True where a count changed."""
  changed = False

  def recount(flops: dict, batch: int, size: int, classes: int) -> None:
    nonlocal changed
    for name, old in flops.items():
      new = training_flops(name, batch, size, classes)
      if new != old:
        flops[name], changed = new, True

  if "train" in results:
    recount(results["train"]["flops"], results["train"]["batch"], 224, 1000)
  for row in results.get("cifar", {}).get("rows", []):
    recount(row["flops"], row["batch"], 32, 10)
  if changed:
    results["flops_recounted_at"] = commit
  return changed


def rewrite_report(out_dir: str, readme: bool = False) -> dict:
  """benchmark.md (and the targets and evidence of benchmark.json) from the
  measurements already in benchmark.json, with the measuring run's
  provenance and a line naming the commit that wrote the text."""
  path = os.path.join(out_dir, "benchmark.json")
  if not os.path.exists(path):
    raise SystemExit(f"--report-only: no {path}; run the benchmark first.")
  with open(path) as f:
    saved = json.load(f)
  cfg = saved["config"]
  results, prov = saved["results"], saved["provenance"]
  commit = provenance()["commit"]
  recount_flops(results, commit)
  checks = check_targets(results, cfg)
  md = to_markdown(
      results, checks, prov, cfg,
      written_by=f"Report text written from benchmark.json by `python -m"
                 f" experiments.benchmark --report-only` at commit {commit}.")
  saved.update(targets=checks, evidence=evidence(results),
               report_commit=commit)
  files.write_json(path, saved)
  files.write_atomic(os.path.join(out_dir, "benchmark.md"), md)
  if readme:
    _write_readme(results, checks, prov)
  print(md)
  return {"results": results, "targets": checks}


if __name__ == "__main__":
  cli.main_guard(main)()
