"""2-D convolution for the ResNets, fast under a plain ``jax.jit`` on CPUs.

`conv2d` is ``lax.conv_general_dilated`` on NHWC images and HWIO kernels:
the same values and derivatives, in forward and reverse mode. On GPUs and
TPUs it is that convolution. On CPUs, a float32 convolution wider than 1x1
runs on oneDNN's kernels where `se_jax.onednn` is built (`resolve` says
which computation a convolution gets). Every other one, and every one where
the handlers are not built, is written so that XLA's default pipeline runs
each of its three parts (the forward pass, the input gradient and the
kernel gradient) on a fast kernel, with no compiler option (the
"formulation"):

- XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK, unless one of YNNPACK's
  own conditions declines them, and otherwise to Eigen. For the convolutions
  of these networks YNNPACK was 1.2-2x slower than Eigen in the forward pass
  and input gradient, and 2-10x slower in the kernel gradient
  (``python -m experiments.benchmark``, section ``kernels``).
- YNNPACK declines a convolution whose output is taller than its input, and
  one whose input and output features are both at most 16. So a stride-1
  convolution computes one extra output row and drops it (the extra row
  costs 1/H of the work), its input gradient is the transpose of a
  convolution of the explicitly padded input, whose output is one row taller
  than the gradient it reads, and the kernel gradient is accumulated over
  blocks of at most 16 images and 16 output channels. All three then run on
  Eigen.
- In the forward pass, a strided convolution with at least 64 input
  features is the sum of stride-1 convolutions of its input's phases (the
  rows and columns of one index modulo the stride, each with the kernel taps
  that meet them): the same multiply-adds, on Eigen as above. The 7x7 stem
  (3 input features) and the CIFAR ResNets' narrower strided convolutions
  were slower so, and stay on YNNPACK.
- A 1x1 convolution is a matrix product. YNNPACK takes only 2-D
  convolutions, and XLA turns a 1x1 convolution that it leaves into a matrix
  product of its own (Eigen's), faster than YNNPACK's dot for ResNet-50's
  1x1 convolutions. So the forward pass is a 1-D convolution over the
  image's pixels. The gradients are matrix products that YNNPACK does not
  take (their operands are transposed), on XLA's own dot too.
- Section ``inference_convs`` of the benchmark times each convolution of
  ResNet-50 this way against XLA's convolution with the option that keeps
  it off YNNPACK (which gives a 1x1 one XLA's own dot), and the strided
  ones also against XLA's convolution without it.

Every formulation is a linear map of the tangent that JAX differentiates and
transposes itself, so gradients of any order and forward mode work.
Under differentiation the input saved for the backward pass is kept in its
own buffer (`materialized`): otherwise XLA:CPU fuses the input's elementwise
producers (the BatchNorm and ReLU before the convolution) into the layout
change that the kernel gradient needs, and recomputes them with a strided
access pattern.

``impl="formulated"`` gives the formulation wherever oneDNN would run, and
``impl="xla"`` XLA's own convolution everywhere, for comparison.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from se_jax import onednn

__all__ = ["IMPLEMENTATIONS", "conv2d", "materialized", "resolve"]

IMPLEMENTATIONS = ("auto", "onednn", "formulated", "xla")

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# YNNPACK declines convolutions whose input and output features are both at
# most this wide.
_NARROW = 16
# Strided convolutions with at least this many input features are computed
# from their input's phases (ResNet-50's 3x3 ones, 128 to 512 features);
# the CIFAR ResNets' (16 and 32) were slower so.
_PHASES_MIN_FEATURES = 64


class _Spec(NamedTuple):
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int


def _xla(x, kernel, spec: _Spec):
  return lax.conv_general_dilated(
      x, kernel, window_strides=spec.strides, padding=spec.padding,
      dimension_numbers=_DIMENSIONS, feature_group_count=spec.groups)


def _pointwise(kernel, spec: _Spec) -> bool:
  return (kernel.shape[:2] == (1, 1) and spec.groups == 1
          and spec.padding == ((0, 0), (0, 0)))


def _subsample(x, spec: _Spec):
  sh, sw = spec.strides
  return x if (sh, sw) == (1, 1) else x[:, ::sh, ::sw, :]


def _matmul(x, kernel):
  """A 1x1 convolution of (already subsampled) `x` as one matrix product."""
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, -1))
  return y.reshape(n, h, w, -1)


def _pointwise_forward(x, kernel):
  """A 1x1 convolution of (already subsampled) `x` as a 1-D convolution over
  its pixels, which XLA computes as its own matrix product."""
  n, h, w, c = x.shape
  y = lax.conv_general_dilated(
      x.reshape(n, h * w, c), kernel.reshape(1, c, -1), window_strides=(1,),
      padding=((0, 0),), dimension_numbers=("NWC", "WIO", "NWC"))
  return y.reshape(n, h, w, -1)


def _library_conv(x, kernel, spec: _Spec) -> bool:
  """Whether YNNPACK would take this stride-1 convolution, and the tricks
  below can hand it to Eigen instead."""
  cin, cout = kernel.shape[2] * spec.groups, kernel.shape[3]
  height = x.shape[1]
  out = onednn.out_size(height, kernel.shape[0], 1, spec.padding[0])
  return (spec.strides == (1, 1) and spec.groups == 1
          and max(cin, cout) > _NARROW and out <= height)


def _phases(n: int, k: int, stride: int, pad: tuple[int, int]):
  """For each phase r of one spatial dim of a strided convolution (the
  input's rows whose index is r modulo `stride`): the rows it takes, the
  kernel taps that meet them, and its padding as a stride-1 convolution."""
  lo, hi = pad
  out = onednn.out_size(n, k, stride, pad)
  taps: dict[int, list[int]] = {}
  for t in range(k):
    taps.setdefault((t - lo) % stride, []).append(t)
  result = []
  for r, ts in sorted(taps.items()):
    first, last = ((t - lo - r) // stride for t in (ts[0], ts[-1]))
    length = len(range(r, n, stride))
    low, high = -first, out - 1 + last - (length - 1)
    # Rows that no output reads are cut off instead of padded.
    start, stop = max(0, -low), length + min(0, high)
    result.append((slice(r + stride * start, r + stride * stop, stride),
                   np.array(ts), (max(0, low), max(0, high))))
  return result


def _by_phases(x, kernel, spec: _Spec):
  """A strided convolution as the sum of stride-1 convolutions of the
  input's phases, each with the kernel taps that meet it: the same
  multiply-adds, in up to stride**2 convolutions and a sum, which is
  accumulated in at least float32 and rounded once."""
  dtype = x.dtype
  wide = jnp.promote_types(dtype, jnp.float32)
  x, kernel = x.astype(wide), kernel.astype(wide)
  total = None
  for rows, row_taps, row_pad in _phases(x.shape[1], kernel.shape[0],
                                         spec.strides[0], spec.padding[0]):
    for cols, col_taps, col_pad in _phases(x.shape[2], kernel.shape[1],
                                           spec.strides[1], spec.padding[1]):
      y = _cpu_forward(x[:, rows, cols], kernel[row_taps][:, col_taps],
                       _Spec((1, 1), (row_pad, col_pad), 1))
      total = y if total is None else total + y
  return total.astype(dtype)


def _by_phases_faster(x, kernel, spec: _Spec) -> bool:
  """Whether a strided convolution that YNNPACK would take is faster as
  stride-1 convolutions of its phases, which run on Eigen."""
  dims = list(zip(x.shape[1:3], kernel.shape[:2], spec.strides,
                  spec.padding))
  return (spec.strides != (1, 1) and spec.groups == 1
          and kernel.shape[2] >= _PHASES_MIN_FEATURES
          and max(kernel.shape[:2]) > 1
          and all(n >= max(k, s) and 0 < onednn.out_size(n, k, s, p) <= n
                  for n, k, s, p in dims))


def _cpu_forward(x, kernel, spec: _Spec):
  if _pointwise(kernel, spec):
    return _pointwise_forward(_subsample(x, spec), kernel)
  if _by_phases_faster(x, kernel, spec):
    return _by_phases(x, kernel, spec)
  if not _library_conv(x, kernel, spec):
    return _xla(x, kernel, spec)
  # One output row more than the input has rows; the extra row is dropped.
  (top, bottom), cols = spec.padding
  out = onednn.out_size(x.shape[1], kernel.shape[0], 1, (top, bottom))
  taller = spec._replace(padding=((top, bottom + x.shape[1] + 1 - out), cols))
  return _xla(x, kernel, taller)[:, :out]


def _cpu_input_term(tx, kernel, spec: _Spec):
  """The forward map's tangent in `tx`; its transpose is the input gradient."""
  if _pointwise(kernel, spec):
    return _matmul(_subsample(tx, spec), kernel)
  if not _library_conv(tx, kernel, spec):
    return _xla(tx, kernel, spec)
  # The same map with one bottom padding row made explicit: its transpose
  # writes a gradient one row taller than the output gradient it reads, and
  # drops that row.
  (top, bottom), cols = spec.padding
  padded = jnp.pad(tx, ((0, 0), (0, 1), (0, 0), (0, 0)))
  return _xla(padded, kernel, spec._replace(padding=((top, bottom - 1), cols)))


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _checkpointed_kernel_term(x, tk, spec: _Spec):
  """The forward map's tangent in `tk`; its transpose is the kernel gradient.

  Under ``jax.checkpoint`` the linearisation keeps `x` and forms the blocks
  below again when the gradient needs them.
  """
  if _pointwise(tk, spec):
    return _matmul(_subsample(x, spec), tk)
  if spec.groups != 1 or (x.shape[0] <= _NARROW and tk.shape[-1] <= _NARROW):
    return _xla(x, tk, spec)
  # Images and output channels in blocks of at most 16: the transpose of
  # each block is a kernel gradient whose input and output features (the
  # images and the channels) are both at most 16. The blocks read the input
  # as (C, H, W, N) and write (H, W, N, C), the layouts of XLA's kernel
  # gradient, so that neither the input nor the output gradient changes
  # layout once per block.
  xt = x.transpose(3, 1, 2, 0)
  dims = lax.conv_dimension_numbers(xt.shape, tk.shape,
                                    ("CHWN", "HWIO", "HWNC"))
  blocks = []
  for i in range(0, x.shape[0], _NARROW):
    blocks.append(jnp.concatenate(
        [lax.conv_general_dilated(
            xt[..., i:i + _NARROW], tk[..., j:j + _NARROW],
            window_strides=spec.strides, padding=spec.padding,
            dimension_numbers=dims)
         for j in range(0, tk.shape[-1], _NARROW)], axis=-1))
  return jnp.concatenate(blocks, axis=2).transpose(2, 0, 1, 3)


def _cpu_kernel_term(x, tk, spec: _Spec):
  return _checkpointed_kernel_term(x, tk, spec)


def materialized(x: jax.Array) -> jax.Array:
  """`x`, computed into a buffer of its own on the CPU.

  Writing a few elements back in place is an identity that XLA:CPU cannot
  fuse its producers into, so consumers read the buffer instead of
  recomputing it. XLA:CPU duplicates an elementwise producer into each of
  its elementwise consumers; through a chain of residual units, whose
  outputs feed both the next unit's convolution and its shortcut sum, that
  recomputes every earlier unit in every later one. The ResNets put each
  unit's output through this. Other platforms get `x` unchanged; values and
  derivatives are those of `x`.

  >>> float(materialized(jnp.arange(4.0)).sum())
  6.0
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x

  def cpu(x):
    # The update spans the whole batch axis, so that it is sharded like `x`
    # when the batch is split over devices.
    update = x[(slice(None),) + (slice(0, 1),) * (x.ndim - 1)]
    return lax.dynamic_update_slice(x, update, (0,) * x.ndim)

  return lax.platform_dependent(x, cpu=cpu, default=lambda x: x)


def _batch_shards(x) -> int:
  """Over how many devices the batch axis of `x` is split, as its type says
  (explicit sharding); 1 when it is not split or not typed."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def _on_cpu(cpu, x, kernel, spec: _Spec, impl: str):
  """`cpu` on CPUs, XLA's convolution elsewhere.

  A batch split over several devices keeps XLA's convolution, whose
  partitioning XLA knows; the formulations are for one device's batch.
  """
  xla = functools.partial(_xla, spec=spec)
  if impl == "xla" or _batch_shards(x) > 1:
    return xla(x, kernel)
  want = jax.eval_shape(xla, x, kernel)

  def on_cpu(x, kernel):
    y = cpu(x, kernel, spec=spec)
    # With explicit sharding on one device, the layout changes inside
    # `cpu` can leave the (trivial) sharding on another axis of the type.
    target = getattr(want, "sharding", None)
    if target is not None and jax.typeof(y).sharding != target:
      y = jax.sharding.reshard(y, target)
    return y

  return lax.platform_dependent(x, kernel, cpu=on_cpu, default=xla)


def _onednn(x, kernel, spec: _Spec):
  return onednn.conv2d(x, kernel, strides=spec.strides, padding=spec.padding)


def resolve(impl: str, x, kernel, *, strides: Sequence[int] = (1, 1),
            padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
            groups: int = 1) -> str:
  """Which computation `conv2d` runs on CPUs for these operands:
  ``"onednn"`` (oneDNN's kernels, `se_jax.onednn`), ``"formulated"`` (XLA
  operations arranged for XLA:CPU's fast kernels, the module docstring) or
  ``"xla"``. ``"auto"`` is oneDNN where its handlers are built and take the
  convolution (float32, no feature groups) and the kernel is wider than
  1x1, the formulation otherwise: for ResNet-50's 1x1 convolutions XLA's
  own matrix product was about as fast as oneDNN's convolution alone, shape
  by shape, and faster inside the network, where oneDNN reorders the kernel
  on every call.

  Raises:
    RuntimeError: for ``impl="onednn"`` when the handlers are not built.
    ValueError: for ``impl="onednn"`` and a convolution they do not take.
  """
  if impl in ("formulated", "xla"):
    return impl
  takes = onednn.supports(x, kernel, strides, padding, groups)
  if impl == "onednn":
    if not onednn.available():
      raise RuntimeError(
          "conv2d(impl='onednn'): se_jax's oneDNN handlers are not built"
          f" ({onednn.library_path()}); run `python -m se_jax.build_onednn`.")
    if not takes:
      raise ValueError(
          "conv2d(impl='onednn') takes float32 operands without feature"
          " groups, non-negative padding and windows that reach the padded"
          " input's last row and column, got"
          f" {x.dtype} {x.shape}, {kernel.dtype} {kernel.shape}, strides"
          f" {tuple(strides)}, padding {tuple(padding)}, groups {groups}.")
    return "onednn"
  pointwise = tuple(kernel.shape[:2]) == (1, 1)
  if takes and not pointwise and onednn.available():
    return "onednn"
  return "formulated"


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv(x, kernel, spec: _Spec, impl: str):
  if impl == "onednn":
    return _on_cpu(_onednn, x, kernel, spec, impl)
  return _on_cpu(_cpu_forward, x, kernel, spec, impl)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(spec, impl, primals, tangents):
  x, kernel = primals
  tx, tk = tangents
  if impl == "onednn":
    # The three parts are one primitive that JAX transposes itself.
    forward = input_term = kernel_term = _onednn
  else:
    x = materialized(x)
    forward, input_term, kernel_term = (
        _cpu_forward, _cpu_input_term, _cpu_kernel_term)
  y = _on_cpu(forward, x, kernel, spec, impl)
  terms = []
  if not isinstance(tx, jax.custom_derivatives.SymbolicZero):
    terms.append(_on_cpu(input_term, tx, kernel, spec, impl))
  if not isinstance(tk, jax.custom_derivatives.SymbolicZero):
    terms.append(_on_cpu(kernel_term, x, tk, spec, impl))
  ty = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, ty


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    groups: int = 1,
    impl: str = "auto",
) -> jax.Array:
  """Cross-correlation of NHWC images with an HWIO kernel.

  Args:
    x: (N, H, W, C) images.
    kernel: (kh, kw, C // groups, K) weights.
    strides: the two spatial strides.
    padding: explicit ``(low, high)`` zero padding of each spatial dim.
    groups: feature groups (ResNeXt's cardinality).
    impl: ``"auto"``: on CPUs oneDNN's kernels or the formulation, as
      `resolve` picks, XLA's convolution elsewhere; ``"onednn"``: oneDNN's
      kernels on CPUs (`se_jax.onednn`); ``"formulated"``: the formulation
      of the module docstring on CPUs; ``"xla"``: XLA's convolution
      everywhere (with the saved input of the module docstring), which
      XLA:CPU runs on YNNPACK unless the compiler option
      ``xla_cpu_experimental_ynn_fusion_type`` leaves convolutions out.

  Returns:
    (N, H', W', K), in the dtype of the operands.

  Raises:
    ValueError: if the shapes do not fit, `impl` is unknown, or oneDNN is
      asked for a convolution it does not take.
    RuntimeError: if oneDNN is asked for and its handlers are not built.

  >>> y = conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5)),
  ...            padding=((1, 1), (1, 1)))
  >>> y.shape, float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0])
  ((1, 4, 4, 5), 18.0, 8.0)
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
        f"impl must be one of {list(IMPLEMENTATIONS)}, got {impl!r}.")
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
        f"conv2d expects NHWC x and HWIO kernel, got shapes {x.shape} and"
        f" {kernel.shape}.")
  if groups < 1 or x.shape[-1] != kernel.shape[2] * groups:
    raise ValueError(
        f"x has {x.shape[-1]} channels but kernel {kernel.shape} with"
        f" groups={groups} expects {kernel.shape[2] * groups}.")
  spec = _Spec(tuple(int(s) for s in strides),
               tuple((int(lo), int(hi)) for lo, hi in padding), int(groups))
  if min(spec.strides) < 1:
    raise ValueError(f"strides must be positive, got {spec.strides}.")
  impl = resolve(impl, x, kernel, strides=spec.strides, padding=spec.padding,
                 groups=spec.groups)
  return _conv(x, kernel, spec, impl)
