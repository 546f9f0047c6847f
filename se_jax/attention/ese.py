"""Effective Squeeze-Excitation: SE with one full-width FC layer.

eSE keeps SE's squeeze and scale but replaces the two FC layers around the
bottleneck by one C -> C layer, which loses no channel information to a
reduction, and gates with a hard sigmoid, ``relu6(v + 3) / 6``.

References:
  Lee, Park. "CenterMask: Real-Time Anchor-Free Instance Segmentation".
  CVPR 2020 (arXiv:1911.06667), Sec. 3 (VoVNetV2, eSE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from se_jax import primitives
from se_jax.attention.base import Attention, check_choice

__all__ = ["ESEOptions", "EffectiveSqueezeExcite", "ese_gate",
           "effective_squeeze_excite", "effective_squeeze_excite_affine"]


def ese_gate(weight: ArrayLike, bias: ArrayLike | None, z: ArrayLike, *,
             gate: str = "hard_sigmoid") -> jax.Array:
  """Gates from channel descriptors: one FC layer, then `gate`.

  Args:
    weight: (C, C) weights, input channels first.
    bias: (C,) bias, or None.
    z: (N, C) descriptors (any float dtype).
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.

  Returns:
    (N, C) float32 gates ``gate(z @ weight + bias)``.

  Raises:
    ValueError: for a weight or bias that does not fit `z`, `z` not (N, C),
      or an unknown gate. TypeError: if `z` is not float.

  >>> ese_gate(jnp.zeros((4, 4)), jnp.zeros(4), jnp.ones((2, 4)))[0]
  Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
  """
  weight, z = jnp.asarray(weight), jnp.asarray(z)
  primitives._check_float("z", z)
  if z.ndim != 2:
    raise ValueError(f"z must be (N, C), got shape {z.shape}.")
  c = z.shape[1]
  if weight.shape != (c, c):
    raise ValueError(
        f"weight must be (C, C) = {(c, c)} for z of shape {z.shape}, got"
        f" {weight.shape}.")
  if bias is not None and jnp.shape(bias) != (c,):
    raise ValueError(
        f"bias must be (C,) = ({c},) or None, got {jnp.shape(bias)}.")
  primitives._check_choice("gate", gate, primitives.GATES)
  f32 = jnp.float32
  s = jnp.matmul(z.astype(f32), weight.astype(f32),
                 precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    s = s + jnp.asarray(bias, f32)[None]
  return primitives.GATES[gate](s)


def _descriptors(x: jax.Array, add_maxpool: bool,
                 data_format: str) -> jax.Array:
  z = primitives.squeeze(x, data_format=data_format)
  if add_maxpool:
    # timm's experimental variant: the mean of the average and the maximum.
    z = 0.5 * z + 0.5 * primitives.squeeze(x, op="max",
                                           data_format=data_format)
  return z


def effective_squeeze_excite(
    weight: ArrayLike, bias: ArrayLike | None, x: ArrayLike, *,
    gate: str = "hard_sigmoid", add_maxpool: bool = False,
    data_format: str = "NHWC", return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The eSE block: average-pool, `ese_gate`, scale.

  Args:
    weight: (C, C) weights of the FC layer, input channels first.
    bias: (C,) bias, or None.
    x: float feature map in `data_format` (see `se_jax.squeeze`).
    gate: output nonlinearity (the paper's hard sigmoid by default).
    add_maxpool: pool with the mean of average and max pooling (timm's
      experimental ``add_maxpool``).
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_gates: also return the (N, C) float32 gates.

  Returns:
    `x` recalibrated, in its dtype, or ``(y, gates)``.

  Raises:
    ValueError / TypeError: as `se_jax.squeeze` and `ese_gate`.

  >>> x = jnp.ones((2, 4, 4, 8))
  >>> y = effective_squeeze_excite(jnp.zeros((8, 8)), None, x)
  >>> y[0, 0, 0, :2]
  Array([0.5, 0.5], dtype=float32)
  """
  x = jnp.asarray(x)
  z = _descriptors(x, add_maxpool, data_format)
  gates = ese_gate(weight, bias, z, gate=gate)
  y = primitives.scale(x, gates, data_format=data_format)
  return (y, gates) if return_gates else y


