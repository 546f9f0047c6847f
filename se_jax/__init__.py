"""se_jax: Squeeze-and-Excitation networks in JAX.

Pure squeeze / excite / scale primitives, a Flax NNX SE block and the
SE-ResNet family of Hu et al., "Squeeze-and-Excitation Networks" (TPAMI 2019).
"""

from se_jax import heap

# Before the imports below, so that nothing they do starts XLA's CPU
# backend first (see `se_jax.heap`).
heap.keep()

from se_jax import attention  # noqa: E402
from se_jax import models
from se_jax.attention.se import SqueezeExcite
from se_jax.costs import count_flops
from se_jax.costs import count_params
from se_jax.primitives import ExciteParams
from se_jax.primitives import excite
from se_jax.primitives import init_excite
from se_jax.primitives import reduced_width
from se_jax.primitives import scale
from se_jax.primitives import squeeze
from se_jax.primitives import squeeze_excite
from se_jax.primitives import squeeze_excite_affine

__version__ = "0.1.0"

__all__ = [
    "ExciteParams",
    "SqueezeExcite",
    "attention",
    "count_flops",
    "count_params",
    "excite",
    "init_excite",
    "models",
    "reduced_width",
    "scale",
    "squeeze",
    "squeeze_excite",
    "squeeze_excite_affine",
]
