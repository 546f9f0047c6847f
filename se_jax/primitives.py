"""Squeeze, excite and scale: the SE block as pure functions on arrays.

Each primitive is a small pure function, safe under ``jax.jit``, ``jax.vmap``
and ``jax.grad``. Shapes, ranks and dtypes are checked at trace time, so a bad
input fails before anything is compiled, with a ``ValueError`` (or a
``TypeError`` for a non-float array) that names the argument.

Mixed precision follows careful implementations of the block: pooling and the
gate arithmetic run in float32 whatever the input dtype, and only the final
product is cast back to the input's dtype.

References:
  Hu, Shen, Albanie, Sun, Wu. "Squeeze-and-Excitation Networks". TPAMI 2019
  (arXiv:1709.01507), Sec. 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "ACTIVATIONS",
    "DATA_FORMATS",
    "ExciteParams",
    "GATES",
    "SQUEEZE_OPS",
    "excite",
    "init_excite",
    "reduced_width",
    "scale",
    "squeeze",
    "squeeze_excite",
    "squeeze_excite_affine",
]

DATA_FORMATS = ("NWC", "NHWC", "NDHWC", "NCW", "NCHW", "NCDHW")
SQUEEZE_OPS = ("avg", "max")
ROUNDINGS = ("paper", "timm")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}

GATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "hard_sigmoid": jax.nn.hard_sigmoid,
}


class ExciteParams(NamedTuple):
  """Weights of the excitation's two fully connected layers.

  Attributes:
    w1: (C, C_r) weights of the reduction layer.
    b1: (C_r,) bias of the reduction layer, or None.
    w2: (C_r, C) weights of the expansion layer.
    b2: (C,) bias of the expansion layer, or None.
  """

  w1: jax.Array
  b1: jax.Array | None
  w2: jax.Array
  b2: jax.Array | None


def _check_choice(name: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(
        f"{name} must be one of {sorted(choices)}, got {value!r}."
    )


def _check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array, got dtype {x.dtype}."
    )


def _channel_axis(name: str, x: jax.Array, data_format: str) -> int:
  """Validates `x` against `data_format` and returns its channel axis."""
  _check_choice("data_format", data_format, DATA_FORMATS)
  if x.ndim < 3:
    raise ValueError(
        f"{name} must have rank >= 3 (batch, spatial..., channels), got shape"
        f" {x.shape} of rank {x.ndim}."
    )
  if x.ndim != len(data_format):
    raise ValueError(
        f"data_format {data_format!r} expects {name} of rank"
        f" {len(data_format)}, got shape {x.shape} of rank {x.ndim}."
    )
  return data_format.index("C")


def reduced_width(
    channels: int, reduction: float = 16, *, rounding: str = "paper"
) -> int:
  """Width C_r of the excitation's bottleneck for `channels` inputs.

  Args:
    channels: number of channels C of the recalibrated feature map.
    reduction: the reduction ratio r (16 in all main models of the paper).
    rounding: ``"paper"`` for ``C // r`` (the original Caffe models);
      ``"timm"`` for ``C / r`` rounded to the nearest multiple of 8, never
      below 8 (timm's ``make_divisible(C / r, 8, round_limit=0)``).

  Returns:
    The reduced width, a positive int.

  Raises:
    ValueError: if the arguments are out of range or the width would be 0.

  References:
    Hu et al., TPAMI 2019, Sec. 3.2 and Table 10.

  >>> reduced_width(256), reduced_width(64, rounding="timm")
  (16, 8)
  """
  _check_choice("rounding", rounding, ROUNDINGS)
  if channels < 1:
    raise ValueError(f"channels must be >= 1, got {channels}.")
  if not reduction > 0:
    raise ValueError(f"reduction must be > 0, got {reduction}.")
  if rounding == "paper":
    width = int(channels // reduction)
  else:
    v = channels / reduction
    width = max(8, int(v + 4) // 8 * 8)
  if width < 1:
    raise ValueError(
        f"reduction={reduction} leaves 0 channels for channels={channels};"
        f" use reduction <= {channels} or set reduced_channels."
    )
  return width


def squeeze(
    x: ArrayLike, *, op: str = "avg", data_format: str = "NHWC"
) -> jax.Array:
  """Squeezes each feature map of `x` to one number by global pooling.

  Args:
    x: float array of shape (N, *spatial, C) (or (N, C, *spatial) for a
      channels-first `data_format`), with 1 to 3 spatial dimensions.
    op: ``"avg"`` (the paper's choice) or ``"max"`` (Table 11).
    data_format: layout of `x`, one of ``DATA_FORMATS``.

  Returns:
    (N, C) float32 channel descriptors; the sum is accumulated in float32
    whatever the dtype of `x`.

  Raises:
    ValueError: for a bad rank, layout or op. TypeError: if `x` is not float.

  References:
    Hu et al., TPAMI 2019, Sec. 3.1 (Eq. 2) and Table 11.

  >>> x = jnp.arange(8.0).reshape(1, 2, 2, 2)
  >>> squeeze(x)
  Array([[3., 4.]], dtype=float32)
  """
  x = jnp.asarray(x)
  _check_float("x", x)
  c_axis = _channel_axis("x", x, data_format)
  _check_choice("op", op, SQUEEZE_OPS)
  spatial = tuple(a for a in range(1, x.ndim) if a != c_axis)
  if op == "avg":
    return jnp.mean(x, axis=spatial, dtype=jnp.float32)
  # The maximum is exact in any dtype; only the result is widened.
  return jnp.max(x, axis=spatial).astype(jnp.float32)


def init_excite(
    key: jax.Array,
    channels: int,
    *,
    reduction: float = 16,
    reduced_channels: int | None = None,
    use_bias: bool = True,
    rounding: str = "paper",
    dtype=jnp.float32,
) -> ExciteParams:
  """He-initialised parameters of the excitation's two FC layers.

  Args:
    key: a PRNG key.
    channels: C, the number of recalibrated channels.
    reduction: the reduction ratio r; ignored if `reduced_channels` is set.
    reduced_channels: the bottleneck width C_r, overriding `reduction`.
    use_bias: whether the FC layers have biases (the paper's ablations in
      Sec. 6 drop them; the released models and timm keep them).
    rounding: how C / r becomes an int, see `reduced_width`.
    dtype: parameter dtype.

  Returns:
    An `ExciteParams`: weights from a truncated normal with variance
    2 / fan_in (He et al., 2015), biases zero.

  Raises:
    ValueError: if a width is not positive.

  References:
    Hu et al., TPAMI 2019, Sec. 3.2 (Eq. 3).

  >>> p = init_excite(jax.random.key(0), 64, reduction=16)
  >>> p.w1.shape, p.w2.shape, p.b1.shape
  ((64, 4), (4, 64), (4,))
  """
  if reduced_channels is None:
    reduced_channels = reduced_width(channels, reduction, rounding=rounding)
  elif reduced_channels < 1:
    raise ValueError(
        f"reduced_channels must be >= 1, got {reduced_channels}."
    )
  if channels < 1:
    raise ValueError(f"channels must be >= 1, got {channels}.")
  k1, k2 = jax.random.split(key)
  he = jax.nn.initializers.he_normal()
  w1 = he(k1, (channels, reduced_channels), dtype)
  w2 = he(k2, (reduced_channels, channels), dtype)
  b1 = jnp.zeros((reduced_channels,), dtype) if use_bias else None
  b2 = jnp.zeros((channels,), dtype) if use_bias else None
  return ExciteParams(w1, b1, w2, b2)


def _check_params(params: ExciteParams, channels: int) -> None:
  if not isinstance(params, ExciteParams):
    raise TypeError(
        f"params must be an ExciteParams, got {type(params).__name__}."
    )
  w1, b1, w2, b2 = params
  if w1.ndim != 2 or w2.ndim != 2 or w1.shape[::-1] != w2.shape:
    raise ValueError(
        "params.w1 and params.w2 must be (C, C_r) and (C_r, C), got"
        f" {w1.shape} and {w2.shape}."
    )
  if w1.shape[0] != channels:
    raise ValueError(
        f"params are for {w1.shape[0]} channels (params.w1 {w1.shape}), but"
        f" the input has {channels} channels."
    )
  if (b1 is None) != (b2 is None):
    raise ValueError("params.b1 and params.b2 must both be set or both None.")
  if b1 is not None and (
      b1.shape != (w1.shape[1],) or b2.shape != (w2.shape[1],)
  ):
    raise ValueError(
        f"params.b1 must be {(w1.shape[1],)} and params.b2 {(w2.shape[1],)},"
        f" got {b1.shape} and {b2.shape}."
    )


def excite(
    params: ExciteParams,
    z: ArrayLike,
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
) -> jax.Array:
  """Turns channel descriptors into per-channel gates.

  ``gate(W2 activation(W1 z + b1) + b2)``, computed in float32. The layers
  act on the last axis, so `z` may also be a whole (N, *spatial, C) map, which
  is the NoSqueeze variant of Table 16.

  Args:
    params: the two FC layers, see `init_excite`.
    z: (N, C) descriptors from `squeeze` (any float dtype), or (..., C).
    activation: hidden nonlinearity, one of ``ACTIVATIONS`` (ReLU in the
      paper).
    gate: output nonlinearity, one of ``GATES`` (sigmoid in the paper;
      tanh and ReLU in Table 12).

  Returns:
    float32 gates of the same shape as `z`.

  Raises:
    ValueError: for params that do not fit `z` or an unknown name.
    TypeError: if `z` is not float.

  References:
    Hu et al., TPAMI 2019, Sec. 3.2 (Eq. 3) and Table 12.

  >>> p = init_excite(jax.random.key(0), 32)
  >>> excite(p, jnp.zeros((2, 32))).round(2)[0, :3]
  Array([0.5, 0.5, 0.5], dtype=float32)
  """
  z = jnp.asarray(z)
  _check_float("z", z)
  if z.ndim < 1:
    raise ValueError(f"z must have a channel axis, got shape {z.shape}.")
  _check_params(params, z.shape[-1])
  _check_choice("activation", activation, ACTIVATIONS)
  _check_choice("gate", gate, GATES)
  f32 = jnp.float32
  w1, b1, w2, b2 = params
  lead = (1,) * (z.ndim - 1)
  h = jnp.matmul(z.astype(f32), w1.astype(f32))
  if b1 is not None:
    h = h + b1.astype(f32).reshape(*lead, -1)
  h = ACTIVATIONS[activation](h)
  s = jnp.matmul(h, w2.astype(f32))
  if b2 is not None:
    s = s + b2.astype(f32).reshape(*lead, -1)
  return GATES[gate](s)


def scale(
    x: ArrayLike, gates: ArrayLike, *, data_format: str = "NHWC"
) -> jax.Array:
  """Multiplies each channel of `x` by its gate.

  Args:
    x: float array in `data_format`, as for `squeeze`.
    gates: (N, C) gates, one per example and channel.
    data_format: layout of `x`, one of ``DATA_FORMATS``.

  Returns:
    The recalibrated array, of the shape and dtype of `x`. The product is
    formed in the wider of the two dtypes and rounded once.

  Raises:
    ValueError: if `gates` is not (N, C) for `x`. TypeError: for non-float
      inputs.

  References:
    Hu et al., TPAMI 2019, Sec. 3.2 (Eq. 4).

  >>> x = jnp.ones((1, 2, 2, 3))
  >>> scale(x, jnp.array([[0.0, 0.5, 1.0]]))[0, 0, 0]
  Array([0. , 0.5, 1. ], dtype=float32)
  """
  x = jnp.asarray(x)
  gates = jnp.asarray(gates)
  _check_float("x", x)
  _check_float("gates", gates)
  c_axis = _channel_axis("x", x, data_format)
  expected = (x.shape[0], x.shape[c_axis])
  if gates.shape != expected:
    raise ValueError(
        f"gates must have shape (N, C) = {expected} for x of shape {x.shape}"
        f" ({data_format}), got {gates.shape}."
    )
  shape = [1] * x.ndim
  shape[0], shape[c_axis] = expected
  g = gates.reshape(shape)
  return (x * g.astype(jnp.promote_types(x.dtype, g.dtype))).astype(x.dtype)


def squeeze_excite(
    params: ExciteParams,
    x: ArrayLike,
    *,
    op: str = "avg",
    activation: str = "relu",
    gate: str = "sigmoid",
    data_format: str = "NHWC",
    return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The whole SE block: squeeze, excite, scale.

  Args:
    params: the excitation's FC layers, see `init_excite`.
    x: float feature map in `data_format`.
    op: squeeze pooling, ``"avg"`` or ``"max"``.
    activation: hidden nonlinearity of the excitation.
    gate: output nonlinearity of the excitation.
    data_format: layout of `x`, one of ``DATA_FORMATS``.
    return_gates: also return the (N, C) float32 gates, for analysis, at no
      extra cost.

  Returns:
    The recalibrated `x` (same shape and dtype), or ``(y, gates)``.

  Raises:
    ValueError / TypeError: as the three primitives.

  References:
    Hu et al., TPAMI 2019, Sec. 3, Fig. 1.

  >>> p = init_excite(jax.random.key(0), 32, reduction=4)
  >>> x = jnp.ones((2, 8, 8, 32))
  >>> y, g = squeeze_excite(p, x, return_gates=True)
  >>> y.shape, g.shape
  ((2, 8, 8, 32), (2, 32))
  """
  z = squeeze(x, op=op, data_format=data_format)
  gates = excite(params, z, activation=activation, gate=gate)
  y = scale(x, gates, data_format=data_format)
  return (y, gates) if return_gates else y


@jax.custom_jvp
def _affine_scale(x, mul, add, gates):
  """``(x * mul + add) * gates`` for (N, P, C) maps, (1, 1, C) mul and add
  and (N, C) gates, rounded once to x's dtype, differentiable in both modes
  without storing the affine map."""
  y = (x.astype(jnp.float32) * mul + add) * gates[:, None, :]
  return y.astype(x.dtype)


@jax.checkpoint
def _times_map(x, t):
  # Under jax.checkpoint the linearisation keeps x itself, in its own
  # dtype, and widens it again when the gradient needs it.
  return x.astype(jnp.float32) * t


@_affine_scale.defjvp
def _affine_scale_jvp(primals, tangents):
  # d[(x mul + add) g] = g mul dx + g dadd + add dg + x (g dmul + mul dg):
  # the only map-sized value the tangent (and so the gradient) reads is x.
  x, mul, add, gates = primals
  dx, dmul, dadd, dgates = tangents
  g = gates[:, None, :]
  dg = dgates[:, None, :]
  dy = (g * mul * dx.astype(jnp.float32) + g * dadd + add * dg
        + _times_map(x, g * dmul + mul * dg))
  return _affine_scale(x, mul, add, gates), dy.astype(x.dtype)


def _given_mean(mean: ArrayLike | None, x: jax.Array,
               channels: int) -> jax.Array | None:
  """A caller's (N, C) mean of `x` over its positions, checked, in float32
  (None stays None)."""
  if mean is None:
    return None
  mean = jnp.asarray(mean)
  _check_float("mean", mean)
  if mean.shape != (x.shape[0], channels):
    raise ValueError(
        f"mean must have shape (N, C) = ({x.shape[0]}, {channels}) for x of"
        f" shape {x.shape}, got {mean.shape}.")
  return mean.astype(jnp.float32)


def squeeze_excite_affine(
    params: ExciteParams,
    x: ArrayLike,
    mul: ArrayLike,
    add: ArrayLike,
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    data_format: str = "NHWC",
    return_gates: bool = False,
    mean: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The SE block on ``x * mul + add``: a map and a per-channel affine.

  The same function as ``squeeze_excite(params, x * mul + add)`` with
  average pooling, for the common case where the SE block follows a
  BatchNorm whose normalisation folds into `mul` and `add`. Its gradient
  needs only `x`, which the BatchNorm keeps for its own gradient anyway,
  so training does not store the normalised map: the gate's gradient is
  ``mul * sum(dy * x) + add * sum(dy)`` over each example's positions. In
  a ResNet this saves one activation-sized buffer per SE block.

  Args:
    params: the excitation's FC layers, see `init_excite`.
    x: float feature map in `data_format`.
    mul, add: (C,) float per-channel scale and shift.
    activation: hidden nonlinearity of the excitation.
    gate: output nonlinearity of the excitation.
    data_format: layout of `x`, one of ``DATA_FORMATS``.
    return_gates: also return the (N, C) float32 gates.
    mean: the (N, C) mean of `x` over its positions, where the caller has
      it for less than a pass over `x`: when `x` is the output of a 1x1
      convolution of stride 1, it is that convolution applied to the mean
      of its input, whose channels are fewer in a bottleneck. Default: the
      squeeze computes it from `x`.

  Returns:
    ``scale(x * mul + add, gates)`` in the dtype of `x` (the affine and the
    product are formed in float32 and rounded once), or ``(y, gates)``.

  Raises:
    ValueError: if `mul` or `add` is not (C,), `mean` not (N, C), or as
      `squeeze_excite`.
    TypeError: for non-float inputs.

  >>> p = init_excite(jax.random.key(0), 8, reduction=4)
  >>> x = jnp.ones((2, 4, 4, 8))
  >>> y = squeeze_excite_affine(p, x, 2 * jnp.ones(8), jnp.zeros(8))
  >>> bool(jnp.allclose(y, squeeze_excite(p, 2 * x)))
  True
  """
  x = jnp.asarray(x)
  mul = jnp.asarray(mul)
  add = jnp.asarray(add)
  _check_float("x", x)
  c_axis = _channel_axis("x", x, data_format)
  channels = x.shape[c_axis]
  for name, v in (("mul", mul), ("add", add)):
    _check_float(name, v)
    if v.shape != (channels,):
      raise ValueError(
          f"{name} must have shape (C,) = ({channels},) for x of shape"
          f" {x.shape} ({data_format}), got {v.shape}.")
  f32 = jnp.float32
  mul, add = mul.astype(f32), add.astype(f32)
  # Channels last, positions flattened: (N, P, C).
  xl = jnp.moveaxis(x, c_axis, -1)
  flat = xl.reshape(x.shape[0], -1, channels)
  pooled = _given_mean(mean, x, channels)
  if pooled is None:
    pooled = jnp.mean(flat, axis=1, dtype=f32)
  z = pooled * mul[None] + add[None]
  gates = excite(params, z, activation=activation, gate=gate)
  y = _affine_scale(flat, mul.reshape(1, 1, -1), add.reshape(1, 1, -1),
                    gates).reshape(xl.shape)
  y = jnp.moveaxis(y, -1, c_axis)
  return (y, gates) if return_gates else y
