"""Squeeze-and-Excitation: the block of Hu et al., as an attention kind.

The pure functions are `se_jax.primitives` (`squeeze`, `excite`, `scale`,
`squeeze_excite`, `squeeze_excite_affine`); this file adds the options of
the paper's ablations and the NNX module that the residual units build.

References:
  Hu, Shen, Albanie, Sun, Wu. "Squeeze-and-Excitation Networks". TPAMI 2019
  (arXiv:1709.01507), Sec. 3 and Tables 10-16.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax import primitives
from se_jax.attention.base import Attention, check_choice, check_positive

__all__ = ["SEOptions", "SqueezeExcite"]


@dataclasses.dataclass(frozen=True)
class SEOptions:
  """The options of an SE block.

  Attributes:
    reduction: the reduction ratio r (Table 10).
    rounding: ``"paper"`` (C // r) or ``"timm"`` (a multiple of 8, >= 8),
      see `se_jax.primitives.reduced_width`.
    se_bias: FC biases (dropped in the paper's ablations, Sec. 6).
    squeeze: ``"avg"`` or ``"max"`` (Table 11).
    activation: hidden nonlinearity of the excitation.
    gate: output nonlinearity (Table 12).
    no_squeeze: the NoSqueeze variant of Table 16: the two layers act as
      1x1 convolutions on every position, with no pooling.
  """

  reduction: float = 16
  rounding: str = "paper"
  se_bias: bool = True
  squeeze: str = "avg"
  activation: str = "relu"
  gate: str = "sigmoid"
  no_squeeze: bool = False

  def __post_init__(self):
    check_positive("reduction", self.reduction)
    check_choice("rounding", self.rounding, primitives.ROUNDINGS)
    check_choice("squeeze", self.squeeze, primitives.SQUEEZE_OPS)
    check_choice("activation", self.activation, primitives.ACTIVATIONS)
    check_choice("gate", self.gate, primitives.GATES)
    if self.no_squeeze and self.squeeze != "avg":
      raise ValueError(
          "no_squeeze=True has no pooling; leave squeeze='avg', got"
          f" squeeze={self.squeeze!r}.")


class SqueezeExcite(Attention):
  """Squeeze-and-Excitation block on an NHWC feature map.

  The module owns the two FC layers and calls the pure primitives. Its
  gates, (N, C), are recorded under its tag (see `Attention`); a NoSqueeze
  block's gates are per position, (N, H, W, C).

  Args:
    channels: C, channels of the recalibrated map.
    options: an `SEOptions` (or a dict of its fields).
    reduced_channels: explicit C_r, overriding the options' reduction.
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the block computes in float32 and returns x's dtype.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    **option_overrides: single `SEOptions` fields, on top of `options`
      (``SqueezeExcite(64, reduction=4, rngs=...)``).

  References:
    Hu et al., TPAMI 2019, Sec. 3 and Table 16.
  """

  kind: ClassVar[str] = "se"
  tag_prefix: ClassVar[str] = "SE"
  Options: ClassVar[type] = SEOptions
  # timm's SEModule (timm/layers/squeeze_excite.py): 1x1 convolutions fc1
  # and fc2 with biases.
  timm_params: ClassVar[dict] = {
      "w1": ("fc1.weight", "fc_conv"), "b1": ("fc1.bias", "vector"),
      "w2": ("fc2.weight", "fc_conv"), "b2": ("fc2.bias", "vector")}

  def __init__(self, channels: int, options: SEOptions | None = None, *,
               reduced_channels: int | None = None, tag: str = "gates",
               record_gates: bool = False, dtype=None, rngs: nnx.Rngs,
               **option_overrides):
    del dtype
    if option_overrides:
      base = dataclasses.asdict(options) if isinstance(options, SEOptions) \
          else dict(options or {})
      options = {**base, **option_overrides}
    o = self._setup(channels, options, tag, record_gates)
    params = primitives.init_excite(
        rngs.params(), channels, reduction=o.reduction,
        reduced_channels=reduced_channels, use_bias=o.se_bias,
        rounding=o.rounding)
    self.reduced_channels = params.w1.shape[1]
    self.w1 = nnx.Param(params.w1)
    self.w2 = nnx.Param(params.w2)
    self.b1 = nnx.Param(params.b1) if o.se_bias else None
    self.b2 = nnx.Param(params.b2) if o.se_bias else None

  @property
  def params(self) -> primitives.ExciteParams:
    """The FC layers as an `ExciteParams`, for the pure primitives."""
    bias = lambda b: None if b is None else b[...]
    return primitives.ExciteParams(
        self.w1[...], bias(self.b1), self.w2[...], bias(self.b2))

  def __call__(self, x: jax.Array) -> jax.Array:
    o = self.options
    if o.no_squeeze:
      primitives._channel_axis("x", jnp.asarray(x), "NHWC")
      gates = primitives.excite(self.params, x, activation=o.activation,
                                gate=o.gate)
      y = (x * gates).astype(x.dtype)
    else:
      y, gates = primitives.squeeze_excite(
          self.params, x, op=o.squeeze, activation=o.activation,
          gate=o.gate, return_gates=True)
    self._record(gates)
    return y

  @property
  def folds_norm(self) -> bool:
    return self.options.squeeze == "avg" and not self.options.no_squeeze

  def affine_call(self, x: jax.Array, mul: jax.Array, add: jax.Array,
                  dtype=None, mean: jax.Array | None = None) -> jax.Array:
    """The block on ``x * mul + add`` (a folded BatchNorm), in `dtype`
    (default: x's), without storing that map for the gradient: see
    `se_jax.squeeze_excite_affine`. Needs average pooling and a squeeze."""
    if not self.folds_norm:
      raise ValueError(
          "affine_call needs squeeze='avg' and no_squeeze=False, got"
          f" squeeze={self.options.squeeze!r},"
          f" no_squeeze={self.options.no_squeeze}.")
    y, gates = primitives.squeeze_excite_affine(
        self.params, x, mul, add, activation=self.options.activation,
        gate=self.options.gate, return_gates=True, mean=mean)
    self._record(gates)
    return y if dtype is None else y.astype(dtype)
