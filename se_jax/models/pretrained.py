"""Pretrained models on disk: an Orbax checkpoint and its preprocessing.

A pretrained checkpoint is one Orbax checkpoint directory with two items:
``state`` (the model's parameters and BatchNorm statistics, as pure dicts)
and ``metadata`` (JSON: the registry name, the classifier and input widths,
the preprocessing and where the weights came from). `load_pretrained`
rebuilds the registry model from the metadata, so the directory is all a
user needs. `se_jax.interop` and ``python -m experiments.convert_timm`` make
such checkpoints from timm's weights.

Orbax is an optional dependency (the ``experiments`` extra); it is imported
when a checkpoint is saved or loaded, never on import.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from se_jax.models.registry import create
from se_jax.models.resnet import ResNet

__all__ = ["Preprocessing", "load_pretrained", "save_pretrained"]

_FORMAT = "se_jax.pretrained/1"

class Preprocessing(NamedTuple):
  """How a pretrained model expects its images, as timm evaluates it.

  Images are RGB, scaled to [0, 1], resized so that the centre crop of
  `input_size` covers `crop_fraction` of the resized image, cropped, then
  normalised per channel with `mean` and `std`, and laid out NHWC.

  Attributes:
    mean: per-channel mean, subtracted first.
    std: per-channel standard deviation, divided by second.
    input_size: (height, width) of the network's input.
    crop_fraction: the crop's share of the resized image (timm's
      ``crop_pct``): resize the shorter side to ``input_size /
      crop_fraction``, then centre-crop `input_size`.
    interpolation: the resize filter, e.g. ``"bilinear"`` or ``"bicubic"``.

  >>> p = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
  ...                   (224, 224), 0.875, "bilinear")
  >>> round(p.input_size[0] / p.crop_fraction)
  256
  """

  mean: tuple[float, ...]
  std: tuple[float, ...]
  input_size: tuple[int, int]
  crop_fraction: float
  interpolation: str


def _import_orbax(what: str):
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:
    raise ImportError(
        f"{what} needs orbax-checkpoint, which is not installed; install it"
        " with `pip install orbax-checkpoint` or the experiments extra,"
        " `pip install 'se_jax[experiments]'`."
    ) from e
  return ocp


@functools.lru_cache(maxsize=16)
def _abstract_split(name: str, num_classes: int, in_channels: int, dtype,
                    conv_impl: str):
  return nnx.split(nnx.eval_shape(lambda: create(
      name, num_classes=num_classes, in_channels=in_channels, dtype=dtype,
      conv_impl=conv_impl)))


def _abstract(name: str, num_classes: int, in_channels: int,
              dtype=None, conv_impl: str = "auto") -> ResNet:
  """The registry model `name` with shapes for values, built once.

  Tracing a deep network's initialisers takes seconds; the cached split is
  merged with a copy of its variables, so no two models share them.
  """
  graphdef, state = _abstract_split(name, num_classes, in_channels, dtype,
                                    conv_impl)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def _static(value: Any) -> Any:
  """`value` if it is static configuration (numbers, strings, tuples,
  option dataclasses), as comparable plain data; else None."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {k: _static(v) for k, v in dataclasses.asdict(value).items()}
  if isinstance(value, (tuple, list)):
    items = [_static(v) for v in value]
    return tuple(items) if all(i is not _NOT_STATIC for i in items) \
        else _NOT_STATIC
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, type) or isinstance(value, np.dtype):
    return str(value)
  return _NOT_STATIC


_NOT_STATIC = object()


def _static_attributes(module: nnx.Module) -> dict[str, Any]:
  """The attributes of `module` that configure what it computes: every
  static attribute except the switches of ``nnx.view`` (``set_view``'s
  arguments, such as BatchNorm's mode), which change how it runs."""
  switches = (set(inspect.signature(module.set_view).parameters)
              if hasattr(module, "set_view") else set())
  out = {}
  for name, value in vars(module).items():
    if name.startswith("_") or name in switches:
      continue
    value = _static(value)
    if value is not _NOT_STATIC:
      out[name] = value
  return out


def _path(path) -> str:
  return "/".join(str(p) for p in path)


def _layout(model: nnx.Module) -> dict[str, dict[str, Any]]:
  layout = {}
  for path, module in nnx.iter_modules(model):
    layout[_path(path) or "the model"] = {
        "type": type(module).__name__, **_static_attributes(module)}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    layout[_path(path)] = {"type": type(var).__name__,
                           "shape": tuple(var.shape)}
  return layout


