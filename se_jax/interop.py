"""timm <-> se_jax: pretrained ImageNet weights, in both directions.

`from_timm` turns a timm state_dict (of ``timm.create_model(name,
pretrained=True)``, or read from a .pth or .safetensors file) into the
matching se_jax model and its preprocessing; `to_timm` turns an se_jax model
back into a state_dict that timm's model loads, so that weights fine-tuned in
JAX return to PyTorch. `TIMM_MODELS` lists the timm models and their se_jax
counterparts. timm's ``legacy_seresnet50/101/152`` weights are ports of the
Caffe SE-ResNets that the paper's authors released.

Layouts: timm's convolution weights are (out, in / groups, kh, kw), se_jax's
kernels (kh, kw, in / groups, out); timm's SE FCs are 1x1 convolutions
(``fc1``, ``fc2``), se_jax's `SqueezeExcite` holds them as matrices ``w1``
(C, C_r) and ``w2`` (C_r, C); the classifier is transposed. Each attention
kind lists its own parameters' timm names and layouts (``timm_params``). The conversion
only moves and transposes float32 values, so a round trip is exact.

torch and timm are the ``torch`` extra (``pip install 'se_jax[torch]'``) and
are imported only when a function needs them: `from_timm` needs timm for the
preprocessing (unless given one), `to_timm` needs torch.

Example, with timm's architecture and random weights (``pretrained=True``
gives timm's ImageNet weights, on a machine that can download them)::

  >>> import pytest; timm = pytest.importorskip("timm")
  >>> import jax.numpy as jnp
  >>> from se_jax import interop, models
  >>> tm = timm.create_model("legacy_seresnet18")
  >>> model, preprocessing = interop.from_timm("legacy_seresnet18",
  ...                                          tm.state_dict())
  >>> preprocessing.input_size, preprocessing.crop_fraction
  ((224, 224), 0.875)
  >>> gates = models.capture_gates(model, jnp.zeros((1, 64, 64, 3)))
  >>> gates["SE_2_1"].shape
  (1, 64)
  >>> tm.load_state_dict(interop.to_timm("legacy_seresnet18", model))
  <All keys matched successfully>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from se_jax.models.pretrained import Preprocessing
from se_jax.models.pretrained import _abstract
from se_jax.models.pretrained import _check_matches
from se_jax.models.resnet import ResNet

__all__ = ["TIMM_MODELS", "from_timm", "se_jax_name", "timm_preprocessing",
           "to_timm"]

_DEPTHS = (18, 34, 50, 101, 152)

TIMM_MODELS: dict[str, str] = {
    **{f"resnet{d}": f"resnet{d}" for d in _DEPTHS},
    **{f"resnext{d}_32x4d": f"resnext{d}_32x4d" for d in (50, 101)},
    **{f"seresnet{d}": f"se_resnet{d}" for d in _DEPTHS},
    **{f"seresnext{d}_32x4d": f"se_resnext{d}_32x4d" for d in (50, 101)},
    **{f"legacy_seresnet{d}": f"legacy_se_resnet{d}" for d in _DEPTHS},
    **{f"legacy_seresnext{d}_32x4d": f"legacy_se_resnext{d}_32x4d"
       for d in (50, 101)},
    # ResNet-D and -T, with SE or ECA (timm/models/resnet.py).
    **{f"resnet{d}d": f"resnet{d}d" for d in (18, 26, 34, 50, 101, 152,
                                               200)},
    "resnet26t": "resnet26t",
    "resnet50t": "resnet50t",
    "seresnet152d": "se_resnet152d",
    "seresnext26d_32x4d": "se_resnext26d_32x4d",
    "seresnext26t_32x4d": "se_resnext26t_32x4d",
    "seresnext101_32x8d": "se_resnext101_32x8d",
    "seresnext101d_32x8d": "se_resnext101d_32x8d",
    "ecaresnet26t": "eca_resnet26t",
    "ecaresnet50d": "eca_resnet50d",
    "ecaresnet50t": "eca_resnet50t",
    "ecaresnet101d": "eca_resnet101d",
    "ecaresnetlight": "eca_resnetlight",
}
"""timm model name -> se_jax registry name, for every supported model."""

# timm's BatchNorm2d entries, in its state_dict order.
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean",
       "var": "running_var"}
# Module names that differ between timm/models/resnet.py and the ported
# Caffe SENets of timm/models/senet.py.
_NAMES = {
    False: {"stem": "conv1", "stem_bn": "bn1", "se": "se", "fc": "fc"},
    True: {"stem": "layer0.conv1", "stem_bn": "layer0.bn1",
           "se": "se_module", "fc": "last_linear"},
}
# A deep stem's layers in timm's ``conv1`` Sequential.
_DEEP_STEM = {"stem_conv_a": 0, "stem_norm_a": 1, "stem_conv_b": 3,
              "stem_norm_b": 4, "stem_conv": 6}
_UNIT = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5}


class _Entry(NamedTuple):
  key: str  # timm's state_dict key
  path: tuple  # se_jax's state path
  kind: str  # how the array is laid out: conv, se_fc, linear or vector


def _to_timm_layout(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return a.transpose(3, 2, 0, 1)
  if kind == "fc_conv":
    return a.T[:, :, None, None]
  if kind == "linear":
    return a.T
  if kind == "conv1d":
    return a[None, None, :]
  if kind == "depthwise_conv":
    return a.transpose(3, 2, 0, 1)
  return a


def _from_timm_layout(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return a.transpose(2, 3, 1, 0)
  if kind == "fc_conv":
    return a[:, :, 0, 0].T
  if kind == "linear":
    return a.T
  if kind == "conv1d":
    return a[0, 0]
  if kind == "depthwise_conv":
    return a.transpose(2, 3, 1, 0)
  return a


def _timm_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  # A zero-stride array has the shape and no memory to transpose.
  return _to_timm_layout(kind, np.broadcast_to(np.bool_(0), shape)).shape


def _entry(path: tuple, names: dict[str, str], model: ResNet
           ) -> tuple[_Entry, tuple]:
  """timm's key for the se_jax variable at `path`, and a sort key."""
  bn = list(_BN)
  deep = model.stem_type != ""
  match path:
    case (layer, "kernel") if deep and layer in _DEEP_STEM:
      return (_Entry(f"conv1.{_DEEP_STEM[layer]}.weight", path, "conv"),
              (0, _DEEP_STEM[layer], 0))
    case (layer, v) if deep and layer in _DEEP_STEM and v in _BN:
      return (_Entry(f"conv1.{_DEEP_STEM[layer]}.{_BN[v]}", path, "vector"),
              (0, _DEEP_STEM[layer], bn.index(v)))
    case ("stem_conv", "kernel"):
      return _Entry(f"{names['stem']}.weight", path, "conv"), (0, 0, 0)
    case ("stem_norm", v) if v in _BN:
      return (_Entry(f"{names['stem_bn']}.{_BN[v]}", path, "vector"),
              (1, bn.index(v)))
    case ("fc", "kernel"):
      return _Entry(f"{names['fc']}.weight", path, "linear"), (3, 0)
    case ("fc", "bias"):
      return _Entry(f"{names['fc']}.bias", path, "vector"), (3, 1)
    case ("stages", int(i), int(j), *rest):
      unit = f"layer{i + 1}.{j}."
      down = 1 if model.stages[i][j].avg_down else 0
      match tuple(rest):
        case (layer, "kernel") if layer in _UNIT:
          return (_Entry(f"{unit}{layer}.weight", path, "conv"),
                  (2, i, j, _UNIT[layer], 0))
        case (layer, v) if layer in _UNIT and v in _BN:
          return (_Entry(f"{unit}{layer}.{_BN[v]}", path, "vector"),
                  (2, i, j, _UNIT[layer], bn.index(v)))
        case ("attn", *inner):
          params = type(model.stages[i][j].attn).__dict__.get(
              "timm_params", {})
          name = "/".join(map(str, inner))
          if name in params:
            key, kind = params[name]
            return (_Entry(f"{unit}{names['se']}.{key}", path, kind),
                    (2, i, j, 100, list(params).index(name)))
        case ("downsample_conv", "kernel"):
          return (_Entry(f"{unit}downsample.{down}.weight", path, "conv"),
                  (2, i, j, 200, 0))
        case ("downsample_norm", v) if v in _BN:
          return (_Entry(f"{unit}downsample.{down + 1}.{_BN[v]}", path,
                         "vector"), (2, i, j, 201, bn.index(v)))
  raise ValueError(
      f"se_jax variable {'/'.join(map(str, path))} has no timm counterpart."
  )


