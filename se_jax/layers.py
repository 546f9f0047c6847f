"""The SE block as a Flax NNX module, built on `se_jax.primitives`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax import primitives

__all__ = ["SqueezeExcite"]


class SqueezeExcite(nnx.Module):
  """Squeeze-and-Excitation block on an NHWC feature map.

  The module owns the two FC layers and calls the pure primitives. Its gates
  can be read after a forward pass: with ``record_gates=True`` (or through
  ``nnx.view(model, record_gates=True)``) each call sows them as an
  ``nnx.Intermediate`` named `tag`, which ``nnx.capture`` returns;
  `se_jax.models.capture_gates` does this for a whole network.

  With ``no_squeeze=True`` the block is the NoSqueeze variant of Table 16: the
  same two layers act as 1x1 convolutions on every position of the map, with
  no pooling, and the gates are per position.

  Args:
    channels: C, channels of the recalibrated map.
    reduction: the ratio r.
    rounding: ``"paper"`` (C // r) or ``"timm"``, see
      `se_jax.primitives.reduced_width`.
    reduced_channels: explicit C_r, overriding `reduction` and `rounding`.
    use_bias: FC biases.
    squeeze: pooling op, ``"avg"`` or ``"max"``.
    activation: hidden nonlinearity.
    gate: output nonlinearity.
    no_squeeze: the Table 16 variant.
    tag: name under which the gates are sown.
    record_gates: sow the gates on each call (only inside ``nnx.capture``).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Hu et al., TPAMI 2019, Sec. 3 and Table 16.
  """

  def __init__(
      self,
      channels: int,
      *,
      reduction: float = 16,
      rounding: str = "paper",
      reduced_channels: int | None = None,
      use_bias: bool = True,
      squeeze: str = "avg",
      activation: str = "relu",
      gate: str = "sigmoid",
      no_squeeze: bool = False,
      tag: str = "gates",
      record_gates: bool = False,
      rngs: nnx.Rngs,
  ):
    for name, value, choices in (
        ("squeeze", squeeze, primitives.SQUEEZE_OPS),
        ("activation", activation, primitives.ACTIVATIONS),
        ("gate", gate, primitives.GATES),
    ):
      primitives._check_choice(name, value, choices)
    params = primitives.init_excite(
        rngs.params(),
        channels,
        reduction=reduction,
        reduced_channels=reduced_channels,
        use_bias=use_bias,
        rounding=rounding,
    )
    self.channels = channels
    self.reduced_channels = params.w1.shape[1]
    self.w1 = nnx.Param(params.w1)
    self.w2 = nnx.Param(params.w2)
    self.b1 = nnx.Param(params.b1) if use_bias else None
    self.b2 = nnx.Param(params.b2) if use_bias else None
    self.squeeze = squeeze
    self.activation = activation
    self.gate = gate
    self.no_squeeze = no_squeeze
    self.tag = tag
    self.record_gates = record_gates

  @property
  def params(self) -> primitives.ExciteParams:
    """The FC layers as an `ExciteParams`, for the pure primitives."""
    bias = lambda b: None if b is None else b[...]
    return primitives.ExciteParams(
        self.w1[...], bias(self.b1), self.w2[...], bias(self.b2)
    )

  def set_view(self, record_gates: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      record_gates: if True, each call sows its gates (read them with
        ``nnx.capture``).
    """
    if record_gates is not None:
      self.record_gates = record_gates

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.no_squeeze:
      primitives._channel_axis("x", jnp.asarray(x), "NHWC")
      gates = primitives.excite(
          self.params, x, activation=self.activation, gate=self.gate
      )
      y = (x * gates).astype(x.dtype)
    else:
      y, gates = primitives.squeeze_excite(
          self.params,
          x,
          op=self.squeeze,
          activation=self.activation,
          gate=self.gate,
          return_gates=True,
      )
    if self.record_gates:
      self.sow(nnx.Intermediate, self.tag, gates, reduce_fn=lambda _, g: g)
    return y
