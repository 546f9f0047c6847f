"""What every attention module of the residual units is.

An attention kind is one file in this package: its pure functions (a
descriptor, a gate, the gate's application, in the spirit of
`se_jax.primitives`), an `Options` dataclass of its options with their
defaults, and an `Attention` subclass that the residual units build through
the registry (`se_jax.attention.create`). The units know nothing of a kind's
insides: they call it on their NHWC feature map, and ask it whether it can
take the unit's last BatchNorm as a per-channel affine (`folds_norm`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

__all__ = ["Attention", "check_choice", "check_positive", "option_types"]


def check_choice(name: str, value: Any, choices) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(
        f"{name} must be one of {sorted(choices)}, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless `value` is a positive number."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) \
      or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}.")


def _plain_type(annotation) -> type:
  """The Python type a config value of `annotation` has: the first non-None
  member of a union, ``tuple`` for any tuple type."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _plain_type(members[0])
  if origin in (tuple, collections.abc.Sequence) or annotation is tuple:
    return tuple
  if isinstance(annotation, type):
    return annotation
  raise TypeError(f"option type {annotation!r} has no plain Python type.")


def option_types(options_class: type) -> dict[str, type]:
  """``{field: Python type}`` of an options dataclass, from its annotations."""
  hints = typing.get_type_hints(options_class)
  return {f.name: _plain_type(hints[f.name])
          for f in dataclasses.fields(options_class)}


class Attention(nnx.Module):
  """Base class of the attention modules on NHWC feature maps.

  Subclasses set the class attributes `kind` (the registry name), `tag_prefix`
  (the prefix of the names under which their outputs are recorded, e.g.
  ``"SE"`` for ``SE_2_1``) and `Options` (a frozen dataclass of their
  options), take ``(channels, options, *, tag, dtype, rngs)`` in their
  constructor, call `_setup` there, and implement ``__call__(x)``, which
  returns a map of the shape and dtype of `x`.

  What a module computes for analysis is recorded only inside
  ``nnx.capture`` with recording switched on (``nnx.view(model,
  record_gates=True)``): channel gates, (N, C) float32, under the module's
  `tag`; spatial maps, (N, H, W) float32, under ``tag + ":spatial"``.
  `se_jax.models.capture_gates` reads them for a whole network.
  """

  kind: ClassVar[str] = ""
  tag_prefix: ClassVar[str] = ""
  Options: ClassVar[type] = type(None)

  def _setup(self, channels: int, options, tag: str,
             record_gates: bool = False) -> Any:
    """Stores the common attributes; returns the validated options."""
    if isinstance(options, Mapping) or options is None:
      options = self.Options(**(options or {}))
    if not isinstance(options, self.Options):
      raise TypeError(
          f"options of {self.kind!r} attention must be a"
          f" {self.Options.__name__}, got {type(options).__name__}.")
    if isinstance(channels, bool) or not isinstance(channels, int) \
        or channels < 1:
      raise ValueError(f"channels must be a positive int, got {channels!r}.")
    self.channels = channels
    self.options = options
    self.tag = tag
    self.record_gates = record_gates
    return options

  def set_view(self, record_gates: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      record_gates: if True, each call records its gates (read them with
        ``nnx.capture``).
    """
    if record_gates is not None:
      self.record_gates = record_gates

  @property
  def folds_norm(self) -> bool:
    """Whether the module can take the BatchNorm before it as a per-channel
    affine (`affine_call`), so that training stores no normalised map."""
    return False

  def affine_call(self, x: jax.Array, mul: jax.Array, add: jax.Array,
                  dtype=None, mean: jax.Array | None = None) -> jax.Array:
    """The module on ``x * mul + add`` (a BatchNorm folded into a
    per-channel affine), in `dtype` (default: x's). `mean`, if given, is
    the (N, C) mean of `x` over its positions, which the unit computes for
    less than a pass over `x` when `x` comes from a 1x1 convolution; a
    module that pools by averaging can use it instead of reading `x`."""
    raise NotImplementedError(
        f"{type(self).__name__} does not fold a BatchNorm; check"
        " `folds_norm` first.")

  def _record(self, gates: jax.Array | None = None,
              spatial: jax.Array | None = None) -> None:
    if not self.record_gates:
      return
    keep = lambda _, value: value
    if gates is not None:
      self.sow(nnx.Intermediate, self.tag, gates, reduce_fn=keep)
    if spatial is not None:
      self.sow(nnx.Intermediate, self.tag + ":spatial", spatial,
               reduce_fn=keep)
