"""phixtral: a lean phi-2 / phixtral decoder that loads the real checkpoints and runs its MoE layers on
phixtral_kernels."""

from .config import PhixtralConfig
from .generate import GenerationStats, NonFiniteLogitsError, generate
from .model import Phixtral
from .weights import default_model_path, from_pretrained, save_msft_checkpoint

__all__ = [
    "GenerationStats",
    "NonFiniteLogitsError",
    "Phixtral",
    "PhixtralConfig",
    "default_model_path",
    "from_pretrained",
    "generate",
    "save_msft_checkpoint",
]
