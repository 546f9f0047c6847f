"""Named models, as configurations of the one ResNet family.

Every option a model takes is read from where it is defined: the keyword
arguments of `ResNet` (the model options), the fields of `Placement`, and
the fields of each attention kind's ``Options`` (`se_jax.attention`).
`option_types` lists them all with their types, for whatever checks or
configures models (the experiment configs, the pretrained checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx

from se_jax import attention as attention_lib
from se_jax.attention.base import option_types as _dataclass_types
from se_jax.attention.base import _plain_type
from se_jax.attention.se import SEOptions
from se_jax.models.resnet import Placement, ResNet

__all__ = ["MODEL_OPTIONS", "PLACEMENT_OPTIONS", "SE_OPTIONS", "create",
           "names", "option_types", "plain_twin", "register"]

# ResNet arguments that name the family itself or are set by `create`.
_FIXED = ("block", "stem", "attention", "attention_options", "placement",
          "num_classes", "rngs")


def _model_option_types() -> dict[str, type]:
  hints = typing.get_type_hints(ResNet.__init__)
  out = {}
  for name, param in inspect.signature(ResNet.__init__).parameters.items():
    if param.kind is param.KEYWORD_ONLY and name not in _FIXED:
      out[name] = (object if hints.get(name, Any) is Any
                   else _plain_type(hints[name]))
  return out


MODEL_OPTIONS = tuple(_model_option_types())
"""Options of every model: the keyword arguments of `ResNet`."""
PLACEMENT_OPTIONS = tuple(f.name for f in dataclasses.fields(Placement))
"""Where the attention sits: the fields of `Placement`."""
SE_OPTIONS = tuple(f.name for f in dataclasses.fields(SEOptions)) \
    + PLACEMENT_OPTIONS
"""The SE block's options and its placement."""


def option_types() -> dict[str, type]:
  """Every option `create` takes, with its Python type: ``attention``, the
  model options, the placement, and every registered kind's options.

  Raises:
    TypeError: if two attention kinds give one option name two types.
  """
  out = {"attention": str, **_model_option_types(),
         **_dataclass_types(Placement)}
  owner = {}
  for kind, cls in attention_lib.KINDS.items():
    for name, typ in _dataclass_types(cls.Options).items():
      if name in out and out[name] is not typ:
        raise TypeError(
            f"option {name!r} of {kind!r} attention is a {typ.__name__}, but"
            f" {owner.get(name, 'the model')!r} has it as a"
            f" {out[name].__name__}.")
      out[name] = typ
      owner.setdefault(name, kind)
  return out


class _Entry(NamedTuple):
  build: Callable[..., ResNet]
  attention: str | None
  options: dict[str, Any]
  plain: str | None


_REGISTRY: dict[str, _Entry] = {}
_DEFAULT = object()


def register(name: str, build: Callable[..., ResNet], *,
             attention: str | None = None, plain: str | None = None,
             **options: Any) -> None:
  """Registers `build` (a partial of `ResNet`) under `name`.

  Args:
    name: the registry name; must be new.
    build: called as ``build(attention=..., attention_options=...,
      placement=..., num_classes=..., rngs=..., **model_options)``.
    attention: the model's attention kind, or None for a plain network.
    plain: the registry name of the same network without attention (its
      plain twin); default `name` itself for a plain network.
    **options: the model's defaults of the kind's options.

  Raises:
    ValueError: if `name` is taken or an option does not fit the kind.
  """
  if name in _REGISTRY:
    raise ValueError(f"model name {name!r} is already registered.")
  if attention is not None:
    attention_lib.make_options(attention, **options)
  elif options:
    raise ValueError(f"{name!r} has no attention; options {options} do not"
                     " apply.")
  _REGISTRY[name] = _Entry(build, attention, dict(options),
                           plain if attention is not None else name)


def names() -> list[str]:
  """All registered model names, sorted."""
  return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown model {name!r}; registered models: {', '.join(names())}.")
  return _REGISTRY[name]


def plain_twin(name: str) -> str:
  """The registry name of `name`'s network without attention.

  Raises:
    ValueError: for an unknown name, or a model registered without one.

  >>> plain_twin("legacy_se_resnet50"), plain_twin("eca_resnet50d")
  ('legacy_resnet50', 'resnet50d')
  """
  entry = _entry(name)
  if entry.plain is None:
    raise ValueError(f"{name!r} has no plain twin in the registry.")
  return entry.plain


