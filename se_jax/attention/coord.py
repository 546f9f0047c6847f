"""Coordinate attention: channel gates factorised along height and width.

Instead of pooling each channel to one number, coordinate attention pools
it along each spatial direction: the mean over the width of every row and
the mean over the height of every column. The H + W descriptors share a
1x1 reduction (with BatchNorm and a hard swish), are split again, and two
1x1 expansions with sigmoids give a gate per row and a gate per column,
whose product gates every position of every channel.

References:
  Hou, Zhou, Feng. "Coordinate Attention for Efficient Mobile Network
  Design". CVPR 2021 (arXiv:2103.02907), Sec. 3.
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

__all__ = ["CoordOptions", "CoordParams", "CoordinateAttention",
           "coord_gates", "coord_pool", "coord_reduced_width",
           "coordinate_attention"]

DATA_FORMATS = ("NHWC", "NCHW")
ACTIVATIONS = {**primitives.ACTIVATIONS, "hard_swish": jax.nn.hard_swish}


def coord_reduced_width(channels: int, reduction: float = 16,
                        width_factor: float = 2 / 3,
                        rounding: str = "timm") -> int:
  """Width of coordinate attention's shared reduction.

  Args:
    channels: C.
    reduction: the reduction ratio r.
    width_factor: multiplies C / r (timm's ``se_factor``, 2/3, which keeps
      the parameters close to SE's).
    rounding: ``"timm"`` for ``C / r * width_factor`` rounded to the
      nearest multiple of 8, at least 8 (timm's ``make_divisible(..., 8,
      round_limit=0)``); ``"paper"`` for ``max(8, C * width_factor // r)``
      (the authors' code, with r = 32 and width_factor = 1).

  Returns:
    The width, a positive int.

  Raises:
    ValueError: for arguments out of range.

  >>> coord_reduced_width(512), coord_reduced_width(
  ...     512, 32, 1, rounding="paper")
  (24, 16)
  """
  primitives._check_choice("rounding", rounding, primitives.ROUNDINGS)
  if isinstance(channels, bool) or not isinstance(channels, int) \
      or channels < 1:
    raise ValueError(f"channels must be a positive int, got {channels!r}.")
  check_positive("reduction", reduction)
  check_positive("width_factor", width_factor)
  if rounding == "paper":
    return max(8, int(channels * width_factor // reduction))
  # timm multiplies by the ratio 1 / r, then the factor; so do we, to
  # round alike.
  v = channels * (1.0 / reduction) * width_factor
  return max(8, int(v + 4) // 8 * 8)


class CoordParams(NamedTuple):
  """The 1x1 layers of a coordinate attention block.

  Attributes:
    w1: (C, M) weights of the shared reduction.
    b1: (M,) its bias, or None.
    w_h: (M, C) weights of the height expansion.
    b_h: (C,) its bias, or None.
    w_w: (M, C) weights of the width expansion.
    b_w: (C,) its bias, or None.
  """

  w1: jax.Array
  b1: jax.Array | None
  w_h: jax.Array
  b_h: jax.Array | None
  w_w: jax.Array
  b_w: jax.Array | None


def coord_pool(x: ArrayLike) -> jax.Array:
  """Directional pooling of an NHWC map.

  Args:
    x: (N, H, W, C) float map.

  Returns:
    (N, H + W, C) float32 descriptors: first the mean of each row (over
    the width), then the mean of each column (over the height),
    accumulated in float32.

  Raises:
    ValueError: if `x` is not of rank 4. TypeError: if it is not float.

  >>> coord_pool(jnp.arange(4.0).reshape(1, 2, 2, 1))[0, :, 0]
  Array([0.5, 2.5, 1. , 2. ], dtype=float32)
  """
  x = jnp.asarray(x)
  primitives._check_float("x", x)
  if x.ndim != 4:
    raise ValueError(
        f"x must be an NHWC map of rank 4, got shape {x.shape}.")
  rows = jnp.mean(x, axis=2, dtype=jnp.float32)
  cols = jnp.mean(x, axis=1, dtype=jnp.float32)
  return jnp.concatenate([rows, cols], axis=1)


def _check_params(params: CoordParams, channels: int) -> None:
  if not isinstance(params, CoordParams):
    raise TypeError(
        f"params must be a CoordParams, got {type(params).__name__}.")
  w1 = params.w1
  if w1.ndim != 2 or w1.shape[0] != channels:
    raise ValueError(
        f"params.w1 must be (C, M) with C = {channels}, got {w1.shape}.")
  m = w1.shape[1]
  for name in ("w_h", "w_w"):
    if getattr(params, name).shape != (m, channels):
      raise ValueError(
          f"params.{name} must be (M, C) = {(m, channels)}, got"
          f" {getattr(params, name).shape}.")
  for name, size in (("b1", m), ("b_h", channels), ("b_w", channels)):
    b = getattr(params, name)
    if b is not None and b.shape != (size,):
      raise ValueError(
          f"params.{name} must be ({size},) or None, got {b.shape}.")


def _dense(z: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  f32 = jnp.float32
  y = jnp.matmul(z, w.astype(f32), precision=lax.Precision.HIGHEST)
  return y if b is None else y + b.astype(f32).reshape(1, 1, -1)


def coord_gates(
    params: CoordParams, pooled: ArrayLike, height: int, *,
    norm: Callable[[jax.Array], jax.Array] | None = None,
    activation: str = "hard_swish", gate: str = "sigmoid",
) -> tuple[jax.Array, jax.Array]:
  """The row and column gates from the directional descriptors.

  Args:
    params: a `CoordParams`.
    pooled: (N, H + W, C) descriptors from `coord_pool`.
    height: H, where the rows end and the columns begin.
    norm: applied to the (N, H + W, M) float32 reduction (the module passes
      its BatchNorm); None for none.
    activation: nonlinearity after the norm: ``"hard_swish"`` (the
      paper's and timm's) or one of `se_jax.primitives.ACTIVATIONS`.
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.

  Returns:
    ``(a_h, a_w)``: (N, H, C) row gates and (N, W, C) column gates,
    float32.

  Raises:
    ValueError: for params that do not fit, a bad `height` or name.
    TypeError: for non-float descriptors or params of another type.

  >>> p = CoordParams(jnp.zeros((4, 8)), None, jnp.zeros((8, 4)), None,
  ...                 jnp.zeros((8, 4)), None)
  >>> a_h, a_w = coord_gates(p, jnp.ones((2, 5, 4)), 2)
  >>> a_h.shape, a_w.shape
  ((2, 2, 4), (2, 3, 4))
  """
  pooled = jnp.asarray(pooled)
  primitives._check_float("pooled", pooled)
  if pooled.ndim != 3:
    raise ValueError(
        f"pooled must be (N, H + W, C), got shape {pooled.shape}.")
  _check_params(params, pooled.shape[2])
  if isinstance(height, bool) or not isinstance(height, int) \
      or not 0 < height < pooled.shape[1]:
    raise ValueError(
        f"height must be an int in [1, {pooled.shape[1] - 1}] for pooled of"
        f" shape {pooled.shape}, got {height!r}.")
  primitives._check_choice("activation", activation, ACTIVATIONS)
  primitives._check_choice("gate", gate, primitives.GATES)
  y = _dense(pooled.astype(jnp.float32), params.w1, params.b1)
  if norm is not None:
    y = norm(y).astype(jnp.float32)
  y = ACTIVATIONS[activation](y)
  g = primitives.GATES[gate]
  a_h = g(_dense(y[:, :height], params.w_h, params.b_h))
  a_w = g(_dense(y[:, height:], params.w_w, params.b_w))
  return a_h, a_w


def coordinate_attention(
    params: CoordParams, x: ArrayLike, *,
    norm: Callable[[jax.Array], jax.Array] | None = None,
    activation: str = "hard_swish", gate: str = "sigmoid",
    data_format: str = "NHWC", return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The coordinate attention block: `coord_pool`, `coord_gates`, and
  ``x * a_h * a_w``.

  Args:
    params: a `CoordParams`.
    x: float map, (N, H, W, C) or (N, C, H, W) by `data_format`.
    norm: see `coord_gates`.
    activation: see `coord_gates`.
    gate: output nonlinearity.
    data_format: ``"NHWC"`` or ``"NCHW"``.
    return_gates: also return the float32 ``(a_h, a_w)``, (N, H, C) and
      (N, W, C).

  Returns:
    `x` recalibrated, in its dtype (formed in float32 and rounded once),
    or ``(y, (a_h, a_w))``.

  Raises:
    ValueError / TypeError: as `coord_pool` and `coord_gates`.

  >>> p = CoordParams(jnp.zeros((4, 8)), None, jnp.zeros((8, 4)), None,
  ...                 jnp.zeros((8, 4)), None)
  >>> coordinate_attention(p, jnp.ones((1, 2, 3, 4)))[0, 0, 0]
  Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
  """
  x = jnp.asarray(x)
  primitives._check_choice("data_format", data_format, DATA_FORMATS)
  primitives._check_float("x", x)
  primitives._channel_axis("x", x, data_format)
  xl = jnp.moveaxis(x, 1, -1) if data_format == "NCHW" else x
  a_h, a_w = coord_gates(params, coord_pool(xl), xl.shape[1], norm=norm,
                         activation=activation, gate=gate)
  y = (xl.astype(jnp.float32) * a_w[:, None, :, :]
       * a_h[:, :, None, :]).astype(x.dtype)
  y = jnp.moveaxis(y, -1, 1) if data_format == "NCHW" else y
  return (y, (a_h, a_w)) if return_gates else y


@dataclasses.dataclass(frozen=True)
class CoordOptions:
  """The options of a coordinate attention block (defaults: timm's
  ``CoordAttn``; the paper's are ``reduction=32, coord_width_factor=1,
  rounding="paper", mlp_bias=True``).

  Attributes:
    reduction: the reduction ratio r (timm's rd_ratio 1/16).
    coord_width_factor: multiplies C / r (timm's se_factor, 2/3).
    rounding: see `coord_reduced_width`.
    mlp_bias: biases in the three 1x1 layers (timm: False; the authors'
      code: True).
    activation: nonlinearity after the BatchNorm (``"hard_swish"``).
    gate: output nonlinearity (sigmoid).
  """

  reduction: float = 16
  coord_width_factor: float = 2 / 3
  rounding: str = "timm"
  mlp_bias: bool = False
  activation: str = "hard_swish"
  gate: str = "sigmoid"

  def __post_init__(self):
    check_positive("reduction", self.reduction)
    check_positive("coord_width_factor", self.coord_width_factor)
    check_choice("rounding", self.rounding, primitives.ROUNDINGS)
    if not isinstance(self.mlp_bias, bool):
      raise ValueError(f"mlp_bias must be a bool, got {self.mlp_bias!r}.")
    check_choice("activation", self.activation, ACTIVATIONS)
    check_choice("gate", self.gate, primitives.GATES)


def _uniform(key: jax.Array, shape: tuple[int, ...],
             fan_in: int) -> jax.Array:
  # PyTorch's default for convolutions, weights and biases alike.
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class CoordinateAttention(Attention):
  """Coordinate attention on an NHWC map.

  Its gate ``a_h[h] * a_w[w]`` varies over positions; it records the
  gate's mean over positions, (N, C), under its tag and its mean over
  channels, (N, H, W), under ``tag + ":spatial"``.

  Initialised as PyTorch initialises timm's layers: 1x1 convolutions
  uniform in +-1/sqrt(fan_in), the BatchNorm with ones and zeros. The
  BatchNorm normalises the H + W reduced descriptors over the batch in
  training and with running statistics in eval mode.

  Args:
    channels: C.
    options: a `CoordOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gates are computed in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Hou et al., CVPR 2021.
  """

  kind: ClassVar[str] = "coord"
  tag_prefix: ClassVar[str] = "COORD"
  Options: ClassVar[type] = CoordOptions
  # timm's CoordAttn (timm/layers/coord_attn.py): 1x1 convolutions conv1,
  # conv_h and conv_w, BatchNorm bn1.
  timm_params: ClassVar[dict] = {
      "w1": ("conv1.weight", "fc_conv"), "b1": ("conv1.bias", "vector"),
      "norm/scale": ("bn1.weight", "vector"),
      "norm/bias": ("bn1.bias", "vector"),
      "norm/mean": ("bn1.running_mean", "vector"),
      "norm/var": ("bn1.running_var", "vector"),
      "w_h": ("conv_h.weight", "fc_conv"), "b_h": ("conv_h.bias", "vector"),
      "w_w": ("conv_w.weight", "fc_conv"), "b_w": ("conv_w.bias", "vector")}

  def __init__(self, channels: int, options: CoordOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype
    o = self._setup(channels, options, tag, record_gates)
    m = coord_reduced_width(channels, o.reduction, o.coord_width_factor,
                            o.rounding)
    self.reduced_channels = m
    keys = jax.random.split(rngs.params(), 6)
    self.w1 = nnx.Param(_uniform(keys[0], (channels, m), channels))
    self.w_h = nnx.Param(_uniform(keys[1], (m, channels), m))
    self.w_w = nnx.Param(_uniform(keys[2], (m, channels), m))
    if o.mlp_bias:
      self.b1 = nnx.Param(_uniform(keys[3], (m,), channels))
      self.b_h = nnx.Param(_uniform(keys[4], (channels,), m))
      self.b_w = nnx.Param(_uniform(keys[5], (channels,), m))
    else:
      self.b1 = self.b_h = self.b_w = None
    self.norm = layers.BatchNorm(m)

  @property
  def params(self) -> CoordParams:
    """The 1x1 layers as a `CoordParams`, for the pure functions."""
    v = lambda p: None if p is None else p[...]
    return CoordParams(v(self.w1), v(self.b1), v(self.w_h), v(self.b_h),
                       v(self.w_w), v(self.b_w))

  def __call__(self, x: jax.Array) -> jax.Array:
    o = self.options
    y, (a_h, a_w) = coordinate_attention(
        self.params, x, norm=self.norm, activation=o.activation, gate=o.gate,
        return_gates=True)
    if self.record_gates:
      # The gate is separable, so its means need no (N, H, W, C) map.
      gates = jnp.mean(a_h, axis=1) * jnp.mean(a_w, axis=1)
      spatial = jnp.einsum("nhc,nwc->nhw", a_h, a_w,
                           precision=lax.Precision.HIGHEST) / self.channels
      self._record(gates=gates, spatial=spatial)
    return y
