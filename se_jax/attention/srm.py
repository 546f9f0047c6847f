"""Style-based Recalibration: gates from each channel's mean and spread.

SRM pools each channel to its style, the mean and the standard deviation
over positions, combines the two with a per-channel weighting (a
channel-wise fully connected layer, C x 2 weights, no bias), normalises the
result with a BatchNorm over the channels and gates with its sigmoid.

References:
  Lee, Kim, Nam. "SRM: A Style-based Recalibration Module for
  Convolutional Neural Networks". ICCV 2019 (arXiv:1903.10829), Sec. 3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from se_jax import layers
from se_jax import primitives
from se_jax.attention.base import Attention, check_choice

__all__ = ["SRMOptions", "StyleRecalibration", "srm_gate", "style_pool",
           "style_recalibration"]


def style_pool(x: ArrayLike, *, data_format: str = "NHWC") -> jax.Array:
  """Style pooling: each channel's mean and standard deviation.

  The standard deviation is the unbiased one (divided by P - 1 for P
  positions), without an epsilon, as the authors' ``torch.std``. Its
  gradient is taken as 0 where a channel is constant, where the square
  root's is infinite.

  Args:
    x: float feature map in `data_format` (see `se_jax.squeeze`), with at
      least 2 positions.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.

  Returns:
    (N, C, 2) float32 styles: ``[..., 0]`` the means, ``[..., 1]`` the
    standard deviations, both accumulated in float32.

  Raises:
    ValueError: for a bad rank or layout, or fewer than 2 positions.
    TypeError: if `x` is not float.

  >>> t = style_pool(jnp.array([1.0, 3.0]).reshape(1, 2, 1, 1))
  >>> t[0, 0]
  Array([2.       , 1.4142135], dtype=float32)
  """
  x = jnp.asarray(x)
  primitives._check_float("x", x)
  c_axis = primitives._channel_axis("x", x, data_format)
  spatial = tuple(a for a in range(1, x.ndim) if a != c_axis)
  positions = x.size // (x.shape[0] * x.shape[c_axis])
  if positions < 2:
    raise ValueError(
        f"x must have at least 2 positions for a standard deviation, got"
        f" shape {x.shape} ({data_format}).")
  f32 = jnp.float32
  mean = jnp.mean(x, axis=spatial, keepdims=True, dtype=f32)
  var = jnp.sum(jnp.square(x.astype(f32) - mean), axis=spatial) / (
      positions - 1)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return jnp.stack([mean.reshape(var.shape), std], axis=-1)


def srm_gate(cfc: ArrayLike, t: ArrayLike, *,
             norm: Callable[[jax.Array], jax.Array] | None = None,
             gate: str = "sigmoid") -> jax.Array:
  """Style integration: ``gate(norm(sum_k cfc[c, k] t[n, c, k]))``.

  Args:
    cfc: (C, 2) channel-wise weights of mean and standard deviation.
    t: (N, C, 2) styles from `style_pool`.
    norm: applied to the (N, C) float32 combination (the module passes its
      BatchNorm); None for none.
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.

  Returns:
    (N, C) float32 gates.

  Raises:
    ValueError: for shapes that do not fit or an unknown gate. TypeError:
      for non-float inputs.

  >>> srm_gate(jnp.zeros((3, 2)), jnp.ones((2, 3, 2)))[0]
  Array([0.5, 0.5, 0.5], dtype=float32)
  """
  cfc, t = jnp.asarray(cfc), jnp.asarray(t)
  primitives._check_float("cfc", cfc)
  primitives._check_float("t", t)
  if t.ndim != 3 or t.shape[2] != 2:
    raise ValueError(f"t must be (N, C, 2), got shape {t.shape}.")
  if cfc.shape != t.shape[1:]:
    raise ValueError(
        f"cfc must be (C, 2) = {t.shape[1:]} for t of shape {t.shape}, got"
        f" {cfc.shape}.")
  primitives._check_choice("gate", gate, primitives.GATES)
  z = jnp.sum(t.astype(jnp.float32) * cfc.astype(jnp.float32)[None], axis=-1)
  if norm is not None:
    z = norm(z).astype(jnp.float32)
  return primitives.GATES[gate](z)


def style_recalibration(
    cfc: ArrayLike, x: ArrayLike, *,
    norm: Callable[[jax.Array], jax.Array] | None = None,
    gate: str = "sigmoid", data_format: str = "NHWC",
    return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The SRM block: `style_pool`, `srm_gate`, scale.

  Args:
    cfc: (C, 2) channel-wise weights.
    x: float feature map in `data_format`.
    norm: see `srm_gate`.
    gate: output nonlinearity.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_gates: also return the (N, C) float32 gates.

  Returns:
    `x` recalibrated, in its dtype, or ``(y, gates)``.

  Raises:
    ValueError / TypeError: as `style_pool` and `srm_gate`.

  >>> y = style_recalibration(jnp.zeros((8, 2)), jnp.ones((2, 4, 4, 8)))
  >>> y[0, 0, 0, :2]
  Array([0.5, 0.5], dtype=float32)
  """
  t = style_pool(x, data_format=data_format)
  gates = srm_gate(cfc, t, norm=norm, gate=gate)
  y = primitives.scale(x, gates, data_format=data_format)
  return (y, gates) if return_gates else y


@dataclasses.dataclass(frozen=True)
class SRMOptions:
  """The options of an SRM block.

  Attributes:
    gate: output nonlinearity, one of `se_jax.primitives.GATES` (the
      paper's sigmoid).
  """

  gate: str = "sigmoid"

  def __post_init__(self):
    check_choice("gate", self.gate, primitives.GATES)


class StyleRecalibration(Attention):
  """SRM on an NHWC map; records its (N, C) gates.

  Initialised as the authors' code: channel-wise weights zero, BatchNorm
  scale one and bias zero. The BatchNorm normalises the (N, C)
  combinations over the batch in training and with running statistics in
  eval mode (`se_jax.layers.BatchNorm`).

  Args:
    channels: C.
    options: an `SRMOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gates are computed in float32.
    rngs: unused (nothing is drawn); accepted for the uniform signature.

  References:
    Lee et al., ICCV 2019.
  """

  kind: ClassVar[str] = "srm"
  tag_prefix: ClassVar[str] = "SRM"
  Options: ClassVar[type] = SRMOptions

  def __init__(self, channels: int, options: SRMOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype, rngs
    self._setup(channels, options, tag, record_gates)
    self.cfc = nnx.Param(jnp.zeros((channels, 2), jnp.float32))
    self.norm = layers.BatchNorm(channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    y, gates = style_recalibration(self.cfc[...], x, norm=self.norm,
                                   gate=self.options.gate, return_gates=True)
    self._record(gates)
    return y
