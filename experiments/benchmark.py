"""Speed and memory of se_jax: SE against the plain network, and against PyTorch.

  python -m experiments.benchmark [--sections inference,train,cifar,...]
      [--repeats 9] [--quick]

Every comparison is measured side by side in one run: the timed calls of the
compared programs alternate (A B B A ...), each after its warm-up and
compilation, and the report gives medians and their ratio. Compilation is
timed separately, with JAX's persistent cache off. Sections:

- ``inference``: ResNet-50 and SE-ResNet-50 at batch 1, 8 and 32 (224 x 224),
  se_jax against timm's resnet50 / seresnet50.
- ``train``: one SGD training step of the same networks.
- ``cifar``: a training step of CIFAR ResNet-20 / ResNet-110 with and
  without SE at batch 128, against the same networks written in PyTorch here.
- ``se_block``: `se_jax.squeeze_excite` alone on the feature maps of each
  ResNet-50 stage, its bytes moved against the machine's measured copy rate.
- ``memory``: XLA's peak memory of a training step, SE against plain.
- ``kernels``: the convolutions of the CIFAR ResNets alone (forward, input
  gradient, weight gradient), XLA against PyTorch: what bounds the step.
- ``tuning``: what this package's CPU measures buy: the CIFAR SE-ResNet-20
  step with XLA's default options, and without the saved convolution inputs
  of `se_jax.conv`, with profiles of the transposes they cost.

On a CPU the programs run in float32; on a GPU in bfloat16 (se_jax's
``dtype=bfloat16``; timm in channels_last under autocast). The report,
experiments/results/benchmark.md and .json, states the machine, versions,
date and commit, and checks the targets of the performance issue.
"""

from __future__ import annotations

import argparse
import functools
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import se_jax
from experiments import files
from experiments.provenance import markdown_header, provenance
from se_jax import conv as conv_lib
from se_jax import primitives
from se_jax.models import resnet
from se_jax.models import create

_HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("inference", "train", "cifar", "se_block", "memory", "kernels",
            "tuning")

# Targets of the performance issue, as (what, limit, direction).
TARGETS = {
    "se_overhead_inference": ("SE overhead, inference (SE / plain time)",
                              1.02, "max"),
    "se_overhead_train": ("SE overhead, training step (SE / plain time)",
                          1.05, "max"),
    "speed_vs_timm_inference": (
        "SE-ResNet-50 inference speed, se_jax / timm", 1.1, "min"),
    "speed_vs_torch_cifar": (
        "CIFAR SE-ResNet-20 training speed, se_jax / PyTorch eager", 1.0,
        "min"),
    "memory_se_over_plain": ("Peak training memory, SE / plain", 1.05,
                             "max"),
}
GPU_SE_OVERHEAD_TARGET = 1.03


# ------------------------------------------------------------------ timing


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int = 2) -> dict[str, dict]:
  """Median seconds per call of each function, their calls alternating.

  Each repeat runs every function once, in an order that reverses on every
  other repeat, so that drift in the machine's speed hits all alike.
  """
  for f in fns.values():
    for _ in range(warmup):
      f()
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(repeats):
    for k in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t0)
  return {k: {"median_s": statistics.median(v), "min_s": min(v),
              "max_s": max(v), "n": len(v)} for k, v in times.items()}


class _Compiled:
  """A jitted function, compiled once with se_jax's options, timed."""

  def __init__(self, fn, *args, options=None, donate=()):
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    self.compiled = lowered.compile(compiler_options=options or {})
    self.compile_s = time.perf_counter() - t0

  def __call__(self, *args):
    return self.compiled(*args)


# ------------------------------------------------------------------ se_jax


def _jax_images(batch, size, channels=3, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(0), (batch, size, size, channels),
                           dtype)