def create(
    name: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs | None = None,
    attention: str | None | object = _DEFAULT,
    **overrides: Any,
) -> ResNet:
  """Builds the registered model `name`.

  Args:
    name: one of `names()`, e.g. ``"se_resnet50"``.
    num_classes: classifier outputs.
    rngs: ``nnx.Rngs`` for initialisation (default ``nnx.Rngs(0)``).
    attention: the attention kind of every unit (a key of
      `se_jax.attention.KINDS`), None for the plain network; default the
      model's own. Another kind than the model's starts from that kind's
      default options.
    **overrides: model options (`MODEL_OPTIONS`: ``stride``, ``widths``,
      ``conv_impl``, ...), placement options (``integration``,
      ``position``, ``se_stages``) and the attention kind's options (for SE:
      ``reduction``, ``rounding``, ``se_bias``, ``squeeze``, ``activation``,
      ``gate``, ``no_squeeze``). `option_types` lists them all.

  Returns:
    The `ResNet` module, in training mode.

  Raises:
    ValueError: for an unknown name, kind or option, an attention option on a
      model without attention, or an invalid value.

  >>> m = create("se_resnet50", reduction=8, squeeze="max", integration="pre")
  >>> m.stages[0][0].attn.reduced_channels
  8
  >>> create("resnet50", attention="eca").stages[0][0].attn.kind
  'eca'
  """
  entry = _entry(name)
  kind = entry.attention if attention is _DEFAULT else attention
  model_types = _model_option_types()
  placement_fields = set(PLACEMENT_OPTIONS)
  kind_fields = (set() if kind is None else
                 {f.name for f in dataclasses.fields(
                     attention_lib.KINDS[kind].Options)}
                 if kind in attention_lib.KINDS else set())
  if kind is not None and kind not in attention_lib.KINDS:
    attention_lib.make_options(kind)  # Raises, naming the kinds.
  unknown = sorted(set(overrides) - set(model_types) - placement_fields
                   - kind_fields)
  if unknown:
    known_elsewhere = [k for k in unknown if k in option_types()]
    if kind is None and known_elsewhere:
      raise ValueError(
          f"{name!r} has no attention, so option(s) {known_elsewhere} do"
          " not apply; pass attention=KIND (e.g. attention='se') or use a"
          " model with attention.")
    raise ValueError(
        f"unknown option(s) {unknown} for {name!r}"
        + (f" with {kind!r} attention" if kind else "")
        + f"; model options: {sorted(model_types)}, placement:"
        f" {sorted(placement_fields)}"
        + (f", {kind!r} options: {sorted(kind_fields)}" if kind else "")
        + ".")
  model_options = {k: v for k, v in overrides.items() if k in model_types}
  placement = {k: v for k, v in overrides.items() if k in placement_fields}
  kind_options = {k: v for k, v in overrides.items() if k in kind_fields}
  if kind is None and placement and any(
      v != getattr(Placement(), k) for k, v in placement.items()):
    raise ValueError(
        f"{name!r} has no attention, so placement option(s)"
        f" {sorted(placement)} do not apply; pass attention=KIND.")
  if kind is not None:
    base = entry.options if kind == entry.attention else {}
    attention_options = attention_lib.make_options(kind, base,
                                                   **kind_options)
  else:
    attention_options = None
  if placement.get("se_stages") is not None:
    placement["se_stages"] = tuple(placement["se_stages"])
  return entry.build(
      attention=kind, attention_options=attention_options,
      placement=Placement(**placement), num_classes=num_classes,
      rngs=rngs or nnx.Rngs(0), **model_options)


_IMAGENET = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
# timm's seresnet* / seresnext*: biased FCs, width rounded to multiples of 8.
_TIMM_SE = dict(rounding="timm")
# The original Caffe SENets (timm's legacy_seresnet*): width C // 16.
_PAPER_SE = dict(rounding="paper")


def _family(depth: int, **kwargs) -> Callable[..., ResNet]:
  block, sizes = _IMAGENET[depth]
  return functools.partial(ResNet, block=block, stage_sizes=sizes, **kwargs)


for _depth in (18, 34, 50, 101, 152):
  _build = _family(_depth)
  register(f"resnet{_depth}", _build)
  register(f"se_resnet{_depth}", _build, attention="se",
           plain=f"resnet{_depth}", **_TIMM_SE)
  # The Caffe layout; timm's legacy SE-ResNet-18/34 put a ReLU before SE in
  # their basic units, which their plain twins keep.
  _legacy = _family(_depth, stride="caffe",
                    relu_before_se=_IMAGENET[_depth][0] == "basic")
  register(f"legacy_resnet{_depth}", _legacy)
  register(f"legacy_se_resnet{_depth}", _legacy, attention="se",
           plain=f"legacy_resnet{_depth}", **_PAPER_SE)

