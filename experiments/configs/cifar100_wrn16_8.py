r"""CIFAR-100, WRN-16-8 (Table 5): paper 20.43% test error (with SE 19.14%).

  python -m experiments.train --config=experiments/configs/cifar100_wrn16_8.py \
      --workdir=workdirs/cifar100_wrn16_8

Smoke run (a few steps): --config=experiments/configs/cifar100_wrn16_8.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

WRN-16-8 (Zagoruyko & Komodakis, 2016) trains with weight decay 5e-4.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar100", "wrn16_8", arg)