def jax_inference(name: str, batch: int, size: int, dtype, options=None):
  """A zero-argument callable running `name` in eval mode, and its compile."""
  model = create(name, dtype=dtype)
  model.eval()
  graphdef, state = nnx.split(model)
  x = _jax_images(batch, size, dtype=dtype or jnp.float32)
  f = _Compiled(lambda s, x: nnx.merge(graphdef, s)(x), state, x,
                options=options)
  return (lambda: f(state, x).block_until_ready()), f.compile_s, f


_TRAIN_STEPS: dict[tuple, tuple] = {}


def jax_train_step(name: str, batch: int, size: int, num_classes: int, dtype,
                   options=None, **model_options):
  """A zero-argument callable running one SGD step of `name` in place.

  Each program is compiled once per run of the benchmark, for the timing and
  the memory sections alike.
  """
  # The tuning section traces with conv_lib._materialized and the units'
  # folding of BN into SE swapped out.
  key = (name, batch, size, num_classes, dtype,
         None if options is None else tuple(sorted(options.items())),
         conv_lib._materialized, tuple(sorted(model_options.items())))
  if key not in _TRAIN_STEPS:
    _TRAIN_STEPS[key] = _build_train_step(name, batch, size, num_classes,
                                          dtype, options, model_options)
  return _TRAIN_STEPS[key]