def _layout_difference(model: nnx.Module, reference: nnx.Module) -> str | None:
  """The first way `model` differs from `reference`, or None if it does not.

  Compares the modules, the variables and their shapes, and the static
  attributes that change what a module computes.
  """
  got, want = _layout(model), _layout(reference)
  for key, expected in want.items():
    if key not in got:
      return f"{key} ({expected['type']}) is missing"
    differ = [a for a, v in expected.items() if got[key].get(a) != v]
    if differ:
      return (f"{key} has " + ", ".join(
          f"{a} {got[key].get(a)}" for a in differ) + ", expected "
          + ", ".join(f"{a} {expected[a]}" for a in differ))
  for key in got:
    if key not in want:
      return f"{key} ({got[key]['type']}) is not part of it"
  return None


def _check_matches(model: ResNet, name: str, what: str,
                   counterpart: str = "") -> None:
  """Raises unless `model` is the registry's `name` (for `what`)."""
  if not isinstance(model, ResNet):
    raise TypeError(
        f"{what} takes an se_jax.models.ResNet, got {type(model).__name__}."
    )
  reference = _abstract(name, model.fc.out_features, model.in_channels,
                        model.dtype, model.conv_impl)
  difference = _layout_difference(model, reference)
  if difference is not None:
    raise ValueError(
        f"model does not have the layout of se_jax's {name!r}{counterpart}:"
        f" {difference}."
    )


def save_pretrained(
    directory: str,
    model: ResNet,
    *,
    name: str,
    preprocessing: Preprocessing,
    source: str = "",
) -> str:
  """Writes `model` as a pretrained checkpoint that `load_pretrained` reads.

  Orbax writes into a temporary directory and renames it when complete, so
  `directory` either holds the whole checkpoint or does not exist.

  Args:
    directory: where to write; must not exist yet.
    model: a model of the registry.
    name: its registry name, e.g. ``"legacy_se_resnet50"``.
    preprocessing: how the model expects its images.
    source: where the weights came from, kept in the metadata.

  Returns:
    The absolute path of the checkpoint directory.

  Raises:
    ValueError: if `model` is not the registry's `name` (another layout, a
      missing layer or a shape that differs), or `name` is unknown.
    TypeError: if `preprocessing` is not a `Preprocessing`.
    FileExistsError: if `directory` exists.
    ImportError: if orbax-checkpoint is not installed.
  """
  if not isinstance(preprocessing, Preprocessing):
    raise TypeError(
        "preprocessing must be an se_jax.models.Preprocessing, got"
        f" {type(preprocessing).__name__}."
    )
  _check_matches(model, name, "save_pretrained")
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(
        f"{directory} already exists; save_pretrained writes a new directory."
    )
  ocp = _import_orbax("save_pretrained")
  state = {
      "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
      "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  }
  metadata = {
      "format": _FORMAT,
      "model": name,
      "num_classes": model.fc.out_features,
      "in_channels": model.in_channels,
      "preprocessing": preprocessing._asdict(),
      "source": source,
  }
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        metadata=ocp.args.JsonSave(metadata),
    ))
  return directory


def load_pretrained(
    directory: str, *, dtype=None
) -> tuple[ResNet, Preprocessing]:
  """Reads a checkpoint written by `save_pretrained`.

  Args:
    directory: the checkpoint directory.
    dtype: compute dtype of the model (e.g. ``jnp.bfloat16``); parameters
      stay float32.

  Returns:
    ``(model, preprocessing)``: the registry model with the checkpoint's
    weights, in eval mode (``model.train()`` switches BatchNorm to batch
    statistics for fine-tuning), and how it expects its images.

  Raises:
    FileNotFoundError: if `directory` does not exist.
    ValueError: if `directory` is not a pretrained se_jax checkpoint.
    ImportError: if orbax-checkpoint is not installed.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no pretrained checkpoint at {directory}.")
  ocp = _import_orbax("load_pretrained")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    try:
      metadata = checkpointer.restore(directory, args=ocp.args.Composite(
          metadata=ocp.args.JsonRestore()))["metadata"]
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise ValueError(
          f"{directory} is not a pretrained se_jax checkpoint (no readable"
          f" metadata: {e})."
      ) from e
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found != _FORMAT:
      raise ValueError(
          f"{directory} is not a pretrained se_jax checkpoint: its metadata"
          f" has format {found!r}, expected {_FORMAT!r}."
      )
    model = _abstract(metadata["model"], metadata["num_classes"],
                      metadata["in_channels"], dtype)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        {"params": nnx.to_pure_dict(params),
         "batch_stats": nnx.to_pure_dict(stats)})
    state = checkpointer.restore(directory, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
  nnx.replace_by_pure_dict(params, state["params"])
  nnx.replace_by_pure_dict(stats, state["batch_stats"])
  model = nnx.merge(graphdef, params, stats)
  model.eval()
  p = metadata["preprocessing"]
  preprocessing = Preprocessing(
      mean=tuple(float(v) for v in p["mean"]),
      std=tuple(float(v) for v in p["std"]),
      input_size=tuple(int(v) for v in p["input_size"]),
      crop_fraction=float(p["crop_fraction"]),
      interpolation=str(p["interpolation"]),
  )
  return model, preprocessing
