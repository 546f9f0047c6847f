"""Efficient Channel Attention: a 1-D convolution across the channels.

ECA replaces SE's two FC layers by one 1-D convolution, without bias, over
the channel descriptors, whose kernel size grows with the number of
channels: ``k = |log2(C) / gamma + beta / gamma|`` rounded to an odd number
(at least 3).

References:
  Wang, Wu, Zhu, Li, Zuo, Hu. "ECA-Net: Efficient Channel Attention for Deep
  Convolutional Neural Networks". CVPR 2020 (arXiv:1910.03151), Sec. 3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.typing import ArrayLike

from se_jax import primitives
from se_jax.attention.base import Attention, check_positive

__all__ = ["ECAOptions", "EfficientChannelAttention", "eca_gate",
           "eca_kernel_size", "efficient_channel_attention"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
  """ECA's adaptive kernel size for `channels` channels.

  ``t = int(|log2(C) + beta| / gamma)``, then the next odd number, at
  least 3 (the paper's Eq. 12, as its reference code and timm compute it).

  >>> eca_kernel_size(64), eca_kernel_size(256), eca_kernel_size(2048)
  (3, 5, 7)
  """
  if channels < 1:
    raise ValueError(f"channels must be >= 1, got {channels}.")
  t = int(abs(math.log2(channels) + beta) / gamma)
  return max(t if t % 2 else t + 1, 3)


def eca_gate(kernel: ArrayLike, z: ArrayLike) -> jax.Array:
  """Gates from channel descriptors: a zero-padded 1-D convolution across
  the channels, then a sigmoid.

  Args:
    kernel: (k,) weights, k odd.
    z: (N, C) descriptors (any float dtype).

  Returns:
    (N, C) float32 gates.

  Raises:
    ValueError: for a kernel that is not an odd-length vector or `z` not
      (N, C).

  >>> eca_gate(jnp.zeros(3), jnp.ones((2, 5)))[0, :2]
  Array([0.5, 0.5], dtype=float32)
  """
  kernel, z = jnp.asarray(kernel), jnp.asarray(z)
  if kernel.ndim != 1 or kernel.shape[0] % 2 == 0:
    raise ValueError(
        f"kernel must be an odd-length vector, got shape {kernel.shape}.")
  if z.ndim != 2:
    raise ValueError(f"z must be (N, C), got shape {z.shape}.")
  k = kernel.shape[0]
  p = (k - 1) // 2
  s = lax.conv_general_dilated(
      z.astype(jnp.float32)[:, :, None], kernel.astype(jnp.float32)[:, None,
                                                                    None],
      (1,), ((p, p),), dimension_numbers=("NWC", "WIO", "NWC"),
      precision=lax.Precision.HIGHEST)
  return jax.nn.sigmoid(s[:, :, 0])


def efficient_channel_attention(
    kernel: ArrayLike, x: ArrayLike, *, data_format: str = "NHWC",
    return_gates: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The ECA block: average-pool, `eca_gate`, scale.

  Args:
    kernel: (k,) weights of the 1-D convolution.
    x: float feature map in `data_format` (see `se_jax.squeeze`).
    data_format: one of `se_jax.primitives.DATA_FORMATS`.
    return_gates: also return the (N, C) float32 gates.

  Returns:
    `x` recalibrated, in its dtype, or ``(y, gates)``.

  >>> y = efficient_channel_attention(jnp.ones(3), jnp.ones((2, 4, 4, 8)))
  >>> y.shape
  (2, 4, 4, 8)
  """
  z = primitives.squeeze(x, data_format=data_format)
  gates = eca_gate(kernel, z)
  y = primitives.scale(x, gates, data_format=data_format)
  return (y, gates) if return_gates else y


@dataclasses.dataclass(frozen=True)
class ECAOptions:
  """The options of an ECA block.

  Attributes:
    kernel_size: the 1-D kernel's size; None for the adaptive size of
      `eca_kernel_size`.
    gamma: gamma of the adaptive size (2 in the paper).
    beta: b of the adaptive size (1 in the paper).
  """

  kernel_size: int | None = None
  gamma: float = 2
  beta: float = 1

  def __post_init__(self):
    if self.kernel_size is not None and (
        isinstance(self.kernel_size, bool)
        or not isinstance(self.kernel_size, int) or self.kernel_size < 1
        or self.kernel_size % 2 == 0):
      raise ValueError(
          f"kernel_size must be an odd positive int or None, got"
          f" {self.kernel_size!r}.")
    check_positive("gamma", self.gamma)
    if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
      raise ValueError(f"beta must be a number, got {self.beta!r}.")


class EfficientChannelAttention(Attention):
  """ECA on an NHWC map; records its (N, C) gates.

  Args:
    channels: C.
    options: an `ECAOptions` (or a dict of its fields).
    tag: name under which the gates are recorded.
    record_gates: record the gates on each call (inside ``nnx.capture``).
    dtype: unused; the gate is computed in float32.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  References:
    Wang et al., CVPR 2020.
  """

  kind: ClassVar[str] = "eca"
  tag_prefix: ClassVar[str] = "ECA"
  Options: ClassVar[type] = ECAOptions
  # timm's EcaModule (timm/layers/eca.py): Conv1d(1, 1, k, bias=False).
  timm_params: ClassVar[dict] = {"kernel": ("conv.weight", "conv1d")}

  def __init__(self, channels: int, options: ECAOptions | None = None, *,
               tag: str = "gates", record_gates: bool = False, dtype=None,
               rngs: nnx.Rngs):
    del dtype
    o = self._setup(channels, options, tag, record_gates)
    k = o.kernel_size or eca_kernel_size(channels, o.gamma, o.beta)
    self.kernel_size = k
    # PyTorch's Conv1d initialisation: uniform in +-1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(k)
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (k,), jnp.float32, -bound, bound))

  def __call__(self, x: jax.Array) -> jax.Array:
    y, gates = efficient_channel_attention(self.kernel[...], x,
                                           return_gates=True)
    self._record(gates)
    return y
