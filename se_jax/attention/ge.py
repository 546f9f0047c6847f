"""Gather-Excite: gates from context gathered over a spatial extent.

A gather operator aggregates each channel over a neighbourhood of every
position (its extent) and an excite operator turns the gathered map back
into gates at the map's resolution: nearest-neighbour upsampling, then a
sigmoid. GE-theta-minus gathers without parameters (average pooling); GE-
theta gathers with depthwise convolutions (strided 3x3 convolutions with
BatchNorm for a local extent, one convolution as large as the map for the
global one). Like timm, an MLP (SE's two 1x1 layers) may sit between the
two (GE-theta-plus in the paper, timm's ``use_mlp``); with a global extent
and no extra parameters the block is SE.

References:
  Hu, Shen, Albanie, Sun, Vedaldi. "Gather-Excite: Exploiting Feature
  Context in Convolutional Neural Networks". NeurIPS 2018
  (arXiv:1810.12348), Sec. 3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from se_jax import layers
from se_jax import primitives
from se_jax.attention.base import Attention, check_choice, check_positive

__all__ = ["GEOptions", "GEParams", "GatherExcite", "gather_excite",
           "ge_excite", "ge_gather", "ge_gather_conv", "ge_reduced_width",
           "ge_upsample"]

DATA_FORMATS = ("NHWC", "NCHW")
_MAX_GATHER_CONVS = 5  # extents up to 32


def ge_reduced_width(channels: int, reduction: float = 16,
                     rounding: str = "timm") -> int:
  """Hidden width of GE's MLP.

  Args:
    channels: C.
    reduction: the reduction ratio r (16, as SE's).
    rounding: ``"paper"`` for ``C // r``; ``"timm"`` for ``C / r`` rounded
      to the nearest int, at least 1 (timm's ``make_divisible(C / r, 1,
      round_limit=0)``).

  Returns:
    The width, a positive int.

  Raises:
    ValueError: for arguments out of range or a width of 0.

  >>> ge_reduced_width(256), ge_reduced_width(40)
  (16, 3)
  """
  primitives._check_choice("rounding", rounding, primitives.ROUNDINGS)
  if isinstance(channels, bool) or not isinstance(channels, int) \
      or channels < 1:
    raise ValueError(f"channels must be a positive int, got {channels!r}.")
  check_positive("reduction", reduction)
  if rounding == "paper":
    width = int(channels // reduction)
  else:
    width = max(1, int(channels * (1.0 / reduction) + 0.5))
  if width < 1:
    raise ValueError(
        f"reduction={reduction} leaves 0 channels for channels={channels}.")
  return width


def _check_extent(extent) -> None:
  if isinstance(extent, bool) or not isinstance(extent, int) or extent < 0:
    raise ValueError(
        f"extent must be a non-negative int (0: global), got {extent!r}.")


def _check_nhwc(name: str, x: jax.Array) -> None:
  primitives._check_float(name, x)
  if x.ndim != 4:
    raise ValueError(
        f"{name} must be an NHWC map of rank 4, got shape {x.shape}.")


def _pool_counts(size: int, k: int, s: int, p: int) -> np.ndarray:
  """How many of each window's positions lie inside the map, per axis."""
  starts = np.arange((size + 2 * p - k) // s + 1) * s - p
  return np.minimum(starts + k, size) - np.maximum(starts, 0)


def ge_gather(x: ArrayLike, *, extent: int = 0,
              add_maxpool: bool = False) -> jax.Array:
  """GE-theta-minus's gather: average pooling over the extent.

  A global extent (0) averages the whole map; extent e averages windows of
  ``2e - 1`` positions per axis with stride e, zero-padded by ``e - 1``
  and divided by the positions inside the map (PyTorch's ``avg_pool2d``
  with ``count_include_pad=False``, as timm), giving a ceil(H / e) x
  ceil(W / e) map.

  Args:
    x: (N, H, W, C) float map.
    extent: 0 for global, else the stride e.
    add_maxpool: average the result with max pooling over the same windows
      (timm's experimental ``add_maxpool``).

  Returns:
    The (N, h, w, C) float32 gathered map ((N, 1, 1, C) when global).

  Raises:
    ValueError: for a negative extent or `x` not of rank 4. TypeError: if
      `x` is not float.

  >>> ge_gather(jnp.ones((1, 8, 8, 3)), extent=2).shape
  (1, 4, 4, 3)
  """
  x = jnp.asarray(x)
  _check_nhwc("x", x)
  _check_extent(extent)
  f32 = jnp.float32
  if extent == 0:
    g = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=f32)
    if add_maxpool:
      g = 0.5 * g + 0.5 * jnp.max(x, axis=(1, 2), keepdims=True).astype(f32)
    return g
  k, s, p = 2 * extent - 1, extent, extent - 1
  window, strides = (1, k, k, 1), (1, s, s, 1)
  pads = ((0, 0), (p, p), (p, p), (0, 0))
  total = lax.reduce_window(x.astype(f32), 0.0, lax.add, window, strides,
                            pads)
  count = np.outer(_pool_counts(x.shape[1], k, s, p),
                   _pool_counts(x.shape[2], k, s, p))
  g = total / jnp.asarray(count, f32)[None, :, :, None]
  if add_maxpool:
    top = lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
    g = 0.5 * g + 0.5 * top.astype(f32)
  return g