for _depth in (50, 101):
  _build = _family(_depth, groups=32, base_width=4)
  register(f"resnext{_depth}_32x4d", _build)
  register(f"se_resnext{_depth}_32x4d", _build, attention="se",
           plain=f"resnext{_depth}_32x4d", **_TIMM_SE)
  # The released SE-ResNeXt models stride on the 3x3 conv but keep the Caffe
  # stem's ceil-mode max-pool.
  _legacy = _family(_depth, groups=32, base_width=4, ceil_pool=True)
  register(f"legacy_resnext{_depth}_32x4d", _legacy)
  register(f"legacy_se_resnext{_depth}_32x4d", _legacy, attention="se",
           plain=f"legacy_resnext{_depth}_32x4d", **_PAPER_SE)

# ResNet-D (deep stem of widths 32, 32, 64 and average-pool shortcuts) and
# ResNet-T (tiered deep stem, 24, 32, 64), as timm/models/resnet.py builds
# them (resnet50d, seresnext26t_32x4d, ecaresnet50t, ...).
_D = dict(stem_type="deep", avg_down=True)
_T = dict(stem_type="deep_tiered", avg_down=True)
for _depth in (18, 26, 34, 50, 101, 152, 200):
  register(f"resnet{_depth}d", _family(_depth, **_D))
register("se_resnet152d", _family(152, **_D), attention="se",
         plain="resnet152d", **_TIMM_SE)
for _depth, _v, _kw in ((26, "d", _D), (26, "t", _T), (101, "", {}),
                        (101, "d", _D)):
  _base = 8 if _depth == 101 else 4
  _name = f"resnext{_depth}{_v}_32x{_base}d"
  _build = _family(_depth, groups=32, base_width=_base, **_kw)
  register(_name, _build)
  register(f"se_{_name}", _build, attention="se", plain=_name, **_TIMM_SE)
for _depth, _v, _kw in ((26, "t", _T), (50, "d", _D), (50, "t", _T),
                        (101, "d", _D)):
  if f"resnet{_depth}{_v}" not in _REGISTRY:
    register(f"resnet{_depth}{_v}", _family(_depth, **_kw))
  register(f"eca_resnet{_depth}{_v}", _family(_depth, **_kw),
           attention="eca", plain=f"resnet{_depth}{_v}")
# timm's ecaresnetlight: 1, 1, 11, 3 bottleneck units, average-pool
# shortcuts, the plain 7x7 stem.
register("resnetlight", functools.partial(
    ResNet, block="bottleneck", stage_sizes=(1, 1, 11, 3), avg_down=True))
register("eca_resnetlight", functools.partial(
    ResNet, block="bottleneck", stage_sizes=(1, 1, 11, 3), avg_down=True),
    attention="eca", plain="resnetlight")

# CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): 6n+2 layers of basic units;
# ResNet-164 is the pre-activation bottleneck net of He et al., ECCV 2016.
for _depth in (20, 32, 44, 56, 110):
  _build = functools.partial(
      ResNet, block="basic", stage_sizes=((_depth - 2) // 6,) * 3,
      stem="cifar")
  register(f"cifar_resnet{_depth}", _build)
  register(f"cifar_se_resnet{_depth}", _build, attention="se",
           plain=f"cifar_resnet{_depth}", **_PAPER_SE)
_build = functools.partial(
    ResNet, block="bottleneck", stage_sizes=(18, 18, 18), stem="cifar",
    preact=True)
register("cifar_resnet164", _build)
register("cifar_se_resnet164", _build, attention="se",
         plain="cifar_resnet164", **_PAPER_SE)

# WRN-16-8 (Zagoruyko & Komodakis, 2016): pre-activation basic units, n = 2,
# widths 16k, 32k, 64k with k = 8.
_build = functools.partial(
    ResNet, block="basic", stage_sizes=(2, 2, 2), widths=(128, 256, 512),
    stem="cifar", preact=True)
register("wrn16_8", _build)
register("se_wrn16_8", _build, attention="se", plain="wrn16_8", **_PAPER_SE)
del _build, _depth, _legacy, _name, _kw, _v, _base
