"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers").

Written natively (timm has no LV-ViT) with the module and parameter names of the original
TokenLabeling code, so its published checkpoints load with ``strict=True``. Blocks are timm
``Block`` instances whose residual branches are scaled by ``1 / skip_lam`` through parameter-free
layer-scale modules, so the SPOT engine treats DeiT and LV-ViT alike.

Output: ``head(cls) + 0.5 * max over (kept) patch tokens of aux_head(token)``, the original
evaluation rule, used in training too so that both modes score the same function.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from spot.config import SpotConfig
from spot.engine import TokenState
from spot.models.base import SpotModelMixin, attach_spot


class ResidualScale(nn.Module):
    """Multiplies a residual branch by a constant (LV-ViT's ``1 / skip_lam``); no parameters."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class PatchEmbed4_2(nn.Module):  # noqa: N801 - the original class name
    """Convolutional stem: 7x7/2 conv, two 3x3 convs (BN + ReLU each), then a (p/2)x(p/2) projection."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        if patch_size % 2 or img_size % patch_size:
            raise ValueError(f"LV-ViT needs an even patch_size dividing img_size: {patch_size}, {img_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(64, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class LVViT(SpotModelMixin, nn.Module):
    """LV-ViT with token-labeling auxiliary head; dense until ``attach_spot`` gives it stages."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 16,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        skip_lam: float = 2.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed4_2(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        norm = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, drop_path=dpr, norm_layer=norm)
                for dpr in torch.linspace(0, drop_path_rate, depth).tolist()
            ]
        )
        for blk in self.blocks:
            blk.ls1 = ResidualScale(1.0 / skip_lam)
            blk.ls2 = ResidualScale(1.0 / skip_lam)
        self.norm = norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        attach_spot(self, SpotConfig(rho=None), embed_dim, num_heads)

    def embed_tokens(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def head_logits(self, x: Tensor, state: TokenState) -> Tensor:
        aux = self.aux_head(state.patches(x))
        keep = state.patch_keep()
        if keep is None:
            return self.head(x[:, 0]) + 0.5 * aux.amax(dim=1)
        # mask mode: the max runs over kept tokens only (none kept: no auxiliary term)
        best = aux.masked_fill(~keep[..., None], float("-inf")).amax(dim=1)
        return self.head(x[:, 0]) + 0.5 * torch.where(keep.any(1, keepdim=True), best, 0.0)

    def spot_filter(self, state_dict: dict) -> dict:
        return checkpoint_filter_fn(state_dict, self)

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay besides biases and norms (timm's convention)."""
        return {"pos_embed", "cls_token"}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def checkpoint_filter_fn(state_dict: dict, model: LVViT) -> dict:
    """Resample ``pos_embed`` when the checkpoint was trained at another resolution."""
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        side = int(math.sqrt(pos.shape[1] - 1))
        out["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=model.patch_embed.grid_size, old_size=(side, side), num_prefix_tokens=1
        )
    return out


def _cfg(url: str, **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.conv1",
        "classifier": "head",
        **kwargs,
    }


_RELEASES = "https://github.com/zihangJiang/TokenLabeling/releases/download"
default_cfgs = generate_default_cfgs(
    {
        "lvvit_t.in1k": _cfg(f"{_RELEASES}/v0.2.0/lvvit_t.pth"),
        "lvvit_s.in1k": _cfg(f"{_RELEASES}/1.0/lvvit_s-26M-224-83.3.pth.tar"),
    }
)


def _create_lvvit(variant: str, pretrained: bool = False, **kwargs) -> LVViT:
    return build_model_with_cfg(
        LVViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: 240 wide, 12 blocks, 4 heads, MLP ratio 3, skip_lam 1 (8.53 M parameters)."""
    args = dict(embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0)
    return _create_lvvit("lvvit_t", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 384 wide, 16 blocks, 6 heads, MLP ratio 3, skip_lam 2 (26.15 M parameters)."""
    args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0)
    return _create_lvvit("lvvit_s", pretrained=pretrained, **dict(args, **kwargs))