def _entries(arch: str, model: ResNet) -> list[tuple[_Entry, tuple]]:
  """(entry, shape of the se_jax variable) in timm's state_dict order."""
  names = _NAMES[arch.startswith("legacy_")]
  out = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    entry, order = _entry(tuple(path), names, model)
    out.append((order, entry, tuple(var.shape)))
  out.sort(key=lambda t: t[0])
  return [(entry, shape) for _, entry, shape in out]


def se_jax_name(name: str) -> str:
  """The se_jax registry name of timm's model `name`.

  Args:
    name: a timm model name, optionally with a pretrained tag (ignored).

  Returns:
    The name of the se_jax model with timm's layout, for `se_jax.models`.

  Raises:
    ValueError: if se_jax has no model with `name`'s layout, saying why.

  >>> se_jax_name("legacy_seresnet50.in1k")
  'legacy_se_resnet50'
  """
  return _resolve(name)[1]


def _resolve(name: str) -> tuple[str, str]:
  """(timm architecture, se_jax registry name) of a timm model name."""
  if not isinstance(name, str):
    raise TypeError(f"name must be a timm model name, got {name!r}.")
  arch = name.partition(".")[0]
  if arch not in TIMM_MODELS:
    raise ValueError(
        f"timm model {arch!r} has no se_jax counterpart; supported:"
        f" {', '.join(sorted(TIMM_MODELS))}."
    )
  return arch, TIMM_MODELS[arch]