def ge_gather_conv(
    kernels: Sequence[ArrayLike], x: ArrayLike, *, extent: int,
    norms: Sequence[Callable[[jax.Array], jax.Array]] | None = None,
    activation: str = "relu") -> jax.Array:
  """GE-theta's gather: depthwise convolutions.

  For a global extent (0), one (H, W, 1, C) kernel as large as the map,
  without padding (the paper's; timm pads it, see `GatherExcite`). For
  extent e, a power of two, log2(e) (3, 3, 1, C) kernels with stride 2
  and padding 1, each followed by its norm, with `activation` between
  them (timm's layout).

  Args:
    kernels: the depthwise kernels, HWIO with I = 1.
    x: (N, H, W, C) float map.
    extent: 0 for global, else a power of two.
    norms: one callable per kernel, applied to its float32 output (the
      module passes its BatchNorms); None for none.
    activation: nonlinearity between the convolutions, one of
      `se_jax.primitives.ACTIVATIONS`.

  Returns:
    The (N, h, w, C) float32 gathered map.

  Raises:
    ValueError: for kernels that do not fit `x` and `extent`, or a bad
      name. TypeError: for non-float inputs.

  >>> ge_gather_conv([jnp.ones((3, 3, 1, 4))] * 2, jnp.ones((1, 8, 8, 4)),
  ...                extent=4).shape
  (1, 2, 2, 4)
  """
  x = jnp.asarray(x)
  _check_nhwc("x", x)
  _check_extent(extent)
  primitives._check_choice("activation", activation, primitives.ACTIVATIONS)
  kernels = [jnp.asarray(k) for k in kernels]
  n, h, w, c = x.shape
  if extent == 0:
    want, count = (h, w, 1, c), 1
  else:
    count = int(math.log2(extent))
    if 2 ** count != extent:
      raise ValueError(
          f"extent must be 0 or a power of two for a convolutional gather,"
          f" got {extent}.")
    want = (3, 3, 1, c)
  if len(kernels) != count or any(k.shape != want for k in kernels):
    raise ValueError(
        f"kernels must be {count} of shape {want} for extent={extent} and x"
        f" of shape {x.shape}, got {[k.shape for k in kernels]}.")
  if norms is not None and len(norms) != count:
    raise ValueError(f"norms must be {count} callables, got {len(norms)}.")
  for k in kernels:
    primitives._check_float("kernels", k)
  f32 = jnp.float32
  stride, pad = ((1, 1), ((0, 0), (0, 0))) if extent == 0 else (
      (2, 2), ((1, 1), (1, 1)))
  g = x.astype(f32)
  for i, k in enumerate(kernels):
    g = lax.conv_general_dilated(
        g, k.astype(f32), stride, pad, feature_group_count=c,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST)
    if norms is not None:
      g = norms[i](g).astype(f32)
    if i < count - 1:
      g = primitives.ACTIVATIONS[activation](g)
  return g


def _mlp(params: primitives.ExciteParams, z: jax.Array,
         activation: str) -> jax.Array:
  f32, hi = jnp.float32, lax.Precision.HIGHEST
  w1, b1, w2, b2 = params
  lead = (1,) * (z.ndim - 1)
  h = jnp.matmul(z, w1.astype(f32), precision=hi)
  if b1 is not None:
    h = h + b1.astype(f32).reshape(*lead, -1)
  h = primitives.ACTIVATIONS[activation](h)
  s = jnp.matmul(h, w2.astype(f32), precision=hi)
  if b2 is not None:
    s = s + b2.astype(f32).reshape(*lead, -1)
  return s


