"""snella: kernelized sparse fine-tuning (SNELLA / SNELL) for pretrained vision models."""

from .config import SnellaConfig
from .model import SnellaModel, get_snella_model

__version__ = "0.1.0"
__all__ = ["SnellaConfig", "SnellaModel", "get_snella_model", "__version__"]
