r"""CIFAR-100, SE-WRN-16-8 (Table 5): paper 19.14% test error (baseline 20.43%).

  python -m experiments.train --config=experiments/configs/cifar100_se_wrn16_8.py \
      --workdir=workdirs/cifar100_se_wrn16_8

Smoke run (a few steps): --config=experiments/configs/cifar100_se_wrn16_8.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

WRN-16-8 (Zagoruyko & Komodakis, 2016) trains with weight decay 5e-4.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar100", "se_wrn16_8", arg)
