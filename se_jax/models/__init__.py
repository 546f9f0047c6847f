"""SE-ResNet family, named models, gate capture and pretrained checkpoints."""

from se_jax.models.capture import capture_gates
from se_jax.models.pretrained import Preprocessing
from se_jax.models.pretrained import load_pretrained
from se_jax.models.pretrained import save_pretrained
from se_jax.models.registry import MODEL_OPTIONS
from se_jax.models.registry import SE_OPTIONS
from se_jax.models.registry import create
from se_jax.models.registry import names
from se_jax.models.registry import register
from se_jax.models.resnet import ResNet
from se_jax.models.resnet import ResidualUnit
from se_jax.models.resnet import SEConfig

__all__ = [
    "MODEL_OPTIONS",
    "Preprocessing",
    "ResNet",
    "ResidualUnit",
    "SEConfig",
    "SE_OPTIONS",
    "capture_gates",
    "create",
    "load_pretrained",
    "names",
    "register",
    "save_pretrained",
]
