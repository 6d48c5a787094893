"""``create_model``: the one way to build a SPOT (or dense) backbone by its short name."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from spot.checkpoint import load_pretrained
from spot.config import CONFIG_FORMAT, FORMAT_KEY, SPOT_OPTIONS, SpotConfig
from spot.models.base import attach_spot
from spot.models.deit import TIMM_NAMES as DEIT_NAMES
from spot.models.deit import patch_vit
from spot.models.lvvit import LVViT  # noqa: F401 - importing registers lvvit_t / lvvit_s with timm
from spot.schedule import default_stage_blocks

TIMM_NAMES = {**DEIT_NAMES, "lvvit_t": "lvvit_t", "lvvit_s": "lvvit_s"}
BACKBONES = tuple(TIMM_NAMES)


def create_model(
    name: str,
    *,
    rho: float | None = 0.7,
    selector: str = "learned",
    pretrained: str | Path | None = None,
    num_classes: int = 1000,
    spot_format: int = CONFIG_FORMAT,
    **overrides,
) -> nn.Module:
    """Build backbone ``name`` (``deit_t|s|b``, ``lvvit_t|s``) with SPOT stages at retention ``rho``.

    ``rho=None`` gives the dense backbone with the same module names (teacher / baseline).
    ``overrides`` are backbone arguments (``img_size``, ``patch_size``, ``depth``, ``embed_dim``,
    ``num_heads``, ``mlp_ratio``, ``drop_path_rate``...) or SPOT options (fields of ``SpotConfig``:
    ``stage_blocks``, ``d_remap``, ``attn_mean``, ``attn_var``, ``descriptor_means``,
    ``descriptor_variances``, ``head_avg``, ``shared_predictor``,
    ``fuse_dropped``, ``sampling``, ``tau``). ``pretrained``: a checkpoint path, ``"hub"`` or ``"hub:<tag>"``.
    The model carries ``spot_config``: ``create_model(**model.spot_config)`` rebuilds the architecture. It
    records every ``SpotConfig`` option (defaults too) and its format (``spot_format``), so a saved model
    keeps its behaviour when a default changes; read older saved configs with ``upgrade_saved_config``.
    """
    if spot_format != CONFIG_FORMAT:
        raise ValueError(
            f"{FORMAT_KEY}={spot_format!r}: create_model reads format {CONFIG_FORMAT}; pass a saved config "
            "through spot.upgrade_saved_config first"
        )
    if name not in TIMM_NAMES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    spot_opts = {k: v for k, v in overrides.items() if k in SPOT_OPTIONS}
    arch_opts = {k: v for k, v in overrides.items() if k not in SPOT_OPTIONS}
    try:
        model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=num_classes, **arch_opts)
    except TypeError as err:
        raise ValueError(f"bad option for backbone {name!r}: {err}") from err
    stages = spot_opts.pop("stage_blocks", None) or default_stage_blocks(len(model.blocks))
    cfg = SpotConfig(rho=rho, selector=selector, stage_blocks=tuple(stages), **spot_opts)
    if name.startswith("deit"):
        patch_vit(model, cfg)
    else:
        attach_spot(model, cfg, model.embed_dim, model.blocks[0].attn.num_heads)
    model.spot_config = {
        FORMAT_KEY: CONFIG_FORMAT,
        "name": name,
        "num_classes": num_classes,
        **arch_opts,
        **cfg.to_dict(),  # every option, defaulted ones too
    }
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def input_normalization(model: nn.Module) -> dict[str, tuple[float, ...]]:
    """``{"mean": ..., "std": ...}`` (per channel, [0, 1] pixel scale) the model expects its inputs normalised
    with: its timm ``pretrained_cfg``, ImageNet's unless built with ``pretrained_cfg_overlay``."""
    cfg = model.pretrained_cfg
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