def ge_excite(mlp: primitives.ExciteParams | None, g: ArrayLike, *,
              activation: str = "relu", gate: str = "sigmoid") -> jax.Array:
  """Gates from a gathered map, at its resolution: the optional MLP at
  every position, then `gate`.

  Args:
    mlp: the MLP as an `se_jax.ExciteParams`, or None for none.
    g: (N, h, w, C) gathered map.
    activation: hidden nonlinearity of the MLP.
    gate: output nonlinearity, one of `se_jax.primitives.GATES`.

  Returns:
    (N, h, w, C) float32 gates.

  Raises:
    ValueError: for an MLP that does not fit `g` or a bad name. TypeError:
      if `g` is not float.

  >>> ge_excite(None, jnp.zeros((1, 2, 2, 3)))[0, 0, 0]
  Array([0.5, 0.5, 0.5], dtype=float32)
  """
  g = jnp.asarray(g)
  _check_nhwc("g", g)
  primitives._check_choice("activation", activation, primitives.ACTIVATIONS)
  primitives._check_choice("gate", gate, primitives.GATES)
  s = g.astype(jnp.float32)
  if mlp is not None:
    primitives._check_params(mlp, g.shape[-1])
    s = _mlp(mlp, s, activation)
  return primitives.GATES[gate](s)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source rows of PyTorch's ``interpolate(mode="nearest")``, which it
  computes in float32: ``floor(i * (n_in / n_out))``."""
  i = np.arange(n_out)
  if n_out == n_in:
    return i
  if n_out == 2 * n_in:
    return i // 2
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(i.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def ge_upsample(g: ArrayLike, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour upsampling of an NHWC map to `size`, as PyTorch's
  ``F.interpolate(g, size)`` (timm's) picks its source positions.

  Args:
    g: (N, h, w, C) map.
    size: (H, W) of the result.

  Returns:
    The (N, H, W, C) map, in g's dtype.

  Raises:
    ValueError: if `g` is not of rank 4. TypeError: if it is not float.

  >>> ge_upsample(jnp.arange(2.0).reshape(1, 2, 1, 1), (4, 1))[0, :, 0, 0]
  Array([0., 0., 1., 1.], dtype=float32)
  """
  g = jnp.asarray(g)
  _check_nhwc("g", g)
  h, w = size
  if g.shape[1:3] == (1, 1):
    return jnp.broadcast_to(g, (g.shape[0], h, w, g.shape[3]))
  g = jnp.take(g, _nearest_index(g.shape[1], h), axis=1)
  return jnp.take(g, _nearest_index(g.shape[2], w), axis=2)


class GEParams(NamedTuple):
  """The weights of a GE block.

  Attributes:
    mlp: the excite MLP, an `se_jax.ExciteParams`, or None.
    gather_kernels: the depthwise kernels of a GE-theta gather; empty for
      the parameter-free gather.
  """

  mlp: primitives.ExciteParams | None = None
  gather_kernels: tuple = ()