def _import_timm():
  try:
    import timm
  except ImportError as e:
    raise ImportError(
        "timm's pretrained configs need timm and PyTorch, which are not"
        " installed; install the torch extra: `pip install 'se_jax[torch]'`,"
        " or pass `preprocessing`."
    ) from e
  return timm


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "to_timm needs PyTorch, which is not installed; install the torch"
        " extra: `pip install 'se_jax[torch]'`."
    ) from e
  return torch


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(np.shape(value))  # Reads .shape; converts nothing.


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor; bfloat16 has no NumPy twin.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.array(value, dtype=np.float32)  # A copy, never a view of torch's.


def timm_preprocessing(name: str) -> Preprocessing:
  """The preprocessing of timm's pretrained config for `name`.

  Args:
    name: a timm model name, optionally with a pretrained tag
      (``"resnet50.tv_in1k"``); without one, timm's default tag, the weights
      that ``timm.create_model(name, pretrained=True)`` loads.

  Returns:
    Mean, std, input size, crop fraction and interpolation of those
    weights.

  Raises:
    ValueError: if `name` is not in `TIMM_MODELS` or timm has no such tag.
    ImportError: if timm is not installed.
  """
  arch, _ = _resolve(name)
  timm = _import_timm()
  try:
    cfg = timm.models.get_pretrained_cfg(name)
  except RuntimeError as e:
    raise ValueError(
        f"timm has no pretrained config {name!r} ({e}); tags with weights:"
        f" {', '.join(timm.list_pretrained(arch + '.*')) or 'none'}."
    ) from e
  if cfg is None:
    raise ValueError(f"timm has no pretrained config for {name!r}.")
  return Preprocessing(
      mean=tuple(float(v) for v in cfg.mean),
      std=tuple(float(v) for v in cfg.std),
      input_size=tuple(int(v) for v in cfg.input_size[1:]),
      crop_fraction=float(cfg.crop_pct),
      interpolation=str(cfg.interpolation),
  )


def _mismatch(arch: str, se_name: str, detail: str, count: int) -> ValueError:
  more = f" ({count - 1} more key(s) do not fit)" if count > 1 else ""
  return ValueError(
      f"state_dict does not fit timm's {arch!r} (se_jax {se_name!r}):"
      f" {detail}{more}."
  )


