"""SPOT: token sparsification with attention dynamics for Vision Transformers.

>>> import spot
>>> model = spot.create_model("deit_s", rho=0.7, pretrained="deit_small.pth")  # doctest: +SKIP
>>> spot.gmacs(model)  # doctest: +SKIP
3.006
"""

from spot.checkpoint import load_pretrained
from spot.config import SpotConfig, upgrade_saved_config
from spot.descriptors import attention_descriptors
from spot.engine import SpotInfo
from spot.flops import gmacs, predictor_gmacs, rho_for_budget
from spot.losses import (
    classification_loss,
    default_lambdas,
    kl_loss,
    rate_loss,
    spot_loss,
    token_cosine_loss,
)
from spot.models import BACKBONES, create_model, input_normalization, set_mode
from spot.schedule import keep_counts
from spot.visualize import draw_token_masks, stage_keep_maps

__all__ = [
    "BACKBONES",
    "SpotConfig",
    "SpotInfo",
    "attention_descriptors",
    "classification_loss",
    "create_model",
    "default_lambdas",
    "draw_token_masks",
    "gmacs",
    "input_normalization",
    "keep_counts",
    "kl_loss",
    "load_pretrained",
    "predictor_gmacs",
    "rate_loss",
    "rho_for_budget",
    "set_mode",
    "spot_loss",
    "stage_keep_maps",
    "token_cosine_loss",
    "upgrade_saved_config",
]
