"""2-D convolutions on oneDNN's CPU kernels, called from XLA (``jax.ffi``).

XLA:CPU runs convolutions on YNNPACK or Eigen. oneDNN's kernels (the ones
PyTorch uses on CPUs) took half the time of the fastest of those for the
convolutions of a CIFAR ResNet-20 training step (1.0-4.0x faster by shape
and part, in the forward pass and both gradients; ``python -m
experiments.benchmark``, section ``kernels``). `conv2d` here is
a float32 cross-correlation of NHWC images with an HWIO kernel that runs
each of its three parts (forward pass, input gradient, kernel gradient) as
one custom call into oneDNN, inside any ``jax.jit`` and with no compiler
option. `se_jax.conv.conv2d` uses it on CPUs when it is built.

The three parts are one primitive, bilinear in its two operands, whose
transposes are each other: JAX differentiates it to any order, in forward
and reverse mode. Under ``jax.vmap`` it computes with XLA's convolution.

The handlers are C++ (``se_jax/csrc/onednn_conv.cc``), compiled against
oneDNN (Debian's ``libdnnl-dev``) and the XLA FFI headers that jaxlib ships:

    python -m se_jax.build_onednn    # build, then check against XLA

``experiments/setup.sh`` does this. Without the library, `available()` is
False and `se_jax.conv.conv2d` uses its XLA formulation.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["available", "build", "conv2d", "library_path"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "csrc", "onednn_conv.cc")
_TARGETS = {"forward": "SeJaxConvForward", "input_grad": "SeJaxConvInputGrad",
            "kernel_grad": "SeJaxConvKernelGrad"}
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def library_path() -> str:
  """Where `build` writes the compiled handlers and `available` loads them:
  ``$SE_JAX_ONEDNN_LIB`` if set, else next to the C++ source."""
  return os.environ.get("SE_JAX_ONEDNN_LIB") or os.path.join(
      _HERE, "csrc", "libse_jax_onednn.so")


def build(path: str | None = None, compiler: str | None = None) -> str:
  """Compiles the handlers into `path` (default `library_path()`).

  Raises:
    RuntimeError: naming what is missing (a C++ compiler, oneDNN's headers)
      or the compiler's own message.
  """
  path = path or library_path()
  compiler = compiler or os.environ.get("CXX") or "g++"
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX).")
  cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
         f"-I{jax.ffi.include_dir()}", _SOURCE, "-ldnnl", "-o", path + ".tmp"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    hint = (" oneDNN's headers are missing: install it (Debian:"
            " apt-get install libdnnl-dev)."
            if "dnnl.hpp" in done.stderr else "")
    raise RuntimeError(f"building {path} failed:{hint}\n{' '.join(cmd)}\n"
                       f"{done.stderr[-4000:]}")
  os.replace(path + ".tmp", path)
  available.cache_clear()
  return path


@functools.cache
def available() -> bool:
  """Whether the handlers are built, load and are registered with XLA."""
  path = library_path()
  if not os.path.exists(path):
    return False
  try:
    lib = ctypes.CDLL(path)
  except OSError:
    return False
  for name in _TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                platform="cpu")
  return True


# ------------------------------------------------------------ the primitive

# The primitive's name, which `se_jax.costs` counts multiply-adds of.
PRIMITIVE_NAME = "se_jax_onednn_conv"
_conv_p = Primitive(PRIMITIVE_NAME)


def _bind(kind, a, b, *, strides, padding, shape):
  return _conv_p.bind(a, b, kind=kind, strides=strides, padding=padding,
                      shape=tuple(shape))


def _abstract(a, b, *, kind, strides, padding, shape):
  # Under explicit sharding the output is split over the batch like the
  # images (the forward pass and the input gradient) or whole (the kernel
  # gradient).
  lead = None if kind == "kernel_grad" else a.sharding.spec[0]
  sharding = a.sharding.update(
      spec=jax.sharding.PartitionSpec(lead, *(None,) * (len(shape) - 1)))
  return a.update(shape=tuple(shape), sharding=sharding, weak_type=False)


_conv_p.def_abstract_eval(_abstract)


@functools.partial(jax.jit, static_argnames=("kind", "strides", "padding",
                                              "shape"))
def _jitted(a, b, *, kind, strides, padding, shape):
  return _conv_p.bind(a, b, kind=kind, strides=strides, padding=padding,
                      shape=shape)


_conv_p.def_impl(_jitted)


def _lower(ctx, a, b, *, kind, strides, padding, shape):
  return jax.ffi.ffi_lowering(_TARGETS[kind])(
      ctx, a, b, strides=np.array(strides, np.int64),
      padding=np.array(padding, np.int64))


mlir.register_lowering(_conv_p, _lower, platform="cpu")


def _transpose_first(ct, a, b, *, kind, strides, padding, shape):
  """The cotangent of the first operand (undefined), the second known."""
  first = a.aval.shape
  if kind == "forward":   # y = conv(x, k): dx = input_grad(dy, k)
    return _bind("input_grad", ct, b, strides=strides, padding=padding,
                 shape=first)
  if kind == "input_grad":   # dx = input_grad(dy, k): d(dy) = conv(ct, k)
    return _bind("forward", ct, b, strides=strides, padding=padding,
                 shape=first)
  # dk = kernel_grad(x, dy): d(x) = input_grad(dy, ct)
  return _bind("input_grad", b, ct, strides=strides, padding=padding,
               shape=first)


def _transpose_second(ct, a, b, *, kind, strides, padding, shape):
  """The cotangent of the second operand (undefined), the first known."""
  second = b.aval.shape
  if kind == "forward":   # y = conv(x, k): dk = kernel_grad(x, dy)
    return _bind("kernel_grad", a, ct, strides=strides, padding=padding,
                 shape=second)
  if kind == "input_grad":   # dx = input_grad(dy, k): dk = kernel_grad(ct, dy)
    return _bind("kernel_grad", ct, a, strides=strides, padding=padding,
                 shape=second)
  # dk = kernel_grad(x, dy): d(dy) = conv(x, ct)
  return _bind("forward", a, ct, strides=strides, padding=padding,
               shape=second)


ad.defbilinear(_conv_p, _transpose_first, _transpose_second)


def _reference(a, b, *, kind, strides, padding, shape):
  """The primitive in XLA's own operations."""
  top, left, bottom, right = padding
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=strides,
      padding=((top, bottom), (left, right)), dimension_numbers=_DIMENSIONS)
  if kind == "forward":
    return conv(a, b)
  if kind == "input_grad":
    zeros = jax.ShapeDtypeStruct(shape, a.dtype)
    return jax.linear_transpose(lambda x: conv(x, b), zeros)(a)[0]
  zeros = jax.ShapeDtypeStruct(shape, a.dtype)
  return jax.linear_transpose(lambda k: conv(a, k), zeros)(b)[0]


