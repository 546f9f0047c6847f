r"""Fashion-MNIST, CIFAR-style SE-ResNet-20: the CPU-sized run of the engine.

  python -m experiments.train \
      --config=experiments/configs/fashion_mnist_se_resnet20.py \
      --workdir=workdirs/fashion_mnist_se_resnet20

No paper number: the paper has no Fashion-MNIST result. It trains offline
on Debian's dataset-fashion-mnist; the target of the training engine is a
test error under 8%. Recipe: the CIFAR recipe (SGD momentum 0.9, weight
decay 1e-4, batch 128, lr 0.1), shortened to 10 epochs with a cosine decay,
2-pixel pad-and-crop augmentation.
"""

from experiments.configs import common


def get_config(arg=None):
  variant, is_smoke = common.parse_arg(arg)
  if variant is not None:
    raise ValueError(f"this config has no variants, got {variant!r}.")
  c = common.base_config()
  c.dataset = "fashion_mnist"
  c.model = "cifar_se_resnet20"
  c.num_epochs = 10.0
  c.schedule = "cosine"
  c.log_every_steps = 20
  return common.finish(c, is_smoke)
