r"""CIFAR-10, WRN-16-8 (Table 4): paper 4.27% test error (with SE 3.88%).

  python -m experiments.train --config=experiments/configs/cifar10_wrn16_8.py \
      --workdir=workdirs/cifar10_wrn16_8

Smoke run (a few steps): --config=experiments/configs/cifar10_wrn16_8.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

WRN-16-8 (Zagoruyko & Komodakis, 2016) trains with weight decay 5e-4.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar10", "wrn16_8", arg)
