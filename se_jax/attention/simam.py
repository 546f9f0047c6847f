"""SimAM: parameter-free weights for every element from an energy function.

SimAM weighs each neuron by how much it stands out of its channel: with
``d = (x - mean)^2`` and ``v = sum(d) / (P - 1)`` over the P positions of
each channel, the inverse of the minimal energy is ``d / (4 (v + lambda))
+ 1/2``, and the map is multiplied by its sigmoid. There are no parameters
and no per-channel gates: the weights vary over positions and channels.

References:
  Yang, Zhang, Li, Xie. "SimAM: A Simple, Parameter-Free Attention Module
  for Convolutional Neural Networks". ICML 2021 (PMLR 139), Sec. 3.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from se_jax import primitives
from se_jax.attention.base import Attention, check_positive

__all__ = ["SimAM", "SimAMOptions", "simam", "simam_weights"]


def simam_weights(x: ArrayLike, *, e_lambda: float = 1e-4,
                  data_format: str = "NHWC") -> jax.Array:
  """SimAM's weights: the sigmoid of each element's inverse energy.

  Args:
    x: float feature map in `data_format` (see `se_jax.squeeze`), with at
      least 2 positions.
    e_lambda: the energy's regulariser lambda (1e-4 in the paper and the
      authors' code).
    data_format: one of `se_jax.primitives.DATA_FORMATS`.

  Returns:
    float32 weights of the shape of `x`, in (0.62, 1) (the inverse energy
    is at least 1/2).

  Raises:
    ValueError: for a bad rank or layout, fewer than 2 positions or a
      lambda that is not positive. TypeError: if `x` is not float.

  >>> simam_weights(jnp.zeros((1, 2, 2, 1)))[0, 0, 0]
  Array([0.62245935], dtype=float32)
  """
  x = jnp.asarray(x)
  primitives._check_float("x", x)
  c_axis = primitives._channel_axis("x", x, data_format)
  check_positive("e_lambda", e_lambda)
  spatial = tuple(a for a in range(1, x.ndim) if a != c_axis)
  positions = x.size // (x.shape[0] * x.shape[c_axis])
  if positions < 2:
    raise ValueError(
        f"x must have at least 2 positions, got shape {x.shape}"
        f" ({data_format}).")
  xf = x.astype(jnp.float32)
  d = jnp.square(xf - jnp.mean(xf, axis=spatial, keepdims=True))
  v = jnp.sum(d, axis=spatial, keepdims=True) / (positions - 1)
  return jax.nn.sigmoid(d / (4.0 * (v + e_lambda)) + 0.5)


def simam(x: ArrayLike, *, e_lambda: float = 1e-4,
          data_format: str = "NHWC", return_weights: bool = False,
          ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The SimAM block: ``x * simam_weights(x)``.

  Args:
    x: float feature map in `data_format`.
    e_lambda: see `simam_weights`.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_weights: also return the float32 weights (the shape of `x`).

  Returns:
    `x` weighted, in its dtype (formed in float32 and rounded once), or
    ``(y, weights)``.

  Raises:
    ValueError / TypeError: as `simam_weights`.

  >>> x = jnp.array([0.0, 2.0]).reshape(1, 2, 1, 1)
  >>> simam(x)[0, :, 0, 0]
  Array([0.      , 1.302707], dtype=float32)
  """
  x = jnp.asarray(x)
  weights = simam_weights(x, e_lambda=e_lambda, data_format=data_format)
  y = (x.astype(jnp.float32) * weights).astype(x.dtype)
  return (y, weights) if return_weights else y


@dataclasses.dataclass(frozen=True)
class SimAMOptions:
  """The options of a SimAM block.

  Attributes:
    simam_lambda: the energy's regulariser lambda (1e-4, the paper's and
      the authors' default).
  """

  simam_lambda: float = 1e-4

  def __post_init__(self):
    check_positive("simam_lambda", self.simam_lambda)


class SimAM(Attention):
  """SimAM on an NHWC map.

  It has no parameters and no channel gates; when recording, it records
  the channel mean of its weights, (N, H, W), under ``tag + ":spatial"``.

  Args:
    channels: C (checked, unused otherwise).
    options: a `SimAMOptions` (or a dict of its fields).
    tag: name under which the spatial weights are recorded.
    record_gates: record them on each call (inside ``nnx.capture``).
    dtype: unused; the weights are computed in float32.
    rngs: unused; accepted for the uniform signature.

  References:
    Yang et al., ICML 2021.
  """

  kind: ClassVar[str] = "simam"
  tag_prefix: ClassVar[str] = "SIMAM"
  Options: ClassVar[type] = SimAMOptions

  def __init__(self, channels: int, options: SimAMOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype, rngs
    self._setup(channels, options, tag, record_gates)

  def __call__(self, x: jax.Array) -> jax.Array:
    y, weights = simam(x, e_lambda=self.options.simam_lambda,
                       return_weights=True)
    if self.record_gates:
      self._record(spatial=jnp.mean(weights, axis=-1))
    return y
