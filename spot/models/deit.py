"""DeiT-T/S/B from timm, made sparse in place (in the manner of ToMe's timm patch).

The model keeps its timm class (as a base), module names and state_dict keys, so timm and the
original DeiT checkpoints load as they are; SPOT adds only ``spot_predictors.*``.
"""

from __future__ import annotations

from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import Tensor

from spot.config import SpotConfig
from spot.engine import TokenState
from spot.models.base import SpotModelMixin, attach_spot

TIMM_NAMES = {
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
}


class SpotVisionTransformerMixin(SpotModelMixin):
    """The SPOT forward for a timm ``VisionTransformer`` with a class token."""

    def embed_tokens(self, x: Tensor) -> Tensor:
        x = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))

    def head_logits(self, x: Tensor, state: TokenState) -> Tensor:
        return self.forward_head(x)  # token pooling reads the class token only

    def spot_filter(self, state_dict: dict) -> dict:
        """Adapt a timm/DeiT checkpoint (e.g. resample ``pos_embed`` for another image size)."""
        return vit_checkpoint_filter_fn(state_dict, self)


_CLASSES: dict[type, type] = {}


def _spot_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Spot{cls.__name__}", (SpotVisionTransformerMixin, cls), {})
    return _CLASSES[cls]


def patch_vit(model: VisionTransformer, cfg: SpotConfig) -> VisionTransformer:
    """Make a timm ``VisionTransformer`` sparse in place; returns the same object."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"SPOT patches timm VisionTransformer models, got {type(model).__name__}")
    unsupported = {
        "a class token": model.cls_token is not None and model.num_prefix_tokens == 1,
        "class-token pooling": model.global_pool == "token" and model.attn_pool is None,
        "a fixed image size": not getattr(model, "dynamic_img_size", False),
        "standard blocks": all(
            isinstance(b, Block) and isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp)
            for b in model.blocks
        ),
    }
    missing = [need for need, ok in unsupported.items() if not ok]
    if missing:
        raise ValueError(f"SPOT needs a ViT with {', '.join(missing)}")
    model.__class__ = _spot_class(model.__class__)
    return attach_spot(model, cfg, model.embed_dim, model.blocks[0].attn.num_heads)
