"""Reading what the attention modules of a network compute, for the
analysis of Sec. 7.2."""

from __future__ import annotations

import jax
from flax import nnx

from se_jax.attention.base import Attention

__all__ = ["capture_gates"]


def capture_gates(model: nnx.Module, x: jax.Array, *,
                  with_outputs: bool = False, spatial: bool = False):
  """Runs `model` on `x` in eval mode and returns its attention gates.

  The model itself is left as it was: the pass runs on an ``nnx.view`` with
  running BatchNorm statistics and gate recording switched on.

  Args:
    model: a network holding `se_jax.attention.Attention` modules.
    x: a batch of inputs for `model`.
    with_outputs: also return the model's outputs (the logits) of the same
      pass.
    spatial: also return the spatial maps of the kinds that have them
      (CBAM, coordinate attention, gather-excite), under ``tag:spatial``.

  Returns:
    ``{tag: (N, C) float32 gates}`` in forward order, tagged in the paper's
    convention (``SE_2_1`` ... ``SE_5_3`` for SE-ResNet-50: stage, unit;
    other kinds use their own prefix, e.g. ``ECA_2_1``). A NoSqueeze block's
    gates are per position, (N, H, W, C). Kinds without channel gates (e.g.
    SimAM, whose weights are per element) record none. With `with_outputs`,
    ``(outputs, gates)``.

  Raises:
    ValueError: if `model` has no attention modules.

  References:
    Hu et al., TPAMI 2019, Sec. 7.2, Figs. 6-7.
  """
  if not any(isinstance(m, Attention) for _, m in nnx.iter_modules(model)):
    raise ValueError(
        f"{type(model).__name__} has no attention modules to read gates"
        " from.")
  view = nnx.view(
      model, record_gates=True, use_running_average=True,
      raise_if_not_found=False)
  outputs, captured = nnx.capture(view, nnx.Intermediate)(x)
  gates = {path[-1]: var[...] for path, var in nnx.to_flat_state(captured)
           if spatial or not str(path[-1]).endswith(":spatial")}
  return (outputs, gates) if with_outputs else gates
