"""One ResNet family, with an attention slot in its residual units.

Basic and bottleneck units, ResNeXt (cardinality x width), wide and
pre-activation networks, ResNet-D and -T (deep stem, average-pool shortcut),
an ImageNet stem and a CIFAR stem are configurations of the two classes
below. Each unit asks `se_jax.attention.create` for its attention module by
name (``attention="se"``, ``"eca"``, ...; None for none) and places it as a
`Placement` says, so every integration variant of the SE paper applies to
every kind.

Layout conventions:
  - ``stride="v1.5"`` puts a downsampling unit's stride on the 3x3 conv, as
    torchvision and timm do; ``stride="caffe"`` puts it on the first 1x1 conv,
    as the original ResNet and SENet Caffe models (and timm's
    ``legacy_seresnet*``) do, whose multiply-add counts the paper reports.
  - Padding is explicit and symmetric, as in those models, so that weights
    carry over exactly.
  - Stages are numbered as in the paper: the stem is stage 1, the first
    residual stage is stage 2. Attention modules are tagged
    ``<PREFIX>_<stage>_<unit>``, e.g. ``SE_2_1`` or ``ECA_4_6``.

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition". CVPR
  2016. He et al. "Identity Mappings in Deep Residual Networks". ECCV 2016.
  Xie et al. "Aggregated Residual Transformations for Deep Neural Networks".
  CVPR 2017. Zagoruyko, Komodakis. "Wide Residual Networks". BMVC 2016.
  He et al. "Bag of Tricks for Image Classification with Convolutional
  Neural Networks". CVPR 2019 (ResNet-D). Hu et al. "Squeeze-and-Excitation
  Networks". TPAMI 2019, Sec. 4 and 6.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from se_jax import attention as attention_lib
from se_jax.attention.base import check_choice
from se_jax.conv import IMPLEMENTATIONS, materialized
from se_jax.layers import BatchNorm, Conv, avg_pool_2x2

__all__ = ["BLOCKS", "INTEGRATIONS", "POSITIONS", "Placement", "ResNet",
           "ResidualUnit", "STEMS", "STEM_TYPES", "STRIDES"]

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")
STEM_TYPES = ("", "deep", "deep_tiered")
STRIDES = ("v1.5", "caffe")
INTEGRATIONS = ("standard", "pre", "post", "identity")
POSITIONS = ("standard", "3x3")

_BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1 in Flax's convention.
_BN_EPSILON = 1e-5
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a network's attention modules sit (the SE paper's variants).

  Attributes:
    integration: ``"standard"`` (on the residual branch after its last BN,
      before the addition), ``"pre"`` (before the unit), ``"post"`` (after
      the addition and ReLU) or ``"identity"`` (on the identity branch)
      (Table 14).
    position: ``"standard"`` or ``"3x3"`` (right after the 3x3 conv of a
      bottleneck, Table 15).
    se_stages: paper-numbered stages whose units have the attention
      (Table 13); None for all.
  """

  integration: str = "standard"
  position: str = "standard"
  se_stages: tuple[int, ...] | None = None

  def __post_init__(self):
    check_choice("integration", self.integration, INTEGRATIONS)
    check_choice("position", self.position, POSITIONS)
    if self.position == "3x3" and self.integration != "standard":
      raise ValueError(
          "position='3x3' places the attention inside the residual branch"
          " and needs integration='standard', got"
          f" integration={self.integration!r}.")
    if self.se_stages is not None:
      stages = tuple(self.se_stages)
      if not all(isinstance(s, int) and not isinstance(s, bool)
                 for s in stages):
        raise ValueError(f"se_stages must be stage numbers, got {stages}.")
      object.__setattr__(self, "se_stages", stages)


def _conv(cin, cout, k, *, stride=1, groups=1, dtype, impl, rngs):
  p = k // 2
  return Conv(
      cin, cout, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
      groups=groups, kernel_init=_conv_init, dtype=dtype, impl=impl,
      rngs=rngs,
  )


def _norm(c, *, dtype):
  return BatchNorm(c, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype)


