"""Builds se_jax's oneDNN convolution handlers (`se_jax.onednn`) and checks
them against XLA's convolution.

    python -m se_jax.build_onednn [--out PATH]

Needs a C++ compiler and oneDNN's headers and library (Debian:
``apt-get install g++ libdnnl-dev``).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from se_jax import onednn

__all__ = ["main"]


def main(argv=None) -> int:
  """The command line: builds the handlers, loads them and compares one
  convolution with XLA's; 0 when they agree."""
  p = argparse.ArgumentParser(
      prog="python -m se_jax.build_onednn",
      description="Build se_jax's oneDNN convolution handlers and check them"
                  " against XLA's convolution.")
  p.add_argument("--out", default=None, help="library path (default: %s)"
                 % onednn.library_path())
  args = p.parse_args(argv)
  path = onednn.build(args.out)
  if args.out:
    os.environ["SE_JAX_ONEDNN_LIB"] = path
    onednn.available.cache_clear()
  if not onednn.available():
    print(f"built {path}, but it does not load", file=sys.stderr)
    return 1
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  pads = ((1, 1), (1, 1))
  mine = jax.jit(lambda x, k: onednn.conv2d(x, k, strides=(2, 1), padding=pads))
  xla = jax.jit(lambda x, k: lax.conv_general_dilated(
      x, k, (2, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  err = float(jnp.max(jnp.abs(mine(x, k) - xla(x, k))))
  print(f"built {path}; largest difference from XLA's convolution: {err:.1e}")
  return 0 if err < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
