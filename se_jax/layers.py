"""The SE block as a Flax NNX module, built on `se_jax.primitives`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax import primitives
from se_jax.conv import IMPLEMENTATIONS, conv2d

__all__ = ["BatchNorm", "Conv", "SqueezeExcite"]


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
    self._record(gates)
    return y

  def affine_call(self, x: jax.Array, mul: jax.Array, add: jax.Array,
                  dtype=None) -> jax.Array:
    """The block on ``x * mul + add`` (a folded BatchNorm), in `dtype`
    (default: x's), without storing that map for the gradient: see
    `se_jax.squeeze_excite_affine`. Needs average pooling and a squeeze."""
    if self.no_squeeze or self.squeeze != "avg":
      raise ValueError(
          "affine_call needs squeeze='avg' and no_squeeze=False, got"
          f" squeeze={self.squeeze!r}, no_squeeze={self.no_squeeze}.")
    y, gates = primitives.squeeze_excite_affine(
        self.params, x, mul, add, activation=self.activation,
        gate=self.gate, return_gates=True)
    self._record(gates)
    return y if dtype is None else y.astype(dtype)

  def _record(self, gates: jax.Array) -> None:
    if self.record_gates:
      self.sow(nnx.Intermediate, self.tag, gates, reduce_fn=lambda _, g: g)


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
    impl: how `se_jax.conv.conv2d` computes it (``"auto"`` or ``"xla"``).
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
