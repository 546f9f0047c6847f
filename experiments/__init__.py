"""The experiment scripts of se_jax: ``python -m experiments.NAME``."""

from experiments import allocator as _allocator

_allocator.restart_if_needed()
