r"""CIFAR-100, SE-ResNet-110 (Table 5): paper 23.85% test error (baseline 26.88%).

  python -m experiments.train --config=experiments/configs/cifar100_se_resnet110.py \
      --workdir=workdirs/cifar100_se_resnet110

Smoke run (a few steps): --config=experiments/configs/cifar100_se_resnet110.py:smoke
Recipe: experiments/configs/common.py `cifar` (docs/reference/facts.md, CIFAR).

The network is the pre-activation ResNet-110 of He et al., ECCV 2016,
whose CIFAR-10 error of 6.37% is the baseline the paper reports.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.cifar("cifar100", "cifar_se_resnet110", arg, preact=True)
