"""Strict JAX settings for the whole suite, and a shared compilation cache."""

import os
import tempfile

# Test runs compile the same programs in several processes (xdist workers,
# the subprocess runs of the resume and multi-device tests); a persistent
# cache lets them share the work. Set before JAX is imported.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "se_jax-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
