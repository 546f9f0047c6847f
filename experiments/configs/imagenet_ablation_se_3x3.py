r"""ImageNet, SE-ResNet-50 ablation of the SE_3x3 (block after the 3x3 conv) (Table 15).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_se_3x3.py \
      --workdir=workdirs/imagenet_ablation_se_3x3

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
SE_3x3 22.48/6.02, 3.86 GFLOPs, 25.8M.
Variants: see common.ABLATIONS['se_3x3']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("se_3x3", arg)