def _build_train_step(name, batch, size, num_classes, dtype, options,
                      model_options):
  model = create(name, num_classes=num_classes, dtype=dtype, **model_options)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = optax.chain(optax.add_decayed_weights(1e-4),
                   optax.sgd(0.1, momentum=0.9))
  x = _jax_images(batch, size, dtype=dtype or jnp.float32)
  y = jnp.arange(batch) % num_classes

  def step(state, x, y):
    params, stats, opt = state

    def loss_fn(p):
      m = nnx.merge(graphdef, p, stats, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.state(m, nnx.BatchStat)

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  state = [(params, stats, tx.init(params))]
  f = _Compiled(step, state[0], x, y, options=options, donate=(0,))

  def run():
    state[0] = f(state[0], x, y)
    jax.block_until_ready(state[0])

  return run, f.compile_s, f


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


def section_inference(cfg) -> dict:
  rows = []
  for batch in cfg["inference_batches"]:
    fns, compile_s = {}, {}
    for name in ("resnet50", "se_resnet50"):
      fns[f"se_jax {name}"], compile_s[name], _ = jax_inference(
          name, batch, 224, cfg["dtype"])
    if cfg["torch"]:
      for timm_name, ours in (("resnet50", "resnet50"),
                              ("seresnet50", "se_resnet50")):
        for cl in cfg["torch_layouts"]:
          fns[f"timm {ours}{' CL' if cl else ''}"] = torch_inference(
              _timm_model(timm_name), batch, 224, cl, cfg["bf16"])
    print(f"[inference] batch {batch}", file=sys.stderr, flush=True)
    times = time_alternating(fns, cfg["repeats"])
    rows.append({"batch": batch, "times": times, "compile_s": compile_s})
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
  return {"batch": batch, "times": times, "compile_s": compile_s}


def section_cifar(cfg) -> dict:
  rows = []
  batch = cfg["cifar_batch"]
  for depth in cfg["cifar_depths"]:
    fns, compile_s, params = {}, {}, {}
    for se in (False, True):
      name = f"cifar_{'se_' if se else ''}resnet{depth}"
      fns[f"se_jax {name}"], compile_s[name], _ = jax_train_step(
          name, batch, 32, 10, cfg["dtype"])
      params[f"se_jax {name}"] = se_jax.count_params(
          nnx.eval_shape(lambda: create(name, num_classes=10)))
      if cfg["torch"]:
        net = torch_cifar_resnet(depth, se)
        params[f"PyTorch {name}"] = sum(p.numel() for p in net.parameters())
        for cl in cfg["torch_layouts"]:
          fns[f"PyTorch {name}{' CL' if cl else ''}"] = torch_train_step(
              torch_cifar_resnet(depth, se), batch, 32, 10, cl, cfg["bf16"])
    print(f"[cifar] ResNet-{depth} at batch {batch}", file=sys.stderr,
          flush=True)
    times = time_alternating(fns, cfg["repeats"])
    rows.append({"depth": depth, "batch": batch, "times": times,
                 "compile_s": compile_s, "params": params})
  return {"rows": rows}


def _copy_rate(nbytes: int, repeats: int) -> float:
  """Bytes per second of a read-and-write pass over `nbytes` in XLA."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.5)
  t = time_alternating({"copy": lambda: f(x).block_until_ready()},
                       repeats)["copy"]["median_s"]
  return 2 * x.nbytes / t


def section_se_block(cfg) -> dict:
  rows = []
  batch = cfg["se_batch"]
  rate = _copy_rate(64 << 20, cfg["repeats"])
  for size, channels in ((56, 256), (28, 512), (14, 1024), (7, 2048)):
    params = se_jax.init_excite(jax.random.key(0), channels, reduction=16,
                                rounding="timm")
    x = _jax_images(batch, size, channels, cfg["dtype"] or jnp.float32)
    f = jax.jit(functools.partial(se_jax.squeeze_excite, params))
    fns = {"se_jax squeeze_excite": lambda: f(x).block_until_ready()}
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
    # Pooling reads the map once; scaling reads it again and writes it.
    moved = 3 * x.nbytes
    t = times["se_jax squeeze_excite"]["median_s"]
    rows.append({"shape": [batch, size, size, channels], "times": times,
                 "bytes_moved": moved, "memory_bound_s": moved / rate,
                 "efficiency": moved / rate / t})
  return {"copy_rate_GBps": rate / 1e9, "rows": rows}


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


def section_kernels(cfg) -> dict:
  """Each convolution of the CIFAR ResNets, forward and both gradients."""
  batch, dtype = cfg["cifar_batch"], cfg["dtype"] or jnp.float32
  # (H, C_in, C_out, stride, count in ResNet-20)
  shapes = [(32, 3, 16, 1, 1), (32, 16, 16, 1, 6), (32, 16, 32, 2, 1),
            (16, 32, 32, 1, 5), (16, 32, 64, 2, 1), (8, 64, 64, 1, 5)]
  rows = []
  totals: dict[str, float] = {}
  for h, cin, cout, stride, count in shapes:
    ho = h // stride
    k = jax.random.key(1)
    x = _jax_images(batch, h, cin, dtype)
    w = jax.random.normal(k, (3, 3, cin, cout), dtype)
    dy = jax.random.normal(k, (batch, ho, ho, cout), dtype)
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(stride, stride),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fwd = _Compiled(conv, x, w)
    dx = _Compiled(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy),
                   x, w, dy)
    dw = _Compiled(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy),
                   x, w, dy)
    fns = {"XLA forward": lambda: fwd(x, w).block_until_ready(),
           "XLA input grad": lambda: jax.block_until_ready(dx(x, w, dy)),
           "XLA weight grad": lambda: jax.block_until_ready(dw(x, w, dy))}
    if cfg["torch"]:
      torch = _torch()
      device = _torch_device(torch)
      tdtype = torch.bfloat16 if cfg["bf16"] else torch.float32
      xt = torch.randn(batch, cin, h, h, device=device, dtype=tdtype)
      wt = torch.randn(cout, cin, 3, 3, device=device, dtype=tdtype)
      dyt = torch.randn(batch, cout, ho, ho, device=device, dtype=tdtype)
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

      fns["PyTorch forward"] = sync(lambda: torch.nn.functional.conv2d(
          xt, wt, stride=stride, padding=1))
      fns["PyTorch input grad"] = sync(lambda: bwd((True, False, False)))
      fns["PyTorch weight grad"] = sync(lambda: bwd((False, True, False)))
    times = time_alternating(fns, cfg["repeats"])
    row = {"shape": [batch, h, h, cin, cout, stride], "count": count,
           "times": times}
    rows.append(row)
    for name, t in times.items():
      # A network's first conv needs no input gradient.
      if h == 32 and cin == 3 and "input grad" in name:
        continue
      totals[name] = totals.get(name, 0.0) + count * t["median_s"]
  return {"rows": rows, "resnet20_totals_s": totals}


def _profile_transposes(run: Callable[[], object], steps: int = 3) -> float:
  """Seconds per step spent in XLA's transpose fusions, from a profile."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    path = glob.glob(os.path.join(d, "**", "*perfetto_trace.json.gz"),
                     recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total = sum(e["dur"] for e in events if e.get("ph") == "X"
              and re.match(r"transpose\w*fusion", e["name"]))
  return total / 1e6 / steps


def section_tuning(cfg) -> dict:
  name, batch = "cifar_se_resnet20", cfg["cifar_batch"]
  fns = {}
  fns["se_jax"], _, _ = jax_train_step(name, batch, 32, 10, cfg["dtype"])
  fns["XLA default options"], _, _ = jax_train_step(
      name, batch, 32, 10, cfg["dtype"], options={})
  with mock.patch.object(conv_lib, "_materialized", lambda x: x):
    fns["without saved conv inputs"], _, _ = jax_train_step(
        name, batch, 32, 10, cfg["dtype"])
  fns["BN apart from SE"], _, _ = jax_train_step(
      name, batch, 32, 10, cfg["dtype"], fold_norm=False)
  print("[tuning] CIFAR SE-ResNet-20 variants", file=sys.stderr, flush=True)
  times = time_alternating(fns, cfg["repeats"])
  transposes = {k: _profile_transposes(fns[k])
                for k in ("se_jax", "without saved conv inputs")}
  # What folding the last BN into the SE block buys, in the deepest net.
  depth = max(cfg["cifar_depths"])
  plain, se = f"cifar_resnet{depth}", f"cifar_se_resnet{depth}"
  steps = {plain: jax_train_step(plain, batch, 32, 10, cfg["dtype"]),
           se: jax_train_step(se, batch, 32, 10, cfg["dtype"])}
  steps[f"{se}, BN apart from SE"] = jax_train_step(
      se, batch, 32, 10, cfg["dtype"], fold_norm=False)
  print(f"[tuning] CIFAR ResNet-{depth}, BN folded into SE or apart",
        file=sys.stderr, flush=True)
  fold_times = time_alternating({k: v[0] for k, v in steps.items()},
                                cfg["repeats"])
  fold_peak = {k: peak_bytes(v[2].compiled.memory_analysis())
               for k, v in steps.items()}
  return {"model": name, "batch": batch, "times": times,
          "transpose_s_per_step": transposes,
          "fold": {"depth": depth, "plain": plain, "se": se,
                   "times": fold_times, "peak_bytes": fold_peak}}


# ------------------------------------------------------------------ report


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
      # timm's default memory format, and channels_last (the faster one on
      # GPUs, and often on CPUs).
      "torch_layouts": (True,) if gpu else (False, True),
      "inference_batches": (1, 8, 32) if not gpu else (1, 32, 256),
      "train_batch": 8 if not gpu else 128,
      "cifar_batch": 128,
      "cifar_depths": (20, 110),
      "se_batch": 8 if not gpu else 128,
      "memory_batches": (8, 32) if not gpu else (128, 256),
  }
  if args.quick:
    cfg.update(repeats=min(args.repeats, 3), inference_batches=(1,),
               train_batch=2, cifar_depths=(20,), cifar_batch=32,
               se_batch=2, memory_batches=())
  return cfg


