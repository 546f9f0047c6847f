r"""ImageNet, SE-ResNet-50 ablation of the squeeze operator (Table 11).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_squeeze.py:max \
      --workdir=workdirs/imagenet_ablation_squeeze_max

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
max 22.57/6.09, avg 22.28/6.03.
Variants: see common.ABLATIONS['squeeze']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("squeeze", arg)
