r"""ImageNet, SE-ResNet-50 ablation of the stages with SE (Table 13).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_stages.py:4 \
      --workdir=workdirs/imagenet_ablation_stages_4

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
stage 2 only 23.03/6.48 (25.6M), stage 3 23.04/6.32 (25.7M),
stage 4 22.68/6.22 (26.4M), all 22.28/6.03 (28.1M).
Variants: see common.ABLATIONS['stages']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("stages", arg)
