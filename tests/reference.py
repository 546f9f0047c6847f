"""An independent NumPy implementation of the SE block, in float64."""

import numpy as np


def to_channels_last(x, data_format):
  return np.moveaxis(x, 1, -1) if data_format[1] == "C" else x


def from_channels_last(x, data_format):
  return np.moveaxis(x, -1, 1) if data_format[1] == "C" else x


def squeeze(x, op, data_format):
  x = to_channels_last(np.asarray(x, np.float64), data_format)
  n, c = x.shape[0], x.shape[-1]
  flat = x.reshape(n, -1, c)
  return flat.mean(axis=1) if op == "avg" else flat.max(axis=1)


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0.0),
    "silu": lambda v: v * _sigmoid(v),
}
GATES = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "hard_sigmoid": lambda v: np.clip(v + 3.0, 0.0, 6.0) / 6.0,
}


def excite(params, z, activation="relu", gate="sigmoid"):
  w1, b1, w2, b2 = (None if p is None else np.asarray(p, np.float64)
                    for p in params)
  h = np.asarray(z, np.float64) @ w1
  if b1 is not None:
    h = h + b1
  h = ACTIVATIONS[activation](h)
  s = h @ w2
  if b2 is not None:
    s = s + b2
  return GATES[gate](s)


def scale(x, gates, data_format):
  x = to_channels_last(np.asarray(x, np.float64), data_format)
  g = np.asarray(gates, np.float64)
  g = g.reshape(g.shape[0], *([1] * (x.ndim - 2)), g.shape[1])
  return from_channels_last(x * g, data_format)


def squeeze_excite(params, x, op="avg", activation="relu", gate="sigmoid",
                   data_format="NHWC"):
  g = excite(params, squeeze(x, op, data_format), activation, gate)
  return scale(x, g, data_format), g
