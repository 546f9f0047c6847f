r"""ImageNet, SE-ResNet-50 ablation of the reduction ratio r (Table 10).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_reduction.py:8 \
      --workdir=workdirs/imagenet_ablation_reduction_8

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
r: 2 22.29/6.00 (45.7M), 4 22.25/6.09 (35.7M), 8 22.26/5.99 (30.7M),
16 22.28/6.03 (28.1M), 32 22.72/6.20 (26.9M).
Variants: see common.ABLATIONS['reduction']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("reduction", arg)
