"""What every SPOT backbone shares: the mode switch, the sparse forward, the relevance modules."""

from __future__ import annotations

from torch import Tensor, nn

from spot.blocks import make_blocks_spot_aware
from spot.config import MODES, SpotConfig
from spot.engine import SpotInfo, TokenState, run_blocks
from spot.relevance import TokenRelevance
from spot.selectors import num_descriptors


class SpotModelMixin:
    """Mixed into a backbone class whose instances have ``blocks``, ``norm`` and ``patch_embed``.

    The backbone supplies ``embed_tokens(x) -> (B, 1 + N0, C)`` and ``head_logits(x, state)``.
    ``train()`` selects mask mode and ``eval()`` prune mode; ``set_mode`` overrides either.
    """

    spot_options: SpotConfig
    spot_mode: str
    spot_predictors: nn.ModuleList | None

    def train(self, mode: bool = True):  # noqa: D102 - nn.Module.train, plus the SPOT mode
        super().train(mode)
        self.spot_mode = "mask" if mode else "prune"
        return self

    def stage_predictor(self, k: int) -> nn.Module | None:
        if self.spot_predictors is None:
            return None
        return self.spot_predictors[0 if self.spot_options.shared_predictor else k]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def check_input(self, x: Tensor) -> None:
        expected = tuple(self.patch_embed.img_size)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"expected images of shape (B, 3, {expected[0]}, {expected[1]}), got {tuple(x.shape)}; "
                f"build the model with img_size={x.shape[-1]} to use another resolution"
            )

    def forward_spot(self, x: Tensor) -> tuple[Tensor, TokenState]:
        """Embedded, sparsified and final-normed tokens, with the forward pass's token decisions."""
        self.check_input(x)
        x, state = run_blocks(self, self.embed_tokens(x), self.num_patches)
        return self.norm(x), state

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_spot(x)[0]

    def forward(self, x: Tensor, return_info: bool = False) -> Tensor | tuple[Tensor, SpotInfo]:
        x, state = self.forward_spot(x)
        logits = self.head_logits(x, state)
        return (logits, state.finish(x)) if return_info else logits


def attach_spot(model: nn.Module, cfg: SpotConfig, dim: int, num_heads: int) -> nn.Module:
    """Give ``model`` its SPOT config, mode and (for the learned selector) relevance modules."""
    depth = len(model.blocks)
    if not cfg.dense and max(cfg.stage_blocks) >= depth:
        raise ValueError(f"stage_blocks {cfg.stage_blocks} do not fit a {depth}-block model")
    make_blocks_spot_aware(model.blocks, cfg.mask_grad)
    model.spot_options = cfg
    model.spot_mode = "mask" if model.training else "prune"
    model.spot_predictors = None
    if not cfg.dense and cfg.selector == "learned":
        d_remap = dim if cfg.d_remap is None else cfg.d_remap
        n = 1 if cfg.shared_predictor else cfg.num_stages
        desc = num_descriptors(cfg, num_heads)
        model.spot_predictors = nn.ModuleList(TokenRelevance(dim, desc, d_remap) for _ in range(n))
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Force ``"mask"`` (training-style masking) or ``"prune"`` (token removal), whatever train/eval says."""
    if mode not in MODES:
        raise ValueError(f"unknown SPOT mode {mode!r}; choose one of {MODES}")
    getattr(model, "module", model).spot_mode = mode  # through a DDP wrapper too
    return model
