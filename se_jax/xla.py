"""XLA compiler options under which the SE-ResNets run fastest.

On the CPU, jaxlib 0.10 hands convolutions to YNNPACK by default. For the
convolutions of these networks, and above all for their weight gradients,
XLA's Eigen convolutions were faster on the machines we measured
(``python -m experiments.benchmark`` compares both), so `compiler_options`
keeps YNNPACK for matrix products and reductions only. The option changes
which library computes a convolution, not what is computed. Other platforms
get no options.

Use it where you compile::

  step = jax.jit(train_step, compiler_options=se_jax.compiler_options())
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

__all__ = ["compiler_options"]

_CPU_OPTIONS = {
    # YNNPACK for single matrix products and for reductions; the
    # convolutions go to Eigen.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _accepted(platform: str) -> bool:
  """Whether this jaxlib's compiler for `platform` knows the options."""
  x = jax.device_put(jnp.zeros(()), jax.local_devices(backend=platform)[0])
  try:
    jax.jit(jnp.sin).lower(x).compile(compiler_options=_CPU_OPTIONS)
  except jax.errors.JaxRuntimeError as e:
    warnings.warn(
        f"se_jax: this jaxlib ({jax.__version__}) rejects the CPU compiler"
        f" options {_CPU_OPTIONS} ({type(e).__name__}: {e}); compiling with"
        " XLA's defaults.", RuntimeWarning, stacklevel=3)
    return False
  return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """The XLA options for compiling se_jax models on `platform`.

  Args:
    platform: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default: JAX's default
      backend.

  Returns:
    A dict for ``jax.jit(..., compiler_options=...)`` or
    ``Lowered.compile(compiler_options=...)``; empty where no option helps or
    where the installed jaxlib does not know the option.

  >>> opts = compiler_options("cpu")
  >>> sorted(opts) in ([], ["xla_cpu_experimental_ynn_fusion_type"])
  True
  """
  platform = platform or jax.default_backend()
  if platform != "cpu" or not _accepted(platform):
    return {}
  return dict(_CPU_OPTIONS)