def from_timm(
    name: str,
    state_dict: Mapping[str, Any],
    *,
    preprocessing: Preprocessing | None = None,
) -> tuple[ResNet, Preprocessing]:
  """Converts a timm state_dict into the matching se_jax model.

  The classifier's and the stem's widths are read from the state_dict, so
  fine-tuned checkpoints with other class counts (or input channels) load
  too. Every other tensor must be there with timm's shape; BatchNorm's
  ``num_batches_tracked`` may be absent (checkpoints of old PyTorch
  versions lack it) and is not used.

  timm's legacy SENets apply dropout (p=0.2) before the classifier in
  training mode; se_jax's ResNet has none, so only their training-mode
  outputs differ, by that dropout.

  Args:
    name: a timm model name of `TIMM_MODELS`, optionally with a pretrained
      tag (``"resnet50.tv_in1k"``) that picks the preprocessing.
    state_dict: timm's ``model.state_dict()`` (or the model itself), or a
      state_dict read from a .pth or .safetensors file: names to
      ``torch.Tensor`` or NumPy arrays.
    preprocessing: the preprocessing to attach; default timm's pretrained
      config for `name` (see `timm_preprocessing`).

  Returns:
    ``(model, preprocessing)``: the se_jax model ``TIMM_MODELS[arch]`` with
    the state_dict's weights and running statistics, in eval mode
    (``model.train()`` switches BatchNorm to batch statistics), and how it
    expects its images.

  Raises:
    ValueError: if `name` is not supported, or the state_dict does not fit
      (another architecture, a missing or an extra key, a shape that
      differs); the message names the first such key and both shapes.
    TypeError: if `state_dict` is not a mapping.
    ImportError: if `preprocessing` is None and timm is not installed.
  """
  arch, se_name = _resolve(name)
  if preprocessing is None:
    preprocessing = timm_preprocessing(name)
  if callable(getattr(state_dict, "state_dict", None)):
    state_dict = state_dict.state_dict()
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        "state_dict must map names to tensors, got"
        f" {type(state_dict).__name__}."
    )
  names = _NAMES[arch.startswith("legacy_")]
  head = _shape(state_dict.get(f"{names['fc']}.weight"))
  num_classes = head[0] if len(head) == 2 and head[0] > 0 else 1000
  stem = _shape(state_dict.get(f"{names['stem']}.weight"))
  in_channels = stem[1] if len(stem) == 4 and stem[1] > 0 else 3
  abstract = _abstract(se_name, num_classes, in_channels)
  entries = _entries(arch, abstract)

  expected = {e.key: (e, _timm_shape(e.kind, s)) for e, s in entries}
  batch_norms = {e.key.rpartition(".")[0] for e, _ in entries
                 if e.key.endswith(".running_var")}
  # Offenders in timm's order, then keys the model does not have.
  problems = []
  for key, (_, want) in expected.items():
    if key not in state_dict:
      problems.append(
          f"missing key {key!r} (expected shape {want}); the state_dict has"
          " no such tensor"
      )
    elif (got := _shape(state_dict[key])) != want:
      problems.append(f"{key!r} has shape {got}, expected {want}")
  for key, value in state_dict.items():
    if key not in expected and not (
        key.endswith(".num_batches_tracked")
        and key.rpartition(".")[0] in batch_norms):
      problems.append(
          f"unexpected key {key!r} (shape {_shape(value)}); the model has no"
          " such tensor"
      )
  if problems:
    raise _mismatch(arch, se_name, problems[0], len(problems))

  pure: dict = {}
  for entry, _ in entries:
    node = pure
    for p in entry.path[:-1]:
      node = node.setdefault(p, {})
    node[entry.path[-1]] = jnp.asarray(
        _from_timm_layout(entry.kind, _to_numpy(state_dict[entry.key])))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  model.eval()
  return model, preprocessing


def to_timm(name: str, model: ResNet) -> dict[str, Any]:
  """The timm state_dict of an se_jax model, for ``load_state_dict``.

  Args:
    name: the timm model name, a key of `TIMM_MODELS` (a pretrained tag is
      ignored); `model` must be the se_jax model ``TIMM_MODELS[name]``.
    model: the se_jax model, e.g. fine-tuned after `from_timm`.

  Returns:
    ``{key: torch.Tensor}`` in timm's order, float32 on the CPU, which
    ``timm.create_model(name, num_classes=...).load_state_dict`` accepts
    with ``strict=True``. BatchNorm's ``num_batches_tracked`` counters, which
    se_jax does not keep, are 0.

  Raises:
    ValueError: if `name` is not supported or `model` is not its se_jax
      counterpart (another layout, or a shape that differs).
    TypeError: if `model` is not an se_jax ResNet.
    ImportError: if PyTorch is not installed.
  """
  arch, se_name = _resolve(name)
  _check_matches(model, se_name, "to_timm",
                 f", the counterpart of timm's {arch!r}")
  torch = _import_torch()
  values = {tuple(path): var[...]
            for path, var in nnx.to_flat_state(nnx.state(model))}
  out = {}
  for entry, _ in _entries(arch, model):
    array = _to_timm_layout(entry.kind, np.asarray(values[entry.path]))
    out[entry.key] = torch.from_numpy(
        np.array(array, dtype=np.float32, order="C"))
    if entry.key.endswith(".running_var"):
      out[entry.key[:-len("running_var")] + "num_batches_tracked"] = (
          torch.zeros((), dtype=torch.long))
  return out
