"""Per-stage keep maps and the Fig. 3 drawing."""

import numpy as np
import pytest
import torch
from PIL import Image

from spot.visualize import PANEL_GAP, draw_token_masks, stage_keep_maps

PATCH = 8
# Non-square grid: 16 x 24 pixels -> 2 x 3 patches (N0 = 6), patch index = row * 3 + col.
HEIGHT, WIDTH = 16, 24
# One image, three stages: patch 5 dropped at stage 1, 4 at stage 2, 3 at stage 3; 0, 1, 2 kept.
STAGED = [torch.tensor([[4, 0, 3, 2, 1]]), torch.tensor([[1, 3, 0, 2]]), torch.tensor([[2, 0, 1]])]


def _patch(figure: np.ndarray, column: int, index: int, row: int = 0) -> np.ndarray:
    """Pixels of patch ``index`` in panel (row, column) of a drawn figure."""
    top = row * (HEIGHT + PANEL_GAP) + (index // 3) * PATCH
    left = column * (WIDTH + PANEL_GAP) + (index % 3) * PATCH
    return figure[top : top + PATCH, left : left + PATCH]


def _random_images(batch: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, HEIGHT, WIDTH), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_stage_keep_maps_hand_example():
    kept = [torch.tensor([[0, 2, 3, 5], [1, 2, 3, 4]]), torch.tensor([[3, 0], [4, 2]])]
    expected = torch.tensor(
        [
            [[1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 0, 0]],
            [[0, 1, 1, 1, 1, 0], [0, 0, 1, 0, 1, 0]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(stage_keep_maps(kept, num_patches=6), expected)


def test_stage_keep_maps_rejects_non_hierarchical_stage():
    kept = [torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[0, 3]])]
    with pytest.raises(ValueError, match="stage 3 keeps patches that stage 2 dropped"):
        stage_keep_maps(kept, num_patches=4)


def test_stage_keep_maps_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one stage"):
        stage_keep_maps([], num_patches=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        stage_keep_maps([torch.tensor([[0, 4]])], num_patches=4)
    with pytest.raises(ValueError, match="stage 2"):
        stage_keep_maps([torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0]])], num_patches=4)


def test_draw_writes_png_of_expected_size(tmp_path):
    path = tmp_path / "masks.png"
    images = _random_images(2)
    kept = [torch.cat([index, index]) for index in STAGED]
    figure = draw_token_masks(images, kept, PATCH, path)
    expected_size = (2 * WIDTH + PANEL_GAP, 2 * HEIGHT + PANEL_GAP)
    assert figure.size == expected_size
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == expected_size
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(figure))


def test_draw_per_stage_panels():
    images = torch.full((1, 3, HEIGHT, WIDTH), 200, dtype=torch.uint8)
    figure = np.asarray(draw_token_masks(images, STAGED, PATCH, per_stage=True))
    assert figure.shape == (HEIGHT, 4 * WIDTH + 3 * PANEL_GAP, 3)
    for stage in (1, 2, 3):
        shaded = [index for index in range(6) if (_patch(figure, stage, index) != 200).any()]
        assert shaded == [5, 4, 3][:stage][::-1]


def test_draw_dense_is_just_the_images():
    images = _random_images(2)
    figure = np.asarray(draw_token_masks(images, [], PATCH))
    assert figure.shape == (2 * HEIGHT + PANEL_GAP, WIDTH, 3)
    assert np.array_equal(figure[:HEIGHT], images[0].permute(1, 2, 0).numpy())
    assert np.array_equal(figure[HEIGHT + PANEL_GAP :], images[1].permute(1, 2, 0).numpy())


def test_earlier_drop_is_shaded_more_and_kept_patches_are_untouched():
    grey = torch.full((1, 3, HEIGHT, WIDTH), 200, dtype=torch.uint8)
    figure = np.asarray(draw_token_masks(grey, STAGED, PATCH))
    stage1, stage2, stage3 = (_patch(figure, 1, index).mean() for index in (5, 4, 3))
    assert stage1 > stage2 > stage3 > 200  # washed out toward white, the earliest drop most

    images = _random_images(1)
    figure = np.asarray(draw_token_masks(images, STAGED, PATCH))
    original = images[0].permute(1, 2, 0).numpy()
    assert np.array_equal(figure[:, :WIDTH], original)
    composite = figure[:, WIDTH + PANEL_GAP :]
    assert np.array_equal(composite[:PATCH], original[:PATCH])  # patches 0, 1, 2
    assert not np.array_equal(composite[PATCH:], original[PATCH:])


def test_small_images_are_enlarged_whole_pixels_and_patches():
    images = _random_images(1)
    small = np.asarray(draw_token_masks(images, STAGED, PATCH))
    large = np.asarray(draw_token_masks(images, STAGED, PATCH, min_side=3 * HEIGHT - 1))
    assert large.shape == (3 * HEIGHT, 2 * 3 * WIDTH + PANEL_GAP, 3)
    panels = [large[:, : 3 * WIDTH], large[:, 3 * WIDTH + PANEL_GAP :]]
    expected = [small[:, :WIDTH], small[:, WIDTH + PANEL_GAP :]]
    for panel, original in zip(panels, expected, strict=True):
        assert np.array_equal(panel, original.repeat(3, axis=0).repeat(3, axis=1))


def test_float_images_are_unnormalised():
    images = _random_images(1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    figure = np.asarray(draw_token_masks(normalised.float(), STAGED, PATCH, mean=mean, std=std))
    assert np.array_equal(figure[:, :WIDTH], images[0].permute(1, 2, 0).numpy())
    in_unit_range = np.asarray(draw_token_masks(images.float() / 255, STAGED, PATCH))
    assert np.array_equal(in_unit_range, figure)


def test_draw_rejects_mismatched_batch_and_half_normalisation():
    with pytest.raises(ValueError, match="2 images"):
        draw_token_masks(_random_images(2), STAGED, PATCH)
    with pytest.raises(ValueError, match="both mean and std"):
        draw_token_masks(_random_images(1).float(), STAGED, PATCH, mean=(0.5, 0.5, 0.5))
