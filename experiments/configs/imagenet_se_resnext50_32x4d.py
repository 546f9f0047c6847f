r"""ImageNet, SE-ResNeXt-50 32x4d (Table 2): paper 21.1 / 5.49 top-1 / top-5 error.

  python -m experiments.train --config=experiments/configs/imagenet_se_resnext50_32x4d.py \
      --workdir=workdirs/imagenet_se_resnext50_32x4d

Smoke run (a few steps): --config=experiments/configs/imagenet_se_resnext50_32x4d.py:smoke
Recipe: experiments/configs/common.py `imagenet` (paper, Sec. 5.1), in the
Caffe layout whose multiply-adds the paper reports. Needs imagenet2012
prepared by TFDS (manual download).
"""

from experiments.configs import common


def get_config(arg=None):
  return common.imagenet("legacy_se_resnext50_32x4d", arg)
