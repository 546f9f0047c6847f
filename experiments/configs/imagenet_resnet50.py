r"""ImageNet, ResNet-50 (Table 2): paper 24.8 / 7.48 top-1 / top-5 error.

  python -m experiments.train --config=experiments/configs/imagenet_resnet50.py \
      --workdir=workdirs/imagenet_resnet50

Smoke run (a few steps): --config=experiments/configs/imagenet_resnet50.py:smoke
Recipe: experiments/configs/common.py `imagenet` (paper, Sec. 5.1), in the
Caffe layout whose multiply-adds the paper reports. Needs imagenet2012
prepared by TFDS (manual download).
"""

from experiments.configs import common


def get_config(arg=None):
  return common.imagenet("resnet50", arg, stride="caffe")
