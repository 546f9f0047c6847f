"""2-D convolution for the ResNets, with a CPU-friendly gradient.

`conv2d` is ``lax.conv_general_dilated`` on NHWC images and HWIO kernels,
with the same values and derivatives, and one difference in how XLA compiles
its gradient on the CPU. There the weight gradient needs the input in a
transposed layout, and XLA:CPU fuses the input's whole elementwise producer
chain (BatchNorm, ReLU, the SE scale and, through the identity shortcuts,
those of every earlier unit) into that transpose, recomputing it with a
strided access pattern. In a CIFAR SE-ResNet-20 training step this took
about a third of the step. Under differentiation `conv2d` therefore keeps the
input it saves for the backward pass in its own buffer (an in-place update
of a few elements, which XLA cannot fuse into), so the transpose reads it
once. On other platforms, and without differentiation, it is the plain
convolution. Measured in ``python -m experiments.benchmark``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv2d"]

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _materialized(x: jax.Array) -> jax.Array:
  """`x`, computed into a buffer of its own on the CPU.

  Writing a few elements back in place is an identity that XLA:CPU cannot
  fuse its producers into, so consumers read the buffer instead of
  recomputing it. Other platforms get `x` unchanged.
  """

  def cpu(x):
    # The update spans the whole batch axis, so that it is sharded like `x`
    # when the batch is split over devices.
    update = x[(slice(None),) + (slice(0, 1),) * (x.ndim - 1)]
    return lax.dynamic_update_slice(x, update, (0,) * x.ndim)

  return lax.platform_dependent(x, cpu=cpu, default=lambda x: x)


def _conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=_DIMENSIONS, feature_group_count=groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv_with_saved_input(x, kernel, strides, padding, groups):
  return _conv(x, kernel, strides, padding, groups)


@functools.partial(_conv_with_saved_input.defjvp, symbolic_zeros=True)
def _conv_jvp(strides, padding, groups, primals, tangents):
  x, kernel = primals
  tx, tk = tangents
  x = _materialized(x)
  conv = functools.partial(_conv, strides=strides, padding=padding,
                           groups=groups)
  y = conv(x, kernel)
  terms = []
  if not isinstance(tx, jax.custom_derivatives.SymbolicZero):
    terms.append(conv(tx, kernel))
  if not isinstance(tk, jax.custom_derivatives.SymbolicZero):
    terms.append(conv(x, tk))
  ty = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, ty


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    groups: int = 1,
) -> jax.Array:
  """Cross-correlation of NHWC images with an HWIO kernel.

  Args:
    x: (N, H, W, C) images.
    kernel: (kh, kw, C // groups, K) weights.
    strides: the two spatial strides.
    padding: explicit ``(low, high)`` zero padding of each spatial dim.
    groups: feature groups (ResNeXt's cardinality).

  Returns:
    (N, H', W', K), in the dtype of the operands.

  Raises:
    ValueError: if the shapes do not fit.

  >>> y = conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 5)),
  ...            padding=((1, 1), (1, 1)))
  >>> y.shape, float(y[0, 1, 1, 0]), float(y[0, 0, 0, 0])
  ((1, 4, 4, 5), 18.0, 8.0)
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(
        f"conv2d expects NHWC x and HWIO kernel, got shapes {x.shape} and"
        f" {kernel.shape}.")
  if groups < 1 or x.shape[-1] != kernel.shape[2] * groups:
    raise ValueError(
        f"x has {x.shape[-1]} channels but kernel {kernel.shape} with"
        f" groups={groups} expects {kernel.shape[2] * groups}.")
  return _conv_with_saved_input(
      x, kernel, tuple(int(s) for s in strides),
      tuple((int(lo), int(hi)) for lo, hi in padding), int(groups))