def _ratio(times, a, b):
  return times[a]["median_s"] / times[b]["median_s"]


def check_targets(results: dict, cfg: dict) -> list[dict]:
  """Each target of the issue with its measured values, met or not."""
  checks = []

  def add(key, value, where):
    what, limit, direction = TARGETS[key]
    if key.startswith("se_overhead") and cfg.get("gpu", cfg["bf16"]):
      limit = GPU_SE_OVERHEAD_TARGET
    ok = value <= limit if direction == "max" else value >= limit
    checks.append({"target": key, "what": what, "where": where,
                   "value": value, "limit": limit, "direction": direction,
                   "met": bool(ok)})

  for row in results.get("inference", {}).get("rows", []):
    t = row["times"]
    add("se_overhead_inference",
        _ratio(t, "se_jax se_resnet50", "se_jax resnet50"),
        f"ResNet-50, batch {row['batch']}")
    for layout in ("", " CL"):
      key = f"timm se_resnet50{layout}"
      if key in t:
        add("speed_vs_timm_inference", _ratio(t, key, "se_jax se_resnet50"),
            f"batch {row['batch']}, timm "
            + ("channels_last" if layout else "default layout"))
  if "train" in results:
    t = results["train"]["times"]
    add("se_overhead_train",
        _ratio(t, "se_jax se_resnet50", "se_jax resnet50"),
        f"ResNet-50, batch {results['train']['batch']}")
  for row in results.get("cifar", {}).get("rows", []):
    t, d = row["times"], row["depth"]
    add("se_overhead_train",
        _ratio(t, f"se_jax cifar_se_resnet{d}", f"se_jax cifar_resnet{d}"),
        f"CIFAR ResNet-{d}, batch {row['batch']}")
    if d == 20:
      for layout in ("", " CL"):
        key = f"PyTorch cifar_se_resnet20{layout}"
        if key in t:
          add("speed_vs_torch_cifar",
              _ratio(t, key, "se_jax cifar_se_resnet20"),
              f"batch {row['batch']}, PyTorch "
              + ("channels_last" if layout else "default layout"))
  for row in results.get("memory", {}).get("rows", []):
    add("memory_se_over_plain", row["ratio"],
        f"{row['plain']}, batch {row['batch']}")
  return checks


