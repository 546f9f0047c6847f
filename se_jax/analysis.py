"""Measures of what SE gates do: the role-of-excitation analysis.

The paper reads Figs. 6-7 by eye: early blocks give every class the same
gate profile, deeper blocks become class-specific, one late block sits near
identity. These functions put numbers on each of those readings, for gates of
shape (N, C) from `se_jax.models.capture_gates` and integer class labels.

References:
  Hu et al., "Squeeze-and-Excitation Networks", TPAMI 2019, Sec. 7.2,
  Figs. 6-7.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["DeadGates", "GateStats", "class_gate_profiles", "dead_gates",
           "gate_statistics", "profile_correlation", "profile_similarity"]


def _check(gates, labels):
  gates = np.asarray(gates, np.float64)
  labels = np.asarray(labels)
  if gates.ndim != 2:
    raise ValueError(f"gates must be (N, C), got shape {gates.shape}.")
  if labels.shape != (gates.shape[0],):
    raise ValueError(
        f"labels must be ({gates.shape[0]},) for gates {gates.shape}, got"
        f" {labels.shape}."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
  return gates, labels


def class_gate_profiles(gates, labels) -> tuple[np.ndarray, np.ndarray,
                                               np.ndarray]:
  """Per-class mean and std of every channel's gate (Figs. 6-7).

  Args:
    gates: (N, C) gates of one SE block.
    labels: (N,) integer classes.

  Returns:
    ``(classes, mean, std)``: the K classes present, sorted, and (K, C)
    arrays of the within-class mean and standard deviation.

  >>> g = np.array([[0.1, 0.9], [0.3, 0.9], [0.5, 0.5]])
  >>> classes, mean, std = class_gate_profiles(g, np.array([0, 0, 1]))
  >>> classes.tolist(), mean.round(2).tolist()
  ([0, 1], [[0.2, 0.9], [0.5, 0.5]])
  """
  gates, labels = _check(gates, labels)
  classes = np.unique(labels)
  mean = np.stack([gates[labels == k].mean(0) for k in classes])
  std = np.stack([gates[labels == k].std(0) for k in classes])
  return classes, mean, std


class GateStats(NamedTuple):
  """Numbers for one SE block.

  Attributes:
    class_share: between-class variance over total variance of the gates
      across images, pooled over channels: 0 when every class has the same
      mean gates (class-agnostic), 1 when the class determines the gates.
    within_class_std: mean over classes and channels of the gates' standard
      deviation within a class: how much the gates depend on the individual
      image beyond its class (input dependence).
    mean_abs_from_one: mean |gate - 1|: 0 for a block that passes its input
      through unchanged.
    near_one_share: share of gates above 0.9 (saturation towards identity).
    near_zero_share: share of gates below 0.1 (channels switched off).
    scale_r2: how much of the between-class differences a per-class scalar
      explains: R^2 of fitting each class profile as a multiple of the mean
      profile (1: classes differ only by a scale, as SE_5_3 in the paper).
    mean_gate: the mean gate.
  """

  class_share: float
  within_class_std: float
  mean_abs_from_one: float
  near_one_share: float
  near_zero_share: float
  scale_r2: float
  mean_gate: float


def gate_statistics(gates, labels) -> GateStats:
  """The `GateStats` of one block's gates over a labelled set of images.

  Args:
    gates: (N, C) gates.
    labels: (N,) integer classes; at least two classes.

  Returns:
    A `GateStats`.

  Raises:
    ValueError: for mismatched shapes or fewer than two classes.

  >>> rng = np.random.default_rng(0)
  >>> labels = np.repeat(np.arange(4), 50)
  >>> same = gate_statistics(rng.uniform(size=(200, 8)), labels)
  >>> by_class = gate_statistics(np.eye(4)[labels] @ rng.uniform(size=(4, 8)),
  ...                            labels)
  >>> same.class_share < 0.1, round(by_class.class_share, 6)
  (True, 1.0)
  """
  gates, labels = _check(gates, labels)
  classes, mean, std = class_gate_profiles(gates, labels)
  if len(classes) < 2:
    raise ValueError(f"need at least two classes, got {classes.tolist()}.")
  weights = np.array([(labels == k).mean() for k in classes])
  overall = gates.mean(0)
  total = gates.var(0).sum()
  between = (weights[:, None] * (mean - overall) ** 2).sum()
  class_share = float(between / total) if total > 0 else 0.0

  # Least-squares scale a_k for each class: mean_k ~ a_k * overall.
  denom = float(overall @ overall)
  if denom > 0 and between > 0:
    a = mean @ overall / denom
    resid = (weights[:, None] * (mean - a[:, None] * overall) ** 2).sum()
    scale_r2 = float(1.0 - resid / between)
  else:
    scale_r2 = 1.0
  return GateStats(
      class_share=class_share,
      within_class_std=float((weights[:, None] * std).sum(0).mean()),
      mean_abs_from_one=float(np.abs(gates - 1.0).mean()),
      near_one_share=float((gates > 0.9).mean()),
      near_zero_share=float((gates < 0.1).mean()),
      scale_r2=scale_r2,
      mean_gate=float(gates.mean()),
  )


class DeadGates(NamedTuple):
  """Where a block's gates do not depend on the input.

  An SE block whose hidden ReLU units are all zero for an input gives that
  input the constant gates ``gate(b2)``: its bottleneck is dead there.

  Attributes:
    all_inputs: the gates are the same for every image.
    class_share: share of the classes within which the gates are the same
      for every image of the class.
    classes: those classes.
  """

  all_inputs: bool
  class_share: float
  classes: tuple[int, ...]


def dead_gates(gates, labels, *, tol: float = 1e-3) -> DeadGates:
  """Whether a block's gates are constant, over all images or per class.

  Args:
    gates: (N, C) gates.
    labels: (N,) integer classes.
    tol: largest standard deviation (over the images, in every channel)
      that counts as constant.

  Returns:
    A `DeadGates`.

  >>> labels = np.repeat(np.arange(3), 4)
  >>> g = np.where(labels[:, None] == 2, 0.5, np.linspace(0, 1, 12)[:, None])
  >>> d = dead_gates(np.repeat(g, 5, axis=1), labels)
  >>> d.all_inputs, round(d.class_share, 3), d.classes
  (False, 0.333, (2,))
  """
  gates, labels = _check(gates, labels)
  classes, _, std = class_gate_profiles(gates, labels)
  constant = std.max(axis=1) < tol
  return DeadGates(
      all_inputs=bool(gates.std(0).max() < tol),
      class_share=float(constant.mean()),
      classes=tuple(int(k) for k in classes[constant]))


def profile_correlation(mean_a, mean_b) -> float:
  """Pearson correlation of two networks' (K, C) class-mean gate profiles
  of one block, channel by channel.

  Meaningful where the channels correspond, as for two points of one
  training run (the same initialisation and data order); 1 for profiles
  equal up to an affine map.

  >>> a = np.array([[0.1, 0.5, 0.9], [0.2, 0.4, 0.8]])
  >>> round(profile_correlation(a, 2 * a + 0.1), 6)
  1.0
  """
  a = np.asarray(mean_a, np.float64).ravel()
  b = np.asarray(mean_b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(
        f"profiles must have one shape, got {np.shape(mean_a)} and"
        f" {np.shape(mean_b)}.")
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt((a @ a) * (b @ b))
  return float(a @ b / denom) if denom > 0 else 0.0


def _class_similarity(mean):
  """(K, K) correlations between the classes' profiles over the channels."""
  m = np.asarray(mean, np.float64)
  m = m - m.mean(axis=1, keepdims=True)
  norms = np.sqrt((m * m).sum(axis=1))
  norms[norms == 0] = 1.0
  m = m / norms[:, None]
  return m @ m.T


def profile_similarity(mean_a, mean_b) -> float:
  """How alike two networks' class structure in one block's gates is,
  whatever their channels: the correlation of their (K, K) matrices of
  between-class profile correlations (off-diagonal entries).

  Unlike `profile_correlation` it needs no correspondence between the
  channels, so it compares networks of different seeds; 1 when the classes
  resemble each other in the same way in both.

  >>> rng = np.random.default_rng(0)
  >>> a = rng.uniform(size=(4, 16))
  >>> round(profile_similarity(a, a[:, rng.permutation(16)]), 6)
  1.0
  """
  sa, sb = _class_similarity(mean_a), _class_similarity(mean_b)
  if sa.shape != sb.shape:
    raise ValueError(
        f"profiles must have as many classes, got {np.shape(mean_a)} and"
        f" {np.shape(mean_b)}.")
  upper = np.triu_indices(sa.shape[0], k=1)
  return profile_correlation(sa[upper], sb[upper])
