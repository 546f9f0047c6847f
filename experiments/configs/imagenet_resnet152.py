r"""ImageNet, ResNet-152 (Table 2): paper 22.42 / 6.34 top-1 / top-5 error.

  python -m experiments.train --config=experiments/configs/imagenet_resnet152.py \
      --workdir=workdirs/imagenet_resnet152

Smoke run (a few steps): --config=experiments/configs/imagenet_resnet152.py:smoke
Recipe: experiments/configs/common.py `imagenet` (paper, Sec. 5.1), in the
Caffe layout whose multiply-adds the paper reports. Needs imagenet2012
prepared by TFDS (manual download).
"""

from experiments.configs import common


def get_config(arg=None):
  return common.imagenet("resnet152", arg, stride="caffe")
