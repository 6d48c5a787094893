"""Per-stage kept-token drawings (paper Fig. 3).

Dropped patches are washed out toward white (as in DynamicViT's figures; a dark shade would vanish on
dark backgrounds), earlier drops more: with K stages the wash's opacity goes linearly from
``FIRST_STAGE_ALPHA`` (dropped at stage 1) to ``LAST_STAGE_ALPHA`` (dropped at stage K); patches kept to
the end are left untouched, pixel for pixel.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SHADE_COLOUR = (255, 255, 255)
FIRST_STAGE_ALPHA = 0.85
LAST_STAGE_ALPHA = 0.35
PANEL_GAP = 4
BACKGROUND = (96, 96, 96)  # between panels: apart from both the images and the wash


def stage_keep_maps(kept_indices: list[Tensor], num_patches: int) -> Tensor:
    """``(B, K, N0)`` bool: which ORIGINAL patches stage k keeps, from its ``(B, k_s)`` original indices.

    Raises ValueError for an empty list (the batch size is unknown), out-of-range indices, and
    non-hierarchical stages (a stage keeping a patch that an earlier stage dropped).
    """
    if not kept_indices:
        raise ValueError("stage_keep_maps needs at least one stage of kept indices")
    batch = kept_indices[0].shape[0]
    maps = []
    for stage, indices in enumerate(kept_indices, start=1):
        if indices.ndim != 2 or indices.shape[0] != batch:
            raise ValueError(
                f"stage {stage}: kept indices must be (B={batch}, k_s), got {tuple(indices.shape)}"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= num_patches):
            raise ValueError(f"stage {stage}: kept indices must lie in [0, {num_patches})")
        keep = torch.zeros(batch, num_patches, dtype=torch.bool, device=indices.device)
        keep.scatter_(1, indices.long(), True)
        if maps and (keep & ~maps[-1]).any():
            raise ValueError(
                f"stage {stage} keeps patches that stage {stage - 1} dropped (masks must be hierarchical)"
            )
        maps.append(keep)
    return torch.stack(maps, dim=1)


def draw_token_masks(
    images: Tensor,
    kept_indices: list[Tensor],
    patch_size: int,
    path: str | os.PathLike | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    per_stage: bool = False,
    min_side: int = 0,
) -> Image.Image:
    """One figure: a row per image with the original and the stage-shaded composite (Fig. 3).

    ``images`` is ``(B, 3, H, W)`` uint8 or float in [0, 1] (or normalised, then pass ``mean``/``std``);
    the patch grid is ``(H // patch_size, W // patch_size)`` and pixels beyond it are left as they are.
    ``per_stage=True`` replaces the composite by one panel per stage k showing the patches dropped up to
    stage k (the last panel is the composite). With no stage (dense model) the figure is the images.
    Images smaller than ``min_side`` are enlarged by a whole factor (nearest pixel) so patches stay visible.
    The PNG is written to ``path`` if given.
    """
    pixels = _to_uint8(images, mean, std)
    scale = max(1, -(-min_side // min(pixels.shape[1:3])))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    patch_size *= scale
    batch, height, width, _ = pixels.shape
    grid = (height // patch_size, width // patch_size)
    num_stages = len(kept_indices)
    panels = [[image] for image in pixels]
    if num_stages:
        # Stages each patch survives (0..K); hierarchy makes this the stage before it is dropped.
        survived = stage_keep_maps(kept_indices, grid[0] * grid[1]).sum(dim=1).cpu().numpy()
        if survived.shape[0] != batch:
            raise ValueError(f"kept indices are for {survived.shape[0]} images, got {batch} images")
        alphas = np.append(np.linspace(FIRST_STAGE_ALPHA, LAST_STAGE_ALPHA, num_stages), 0.0)
        shown_stages = range(1, num_stages + 1) if per_stage else [num_stages]
        for row, image, stages in zip(panels, pixels, survived, strict=True):
            for shown in shown_stages:
                patch_alpha = np.where(stages < shown, alphas[stages], 0.0).reshape(grid)
                row.append(_shade(image, patch_alpha, patch_size))
    figure = _tile(panels, height, width)
    if path is not None:
        figure.save(path, format="PNG")
    return figure


def _to_uint8(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """``(B, 3, H, W)`` tensor -> ``(B, H, W, 3)`` uint8 array."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        if mean is not None:
            raise ValueError("mean/std un-normalise float images; got uint8 images")
    elif images.is_floating_point():
        images = images.double()
        if mean is not None:
            images = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        images = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.permute(0, 2, 3, 1).numpy()


def _shade(image: np.ndarray, patch_alpha: np.ndarray, patch_size: int) -> np.ndarray:
    """Blend each patch of ``image`` toward ``SHADE_COLOUR`` with its opacity in ``patch_alpha``."""
    alpha = np.zeros(image.shape[:2])
    grid_alpha = patch_alpha.repeat(patch_size, axis=0).repeat(patch_size, axis=1)
    alpha[: grid_alpha.shape[0], : grid_alpha.shape[1]] = grid_alpha
    alpha = alpha[..., None]
    blended = image * (1.0 - alpha) + np.asarray(SHADE_COLOUR, dtype=np.float64) * alpha
    return np.rint(blended).astype(np.uint8)


def _tile(panels: list[list[np.ndarray]], height: int, width: int) -> Image.Image:
    """Rows of equally sized panels on one canvas, ``PANEL_GAP`` pixels apart."""
    rows, cols = len(panels), len(panels[0])
    canvas = Image.new(
        "RGB", (cols * width + (cols - 1) * PANEL_GAP, rows * height + (rows - 1) * PANEL_GAP), BACKGROUND
    )
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            canvas.paste(Image.fromarray(panel), (c * (width + PANEL_GAP), r * (height + PANEL_GAP)))
    return canvas