def _ms(t):
  return f"{1e3 * t['median_s']:.1f}"


def _times_table(times: dict, batch: int, baseline: str | None = None):
  head = "| program | median ms | img/s |" + (
      f" vs {baseline} |" if baseline else "")
  out = [head, "|---|---|---|" + ("---|" if baseline else "")]
  for k, t in times.items():
    line = f"| {k} | {_ms(t)} | {batch / t['median_s']:.1f} |"
    if baseline:
      line += f" {times[baseline]['median_s'] / t['median_s']:.2f}x |"
    out.append(line)
  return out


def evidence(results: dict) -> list[str]:
  """What bounds the measured ratios, in words from the numbers."""
  lines = []
  k = results.get("kernels")
  if k and "PyTorch forward" in k["resnet20_totals_s"]:
    tot = k["resnet20_totals_s"]
    xla = sum(v for n, v in tot.items() if n.startswith("XLA"))
    pt = sum(v for n, v in tot.items() if n.startswith("PyTorch"))
    parts = ", ".join(
        f"{what} {1e3 * tot['XLA ' + what]:.0f} vs"
        f" {1e3 * tot['PyTorch ' + what]:.0f} ms"
        for what in ("forward", "input grad", "weight grad"))
    lines.append(
        f"The convolutions of one ResNet-20 training step alone take"
        f" {1e3 * xla:.0f} ms in XLA and {1e3 * pt:.0f} ms in PyTorch"
        f" ({parts}): XLA's CPU convolution kernels run at"
        f" {pt / xla:.2f}x PyTorch's speed, which bounds the whole step.")
  c = results.get("cifar")
  if c and k:
    row = next(r for r in c["rows"] if r["depth"] == 20)
    t = row["times"]
    if "PyTorch cifar_se_resnet20" in t:
      step = t["se_jax cifar_se_resnet20"]["median_s"]
      conv = sum(v for n, v in k["resnet20_totals_s"].items()
                 if n.startswith("XLA"))
      lines.append(
          f"In se_jax's SE-ResNet-20 step ({1e3 * step:.0f} ms) the"
          f" convolutions measured alone account for {1e3 * conv:.0f} ms;"
          f" the other {1e3 * (step - conv):.0f} ms are BatchNorm, ReLU, SE,"
          " the layout transposes of the weight gradients and the update.")
  tu = results.get("tuning")
  if tu:
    t = tu["times"]
    tr = tu["transpose_s_per_step"]
    lines.append(
        f"The CPU measures of se_jax, measured in the same run:"
        f" with XLA's default options the step takes"
        f" {_ratio(t, 'XLA default options', 'se_jax'):.2f}x as long"
        f" (YNNPACK convolutions), and without the saved convolution inputs"
        f" {_ratio(t, 'without saved conv inputs', 'se_jax'):.2f}x as long;"
        f" a profile puts {1e3 * tr['without saved conv inputs']:.0f} ms of"
        f" that step in transpose fusions, against"
        f" {1e3 * tr['se_jax']:.0f} ms with them.")
  fold = (tu or {}).get("fold")
  if fold:
    t, m = fold["times"], fold["peak_bytes"]
    se, plain = fold["se"], fold["plain"]
    apart = f"{se}, BN apart from SE"
    lines.append(
        f"Folding each unit's last BN into its SE block"
        f" (`SqueezeExcite.affine_call`, whose gradient needs only the"
        f" BN's input): the CIFAR SE-ResNet-{fold['depth']} step takes"
        f" {_ms(t[se])} ms against {_ms(t[apart])} ms with the BN apart,"
        f" SE / plain time {_ratio(t, se, plain):.3f} against"
        f" {_ratio(t, apart, plain):.3f}, and SE / plain peak memory"
        f" {m[se] / m[plain]:.3f} against {m[apart] / m[plain]:.3f}.")
  lines.extend(_inference_evidence(results))
  torch_se = _torch_se_overheads(results)
  if torch_se:
    lines.append(
        "PyTorch's own SE overhead on this machine, SE / plain time in the"
        " same runs: " + "; ".join(torch_se) + ".")
  return lines