def effective_squeeze_excite_affine(
    weight: ArrayLike, bias: ArrayLike | None, x: ArrayLike, mul: ArrayLike,
    add: ArrayLike, *, gate: str = "hard_sigmoid",
    data_format: str = "NHWC", return_gates: bool = False,
    mean: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The eSE block on ``x * mul + add``, a map and a per-channel affine.

  The same function as ``effective_squeeze_excite(weight, bias, x * mul +
  add)``, for an eSE block after a BatchNorm folded into `mul` and `add`:
  the average of the affine map is the affine of the average, so the gate
  needs only `x`, and the gradient keeps `x` and not the normalised map
  (as `se_jax.squeeze_excite_affine` does for SE).

  Args:
    weight: (C, C) weights of the FC layer, input channels first.
    bias: (C,) bias, or None.
    x: float feature map in `data_format`.
    mul, add: (C,) float per-channel scale and shift.
    gate: output nonlinearity.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_gates: also return the (N, C) float32 gates.
    mean: the (N, C) mean of `x` over its positions, if the caller has it
      (see `se_jax.squeeze_excite_affine`); default: computed from `x`.

  Returns:
    The recalibrated affine map in the dtype of `x` (formed in float32 and
    rounded once), or ``(y, gates)``.

  Raises:
    ValueError: if `mul` or `add` is not (C,), `mean` not (N, C), or as
      `effective_squeeze_excite`. TypeError: for non-float inputs.

  >>> x = jnp.ones((2, 4, 4, 8))
  >>> w = 0.1 * jnp.eye(8)
  >>> y = effective_squeeze_excite_affine(w, None, x, 2 * jnp.ones(8),
  ...                                     jnp.zeros(8))
  >>> bool(jnp.allclose(y, effective_squeeze_excite(w, None, 2 * x)))
  True
  """
  x, mul, add = jnp.asarray(x), jnp.asarray(mul), jnp.asarray(add)
  primitives._check_float("x", x)
  c_axis = primitives._channel_axis("x", x, data_format)
  channels = x.shape[c_axis]
  for name, v in (("mul", mul), ("add", add)):
    primitives._check_float(name, v)
    if v.shape != (channels,):
      raise ValueError(
          f"{name} must have shape (C,) = ({channels},) for x of shape"
          f" {x.shape} ({data_format}), got {v.shape}.")
  f32 = jnp.float32
  mul, add = mul.astype(f32), add.astype(f32)
  xl = jnp.moveaxis(x, c_axis, -1)
  flat = xl.reshape(x.shape[0], -1, channels)
  pooled = primitives._given_mean(mean, x, channels)
  if pooled is None:
    pooled = jnp.mean(flat, axis=1, dtype=f32)
  z = pooled * mul[None] + add[None]
  gates = ese_gate(weight, bias, z, gate=gate)
  y = primitives._affine_scale(flat, mul.reshape(1, 1, -1),
                               add.reshape(1, 1, -1), gates)
  y = jnp.moveaxis(y.reshape(xl.shape), -1, c_axis)
  return (y, gates) if return_gates else y


@dataclasses.dataclass(frozen=True)
class ESEOptions:
  """The options of an eSE block.

  Attributes:
    gate: output nonlinearity, one of `se_jax.primitives.GATES`; the
      paper's and timm's ``"hard_sigmoid"``.
    add_maxpool: pool with the mean of average and max pooling (timm's
      experimental ``add_maxpool``, off by default as in timm).
  """

  gate: str = "hard_sigmoid"
  add_maxpool: bool = False

  def __post_init__(self):
    check_choice("gate", self.gate, primitives.GATES)
    if not isinstance(self.add_maxpool, bool):
      raise ValueError(
          f"add_maxpool must be a bool, got {self.add_maxpool!r}.")


class EffectiveSqueezeExcite(Attention):
  """Effective Squeeze-Excitation on an NHWC map; records its (N, C) gates.

  The FC layer is initialised as PyTorch initialises timm's 1x1
  convolution: weight and bias uniform in +-1/sqrt(C).

  Args:
    channels: C.
    options: an `ESEOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gate is computed in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Lee, Park, CVPR 2020.
  """

  kind: ClassVar[str] = "ese"
  tag_prefix: ClassVar[str] = "ESE"
  Options: ClassVar[type] = ESEOptions
  # timm's EffectiveSEModule (timm/layers/squeeze_excite.py): a 1x1
  # convolution fc with bias.
  timm_params: ClassVar[dict] = {
      "weight": ("fc.weight", "fc_conv"), "bias": ("fc.bias", "vector")}

  def __init__(self, channels: int, options: ESEOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype
    self._setup(channels, options, tag, record_gates)
    bound = 1.0 / math.sqrt(channels)
    kw, kb = jax.random.split(rngs.params())
    self.weight = nnx.Param(jax.random.uniform(
        kw, (channels, channels), jnp.float32, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(
        kb, (channels,), jnp.float32, -bound, bound))

  def __call__(self, x: jax.Array) -> jax.Array:
    y, gates = effective_squeeze_excite(
        self.weight[...], self.bias[...], x, gate=self.options.gate,
        add_maxpool=self.options.add_maxpool, return_gates=True)
    self._record(gates)
    return y

  @property
  def folds_norm(self) -> bool:
    return not self.options.add_maxpool

  def affine_call(self, x: jax.Array, mul: jax.Array, add: jax.Array,
                  dtype=None, mean: jax.Array | None = None) -> jax.Array:
    """The block on ``x * mul + add`` (a folded BatchNorm), in `dtype`
    (default: x's), without storing that map for the gradient: see
    `effective_squeeze_excite_affine`. Needs ``add_maxpool=False``."""
    if not self.folds_norm:
      raise ValueError("affine_call needs add_maxpool=False.")
    y, gates = effective_squeeze_excite_affine(
        self.weight[...], self.bias[...], x, mul, add,
        gate=self.options.gate, return_gates=True, mean=mean)
    self._record(gates)
    return y if dtype is None else y.astype(dtype)
