"""The ResNet family, named models, gate capture and pretrained checkpoints."""

from se_jax.models.capture import capture_gates
from se_jax.models.pretrained import Preprocessing
from se_jax.models.pretrained import load_pretrained
from se_jax.models.pretrained import save_pretrained
from se_jax.models.registry import MODEL_OPTIONS
from se_jax.models.registry import PLACEMENT_OPTIONS
from se_jax.models.registry import SE_OPTIONS
from se_jax.models.registry import create
from se_jax.models.registry import names
from se_jax.models.registry import option_types
from se_jax.models.registry import plain_twin
from se_jax.models.registry import register
from se_jax.models.resnet import Placement
from se_jax.models.resnet import ResNet
from se_jax.models.resnet import ResidualUnit

__all__ = [
    "MODEL_OPTIONS",
    "PLACEMENT_OPTIONS",
    "Placement",
    "Preprocessing",
    "ResNet",
    "ResidualUnit",
    "SE_OPTIONS",
    "capture_gates",
    "create",
    "load_pretrained",
    "names",
    "option_types",
    "plain_twin",
    "register",
    "save_pretrained",
]
