r"""CIFAR-10, SE-ResNet-164 (Table 4): paper 4.39% test error (baseline 5.46%).

  python -m experiments.train --config=experiments/configs/cifar10_se_resnet164.py \
      --workdir=workdirs/cifar10_se_resnet164

Smoke run (a few steps): --config=experiments/configs/cifar10_se_resnet164.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

ResNet-164 is the pre-activation bottleneck network of He et al., ECCV 2016.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar10", "cifar_se_resnet164", arg)
