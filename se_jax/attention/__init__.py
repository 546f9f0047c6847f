"""SE and its successors: attention modules for the residual units.

Each kind is one file of this package and one line of `KINDS`. The residual
units ask `create` for their attention by name; `Options` of a kind lists
its options with their types and defaults, and everything that checks or
lists options (`se_jax.models.create`, the experiment configs) reads them
from there.

Add your own kind: write a file with an `Attention` subclass (see
`se_jax.attention.base` and ``se.py``) and add it to `KINDS`, or call
`register` from your own code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from se_jax.attention import cbam
from se_jax.attention import coord
from se_jax.attention import eca
from se_jax.attention import ese
from se_jax.attention import gct
from se_jax.attention import ge
from se_jax.attention import se
from se_jax.attention import simam
from se_jax.attention import srm
from se_jax.attention.base import Attention, option_types

__all__ = ["Attention", "KINDS", "create", "make_options", "option_types",
           "register"]

KINDS: dict[str, type[Attention]] = {
    "se": se.SqueezeExcite,
    "eca": eca.EfficientChannelAttention,
    "ese": ese.EffectiveSqueezeExcite,
    "cbam": cbam.ConvolutionalBlockAttention,
    "ge": ge.GatherExcite,
    "srm": srm.StyleRecalibration,
    "gct": gct.GatedChannelTransformation,
    "coord": coord.CoordinateAttention,
    "simam": simam.SimAM,
}
"""Registry name -> attention class."""


def register(cls: type[Attention]) -> type[Attention]:
  """Adds an `Attention` subclass to `KINDS` under its `kind`.

  Raises:
    ValueError: if the kind is taken or the class is incomplete.
  """
  if not (isinstance(cls, type) and issubclass(cls, Attention)):
    raise ValueError(f"{cls!r} is not an se_jax.attention.Attention class.")
  if not cls.kind or not dataclasses.is_dataclass(cls.Options):
    raise ValueError(
        f"{cls.__name__} must set `kind` and an `Options` dataclass.")
  if cls.kind in KINDS:
    raise ValueError(f"attention kind {cls.kind!r} is already registered.")
  KINDS[cls.kind] = cls
  return cls


def _kind(kind: str) -> type[Attention]:
  if kind not in KINDS:
    raise ValueError(
        f"unknown attention {kind!r}; registered kinds: {sorted(KINDS)}.")
  return KINDS[kind]


def make_options(kind: str, options: Any = None, **overrides) -> Any:
  """The `Options` of `kind`: its defaults, then `options` (an instance or a
  dict), then `overrides`, checked.

  Raises:
    ValueError: for an unknown kind, an option the kind does not have, or an
      invalid value.
  """
  cls = _kind(kind).Options
  values = {} if options is None else (
      dataclasses.asdict(options) if dataclasses.is_dataclass(options)
      else dict(options))
  values.update(overrides)
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(
        f"option(s) {unknown} do not apply to {kind!r} attention; its"
        f" options: {fields}.")
  return cls(**values)


def create(kind: str, channels: int, *, options: Any = None,
           tag: str = "gates", dtype=None, rngs: nnx.Rngs,
           **overrides) -> Attention:
  """The attention module `kind` for a map of `channels` channels.

  Args:
    kind: a key of `KINDS`.
    channels: channels of the map it acts on.
    options: the kind's `Options` (or a dict of them); default its defaults.
    tag: name under which it records its gates.
    dtype: compute dtype of the network.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    **overrides: single options, on top of `options`.

  Raises:
    ValueError: as `make_options`, or for a bad `channels`.

  >>> m = create("se", 64, reduction=4, rngs=nnx.Rngs(0))
  >>> m.reduced_channels
  16
  """
  cls = _kind(kind)
  return cls(channels, make_options(kind, options, **overrides), tag=tag,
             dtype=dtype, rngs=rngs)
