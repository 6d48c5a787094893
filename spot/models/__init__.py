"""SPOT backbones: DeiT (timm, patched in place) and LV-ViT (native, registered with timm)."""

from spot.models.base import set_mode
from spot.models.factory import BACKBONES, create_model, input_normalization

__all__ = ["BACKBONES", "create_model", "input_normalization", "set_mode"]
