"""Converts timm's weights into a pretrained se_jax checkpoint.

  python -m experiments.convert_timm --model NAME
      (--checkpoint FILE | --pretrained) --out DIR

NAME is a timm model of `se_jax.interop.TIMM_MODELS` (e.g.
``legacy_seresnet50``, timm's port of the paper authors' Caffe SE-ResNet-50),
optionally with a pretrained tag (``resnet50.tv_in1k``) that picks the
preprocessing. FILE is a timm state_dict saved as .pth (``torch.save``) or
.safetensors; ``--pretrained`` downloads timm's weights instead, which needs
the network. DIR must not exist; it receives an Orbax checkpoint that
``se_jax.models.load_pretrained(DIR)`` restores, with the model's
preprocessing. A state_dict that does not fit NAME is refused, naming the
first key that does not, and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from experiments import cli
from se_jax import interop
from se_jax.models import save_pretrained


class ConversionError(Exception):
  """The input cannot be converted; the message says why."""


def read_state_dict(path: str) -> Mapping:
  """The state_dict in a .pth/.pt/.bin (torch.save) or .safetensors file.

  A training checkpoint that wraps the weights in ``{"state_dict": ...}``
  or ``{"model": ...}`` is unwrapped, and DataParallel's ``module.`` prefix
  is dropped. Pickled files are read with ``weights_only=True``: tensors
  and plain containers, never code.

  Raises:
    ConversionError: if the file is missing, unreadable or holds no
      state_dict.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"--checkpoint {path}: no such file.")
  try:
    if path.endswith(".safetensors"):
      from safetensors.torch import load_file
      state = load_file(path, device="cpu")
    else:
      import torch
      state = torch.load(path, map_location="cpu", weights_only=True)
  except ImportError as e:
    raise ConversionError(
        f"reading {path} needs PyTorch and safetensors: pip install"
        f" 'se_jax[torch]' ({e})."
    ) from e
  except Exception as e:  # torch and safetensors raise many kinds.
    raise ConversionError(
        f"could not read --checkpoint {path} as a torch.save or safetensors"
        f" state_dict: {type(e).__name__}: {e}"
    ) from e
  for wrapper in ("state_dict", "model"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
      break
  if not isinstance(state, Mapping) or not state:
    raise ConversionError(
        f"--checkpoint {path} holds {type(state).__name__}, not a state_dict"
        " (a mapping of parameter names to tensors)."
    )
  if all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def download_state_dict(name: str) -> Mapping:
  """timm's pretrained weights for `name`, downloaded by timm.

  Raises:
    ConversionError: if timm is missing, has no weights for `name`, or the
      download fails (no network).
  """
  try:
    import timm
  except ImportError as e:
    raise ConversionError(
        f"--pretrained needs timm: pip install 'se_jax[torch]' ({e})."
    ) from e
  try:
    model = timm.create_model(name, pretrained=True)
  except OSError as e:  # URLError, ConnectionError, the hub's errors.
    raise ConversionError(
        f"--pretrained downloads timm's weights for {name!r} and needs the"
        " network (GitHub or the Hugging Face Hub), which could not be"
        f" reached: {type(e).__name__}: {e}. On a machine without network,"
        " download the weights elsewhere (e.g. torch.save(timm.create_model("
        f"{name!r}, pretrained=True).state_dict(), FILE)) and pass"
        " --checkpoint FILE."
    ) from e
  except RuntimeError as e:  # timm: "No pretrained weights exist for ...".
    raise ConversionError(f"timm has no weights for {name!r}: {e}") from e
  return model.state_dict()


def convert(name: str, state_dict: Mapping, out: str) -> str:
  """Converts `state_dict` of timm's `name` and writes it to `out`.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    ConversionError: if the state_dict does not fit `name`, or timm (for
      the preprocessing) is missing; nothing is written then.
  """
  try:
    model, preprocessing = interop.from_timm(name, state_dict)
  except (ValueError, ImportError) as e:
    raise ConversionError(str(e)) from e
  return save_pretrained(out, model, name=interop.se_jax_name(name),
                         preprocessing=preprocessing, source=f"timm:{name}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Supported models: " + ", ".join(sorted(interop.TIMM_MODELS)))
  p.add_argument("--model", required=True,
                 help="timm model name, optionally with a pretrained tag")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", metavar="FILE",
                      help="a timm state_dict, .pth or .safetensors")
  source.add_argument("--pretrained", action="store_true",
                      help="download timm's weights (needs the network)")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="the new checkpoint directory (must not exist)")
  args = p.parse_args(argv)
  try:
    se_jax_name = interop.se_jax_name(args.model)
  except ValueError as e:
    p.error(f"--model {args.model!r} is not supported: {e}")
  if os.path.exists(args.out):
    p.error(f"--out {args.out} already exists; give a new directory.")
  state_dict = (download_state_dict(args.model) if args.pretrained
                else read_state_dict(args.checkpoint))
  path = convert(args.model, state_dict, args.out)
  print(f"wrote {path}: se_jax's {se_jax_name!r} with the weights of timm's"
        f" {args.model!r}; restore it with"
        f" se_jax.models.load_pretrained({path!r}).")
  return 0


if __name__ == "__main__":
  sys.exit(cli.main_guard(main)())
