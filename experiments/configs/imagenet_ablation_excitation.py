r"""ImageNet, SE-ResNet-50 ablation of the excitation (gate) nonlinearity (Table 12).

  python -m experiments.train --config=experiments/configs/imagenet_ablation_excitation.py:tanh \
      --workdir=workdirs/imagenet_ablation_excitation_tanh

Paper, top-1 / top-5 error (baseline ResNet-50: 23.30 / 6.55, 25.6M):
ReLU 23.47/6.98, tanh 23.00/6.38, sigmoid 22.28/6.03.
Variants: see common.ABLATIONS['excitation']. Smoke run: append ",smoke" (or ":smoke").
The model is the Caffe-layout SE-ResNet-50 with C // r and no FC biases
(paper, Sec. 6) on the Table 2 recipe.
"""

from experiments.configs import common


def get_config(arg=None):
  return common.ablation("excitation", arg)
