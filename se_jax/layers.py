"""The layers of the ResNets: BatchNorm, convolution and average pooling.

The SE block lives in `se_jax.attention.se` (re-exported here as
`SqueezeExcite`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax import primitives
from se_jax.attention.se import SqueezeExcite
from se_jax.conv import IMPLEMENTATIONS, conv2d

__all__ = ["BatchNorm", "Conv", "SqueezeExcite", "avg_pool_2x2"]


class BatchNorm(nnx.Module):
  """Batch normalisation over all axes but the last, as in the ResNets.

  Statistics are computed in float32 whatever the compute dtype, and the
  running variance is updated with the unbiased batch variance, as PyTorch
  does, so that statistics carry over to and from timm models. Running
  statistics are used after ``model.eval()`` or under
  ``nnx.view(model, use_running_average=True)``.

  Args:
    num_features: channels C.
    momentum: weight of the old running statistics (PyTorch's 1 - momentum).
    epsilon: added to the variance.
    dtype: compute dtype of the output (None: the input's).
    use_running_average: start in eval mode.
    rngs: unused; accepted for a uniform constructor signature.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9,
               epsilon: float = 1e-5, dtype=None,
               use_running_average: bool = False,
               rngs: nnx.Rngs | None = None):
    del rngs
    f32 = jnp.float32
    self.scale = nnx.Param(jnp.ones((num_features,), f32))
    self.bias = nnx.Param(jnp.zeros((num_features,), f32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), f32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), f32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = use_running_average

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      use_running_average: if True, normalise with the running statistics.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    mul, add = self.affine(x)
    dtype = self.dtype or x.dtype
    lead = (1,) * (x.ndim - 1)
    y = x.astype(jnp.float32) * mul.reshape(*lead, -1) + add.reshape(*lead, -1)
    return y.astype(dtype)

  def affine(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The normalisation of `x` as a per-channel ``(mul, add)`` in float32:
    the layer's output is ``x * mul + add``. In training mode this computes
    the batch statistics of `x` and updates the running ones, as a call
    does."""
    f32 = jnp.float32
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(f32)
      mean = jnp.mean(xf, axis=axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axis=axes)
                        - jnp.square(mean), 0.0)
      n = x.size // x.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      # set_value (not [...] =) keeps tracing linear in the network's depth.
      self.mean.set_value(jax.lax.stop_gradient(
          m * self.mean[...] + (1 - m) * mean))
      self.var.set_value(jax.lax.stop_gradient(
          m * self.var[...] + (1 - m) * unbiased))
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    add = self.bias[...] - mean * mul
    return mul, add


class Conv(nnx.Module):
  """A bias-free 2-D convolution on NHWC maps, with explicit padding.

  The parameter is ``kernel``, (kh, kw, in_features // groups,
  out_features), as in ``flax.nnx.Conv``; the forward pass is
  `se_jax.conv.conv2d`, whose gradient compiles better on the CPU.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ``((top, bottom), (left, right))`` zero padding.
    groups: feature groups.
    kernel_init: initializer of the kernel.
    dtype: compute dtype (None: the promoted dtype of input and kernel).
    impl: how `se_jax.conv.conv2d` computes it (one of
      `se_jax.conv.IMPLEMENTATIONS`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: tuple[int, int], *,
               strides: tuple[int, int] = (1, 1),
               padding: tuple[tuple[int, int], tuple[int, int]] = (
                   (0, 0), (0, 0)),
               groups: int = 1,
               kernel_init=nnx.initializers.lecun_normal(), dtype=None,
               impl: str = "auto", rngs: nnx.Rngs):
    primitives._check_choice("impl", impl, IMPLEMENTATIONS)
    if in_features % groups or out_features % groups:
      raise ValueError(
          f"in_features {in_features} and out_features {out_features} must"
          f" be divisible by groups={groups}.")
    self.kernel = nnx.Param(kernel_init(
        rngs.params(), (*kernel_size, in_features // groups, out_features),
        jnp.float32))
    self.in_features = in_features
    self.out_features = out_features
    self.strides = tuple(strides)
    self.padding = tuple(tuple(p) for p in padding)
    self.groups = groups
    self.dtype = dtype
    self.impl = impl

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
    return conv2d(x.astype(dtype), kernel.astype(dtype),
                  strides=self.strides, padding=self.padding,
                  groups=self.groups, impl=self.impl)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2 x 2 average pooling with stride 2 of an NHWC map, in ceil mode: an
  odd last row or column is averaged over the elements it has (PyTorch's
  ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``, the
  shortcut of ResNet-D units)."""
  h, w = x.shape[1:3]
  pads = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
  total = nnx.avg_pool(jnp.pad(x, pads), (2, 2), strides=(2, 2)) * 4
  ones = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pads)
  count = nnx.avg_pool(ones, (2, 2), strides=(2, 2)) * 4
  return (total / count).astype(x.dtype)