def squeezes_through_conv3(positions: int, width: int, channels: int) -> bool:
  """Whether a bottleneck unit in inference takes its squeeze as conv3
  applied to the mean of conv3's input rather than as the mean of conv3's
  output: where reading that input (`positions` x `width` values, positions
  counting N x H x W) and conv3's kernel (`width` x `channels`) moves fewer
  values than reading the output (`positions` x `channels`). In ResNet-50
  at batch 1 the last two stages' kernels outweigh their maps."""
  return positions * width + width * channels < positions * channels


def _materialized_rows(x: jax.Array) -> jax.Array:
  """`materialized` for an (N, H, W, C) map written as the rows of pixels
  (N, H * W, C) that a 1x1 convolution reads in inference (see
  `se_jax.conv`), so that the convolution and the map's other readers
  share that one buffer."""
  n, h, w, c = x.shape
  return materialized(x.reshape(n, h * w, c)).reshape(x.shape)


class ResidualUnit(nnx.Module):
  """A residual unit, basic or bottleneck, plain or pre-activation, with an
  optional attention module.

  Layers: ``conv1``, ``bn1``, ``conv2``, ``bn2`` (and ``conv3``, ``bn3`` in a
  bottleneck), ``attn``, and the projection shortcut ``downsample_conv``,
  ``downsample_norm`` where the shape changes. A pre-activation unit has
  ``pre_bn`` and no BN after its last conv.

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
      follows it (the attention and the addition), as in the basic units of
      timm's ``legacy_seresnet18/34`` (timm/models/senet.py, SEResNetBlock).
    avg_down: the ResNet-D shortcut: 2 x 2 average pooling, then a stride-1
      1x1 conv.
    attention: a kind of `se_jax.attention.KINDS`, or None.
    attention_options: the kind's options (its ``Options`` or a dict).
    placement: where the attention sits.
    fold_norm: let an attention module that can (``folds_norm``, e.g. SE
      with average pooling) take the branch's last BN as a per-channel
      affine, so that training does not store the normalised map; the same
      function either way.
    tag: name of the attention's recorded gates, e.g. ``"SE_2_1"``.
    dtype: compute dtype.
    conv_impl: how the convolutions are computed, see
      `se_jax.conv.conv2d`.
    materialize: compute the unit's output into a buffer of its own on CPUs
      (`se_jax.conv.materialized`), so that later units read it rather than
      recompute it; the same function either way.
    rngs: ``nnx.Rngs``.
  """

  def __init__(
      self, in_channels: int, planes: int, *, block: str = "basic",
      stride: int = 1, stride_on: str = "v1.5", groups: int = 1,
      base_width: int = 64, preact: bool = False,
      relu_before_se: bool = False, avg_down: bool = False,
      attention: str | None = None, attention_options: Any = None,
      placement: Placement | None = None, fold_norm: bool = True,
      tag: str = "gates", dtype=None, conv_impl: str = "auto",
      materialize: bool = True, rngs: nnx.Rngs,
  ):
    check_choice("block", block, BLOCKS)
    check_choice("stride", stride_on, STRIDES)
    check_choice("conv_impl", conv_impl, IMPLEMENTATIONS)
    if relu_before_se and preact:
      raise ValueError(
          "relu_before_se needs a BN at the end of the residual branch;"
          " pre-activation units have none.")
    placement = placement or Placement()
    conv = lambda *a, **k: _conv(*a, dtype=dtype, impl=conv_impl, rngs=rngs,
                                 **k)
    norm = lambda c: _norm(c, dtype=dtype)
    self.block = block
    self.preact = preact
    self.relu_before_se = relu_before_se
    self.avg_down = avg_down
    self.stride = stride
    # How it runs, not what it computes: not part of the layout that
    # pretrained weights are checked against.
    self._materialize = bool(materialize)
    if block == "basic":
      if groups != 1 or base_width != 64:
        raise ValueError(
            "basic units support groups=1 and base_width=64 only, got"
            f" groups={groups}, base_width={base_width}.")
      width = out = planes
      self.conv1 = conv(in_channels, width, 3, stride=stride)
      self.bn1 = norm(width)
      self.conv2 = conv(width, out, 3)
      self.bn2 = None if preact else norm(out)
      self.conv3 = self.bn3 = None
    else:
      width = int(planes * (base_width / 64.0)) * groups
      out = planes * 4
      s1, s3 = (stride, 1) if stride_on == "caffe" else (1, stride)
      self.conv1 = conv(in_channels, width, 1, stride=s1)
      self.bn1 = norm(width)
      self.conv2 = conv(width, width, 3, stride=s3, groups=groups)
      self.bn2 = norm(width)
      self.conv3 = conv(width, out, 1)
      self.bn3 = None if preact else norm(out)
    self.out_channels = out
    self.pre_bn = norm(in_channels) if preact else None

    project = stride != 1 or in_channels != out
    self.downsample_conv = (
        conv(in_channels, out, 1, stride=1 if avg_down else stride)
        if project else None)
    self.downsample_norm = norm(out) if project and not preact else None

    self.integration = placement.integration
    self.position = placement.position
    if attention is None:
      self.attn = None
    else:
      if placement.position == "3x3":
        channels = width
      elif placement.integration == "pre":
        channels = in_channels
      else:
        channels = out
      self.attn = attention_lib.create(
          attention, channels, options=attention_options, tag=tag,
          dtype=dtype, rngs=rngs)
    # The standard unit hands its last BN to an attention that folds it.
    self.fold_norm = bool(
        fold_norm and self._attends("standard", "standard")
        and not preact and not relu_before_se and self.attn.folds_norm)

  def _attends(self, integration: str, position: str = "standard") -> bool:
    return (self.attn is not None and self.integration == integration
            and self.position == position)

  def _shortcut(self, x: jax.Array) -> jax.Array:
    if self.downsample_conv is None:
      return x
    if self.avg_down and self.stride > 1:
      x = avg_pool_2x2(x)
    x = self.downsample_conv(x)
    return x if self.downsample_norm is None else self.downsample_norm(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attn(x) if self._attends("pre") else x
    if self.preact:
      h = nnx.relu(self.pre_bn(h))
      shortcut = x if self.downsample_conv is None else self._shortcut(h)
    else:
      shortcut = self._shortcut(x)

    h = nnx.relu(self.bn1(self.conv1(h)))
    mean = None
    if self.block == "basic":
      if self._attends("standard", "3x3"):
        h = self.attn(h)
      h = self.conv2(h)
      last_bn = self.bn2
    else:
      h = nnx.relu(self.bn2(self.conv2(h)))
      if self._attends("standard", "3x3"):
        h = self.attn(h)
      if (self.fold_norm and self.bn3.use_running_average
          and squeezes_through_conv3(math.prod(h.shape[:-1]), h.shape[-1],
                                     self.conv3.out_features)):
        # conv3 is linear, 1x1 and of stride 1: the mean of its output over
        # the positions is conv3 of its input's mean, a quarter as many
        # channels to read, besides conv3's kernel. In training the
        # BatchNorm's statistics read the output anyway, and the squeeze
        # shares that pass. The input goes into a buffer of its own, in the
        # rows that conv3 reads, so that XLA does not compute it twice, once
        # for each reader.
        h = _materialized_rows(h)
        f32 = jnp.float32
        mean = (jnp.mean(h, axis=(1, 2), dtype=f32)
                @ self.conv3.kernel[...][0, 0].astype(f32))
      h = self.conv3(h)
      last_bn = self.bn3

    if self.fold_norm:
      mul, add = last_bn.affine(h)
      h = self.attn.affine_call(h, mul, add, dtype=last_bn.dtype, mean=mean)
    else:
      if last_bn is not None:
        h = last_bn(h)
        if self.relu_before_se:
          h = nnx.relu(h)
      if self._attends("standard"):
        h = self.attn(h)

    if self._attends("identity"):
      shortcut = self.attn(shortcut)
    out = h + shortcut
    if not self.preact:
      out = nnx.relu(out)
    if self._attends("post"):
      out = self.attn(out)
    # In a buffer of its own, read by the next unit's convolution and its
    # shortcut sum alike (see `materialized`).
    if not self._materialize:
      return out
    if self.block == "bottleneck" and self.bn1.use_running_average:
      # In inference the next bottleneck's 1x1 convolution reads the map as
      # rows of pixels (see `se_jax.conv`); written in that shape, the
      # buffer is the one both readers share, where the image's shape would
      # have XLA copy it for one of them. In training, and in basic units,
      # whose next convolution is 3x3, that shape adds copies instead.
      return _materialized_rows(out)
    return materialized(out)


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
  """The ResNet family: ResNet, SE-ResNet, ResNeXt, WRN, CIFAR ResNets,
  ResNet-D/T, with any attention kind.

  Args:
    block: ``"basic"`` or ``"bottleneck"``.
    stage_sizes: number of units in each stage.
    widths: planes of each stage (default: ImageNet's 64..512, or CIFAR's
      16, 32, 64 for three stages).
    stem: ``"imagenet"`` (a stem conv + 3x3/2 max-pool) or ``"cifar"`` (a
      3x3 conv, no pooling).
    stem_type: the ImageNet stem's convs: ``""`` (one 7x7/2), ``"deep"``
      (three 3x3, the first with stride 2, of widths `deep_stem_width`,
      `deep_stem_width`, `stem_width`: ResNet-D) or ``"deep_tiered"``
      (widths 3/4 `deep_stem_width`, `deep_stem_width`, `stem_width`:
      ResNet-T).
    deep_stem_width: inner width of a deep stem.
    stem_width: channels of the stem's output (64 ImageNet, 16 CIFAR).
    stride: ``"v1.5"`` or ``"caffe"``; sets where downsampling units stride.
    ceil_pool: max-pool in ceil mode without padding (the Caffe models);
      default: True exactly when ``stride="caffe"``.
    groups: ResNeXt cardinality.
    base_width: ResNeXt width per group at planes=64.
    preact: pre-activation units (and a final BN-ReLU before pooling).
    relu_before_se: see `ResidualUnit`.
    avg_down: ResNet-D shortcuts (average pooling, then a 1x1 conv).
    attention: a kind of `se_jax.attention.KINDS` for every unit, or None
      for the plain network.
    attention_options: the kind's options (its ``Options`` or a dict).
    placement: where the attention sits, a `Placement`.
    fold_norm: see `ResidualUnit`.
    num_classes: classifier outputs.
    in_channels: channels of the input images.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    conv_impl: how the convolutions are computed: ``"auto"`` (fast under a
      plain ``jax.jit`` on every platform), ``"onednn"``, ``"formulated"``
      or ``"xla"``, see `se_jax.conv.conv2d`.
    materialize: see `ResidualUnit`.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Input: (N, H, W, in_channels) float images. Output: (N, num_classes)
  float32 logits. BatchNorm uses batch statistics after ``model.train()`` and
  running statistics after ``model.eval()``.
  """

  def __init__(
      self, *, block: str, stage_sizes: Sequence[int],
      widths: Sequence[int] | None = None, stem: str = "imagenet",
      stem_type: str = "", deep_stem_width: int = 32,
      stem_width: int | None = None, stride: str = "v1.5",
      ceil_pool: bool | None = None, groups: int = 1, base_width: int = 64,
      preact: bool = False, relu_before_se: bool = False,
      avg_down: bool = False, attention: str | None = None,
      attention_options: Any = None, placement: Placement | None = None,
      fold_norm: bool = True, num_classes: int = 1000, in_channels: int = 3,
      dtype: Any = None, conv_impl: str = "auto", materialize: bool = True,
      rngs: nnx.Rngs,
  ):
    check_choice("stem", stem, STEMS)
    check_choice("stem_type", stem_type, STEM_TYPES)
    check_choice("stride", stride, STRIDES)
    check_choice("conv_impl", conv_impl, IMPLEMENTATIONS)
    stage_sizes = tuple(stage_sizes)
    if not stage_sizes or min(stage_sizes) < 1:
      raise ValueError(
          f"stage_sizes must be positive unit counts, got {stage_sizes}.")
    if widths is None:
      widths = (64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64)
      widths = tuple(widths[: len(stage_sizes)])
    if len(widths) != len(stage_sizes):
      raise ValueError(
          f"widths {tuple(widths)} and stage_sizes {stage_sizes} must have"
          " the same length.")
    if stem_width is None:
      stem_width = 64 if stem == "imagenet" else 16
    if num_classes < 1 or in_channels < 1:
      raise ValueError(
          f"num_classes and in_channels must be >= 1, got {num_classes} and"
          f" {in_channels}.")
    if stem_type and stem != "imagenet":
      raise ValueError(
          f"stem_type={stem_type!r} is an ImageNet stem; the CIFAR stem is"
          " one 3x3 conv.")
    placement = placement or Placement()
    if attention is not None:
      attention_options = attention_lib.make_options(attention,
                                                     attention_options)
    elif attention_options:
      raise ValueError(
          "attention_options need an attention kind; got attention=None.")
    all_stages = tuple(range(2, 2 + len(stage_sizes)))
    if placement.se_stages is not None:
      bad = sorted(set(placement.se_stages) - set(all_stages))
      if bad:
        raise ValueError(
            f"se_stages must be among the paper-numbered stages"
            f" {all_stages}, got {placement.se_stages}.")
    self.stem_kind = stem
    self.stem_type = stem_type
    self.in_channels = in_channels
    self.ceil_pool = stride == "caffe" if ceil_pool is None else ceil_pool
    self.preact = preact
    self.dtype = dtype
    self.conv_impl = conv_impl
    self.attention = attention
    conv = lambda *a, **k: _conv(*a, dtype=dtype, impl=conv_impl, rngs=rngs,
                                 **k)
    if stem_type:
      inner = ((3 * (deep_stem_width // 4), deep_stem_width)
               if stem_type == "deep_tiered"
               else (deep_stem_width, deep_stem_width))
      self.stem_conv_a = conv(in_channels, inner[0], 3, stride=2)
      self.stem_norm_a = _norm(inner[0], dtype=dtype)
      self.stem_conv_b = conv(inner[0], inner[1], 3)
      self.stem_norm_b = _norm(inner[1], dtype=dtype)
      self.stem_conv = conv(inner[1], stem_width, 3)
    else:
      k, s = (7, 2) if stem == "imagenet" else (3, 1)
      self.stem_conv_a = self.stem_norm_a = None
      self.stem_conv_b = self.stem_norm_b = None
      self.stem_conv = conv(in_channels, stem_width, k, stride=s)
    # A pre-activation net normalises the stem output in its first unit.
    self.stem_norm = (
        None if preact and stem == "cifar" else _norm(stem_width, dtype=dtype))

    prefix = (attention_lib.KINDS[attention].tag_prefix
              if attention is not None else "")
    stages = []
    c = stem_width
    for i, (n, planes) in enumerate(zip(stage_sizes, widths)):
      stage_no = i + 2
      attends = attention is not None and (
          placement.se_stages is None or stage_no in placement.se_stages)
      units = []
      for j in range(n):
        unit = ResidualUnit(
            c, planes, block=block, stride=2 if (j == 0 and i > 0) else 1,
            stride_on=stride, groups=groups, base_width=base_width,
            preact=preact, relu_before_se=relu_before_se, avg_down=avg_down,
            attention=attention if attends else None,
            attention_options=attention_options, placement=placement,
            fold_norm=fold_norm, tag=f"{prefix}_{stage_no}_{j + 1}",
            dtype=dtype, conv_impl=conv_impl, materialize=materialize,
            rngs=rngs)
        c = unit.out_channels
        units.append(unit)
      stages.append(nnx.List(units))
    self.stages = nnx.List(stages)
    self.final_norm = _norm(c, dtype=dtype) if preact else None
    self.num_features = c
    self.fc = nnx.Linear(c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
          f"images must be a floating-point array (normalise uint8 images"
          f" first), got dtype {x.dtype}.")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(
          f"images must be NHWC with {self.in_channels} channels, got shape"
          f" {x.shape}.")
    h = x
    if self.stem_conv_a is not None:
      h = nnx.relu(self.stem_norm_a(self.stem_conv_a(h)))
      h = nnx.relu(self.stem_norm_b(self.stem_conv_b(h)))
    h = self.stem_conv(h)
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
