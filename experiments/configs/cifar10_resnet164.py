r"""CIFAR-10, ResNet-164 (Table 4): paper 5.46% test error (with SE 4.39%).

  python -m experiments.train --config=experiments/configs/cifar10_resnet164.py \
      --workdir=workdirs/cifar10_resnet164

Smoke run (a few steps): --config=experiments/configs/cifar10_resnet164.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

ResNet-164 is the pre-activation bottleneck network of He et al., ECCV 2016.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar10", "cifar_resnet164", arg)
