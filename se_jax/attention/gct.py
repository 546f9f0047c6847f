"""Gated Channel Transformation: normalised channel competition.

GCT embeds each channel by its l2 norm over positions (scaled by a
trainable alpha), normalises the embeddings across channels (scaled by a
trainable gamma), and gates with ``1 + tanh(gamma * s_hat + beta)``. With
gamma and beta zero the gate is 1, so a freshly initialised block is the
identity.

References:
  Yang, Zhu, Wu, Yang. "Gated Channel Transformation for Visual
  Recognition". CVPR 2020 (arXiv:1909.11519), Sec. 3.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from se_jax import primitives
from se_jax.attention.base import Attention, check_choice, check_positive

__all__ = ["GCTOptions", "GCTParams", "GatedChannelTransformation",
           "gated_channel_transformation", "gct_embedding", "gct_gate"]

MODES = ("l2", "l1")


class GCTParams(NamedTuple):
  """The per-channel parameters of a GCT block, each (C,).

  Attributes:
    alpha: embedding weights (initialised to ones).
    gamma: gating weights (zeros).
    beta: gating biases (zeros).
  """

  alpha: jax.Array
  gamma: jax.Array
  beta: jax.Array


def _check_vector(name: str, v: jax.Array, channels: int) -> None:
  primitives._check_float(name, v)
  if v.shape != (channels,):
    raise ValueError(
        f"{name} must have shape (C,) = ({channels},), got {v.shape}.")


def gct_embedding(alpha: ArrayLike, x: ArrayLike, *, mode: str = "l2",
                  epsilon: float = 1e-5,
                  data_format: str = "NHWC") -> jax.Array:
  """GCT's global context embedding of each channel.

  ``alpha * sqrt(sum x^2 + epsilon)`` over positions (mode ``"l2"``), or
  ``alpha * sum |x|`` (mode ``"l1"``), as the authors' code.

  Args:
    alpha: (C,) embedding weights.
    x: float feature map in `data_format` (see `se_jax.squeeze`).
    mode: ``"l2"`` (the paper's default) or ``"l1"``.
    epsilon: added under the square root.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.

  Returns:
    (N, C) float32 embeddings; the sums are accumulated in float32.

  Raises:
    ValueError: for a bad shape, layout or mode. TypeError: for non-float
      inputs.

  >>> gct_embedding(jnp.ones(1), jnp.full((1, 2, 2, 1), 2.0), epsilon=0.0)
  Array([[4.]], dtype=float32)
  """
  x, alpha = jnp.asarray(x), jnp.asarray(alpha)
  primitives._check_float("x", x)
  c_axis = primitives._channel_axis("x", x, data_format)
  _check_vector("alpha", alpha, x.shape[c_axis])
  primitives._check_choice("mode", mode, MODES)
  spatial = tuple(a for a in range(1, x.ndim) if a != c_axis)
  xf = x.astype(jnp.float32)
  if mode == "l2":
    s = jnp.sqrt(jnp.sum(jnp.square(xf), axis=spatial) + epsilon)
  else:
    s = jnp.sum(jnp.abs(xf), axis=spatial)
  return s * alpha.astype(jnp.float32)[None]


def gct_gate(gamma: ArrayLike, beta: ArrayLike, s: ArrayLike, *,
             mode: str = "l2", epsilon: float = 1e-5) -> jax.Array:
  """GCT's channel normalisation and gating.

  ``1 + tanh(s * gamma / sqrt(mean_c s^2 + epsilon) + beta)`` (mode
  ``"l2"``); mode ``"l1"`` divides by ``mean_c |s| + epsilon`` instead.

  Args:
    gamma, beta: (C,) gating weights and biases.
    s: (N, C) embeddings from `gct_embedding`.
    mode: ``"l2"`` or ``"l1"``.
    epsilon: added to the normaliser.

  Returns:
    (N, C) float32 gates in (0, 2).

  Raises:
    ValueError: for bad shapes or mode. TypeError: for non-float inputs.

  >>> gct_gate(jnp.zeros(3), jnp.zeros(3), jnp.ones((2, 3)))[0]
  Array([1., 1., 1.], dtype=float32)
  """
  s = jnp.asarray(s)
  gamma, beta = jnp.asarray(gamma), jnp.asarray(beta)
  primitives._check_float("s", s)
  if s.ndim != 2:
    raise ValueError(f"s must be (N, C), got shape {s.shape}.")
  _check_vector("gamma", gamma, s.shape[1])
  _check_vector("beta", beta, s.shape[1])
  primitives._check_choice("mode", mode, MODES)
  f32 = jnp.float32
  s = s.astype(f32)
  if mode == "l2":
    scale = jax.lax.rsqrt(jnp.mean(jnp.square(s), axis=1, keepdims=True)
                          + epsilon)
  else:
    scale = 1.0 / (jnp.mean(jnp.abs(s), axis=1, keepdims=True) + epsilon)
  return 1.0 + jnp.tanh(s * scale * gamma.astype(f32)[None]
                        + beta.astype(f32)[None])


def gated_channel_transformation(
    params: GCTParams, x: ArrayLike, *, mode: str = "l2",
    epsilon: float = 1e-5, data_format: str = "NHWC",
    return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The GCT block: `gct_embedding`, `gct_gate`, scale.

  Args:
    params: a `GCTParams`.
    x: float feature map in `data_format`.
    mode: ``"l2"`` or ``"l1"``.
    epsilon: see `gct_embedding` and `gct_gate`.
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_gates: also return the (N, C) float32 gates.

  Returns:
    `x` transformed, in its dtype, or ``(y, gates)``.

  Raises:
    ValueError / TypeError: as `gct_embedding` and `gct_gate`.

  >>> c = 4
  >>> p = GCTParams(jnp.ones(c), jnp.zeros(c), jnp.zeros(c))
  >>> x = jnp.ones((2, 3, 3, c))
  >>> bool(jnp.array_equal(gated_channel_transformation(p, x), x))
  True
  """
  if not isinstance(params, GCTParams):
    raise TypeError(
        f"params must be a GCTParams, got {type(params).__name__}.")
  s = gct_embedding(params.alpha, x, mode=mode, epsilon=epsilon,
                    data_format=data_format)
  gates = gct_gate(params.gamma, params.beta, s, mode=mode, epsilon=epsilon)
  y = primitives.scale(x, gates, data_format=data_format)
  return (y, gates) if return_gates else y


@dataclasses.dataclass(frozen=True)
class GCTOptions:
  """The options of a GCT block (defaults: the authors' code).

  Attributes:
    gct_mode: the embedding's norm, ``"l2"`` (default) or ``"l1"``.
    gct_epsilon: the epsilon of embedding and normalisation (1e-5).
  """

  gct_mode: str = "l2"
  gct_epsilon: float = 1e-5

  def __post_init__(self):
    check_choice("gct_mode", self.gct_mode, MODES)
    check_positive("gct_epsilon", self.gct_epsilon)


class GatedChannelTransformation(Attention):
  """GCT on an NHWC map; records its (N, C) gates.

  Initialised as the paper and the authors' code: alpha ones, gamma and
  beta zeros, so the block starts as the identity.

  Args:
    channels: C.
    options: a `GCTOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gates are computed in float32.
    rngs: unused (nothing is drawn); accepted for the uniform signature.

  References:
    Yang et al., CVPR 2020.
  """

  kind: ClassVar[str] = "gct"
  tag_prefix: ClassVar[str] = "GCT"
  Options: ClassVar[type] = GCTOptions

  def __init__(self, channels: int, options: GCTOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype, rngs
    self._setup(channels, options, tag, record_gates)
    f32 = jnp.float32
    self.alpha = nnx.Param(jnp.ones((channels,), f32))
    self.gamma = nnx.Param(jnp.zeros((channels,), f32))
    self.beta = nnx.Param(jnp.zeros((channels,), f32))

  @property
  def params(self) -> GCTParams:
    """The parameters as a `GCTParams`, for the pure functions."""
    return GCTParams(self.alpha[...], self.gamma[...], self.beta[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    o = self.options
    y, gates = gated_channel_transformation(
        self.params, x, mode=o.gct_mode, epsilon=o.gct_epsilon,
        return_gates=True)
    self._record(gates)
    return y