def _batch(args, dims, **params):
  return jax.vmap(functools.partial(_reference, **params),
                  in_axes=tuple(dims))(*args), 0


batching.primitive_batchers[_conv_p] = _batch


def out_size(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
  """Output length of a convolution along one axis: input length `n`,
  window `k`, stride `s`, padding ``(lo, hi)``."""
  return (n + pad[0] + pad[1] - k) // s + 1


def _padding_hi(n: int, k: int, s: int, lo: int, hi: int) -> int:
  """The high padding that the output actually reads (oneDNN wants it
  exact): the rows past the last window are left out."""
  return (out_size(n, k, s, (lo, hi)) - 1) * s + k - n - lo


def supports(x, kernel, strides: Sequence[int],
             padding: Sequence[tuple[int, int]], groups: int = 1) -> bool:
  """Whether `conv2d` computes this convolution: float32, no feature
  groups, non-negative padding, a non-empty output, and no input rows or
  columns past the last window (which oneDNN would see as negative
  padding)."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or groups != 1:
    return False
  for n, k, s, (lo, hi) in zip(x.shape[1:3], kernel.shape[:2], strides,
                               padding):
    if lo < 0 or hi < 0 or n + lo + hi < k:
      return False
    if _padding_hi(n, k, s, lo, hi) < 0:
      return False
  return True


def conv2d(x: jax.Array, kernel: jax.Array, *,
           strides: Sequence[int] = (1, 1),
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
           ) -> jax.Array:
  """Cross-correlation of float32 NHWC images with an HWIO kernel on oneDNN:
  ``lax.conv_general_dilated`` with explicit padding, on CPUs.

  Raises:
    RuntimeError: if the handlers are not built (see the module docstring).
    ValueError: if `supports` says no.
  """
  if not available():
    raise RuntimeError(
        f"se_jax's oneDNN handlers are not built ({library_path()}): run"
        " `python -m se_jax.build_onednn`.")
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if not supports(x, kernel, strides, padding):
    raise ValueError(
        "oneDNN conv2d takes float32 operands, non-negative padding and"
        " windows that reach the padded input's last row and column (no"
        f" input rows past the last window), got {x.dtype} {x.shape},"
        f" {kernel.dtype} {kernel.shape}, strides {strides}, padding"
        f" {padding}.")
  (top, bottom), (left, right) = padding
  bottom = _padding_hi(x.shape[1], kernel.shape[0], strides[0], top, bottom)
  right = _padding_hi(x.shape[2], kernel.shape[1], strides[1], left, right)
  out = tuple(out_size(n, k, s, p) for n, k, s, p in zip(
      x.shape[1:3], kernel.shape[:2], strides, padding))
  shape = (x.shape[0], *out, kernel.shape[3])
  return _bind("forward", x, kernel, strides=strides,
               padding=(top, left, bottom, right), shape=shape)
