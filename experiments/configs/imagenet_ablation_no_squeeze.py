r"""ImageNet, SE-ResNet-50 ablation of the NoSqueeze (1x1 convs on the full map) (Table 16).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_no_squeeze.py \
      --workdir=workdirs/imagenet_ablation_no_squeeze

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
NoSqueeze 22.93/6.39, 4.27 GFLOPs, 28.1M.
Variants: see common.ABLATIONS['no_squeeze']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("no_squeeze", arg)
