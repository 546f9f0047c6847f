"""The experiment scripts of se_jax: ``python -m experiments.NAME``."""

from experiments import hugepages as _hugepages

_hugepages.restart_if_needed()
