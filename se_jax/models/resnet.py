"""One ResNet family, with the SE block injected into its residual units.

Basic and bottleneck units, ResNeXt (cardinality x width), wide and
pre-activation networks, an ImageNet stem and a CIFAR stem are configurations
of the two classes below. Where SE goes is an `SEConfig`, so every
integration variant of the paper is one argument away.

Layout conventions:
  - ``stride="v1.5"`` puts a downsampling unit's stride on the 3x3 conv, as
    torchvision and timm do; ``stride="caffe"`` puts it on the first 1x1 conv,
    as the original ResNet and SENet Caffe models (and timm's
    ``legacy_seresnet*``) do, whose multiply-add counts the paper reports.
  - Padding is explicit and symmetric, as in those models, so that weights
    carry over exactly.
  - Stages are numbered as in the paper: the stem is stage 1, the first
    residual stage is stage 2. SE blocks are tagged ``SE_<stage>_<unit>``.

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR
  2016. He et al. "Identity Mappings in Deep Residual Networks". ECCV 2016.
  Xie et al. "Aggregated Residual Transformations for Deep Neural Networks".
  CVPR 2017. Zagoruyko, Komodakis. "Wide Residual Networks". BMVC 2016.
  Hu et al. "Squeeze-and-Excitation Networks". TPAMI 2019, Sec. 4 and 6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax.layers import BatchNorm, Conv, SqueezeExcite
from se_jax.primitives import ACTIVATIONS, GATES, ROUNDINGS, SQUEEZE_OPS
from se_jax.primitives import _check_choice

__all__ = ["BLOCKS", "INTEGRATIONS", "POSITIONS", "ResNet", "ResidualUnit",
           "SEConfig", "STEMS", "STRIDES", "check_se_config"]

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")
STRIDES = ("v1.5", "caffe")
INTEGRATIONS = ("standard", "pre", "post", "identity")
POSITIONS = ("standard", "3x3")

_BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in Flax's convention.
_BN_EPSILON = 1e-5
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class SEConfig(NamedTuple):
  """Where and how a network uses SE blocks.

  Attributes:
    reduction: the reduction ratio r (Table 10).
    rounding: ``"paper"`` (C // r) or ``"timm"`` (multiple of 8, >= 8).
    se_bias: FC biases (dropped in the paper's ablations, Sec. 6).
    squeeze: ``"avg"`` or ``"max"`` (Table 11).
    activation: hidden nonlinearity of the excitation.
    gate: output nonlinearity (Table 12).
    integration: ``"standard"``, ``"pre"``, ``"post"`` or ``"identity"``
      (Table 14).
    position: ``"standard"`` (after the residual branch's last BN) or
      ``"3x3"`` (after the 3x3 conv, Table 15).
    se_stages: paper-numbered stages that get SE (Table 13); None for all.
    no_squeeze: the NoSqueeze variant (Table 16).
  """

  reduction: float = 16
  rounding: str = "paper"
  se_bias: bool = True
  squeeze: str = "avg"
  activation: str = "relu"
  gate: str = "sigmoid"
  integration: str = "standard"
  position: str = "standard"
  se_stages: tuple[int, ...] | None = None
  no_squeeze: bool = False


def check_se_config(se: SEConfig) -> None:
  """Raises ValueError naming the first field of `se` that is invalid."""
  _check_choice("rounding", se.rounding, ROUNDINGS)
  _check_choice("squeeze", se.squeeze, SQUEEZE_OPS)
  _check_choice("activation", se.activation, ACTIVATIONS)
  _check_choice("gate", se.gate, GATES)
  _check_choice("integration", se.integration, INTEGRATIONS)
  _check_choice("position", se.position, POSITIONS)
  if not se.reduction > 0:
    raise ValueError(f"reduction must be > 0, got {se.reduction}.")
  if se.position == "3x3" and se.integration != "standard":
    raise ValueError(
        "position='3x3' places SE inside the residual branch and needs"
        f" integration='standard', got integration={se.integration!r}."
    )
  if se.no_squeeze and se.squeeze != "avg":
    raise ValueError(
        "no_squeeze=True has no pooling; leave squeeze='avg', got"
        f" squeeze={se.squeeze!r}."
    )


def _conv(cin, cout, k, *, stride=1, groups=1, dtype, impl, rngs):
  p = k // 2
  return Conv(
      cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
      groups=groups, kernel_init=_conv_init, dtype=dtype, impl=impl,
      rngs=rngs,
  )


def _norm(c, *, dtype, rngs):
  return BatchNorm(c, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype)


class ResidualUnit(nnx.Module):
  """A residual unit, basic or bottleneck, plain or pre-activation, +/- SE.

  Args:
    in_channels: channels of the unit's input.
    planes: the stage width; a bottleneck unit outputs ``4 * planes``.
    block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1).
    stride: spatial stride of the unit.
    stride_on: ``"v1.5"`` or ``"caffe"``, see the module docstring.
    groups: cardinality of the 3x3 conv (ResNeXt).
    base_width: width per group at planes=64 (ResNeXt's "d").
    preact: BN-ReLU-conv ordering (He et al., ECCV 2016).
    relu_before_se: a ReLU between the residual branch's last BN and what
      follows it (SE and the addition), as in the basic units of timm's
      ``legacy_seresnet18/34`` (timm/models/senet.py, SEResNetBlock).
    se: an `SEConfig`, or None for a unit without SE.
    tag: name of the unit's SE gates, e.g. ``"SE_2_1"``.
    dtype: compute dtype.
    conv_impl: how the convolutions are computed, see
      `se_jax.conv.conv2d`.
    rngs: ``nnx.Rngs``.
  """

  def __init__(
      self, in_channels: int, planes: int, *, block: str = "basic",
      stride: int = 1, stride_on: str = "v1.5", groups: int = 1,
      base_width: int = 64, preact: bool = False,
      relu_before_se: bool = False, se: SEConfig | None = None,
      tag: str = "gates", dtype=None, conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    _check_choice("block", block, BLOCKS)
    _check_choice("stride", stride_on, STRIDES)
    if block == "basic":
      if groups != 1 or base_width != 64:
        raise ValueError(
            "basic units support groups=1 and base_width=64 only, got"
            f" groups={groups}, base_width={base_width}."
        )
      width = out = planes
      shapes = [(in_channels, width, 3, stride, 1), (width, out, 3, 1, 1)]
      self.mid = 0
    else:
      width = int(planes * (base_width / 64.0)) * groups
      out = planes * 4
      s1, s3 = (stride, 1) if stride_on == "caffe" else (1, stride)
      shapes = [(in_channels, width, 1, s1, 1), (width, width, 3, s3, groups),
                (width, out, 1, 1, 1)]
      self.mid = 1
    self.out_channels = out
    if relu_before_se and preact:
      raise ValueError(
          "relu_before_se needs a BN at the end of the residual branch;"
          " pre-activation units have none.")
    self.preact = preact
    self.relu_before_se = relu_before_se
    self.convs = nnx.List([
        _conv(ci, co, k, stride=s, groups=g, dtype=dtype, impl=conv_impl,
              rngs=rngs)
        for ci, co, k, s, g in shapes
    ])
    n_norms = len(shapes) - 1 if preact else len(shapes)
    self.norms = nnx.List([
        _norm(co, dtype=dtype, rngs=rngs) for _, co, *_ in shapes[:n_norms]
    ])
    self.pre_norm = _norm(in_channels, dtype=dtype, rngs=rngs) if preact else None

    project = stride != 1 or in_channels != out
    self.proj = (
        _conv(in_channels, out, 1, stride=stride, dtype=dtype,
              impl=conv_impl, rngs=rngs)
        if project else None
    )
    self.proj_norm = (
        _norm(out, dtype=dtype, rngs=rngs) if project and not preact else None
    )

    if se is not None:
      check_se_config(se)
      if se.position == "3x3":
        se_channels = width
      elif se.integration == "pre":
        se_channels = in_channels
      else:
        se_channels = out
    self.integration = None if se is None else se.integration
    self.position = None if se is None else se.position
    self.se = None if se is None else SqueezeExcite(
        se_channels, reduction=se.reduction, rounding=se.rounding,
        use_bias=se.se_bias, squeeze=se.squeeze, activation=se.activation,
        gate=se.gate, no_squeeze=se.no_squeeze, tag=tag, rngs=rngs,
    )

  @property
  def fold_norm_into_se(self) -> bool:
    """Whether the last BN feeds the SE block as a per-channel affine
    (`SqueezeExcite.affine_call`), which keeps training from storing the
    normalised map: the standard SE-ResNet unit with average pooling."""
    return (self._se_at("standard") and not self.preact
            and not self.relu_before_se and not self.se.no_squeeze
            and self.se.squeeze == "avg")

  def _se_at(self, integration: str, position: str = "standard") -> bool:
    return (
        self.se is not None
        and self.integration == integration
        and self.position == position
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.se(x) if self._se_at("pre") else x
    if self.preact:
      h = nnx.relu(self.pre_norm(h))
      shortcut = self.proj(h) if self.proj is not None else x
    elif self.proj is not None:
      shortcut = self.proj_norm(self.proj(x))
    else:
      shortcut = x
    fold = self.fold_norm_into_se
    last = len(self.convs) - 1
    for i, conv in enumerate(self.convs):
      h = conv(h)
      if i < last:
        h = nnx.relu(self.norms[i](h))
        if i == self.mid and self._se_at("standard", "3x3"):
          h = self.se(h)
      elif fold:
        norm = self.norms[i]
        mul, add = norm.affine(h)
        h = self.se.affine_call(h, mul, add, dtype=norm.dtype)
      elif not self.preact:
        h = self.norms[i](h)
        if self.relu_before_se:
          h = nnx.relu(h)
    if self._se_at("standard") and not fold:
      h = self.se(h)
    if self._se_at("identity"):
      shortcut = self.se(shortcut)
    out = h + shortcut
    if not self.preact:
      out = nnx.relu(out)
    if self._se_at("post"):
      out = self.se(out)
    return out


def _max_pool_3x3_s2(x: jax.Array, ceil_mode: bool) -> jax.Array:
  if ceil_mode:
    # Caffe / PyTorch ceil_mode=True: no padding in front; the last window may
    # hang over the end, which -inf padding makes harmless.
    pads = []
    for n in x.shape[1:3]:
      out = math.ceil((n - 3) / 2) + 1
      pads.append((0, max(0, (out - 1) * 2 + 3 - n)))
  else:
    pads = [(1, 1), (1, 1)]
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=pads)


class ResNet(nnx.Module):
  """The ResNet family: ResNet, SE-ResNet, ResNeXt, WRN, CIFAR ResNets.

  Args:
    block: ``"basic"`` or ``"bottleneck"``.
    stage_sizes: number of units in each stage.
    widths: planes of each stage (default: ImageNet's 64..512, or CIFAR's
      16, 32, 64 for three stages).
    stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"cifar"``
      (3x3 conv, no pooling).
    stem_width: channels of the stem conv (64 ImageNet, 16 CIFAR).
    stride: ``"v1.5"`` or ``"caffe"``; sets where downsampling units stride.
    ceil_pool: max-pool in ceil mode without padding (the Caffe models);
      default: True exactly when ``stride="caffe"``.
    groups: ResNeXt cardinality.
    base_width: ResNeXt width per group at planes=64.
    preact: pre-activation units (and a final BN-ReLU before pooling).
    relu_before_se: see `ResidualUnit`.
    se: an `SEConfig`, or None for the plain network.
    num_classes: classifier outputs.
    in_channels: channels of the input images.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    conv_impl: how the convolutions are computed: ``"auto"`` (fast under a
      plain ``jax.jit`` on every platform) or ``"xla"``, see
      `se_jax.conv.conv2d`.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Input: (N, H, W, in_channels) float images. Output: (N, num_classes)
  float32 logits. BatchNorm uses batch statistics after ``model.train()`` and
  running statistics after ``model.eval()``.
  """

  def __init__(
      self, *, block: str, stage_sizes: Sequence[int],
      widths: Sequence[int] | None = None, stem: str = "imagenet",
      stem_width: int | None = None, stride: str = "v1.5",
      ceil_pool: bool | None = None, groups: int = 1, base_width: int = 64,
      preact: bool = False, relu_before_se: bool = False,
      se: SEConfig | None = None, num_classes: int = 1000,
      in_channels: int = 3, dtype=None, conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    _check_choice("stem", stem, STEMS)
    _check_choice("stride", stride, STRIDES)
    stage_sizes = tuple(stage_sizes)
    if not stage_sizes or min(stage_sizes) < 1:
      raise ValueError(
          f"stage_sizes must be positive unit counts, got {stage_sizes}."
      )
    if widths is None:
      widths = (64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64)
      widths = tuple(widths[: len(stage_sizes)])
    if len(widths) != len(stage_sizes):
      raise ValueError(
          f"widths {tuple(widths)} and stage_sizes {stage_sizes} must have"
          " the same length."
      )
    if stem_width is None:
      stem_width = 64 if stem == "imagenet" else 16
    if num_classes < 1 or in_channels < 1:
      raise ValueError(
          f"num_classes and in_channels must be >= 1, got {num_classes} and"
          f" {in_channels}."
      )
    all_stages = tuple(range(2, 2 + len(stage_sizes)))
    if se is not None:
      check_se_config(se)
      if se.se_stages is not None:
        bad = sorted(set(se.se_stages) - set(all_stages))
        if bad:
          raise ValueError(
              f"se_stages must be among the paper-numbered stages"
              f" {all_stages}, got {tuple(se.se_stages)}."
          )
    self.stem_kind = stem
    self.in_channels = in_channels
    self.ceil_pool = stride == "caffe" if ceil_pool is None else ceil_pool
    self.preact = preact
    self.dtype = dtype
    k, s = (7, 2) if stem == "imagenet" else (3, 1)
    self.stem_conv = _conv(in_channels, stem_width, k, stride=s, dtype=dtype,
                           impl=conv_impl, rngs=rngs)
    # A pre-activation net normalises the stem output in its first unit.
    self.stem_norm = (
        None if preact and stem == "cifar"
        else _norm(stem_width, dtype=dtype, rngs=rngs)
    )

    stages = []
    c = stem_width
    for i, (n, planes) in enumerate(zip(stage_sizes, widths)):
      stage_no = i + 2
      stage_se = se
      if se is not None and se.se_stages is not None:
        stage_se = se if stage_no in se.se_stages else None
      units = []
      for j in range(n):
        stride_ij = 2 if (j == 0 and i > 0) else 1
        unit = ResidualUnit(
            c, planes, block=block, stride=stride_ij, stride_on=stride,
            groups=groups, base_width=base_width, preact=preact,
            relu_before_se=relu_before_se, se=stage_se,
            tag=f"SE_{stage_no}_{j + 1}", dtype=dtype, conv_impl=conv_impl,
            rngs=rngs,
        )
        c = unit.out_channels
        units.append(unit)
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.final_norm = _norm(c, dtype=dtype, rngs=rngs) if preact else None
    self.num_features = c
    self.fc = nnx.Linear(c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
          f"images must be a floating-point array (normalise uint8 images"
          f" first), got dtype {x.dtype}."
      )
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(
          f"images must be NHWC with {self.in_channels} channels, got shape"
          f" {x.shape}."
      )
    h = self.stem_conv(x)
    if self.stem_norm is not None:
      h = nnx.relu(self.stem_norm(h))
    if self.stem_kind == "imagenet":
      h = _max_pool_3x3_s2(h, self.ceil_pool)
    for stage in self.stages:
      for unit in stage:
        h = unit(h)
    if self.final_norm is not None:
      h = nnx.relu(self.final_norm(h))
    h = jnp.mean(h, axis=(1, 2), dtype=jnp.float32)
    return self.fc(h.astype(self.dtype or jnp.float32)).astype(jnp.float32)
