"""Parameter and multiply-add counts, the paper's measures of cost."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from se_jax import onednn

__all__ = ["count_flops", "count_params", "macs_of_jaxpr"]


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (``nnx.Param``), as timm counts them.

  BatchNorm running statistics are buffers, not parameters, and are not
  counted.

  >>> from se_jax.models import create
  >>> count_params(create("se_resnet50"))
  28088024
  """
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(
      nnx.state(model, nnx.Param))))


def _taps_inside(in_size, out_size, window, stride, pad_lo, dilation):
  """(output position, kernel tap) pairs of one spatial dim inside the input."""
  o = np.arange(out_size)[:, None]
  k = np.arange(window)[None, :]
  pos = o * stride - pad_lo + k * dilation
  return int(np.sum((pos >= 0) & (pos < in_size)))


def _conv_macs(eqn, count_padding: bool) -> int:
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
  in_per_group = rhs.shape[rhs_spec[1]]
  if count_padding:
    window = int(np.prod([rhs.shape[d] for d in rhs_spec[2:]]))
    return int(np.prod(out.shape)) * in_per_group * window
  taps = 1
  for i in range(len(rhs_spec) - 2):
    taps *= _taps_inside(
        lhs.shape[lhs_spec[2 + i]], out.shape[out_spec[2 + i]],
        rhs.shape[rhs_spec[2 + i]], eqn.params["window_strides"][i],
        eqn.params["padding"][i][0], eqn.params["rhs_dilation"][i],
    )
  return (out.shape[out_spec[0]] * out.shape[out_spec[1]] * in_per_group
          * taps)


def _onednn_macs(eqn, count_padding: bool) -> int:
  """Multiply-adds of a `se_jax.onednn` convolution (or of either of its
  gradients, which take as many)."""
  a, b = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  x, k, y = {"forward": (a, b, out), "input_grad": (out, b, a),
             "kernel_grad": (a, out, b)}[eqn.params["kind"]]
  kh, kw, cin, _ = k
  if count_padding:
    return int(np.prod(y)) * cin * kh * kw
  top, left = eqn.params["padding"][:2]
  sh, sw = eqn.params["strides"]
  taps = (_taps_inside(x[1], y[1], kh, sh, top, 1)
          * _taps_inside(x[2], y[2], kw, sw, left, 1))
  return y[0] * y[3] * cin * taps


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  k = int(np.prod([lhs.shape[d] for d in lhs_contract]))
  return int(np.prod(out.shape)) * k


def macs_of_jaxpr(jaxpr, *, count_padding: bool = True) -> int:
  """Multiply-adds of every convolution and matrix product in `jaxpr`.

  Args:
    jaxpr: a (closed) jaxpr, e.g. from ``jax.make_jaxpr``.
    count_padding: count a convolution's taps on zero padding, as the paper
      and the usual FLOP counters do; False counts only taps inside the
      input, as XLA's cost analysis does.

  Sub-jaxprs (jit, custom derivatives) are counted once each: a forward pass
  of these networks has no loops. The branches of a ``cond`` are
  alternatives, and count as the cheapest.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_macs(eqn, count_padding)
    elif name == "dot_general":
      total += _dot_macs(eqn)
    elif name == onednn.PRIMITIVE_NAME:
      total += _onednn_macs(eqn, count_padding)
    subs = [macs_of_jaxpr(sub, count_padding=count_padding)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
    if name == "cond":
      # Alternative implementations of one computation (e.g. the
      # platform-dependent convolutions of se_jax.conv): the cheapest.
      total += min(subs, default=0)
    else:
      total += sum(subs)
  return total


def count_flops(
    model: nnx.Module, input_shape: Sequence[int], *, count_padding: bool = True
) -> int:
  """Multiply-adds of one forward pass of `model` on one example.

  The paper's "GFLOPs" are multiply-adds of convolutions and fully connected
  layers (Table 2); this counts exactly those, from the traced computation,
  so it needs no device and no compilation, and works on an abstract model
  from ``nnx.eval_shape``.

  Args:
    model: an NNX model taking a batch of inputs.
    input_shape: shape of one example, e.g. ``(224, 224, 3)``; a leading
      batch dimension of 1 is also accepted.
    count_padding: see `macs_of_jaxpr`; True matches the paper.

  Returns:
    The multiply-add count, an int.

  Raises:
    ValueError: if `input_shape` has a batch dimension other than 1 or is
      empty.

  References:
    Hu et al., TPAMI 2019, Sec. 4 and Table 2.
  """
  shape = tuple(int(d) for d in input_shape)
  if not shape:
    raise ValueError("input_shape must not be empty.")
  if len(shape) == 4:
    if shape[0] != 1:
      raise ValueError(
          f"input_shape is one example's shape, or has batch 1; got {shape}."
      )
    shape = shape[1:]
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True,
                                       raise_if_not_found=False))

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return macs_of_jaxpr(jax.make_jaxpr(forward)(state, x),
                       count_padding=count_padding)
