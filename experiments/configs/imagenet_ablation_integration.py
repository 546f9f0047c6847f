r"""ImageNet, SE-ResNet-50 ablation of the integration strategy (Table 14).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_integration.py:pre \
      --workdir=workdirs/imagenet_ablation_integration_pre

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
SE 22.28/6.03, SE-PRE 22.23/6.00, SE-POST 22.78/6.35,
SE-Identity 22.20/6.15.
Variants: see common.ABLATIONS['integration']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("integration", arg)
