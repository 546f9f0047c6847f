"""Named models of the paper, as configurations of the one ResNet family."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx

from se_jax.models.resnet import ResNet, SEConfig

__all__ = ["MODEL_OPTIONS", "SE_OPTIONS", "create", "names", "register"]

SE_OPTIONS = tuple(SEConfig._fields)
MODEL_OPTIONS = ("stride", "ceil_pool", "preact", "relu_before_se",
                 "in_channels", "dtype", "widths", "stem_width",
                 "stage_sizes", "conv_impl")


class _Entry(NamedTuple):
  build: Callable[..., ResNet]
  se: SEConfig | None


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, build: Callable[..., ResNet],
             se: SEConfig | None = None) -> None:
  """Registers `build` (a partial of `ResNet`) under `name`.

  Args:
    name: the registry name; must be new.
    build: called as ``build(se=..., num_classes=..., rngs=..., **options)``.
    se: the default `SEConfig`, or None for a network without SE.

  Raises:
    ValueError: if `name` is taken.
  """
  if name in _REGISTRY:
    raise ValueError(f"model name {name!r} is already registered.")
  _REGISTRY[name] = _Entry(build, se)


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> ResNet:
  """Builds the registered model `name`.

  Args:
    name: one of `names()`, e.g. ``"se_resnet50"``.
    num_classes: classifier outputs.
    rngs: ``nnx.Rngs`` for initialisation (default ``nnx.Rngs(0)``).
    **overrides: SE options (``reduction``, ``rounding``, ``se_bias``,
      ``squeeze``, ``activation``, ``gate``, ``integration``, ``position``,
      ``se_stages``, ``no_squeeze``) for a model with SE, and model options
      (``stride``, ``ceil_pool``, ``preact``, ``relu_before_se``,
      ``in_channels``, ``dtype``, ``widths``, ``stem_width``,
      ``stage_sizes``) for any model.

  Returns:
    The `ResNet` module, in training mode.

  Raises:
    ValueError: for an unknown name, an unknown option, an SE option on a
      model without SE, or an invalid value.

  >>> m = create("se_resnet50", reduction=8, squeeze="max", integration="pre")
  >>> m.stages[0][0].se.reduced_channels
  8
  """
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown model {name!r}; registered models: {', '.join(names())}."
    )
  entry = _REGISTRY[name]
  unknown = sorted(set(overrides) - set(SE_OPTIONS) - set(MODEL_OPTIONS))
  if unknown:
    raise ValueError(
        f"unknown option(s) {unknown} for {name!r}; SE options:"
        f" {list(SE_OPTIONS)}, model options: {list(MODEL_OPTIONS)}."
    )
  se_overrides = {k: v for k, v in overrides.items() if k in SE_OPTIONS}
  model_options = {k: v for k, v in overrides.items() if k in MODEL_OPTIONS}
  se = entry.se
  if se_overrides:
    if se is None:
      raise ValueError(
          f"{name!r} has no SE blocks, so SE option(s)"
          f" {sorted(se_overrides)} do not apply; use its se_ counterpart."
      )
    if se_overrides.get("se_stages") is not None:
      se_overrides["se_stages"] = tuple(se_overrides["se_stages"])
    se = se._replace(**se_overrides)
  return entry.build(
      se=se, num_classes=num_classes, rngs=rngs or nnx.Rngs(0),
      **model_options,
  )


_IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# timm's seresnet* / seresnext*: biased FCs, width rounded to multiples of 8.
_TIMM_SE = SEConfig(rounding="timm")
# The original Caffe SENets (timm's legacy_seresnet*): width C // 16.
_PAPER_SE = SEConfig(rounding="paper")

for _depth, (_block, _sizes) in _IMAGENET.items():
  _build = functools.partial(ResNet, block=_block, stage_sizes=_sizes)
  register(f"resnet{_depth}", _build)
  register(f"se_resnet{_depth}", _build, _TIMM_SE)
  # timm's legacy SE-ResNet-18/34 put a ReLU before SE in their basic units.
  register(f"legacy_se_resnet{_depth}",
           functools.partial(_build, stride="caffe",
                             relu_before_se=_block == "basic"), _PAPER_SE)

for _depth in (50, 101):
  _build = functools.partial(
      ResNet, block="bottleneck", stage_sizes=_IMAGENET[_depth][1],
      groups=32, base_width=4,
  )
  register(f"resnext{_depth}_32x4d", _build)
  register(f"se_resnext{_depth}_32x4d", _build, _TIMM_SE)
  # The released SE-ResNeXt models stride on the 3x3 conv but keep the Caffe
  # stem's ceil-mode max-pool.
  register(f"legacy_se_resnext{_depth}_32x4d",
           functools.partial(_build, ceil_pool=True), _PAPER_SE)

# CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): 6n+2 layers of basic units;
# ResNet-164 is the pre-activation bottleneck net of He et al., ECCV 2016.
for _depth in (20, 32, 44, 56, 110):
  _build = functools.partial(
      ResNet, block="basic", stage_sizes=((_depth - 2) // 6,) * 3,
      stem="cifar",
  )
  register(f"cifar_resnet{_depth}", _build)
  register(f"cifar_se_resnet{_depth}", _build, _PAPER_SE)
_build = functools.partial(
    ResNet, block="bottleneck", stage_sizes=(18, 18, 18), stem="cifar",
    preact=True,
)
register("cifar_resnet164", _build)
register("cifar_se_resnet164", _build, _PAPER_SE)

# WRN-16-8 (Zagoruyko & Komodakis, 2016): pre-activation basic units, n = 2,
# widths 16k, 32k, 64k with k = 8.
_build = functools.partial(
    ResNet, block="basic", stage_sizes=(2, 2, 2), widths=(128, 256, 512),
    stem="cifar", preact=True,
)
register("wrn16_8", _build)
register("se_wrn16_8", _build, _PAPER_SE)
del _build, _block, _sizes, _depth