def se_input_bytes(name: str, batch: int, size: int,
                   itemsize: int = 4) -> int:
  """Bytes of all the maps the SE blocks of `name` read, for one batch:
  what the squeeze reads in a pass the plain network does not make."""
  elements = []
  folded = primitives.squeeze_excite_affine

  def record(params, x, *args, **kwargs):
    elements.append(x.size)
    return folded(params, x, *args, **kwargs)

  model = create(name)
  model.eval()
  with mock.patch.object(primitives, "squeeze_excite_affine", record):
    jax.eval_shape(model, jax.ShapeDtypeStruct((batch, size, size, 3),
                                               jnp.float32))
  return itemsize * sum(elements)


def _inference_evidence(results: dict) -> list[str]:
  lines = []
  rows = results.get("inference", {}).get("rows", [])
  rate = results.get("se_block", {}).get("copy_rate_GBps")
  if rows and rate:
    row = rows[-1]
    t, b = row["times"], row["batch"]
    extra = (t["se_jax se_resnet50"]["median_s"]
             - t["se_jax resnet50"]["median_s"])
    nbytes = se_input_bytes("se_resnet50", b, 224)
    pass_s = nbytes / (rate * 1e9)
    lines.append(
        f"SE-ResNet-50 inference at batch {b} takes {1e3 * extra:.0f} ms"
        f" more than ResNet-50 (SE / plain"
        f" {_ratio(t, 'se_jax se_resnet50', 'se_jax resnet50'):.3f}). With"
        f" the BN folded in, the SE blocks add one pass over their input"
        f" maps to the plain network's work, the squeeze: {nbytes / 1e6:.0f}"
        f" MB, {1e3 * pass_s:.0f} ms at the measured {rate:.1f} GB/s,"
        f" besides the small FC layers. The extra time is"
        + (" within" if extra <= pass_s else
           f" {extra / pass_s:.1f}x")
        + " the cost of that pass, which only fusing the pooling into the"
        " convolution that produces the map would save.")
  cl = [(row["batch"], _ratio(row["times"], "timm resnet50 CL",
                              "se_jax resnet50"),
         _ratio(row["times"], "timm se_resnet50 CL", "se_jax se_resnet50"))
        for row in rows if "timm resnet50 CL" in row["times"]]
  if cl:
    lines.append(
        "Against timm in channels_last, se_jax / timm inference speed"
        " without SE and with SE, by batch: "
        + "; ".join(f"{b}: {p:.2f} and {s:.2f}" for b, p, s in cl) + "."
        + (" The SE networks compare at least as well as the plain ones, so"
           " the gap lies in the network both share: its convolutions,"
           " which timm runs with oneDNN's channels_last kernels and se_jax"
           " with XLA's Eigen kernels (the convolution table shows the same"
           " gap in training)." if all(s >= p for _, p, s in cl) else ""))
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


