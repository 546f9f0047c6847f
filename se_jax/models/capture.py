"""Reading the SE gates of a network, for the analysis of Sec. 7.2."""

from __future__ import annotations

import jax
from flax import nnx

from se_jax.layers import SqueezeExcite

__all__ = ["capture_gates"]


def capture_gates(model: nnx.Module, x: jax.Array, *,
                  with_outputs: bool = False):
  """Runs `model` on `x` in eval mode and returns every SE block's gates.

  The model itself is left as it was: the pass runs on an ``nnx.view`` with
  running BatchNorm statistics and gate recording switched on.

  Args:
    model: a network holding `SqueezeExcite` blocks.
    x: a batch of inputs for `model`.
    with_outputs: also return the model's outputs (the logits) of the same
      pass.

  Returns:
    ``{tag: (N, C) float32 gates}`` in forward order, tagged in the paper's
    convention (``SE_2_1`` ... ``SE_5_3`` for SE-ResNet-50: stage, unit). A
    NoSqueeze block's gates are per position, (N, H, W, C). With
    `with_outputs`, ``(outputs, gates)``.

  Raises:
    ValueError: if `model` has no SE blocks.

  References:
    Hu et al., TPAMI 2019, Sec. 7.2, Figs. 6-7.
  """
  if not any(isinstance(m, SqueezeExcite) for _, m in nnx.iter_modules(model)):
    raise ValueError(
        f"{type(model).__name__} has no SqueezeExcite blocks to read gates"
        " from."
    )
  view = nnx.view(
      model, record_gates=True, use_running_average=True,
      raise_if_not_found=False,
  )
  outputs, captured = nnx.capture(view, nnx.Intermediate)(x)
  gates = {path[-1]: var[...] for path, var in nnx.to_flat_state(captured)}
  return (outputs, gates) if with_outputs else gates