def gather_excite(
    params: GEParams, x: ArrayLike, *, extent: int = 0,
    gather_norms: Sequence[Callable[[jax.Array], jax.Array]] | None = None,
    add_maxpool: bool = False, activation: str = "relu",
    gate: str = "sigmoid", data_format: str = "NHWC",
    return_gates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The GE block: gather, excite, upsample, multiply.

  Args:
    params: a `GEParams`; with gather kernels the gather is GE-theta's
      (`ge_gather_conv`), else the parameter-free `ge_gather`.
    x: float map, (N, H, W, C) or (N, C, H, W) by `data_format`.
    extent: 0 for global, else the gather's stride.
    gather_norms: the norms of a GE-theta gather, see `ge_gather_conv`.
    add_maxpool: see `ge_gather` (parameter-free gather only).
    activation: nonlinearity of the MLP and between gather convolutions.
    gate: output nonlinearity.
    data_format: ``"NHWC"`` or ``"NCHW"``.
    return_gates: also return the float32 gates: (N, C) for a global
      extent, else (N, H, W, C) channels-last.

  Returns:
    `x` recalibrated, in its dtype, or ``(y, gates)``.

  Raises:
    ValueError / TypeError: as the gather and `ge_excite`.

  >>> y = gather_excite(GEParams(), jnp.ones((2, 8, 8, 4)), extent=2)
  >>> y.shape
  (2, 8, 8, 4)
  """
  if not isinstance(params, GEParams):
    raise TypeError(
        f"params must be a GEParams, got {type(params).__name__}.")
  x = jnp.asarray(x)
  primitives._check_choice("data_format", data_format, DATA_FORMATS)
  primitives._check_float("x", x)
  primitives._channel_axis("x", x, data_format)
  xl = jnp.moveaxis(x, 1, -1) if data_format == "NCHW" else x
  if params.gather_kernels:
    if add_maxpool:
      raise ValueError(
          "add_maxpool applies to the parameter-free gather only.")
    g = ge_gather_conv(params.gather_kernels, xl, extent=extent,
                       norms=gather_norms, activation=activation)
  else:
    g = ge_gather(xl, extent=extent, add_maxpool=add_maxpool)
  # The gate is elementwise, so it is applied before the upsampling, on
  # the smaller map.
  gates = ge_upsample(ge_excite(params.mlp, g, activation=activation,
                                gate=gate), xl.shape[1:3])
  y = (xl * gates.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(
      x.dtype)
  y = jnp.moveaxis(y, -1, 1) if data_format == "NCHW" else y
  if not return_gates:
    return y
  return y, gates[:, 0, 0, :] if extent == 0 else gates


@dataclasses.dataclass(frozen=True)
class GEOptions:
  """The options of a GE block (defaults: timm's ``GatherExcite``).

  Attributes:
    extent: 0 for a global extent, else the gather's stride e (even, as
      timm requires; the paper uses 2, 4 and 8).
    extra_params: GE-theta (depthwise-convolution gather) instead of
      GE-theta-minus (average pooling). A local extent must then be a power
      of two; the global one needs `ge_feat_size`.
    use_mlp: an MLP between gather and excite (timm's default, True).
    reduction: the MLP's reduction ratio r (16).
    rounding: how C / r becomes the MLP width, see `ge_reduced_width`.
    activation: nonlinearity of the MLP and between gather convolutions
      (ReLU).
    gate: output nonlinearity (sigmoid).
    add_maxpool: timm's experimental average-and-max gather (False);
      parameter-free gather only.
    ge_feat_size: the (square) map size H = W for which a global GE-theta
      gather's kernel is built; only for ``extent=0, extra_params=True``.
  """

  extent: int = 0
  extra_params: bool = False
  use_mlp: bool = True
  reduction: float = 16
  rounding: str = "timm"
  activation: str = "relu"
  gate: str = "sigmoid"
  add_maxpool: bool = False
  ge_feat_size: int | None = None

  def __post_init__(self):
    e = self.extent
    if isinstance(e, bool) or not isinstance(e, int) or e < 0 or e % 2:
      raise ValueError(
          f"extent must be 0 (global) or an even positive int, got {e!r}.")
    for name in ("extra_params", "use_mlp", "add_maxpool"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
            f"{name} must be a bool, got {getattr(self, name)!r}.")
    check_positive("reduction", self.reduction)
    check_choice("rounding", self.rounding, primitives.ROUNDINGS)
    check_choice("activation", self.activation, primitives.ACTIVATIONS)
    check_choice("gate", self.gate, primitives.GATES)
    f = self.ge_feat_size
    needs_size = self.extra_params and e == 0
    if needs_size != (f is not None):
      raise ValueError(
          "ge_feat_size must be set for extent=0 with extra_params=True and"
          f" only then, got ge_feat_size={f!r} with extent={e},"
          f" extra_params={self.extra_params}.")
    if f is not None and (isinstance(f, bool) or not isinstance(f, int)
                          or f < 1):
      raise ValueError(f"ge_feat_size must be a positive int, got {f!r}.")
    if self.extra_params and e and 2 ** int(math.log2(e)) != e:
      raise ValueError(
          f"extent must be a power of two with extra_params=True, got {e}.")
    if self.extra_params and e > 2 ** _MAX_GATHER_CONVS:
      raise ValueError(
          f"extent must be at most {2 ** _MAX_GATHER_CONVS} with"
          f" extra_params=True, got {e}.")
    if self.extra_params and self.add_maxpool:
      raise ValueError(
          "add_maxpool applies to the parameter-free gather only; got"
          " extra_params=True.")


def _uniform(key: jax.Array, shape: tuple[int, ...],
             fan_in: int) -> jax.Array:
  # PyTorch's default for convolutions, weights and biases alike.
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _timm_params() -> dict:
  out = {"w1": ("mlp.fc1.weight", "fc_conv"), "b1": ("mlp.fc1.bias", "vector"),
         "w2": ("mlp.fc2.weight", "fc_conv"), "b2": ("mlp.fc2.bias", "vector")}
  bn = {"scale": "weight", "bias": "bias", "mean": "running_mean",
        "var": "running_var"}
  for i in range(1, _MAX_GATHER_CONVS + 1):
    out[f"gather_conv{i}"] = (f"gather.conv{i}.weight", "conv")
    for ours, theirs in bn.items():
      out[f"gather_norm{i}/{ours}"] = (f"gather.norm{i}.{theirs}", "vector")
  return out


class GatherExcite(Attention):
  """Gather-Excite on an NHWC map.

  Records, with a global extent, the (N, C) gates under its tag; with a
  local extent, whose gates vary over positions, their spatial mean (N, C)
  under its tag and their channel mean (N, H, W) under ``tag +
  ":spatial"``.

  timm's ``GatherExcite`` is matched for the parameter-free gathers and
  the local GE-theta gathers. Its global GE-theta gather pads its
  map-sized kernel by (k - 1) // 2 (timm's default padding), so that it is
  not global; this module follows the paper: no padding, one value per
  channel. The module is initialised as PyTorch initialises timm's layers:
  convolutions uniform in +-1/sqrt(fan_in), BatchNorms with ones and zeros.

  Args:
    channels: C.
    options: a `GEOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gates are computed in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Hu et al., NeurIPS 2018.
  """

  kind: ClassVar[str] = "ge"
  tag_prefix: ClassVar[str] = "GE"
  Options: ClassVar[type] = GEOptions
  # timm's GatherExcite (timm/layers/gather_excite.py): mlp a ConvMlp
  # (fc1, fc2 with biases); gather a Sequential of depthwise conv<i>
  # (without bias) and norm<i> BatchNorms.
  timm_params: ClassVar[dict] = _timm_params()

  def __init__(self, channels: int, options: GEOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype
    o = self._setup(channels, options, tag, record_gates)
    key_mlp, key_gather = jax.random.split(rngs.params())
    if o.use_mlp:
      r = ge_reduced_width(channels, o.reduction, o.rounding)
      k1, k2, k3, k4 = jax.random.split(key_mlp, 4)
      self.reduced_channels = r
      self.w1 = nnx.Param(_uniform(k1, (channels, r), channels))
      self.b1 = nnx.Param(_uniform(k2, (r,), channels))
      self.w2 = nnx.Param(_uniform(k3, (r, channels), r))
      self.b2 = nnx.Param(_uniform(k4, (channels,), r))
    else:
      self.reduced_channels = None
      self.w1 = self.b1 = self.w2 = self.b2 = None
    if not o.extra_params:
      self.num_gather_convs = 0
    elif o.extent == 0:
      self.num_gather_convs = 1
      f = o.ge_feat_size
      self.gather_conv1 = nnx.Param(
          _uniform(key_gather, (f, f, 1, channels), f * f))
      self.gather_norm1 = layers.BatchNorm(channels)
    else:
      self.num_gather_convs = int(math.log2(o.extent))
      keys = jax.random.split(key_gather, self.num_gather_convs)
      for i, key in enumerate(keys, start=1):
        setattr(self, f"gather_conv{i}",
                nnx.Param(_uniform(key, (3, 3, 1, channels), 9)))
        setattr(self, f"gather_norm{i}", layers.BatchNorm(channels))

  @property
  def params(self) -> GEParams:
    """The weights as a `GEParams`, for the pure functions."""
    mlp = None if self.w1 is None else primitives.ExciteParams(
        self.w1[...], self.b1[...], self.w2[...], self.b2[...])
    kernels = tuple(getattr(self, f"gather_conv{i}")[...]
                    for i in range(1, self.num_gather_convs + 1))
    return GEParams(mlp, kernels)

  def __call__(self, x: jax.Array) -> jax.Array:
    o = self.options
    norms = [getattr(self, f"gather_norm{i}")
             for i in range(1, self.num_gather_convs + 1)]
    y, gates = gather_excite(
        self.params, x, extent=o.extent, gather_norms=norms or None,
        add_maxpool=o.add_maxpool, activation=o.activation, gate=o.gate,
        return_gates=True)
    if o.extent == 0:
      self._record(gates=gates)
    elif self.record_gates:
      self._record(gates=jnp.mean(gates, axis=(1, 2)),
                   spatial=jnp.mean(gates, axis=-1))
    return y