def to_markdown(results: dict, checks: list[dict], prov: dict,
                cfg: dict, written_by: str | None = None) -> str:
  out = [markdown_header("se_jax benchmark", prov)
         + (f"\n{written_by}" if written_by else ""), ""]
  out.append(
      f"PyTorch {prov['versions'].get('torch', 'absent')}, timm"
      f" {prov['versions'].get('timm', 'absent')}. Medians of"
      f" {cfg['repeats']} timed calls per program, the programs' calls"
      " alternating, after warm-up; compilation timed apart."
      + (" bfloat16 compute." if cfg["bf16"] else " float32.")
      + " `CL`: PyTorch in channels_last.\n")
  out.append("## Targets\n")
  out.append("| target | where | measured | limit | met |\n|---|---|---|---|---|")
  for c in checks:
    sign = "<=" if c["direction"] == "max" else ">="
    miss = ""
    if not c["met"]:
      miss = f" (misses by {abs(c['value'] / c['limit'] - 1) * 100:.1f}%)"
    out.append(f"| {c['what']} | {c['where']} | {c['value']:.3f} |"
               f" {sign} {c['limit']} | {'yes' if c['met'] else 'no' + miss}"
               " |")
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
  if "train" in results:
    r = results["train"]
    out.append(f"## Training step, ResNet-50 and SE-ResNet-50, batch"
               f" {r['batch']}\n")
    out.append("Compile: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in r["compile_s"].items()) + "\n")
    out.extend(_times_table(r["times"], r["batch"], "se_jax se_resnet50"))
    out.append("")
  if "cifar" in results:
    for row in results["cifar"]["rows"]:
      d = row["depth"]
      out.append(f"## Training step, CIFAR ResNet-{d} +/- SE, batch"
                 f" {row['batch']}\n")
      out.append("Parameters: " + ", ".join(
          f"{k} {v:,}" for k, v in row["params"].items()) + ". Compile: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in row["compile_s"].items())
          + "\n")
      out.extend(_times_table(row["times"], row["batch"],
                              f"se_jax cifar_se_resnet{d}"))
      out.append("")
  if "se_block" in results:
    s = results["se_block"]
    out.append("## The SE block alone\n")
    out.append(
        f"`se_jax.squeeze_excite` on the maps of each ResNet-50 stage."
        f" Measured read-and-write rate of XLA on this machine:"
        f" {s['copy_rate_GBps']:.1f} GB/s. The block must read its input"
        " twice and write it once; the memory-bound time is those bytes at"
        " that rate.\n")
    out.append("| map (NHWC) | se_jax ms | timm SEModule CL ms | bytes moved"
               " | memory-bound ms | efficiency |\n|---|---|---|---|---|---|")
    for r in s["rows"]:
      t = r["times"]
      timm_ms = _ms(t["timm SEModule CL"]) if "timm SEModule CL" in t else "-"
      out.append(
          f"| {'x'.join(map(str, r['shape']))} |"
          f" {_ms(t['se_jax squeeze_excite'])} | {timm_ms} |"
          f" {r['bytes_moved'] / 1e6:.1f} MB |"
          f" {1e3 * r['memory_bound_s']:.2f} | {100 * r['efficiency']:.0f}% |")
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
    names = list(k["rows"][0]["times"])
    out.append("| N, H, W, C_in, C_out, stride | x in ResNet-20 | " + " | ".join(
        f"{n} ms" for n in names) + " |\n|---|---|" + "---|" * len(names))
    for r in k["rows"]:
      out.append(f"| {', '.join(map(str, r['shape']))} | {r['count']} | "
                 + " | ".join(_ms(r["times"][n]) for n in names) + " |")
    out.append("| ResNet-20 total | | " + " | ".join(
        f"{1e3 * k['resnet20_totals_s'][n]:.0f}" for n in names) + " |\n")
    out.append("The total counts each shape as often as ResNet-20 has it and"
               " leaves out the first layer's input gradient, which"
               " training does not compute.\n")
  if "tuning" in results:
    tu = results["tuning"]
    out.append(f"## What the CPU measures buy: `{tu['model']}`, batch"
               f" {tu['batch']}\n")
    out.extend(_times_table(tu["times"], tu["batch"], "se_jax"))
    out.append("")
    fold = tu.get("fold")
    if fold:
      out.append(f"## Folding BN into SE: CIFAR ResNet-{fold['depth']},"
                 f" batch {tu['batch']}\n")
      out.append("| program | median ms | vs plain | peak MB | vs plain |\n"
                 "|---|---|---|---|---|")
      t, m = fold["times"], fold["peak_bytes"]
      for k in t:
        out.append(f"| {k} | {_ms(t[k])} | {_ratio(t, k, fold['plain']):.3f}"
                   f" | {m[k] / 1e6:.1f} | {m[k] / m[fold['plain']]:.3f} |")
      out.append("")
  return "\n".join(out) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated, from {', '.join(SECTIONS)}")
  p.add_argument("--repeats", type=int, default=9)
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
  args = p.parse_args(argv)
  if args.report_only:
    return rewrite_report(args.out_dir)
  sections = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  # Compile times are part of the report: measure them without the cache.
  jax.config.update("jax_enable_compilation_cache", False)
  cfg = _config(args)
  prov = provenance()
  if cfg["torch"]:
    import timm
    import torch
    prov["versions"].update(torch=torch.__version__, timm=timm.__version__)
  results = {}
  t0 = time.perf_counter()
  for s in sections:
    results[s] = globals()[f"section_{s}"](cfg)
  checks = check_targets(results, cfg)
  serializable = {k: v for k, v in cfg.items() if k != "dtype"}
  serializable["dtype"] = "bfloat16" if cfg["bf16"] else "float32"
  os.makedirs(args.out_dir, exist_ok=True)
  files.write_json(os.path.join(args.out_dir, "benchmark.json"), {
      "provenance": prov, "config": serializable, "results": results,
      "targets": checks, "evidence": evidence(results),
      "wall_seconds": time.perf_counter() - t0})
  md = to_markdown(results, checks, prov, cfg)
  files.write_atomic(os.path.join(args.out_dir, "benchmark.md"), md)
  print(md)
  return {"results": results, "targets": checks}


def rewrite_report(out_dir: str) -> dict:
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
  checks = check_targets(results, cfg)
  commit = provenance()["commit"]
  md = to_markdown(
      results, checks, prov, cfg,
      written_by=f"Report text written from benchmark.json by `python -m"
                 f" experiments.benchmark --report-only` at commit {commit}.")
  saved.update(targets=checks, evidence=evidence(results),
               report_commit=commit)
  files.write_json(path, saved)
  files.write_atomic(os.path.join(out_dir, "benchmark.md"), md)
  print(md)
  return {"results": results, "targets": checks}


if __name__ == "__main__":
  main()
