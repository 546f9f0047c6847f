"""CBAM: channel attention from two poolings, then spatial attention.

The Convolutional Block Attention Module refines a map twice. Its channel
attention passes the average- and the max-pooled descriptors through one
shared MLP and gates with the sigmoid of the sum; its spatial attention
pools the refined map across the channels (mean and max), convolves the
two-channel map with a 7x7 kernel, normalises it with a BatchNorm (as the
authors' code and timm do) and gates every position with its sigmoid.

References:
  Woo, Park, Lee, Kweon. "CBAM: Convolutional Block Attention Module".
  ECCV 2018 (arXiv:1807.06521), Sec. 3, Eqs. 2-3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from se_jax import layers
from se_jax import primitives
from se_jax.attention.base import Attention, check_choice, check_positive

__all__ = ["CBAMOptions", "CBAMParams", "ConvolutionalBlockAttention",
           "cbam_channel_gate", "cbam_reduced_width",
           "cbam_spatial_descriptor", "cbam_spatial_gate",
           "convolutional_block_attention"]

# The 2-D kinds take channels-last or channels-first maps.
DATA_FORMATS = ("NHWC", "NCHW")


def cbam_reduced_width(channels: int, reduction: float = 16,
                       rounding: str = "timm") -> int:
  """Hidden width of CBAM's shared MLP.

  Args:
    channels: C.
    reduction: the reduction ratio r (16 in the paper and timm).
    rounding: ``"paper"`` for ``C // r`` (the authors' code); ``"timm"``
      for ``C / r`` rounded to the nearest int, at least 1 (timm's
      ``make_divisible(C / r, 1, round_limit=0)``).

  Returns:
    The width, a positive int.

  Raises:
    ValueError: for arguments out of range or a width of 0.

  >>> cbam_reduced_width(64), cbam_reduced_width(40), cbam_reduced_width(
  ...     40, rounding="paper")
  (4, 3, 2)
  """
  primitives._check_choice("rounding", rounding, primitives.ROUNDINGS)
  if isinstance(channels, bool) or not isinstance(channels, int) \
      or channels < 1:
    raise ValueError(f"channels must be a positive int, got {channels!r}.")
  check_positive("reduction", reduction)
  if rounding == "paper":
    width = int(channels // reduction)
  else:
    # timm multiplies by the ratio 1 / r; so do we, to round alike.
    width = max(1, int(channels * (1.0 / reduction) + 0.5))
  if width < 1:
    raise ValueError(
        f"reduction={reduction} leaves 0 channels for channels={channels}.")
  return width


def _mlp(params: primitives.ExciteParams, z: jax.Array,
         activation: str) -> jax.Array:
  f32, hi = jnp.float32, lax.Precision.HIGHEST
  w1, b1, w2, b2 = params
  h = jnp.matmul(z, w1.astype(f32), precision=hi)
  if b1 is not None:
    h = h + b1.astype(f32)[None]
  h = primitives.ACTIVATIONS[activation](h)
  s = jnp.matmul(h, w2.astype(f32), precision=hi)
  if b2 is not None:
    s = s + b2.astype(f32)[None]
  return s


def cbam_channel_gate(
    params: primitives.ExciteParams, x: ArrayLike, *,
    activation: str = "relu", gate: str = "sigmoid",
    data_format: str = "NHWC") -> jax.Array:
  """CBAM's channel gates: ``gate(MLP(avgpool x) + MLP(maxpool x))``.

  Args:
    params: the shared MLP as an `se_jax.ExciteParams` ((C, C_r) and
      (C_r, C) weights, biases or None).
    x: float feature map in `data_format` (see `se_jax.squeeze`).
    activation: hidden nonlinearity, one of `se_jax.primitives.ACTIVATIONS`.
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.

  Returns:
    (N, C) float32 gates.

  Raises:
    ValueError: for params that do not fit `x`, or a bad name, rank or
      layout. TypeError: if `x` is not float.

  >>> p = primitives.init_excite(jax.random.key(0), 8, reduced_channels=2)
  >>> cbam_channel_gate(p, jnp.zeros((2, 4, 4, 8)))[0, :2]
  Array([0.5, 0.5], dtype=float32)
  """
  z_avg = primitives.squeeze(x, op="avg", data_format=data_format)
  z_max = primitives.squeeze(x, op="max", data_format=data_format)
  primitives._check_params(params, z_avg.shape[1])
  primitives._check_choice("activation", activation, primitives.ACTIVATIONS)
  primitives._check_choice("gate", gate, primitives.GATES)
  # One pass of the MLP over both descriptors.
  s = _mlp(params, jnp.concatenate([z_avg, z_max]), activation)
  n = z_avg.shape[0]
  return primitives.GATES[gate](s[:n] + s[n:])


def _check_nhwc(name: str, x: jax.Array) -> None:
  primitives._check_float(name, x)
  if x.ndim != 4:
    raise ValueError(
        f"{name} must be an NHWC map of rank 4, got shape {x.shape}.")


def cbam_spatial_descriptor(x: ArrayLike) -> jax.Array:
  """The channel-wise mean and maximum of an NHWC map, in that order (as
  timm; the authors' code stacks the maximum first).

  Args:
    x: (N, H, W, C) float map.

  Returns:
    (N, H, W, 2) float32 descriptors; the mean is accumulated in float32.

  Raises:
    ValueError: if `x` is not of rank 4. TypeError: if it is not float.

  >>> d = cbam_spatial_descriptor(jnp.arange(4.0).reshape(1, 1, 1, 4))
  >>> d[0, 0, 0]
  Array([1.5, 3. ], dtype=float32)
  """
  x = jnp.asarray(x)
  _check_nhwc("x", x)
  mean = jnp.mean(x, axis=-1, keepdims=True, dtype=jnp.float32)
  # The maximum is exact in any dtype; only the result is widened.
  top = jnp.max(x, axis=-1, keepdims=True).astype(jnp.float32)
  return jnp.concatenate([mean, top], axis=-1)


def cbam_spatial_gate(
    kernel: ArrayLike, d: ArrayLike, *,
    norm: Callable[[jax.Array], jax.Array] | None = None,
    gate: str = "sigmoid") -> jax.Array:
  """CBAM's spatial gates: a zero-padded ``k x k`` convolution of the
  descriptors, `norm`, then `gate`.

  Args:
    kernel: (k, k, 2, 1) weights (HWIO), k odd.
    d: (N, H, W, 2) descriptors from `cbam_spatial_descriptor`.
    norm: applied to the (N, H, W, 1) float32 convolution output (the
      module passes its BatchNorm); None for none.
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.

  Returns:
    (N, H, W) float32 gates.

  Raises:
    ValueError: for a kernel that is not (k, k, 2, 1) with k odd, `d` not
      (N, H, W, 2), or an unknown gate. TypeError: for non-float inputs.

  >>> cbam_spatial_gate(jnp.zeros((7, 7, 2, 1)), jnp.ones((1, 4, 4, 2))).shape
  (1, 4, 4)
  """
  kernel, d = jnp.asarray(kernel), jnp.asarray(d)
  primitives._check_float("kernel", kernel)
  _check_nhwc("d", d)
  if d.shape[-1] != 2:
    raise ValueError(f"d must be (N, H, W, 2), got shape {d.shape}.")
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] \
      or kernel.shape[0] % 2 == 0 or kernel.shape[2:] != (2, 1):
    raise ValueError(
        f"kernel must be (k, k, 2, 1) with k odd, got shape {kernel.shape}.")
  primitives._check_choice("gate", gate, primitives.GATES)
  p = kernel.shape[0] // 2
  s = lax.conv_general_dilated(
      d.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1),
      ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  if norm is not None:
    s = norm(s).astype(jnp.float32)
  return primitives.GATES[gate](s[..., 0])


class CBAMParams(NamedTuple):
  """The weights of a CBAM block.

  Attributes:
    mlp: the channel attention's shared MLP, an `se_jax.ExciteParams`.
    spatial_kernel: (k, k, 2, 1) weights of the spatial convolution.
  """

  mlp: primitives.ExciteParams
  spatial_kernel: jax.Array


def convolutional_block_attention(
    params: CBAMParams, x: ArrayLike, *,
    spatial_norm: Callable[[jax.Array], jax.Array] | None = None,
    activation: str = "relu", gate: str = "sigmoid",
    data_format: str = "NHWC", return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The CBAM block: channel attention, then spatial attention.

  The channel-refined map is kept in float32 and the output rounded once
  to x's dtype.

  Args:
    params: a `CBAMParams`.
    x: float feature map, (N, H, W, C) or (N, C, H, W) by `data_format`.
    spatial_norm: applied to the spatial convolution's output, see
      `cbam_spatial_gate`.
    activation: hidden nonlinearity of the channel MLP.
    gate: output nonlinearity of both attentions.
    data_format: ``"NHWC"`` or ``"NCHW"``.
    return_gates: also return the (N, C) channel gates and the (N, H, W)
      spatial gates, float32.

  Returns:
    `x` refined, in its dtype, or ``(y, (channel_gates, spatial_gates))``.

  Raises:
    ValueError / TypeError: as `cbam_channel_gate` and `cbam_spatial_gate`.

  >>> p = CBAMParams(
  ...     primitives.init_excite(jax.random.key(0), 8, reduced_channels=2),
  ...     jnp.zeros((7, 7, 2, 1)))
  >>> y, (g, s) = convolutional_block_attention(
  ...     p, jnp.ones((2, 5, 5, 8)), return_gates=True)
  >>> y.shape, g.shape, s.shape
  ((2, 5, 5, 8), (2, 8), (2, 5, 5))
  """
  if not isinstance(params, CBAMParams):
    raise TypeError(
        f"params must be a CBAMParams, got {type(params).__name__}.")
  x = jnp.asarray(x)
  primitives._check_choice("data_format", data_format, DATA_FORMATS)
  primitives._check_float("x", x)
  primitives._channel_axis("x", x, data_format)
  xl = jnp.moveaxis(x, 1, -1) if data_format == "NCHW" else x
  channel = cbam_channel_gate(params.mlp, xl, activation=activation,
                              gate=gate)
  refined = xl.astype(jnp.float32) * channel[:, None, None, :]
  spatial = cbam_spatial_gate(
      params.spatial_kernel, cbam_spatial_descriptor(refined),
      norm=spatial_norm, gate=gate)
  y = (refined * spatial[..., None]).astype(x.dtype)
  y = jnp.moveaxis(y, -1, 1) if data_format == "NCHW" else y
  return (y, (channel, spatial)) if return_gates else y


@dataclasses.dataclass(frozen=True)
class CBAMOptions:
  """The options of a CBAM block (defaults: the paper's and timm's).

  Attributes:
    reduction: the channel MLP's reduction ratio r (16).
    rounding: how C / r becomes the MLP width, see `cbam_reduced_width`
      (timm's by default, the same as the paper's for C a multiple of r).
    mlp_bias: biases in the channel MLP (timm's ``mlp_bias``, False; the
      authors' linear layers have them).
    activation: hidden nonlinearity of the channel MLP (ReLU).
    gate: output nonlinearity of both attentions (sigmoid).
    spatial_kernel_size: k of the spatial k x k convolution (7), odd.
  """

  reduction: float = 16
  rounding: str = "timm"
  mlp_bias: bool = False
  activation: str = "relu"
  gate: str = "sigmoid"
  spatial_kernel_size: int = 7

  def __post_init__(self):
    check_positive("reduction", self.reduction)
    check_choice("rounding", self.rounding, primitives.ROUNDINGS)
    if not isinstance(self.mlp_bias, bool):
      raise ValueError(f"mlp_bias must be a bool, got {self.mlp_bias!r}.")
    check_choice("activation", self.activation, primitives.ACTIVATIONS)
    check_choice("gate", self.gate, primitives.GATES)
    k = self.spatial_kernel_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
      raise ValueError(
          f"spatial_kernel_size must be an odd positive int, got {k!r}.")


def _uniform(key: jax.Array, shape: tuple[int, ...],
             fan_in: int) -> jax.Array:
  # PyTorch's default for convolutions, weights and biases alike.
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class ConvolutionalBlockAttention(Attention):
  """CBAM on an NHWC map.

  Records the (N, C) channel gates under its tag and the (N, H, W) spatial
  gates under ``tag + ":spatial"``. The spatial BatchNorm normalises with
  the batch's statistics in training and the running ones in eval mode,
  like `se_jax.layers.BatchNorm` everywhere.

  Weights are initialised as PyTorch initialises timm's convolutions:
  uniform in +-1/sqrt(fan_in); the BatchNorm with ones and zeros.

  Args:
    channels: C.
    options: a `CBAMOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the attention is computed in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Woo et al., ECCV 2018.
  """

  kind: ClassVar[str] = "cbam"
  tag_prefix: ClassVar[str] = "CBAM"
  Options: ClassVar[type] = CBAMOptions
  # timm's CbamModule (timm/layers/cbam.py): channel.fc1/fc2 1x1
  # convolutions, spatial.conv a ConvNormAct (conv without bias, then bn).
  timm_params: ClassVar[dict] = {
      "w1": ("channel.fc1.weight", "fc_conv"),
      "b1": ("channel.fc1.bias", "vector"),
      "w2": ("channel.fc2.weight", "fc_conv"),
      "b2": ("channel.fc2.bias", "vector"),
      "spatial_kernel": ("spatial.conv.conv.weight", "conv"),
      "spatial_norm/scale": ("spatial.conv.bn.weight", "vector"),
      "spatial_norm/bias": ("spatial.conv.bn.bias", "vector"),
      "spatial_norm/mean": ("spatial.conv.bn.running_mean", "vector"),
      "spatial_norm/var": ("spatial.conv.bn.running_var", "vector")}

  def __init__(self, channels: int, options: CBAMOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype
    o = self._setup(channels, options, tag, record_gates)
    r = cbam_reduced_width(channels, o.reduction, o.rounding)
    self.reduced_channels = r
    k1, k2, k3, k4, k5 = jax.random.split(rngs.params(), 5)
    self.w1 = nnx.Param(_uniform(k1, (channels, r), channels))
    self.w2 = nnx.Param(_uniform(k2, (r, channels), r))
    self.b1 = nnx.Param(_uniform(k3, (r,), channels)) if o.mlp_bias \
        else None
    self.b2 = nnx.Param(_uniform(k4, (channels,), r)) if o.mlp_bias \
        else None
    k = o.spatial_kernel_size
    self.spatial_kernel = nnx.Param(_uniform(k5, (k, k, 2, 1), 2 * k * k))
    self.spatial_norm = layers.BatchNorm(1)

  @property
  def params(self) -> CBAMParams:
    """The weights as a `CBAMParams`, for the pure functions."""
    bias = lambda b: None if b is None else b[...]
    return CBAMParams(
        primitives.ExciteParams(self.w1[...], bias(self.b1), self.w2[...],
                                bias(self.b2)),
        self.spatial_kernel[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    o = self.options
    y, (gates, spatial) = convolutional_block_attention(
        self.params, x, spatial_norm=self.spatial_norm,
        activation=o.activation, gate=o.gate, return_gates=True)
    self._record(gates=gates, spatial=spatial)
    return y
