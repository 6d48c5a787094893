"""SPOT: token sparsification with attention dynamics for Vision Transformers."""

from spot.config import SpotConfig
from spot.descriptors import attention_descriptors
from spot.engine import SpotInfo
from spot.models import BACKBONES, create_model, set_mode
from spot.schedule import keep_counts

__all__ = [
    "BACKBONES",
    "SpotConfig",
    "SpotInfo",
    "attention_descriptors",
    "create_model",
    "keep_counts",
    "set_mode",
]
