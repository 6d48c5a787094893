"""SPOT: token sparsification with attention dynamics for Vision Transformers.

>>> import spot
>>> model = spot.create_model("deit_s", rho=0.7, pretrained="deit_small.pth")  # doctest: +SKIP
>>> spot.gmacs(model)  # doctest: +SKIP
3.006
"""

from spot.checkpoint import load_pretrained
from spot.config import SpotConfig
from spot.descriptors import attention_descriptors
from spot.engine import SpotInfo
from spot.flops import gmacs, predictor_gmacs, rho_for_budget
from spot.losses import default_lambdas, spot_loss
from spot.models import BACKBONES, create_model, set_mode
from spot.schedule import keep_counts

__all__ = [
    "BACKBONES",
    "SpotConfig",
    "SpotInfo",
    "attention_descriptors",
    "create_model",
    "default_lambdas",
    "gmacs",
    "keep_counts",
    "load_pretrained",
    "predictor_gmacs",
    "rho_for_budget",
    "set_mode",
    "spot_loss",
]
