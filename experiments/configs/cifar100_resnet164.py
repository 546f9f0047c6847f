r"""CIFAR-100, ResNet-164 (Table 5): paper 24.33% test error (with SE 21.31%).

  python -m experiments.train --config=experiments/configs/cifar100_resnet164.py \
      --workdir=workdirs/cifar100_resnet164

Smoke run (a few steps): --config=experiments/configs/cifar100_resnet164.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

ResNet-164 is the pre-activation bottleneck network of He et al., ECCV 2016.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar100", "cifar_resnet164", arg)
