"""The cluttered-digits source: deterministic, split by scan, labels and digit boxes that hold."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipelines.data.cluttered_digits import (
    CANVAS,
    PIXEL_MEAN,
    PIXEL_STD,
    digit_patches,
    make_canvases,
    pixel_stats,
)
from pipelines.data.manifest import read_manifest
from pipelines.data.shards import write_shards
from tests.shard_reading import split_samples

PATCH = 8


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluttered")
    write_shards("cluttered-digits", out, split="val", shard_size=700, workers=1)
    return out


def test_same_seed_gives_byte_identical_shards_and_another_seed_other_canvases(val_dir, tmp_path):
    write_shards("cluttered-digits", tmp_path, split="val", shard_size=700, workers=1)
    for tar in read_manifest(val_dir).shards("val"):
        assert (tmp_path / tar.name).read_bytes() == tar.read_bytes()
    first, other = make_canvases("val", seed=0)[:50], make_canvases("val", seed=1)[:50]
    assert [c.scan for c in first] == [c.scan for c in other]  # same scans, drawn anew
    assert not all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first, other, strict=True))


def test_splits_share_no_scan_as_digit_or_clutter():
    def scans(split: str) -> set[int]:
        return {s for c in make_canvases(split) for s in (c.scan, *c.clutter)}

    train, val = scans("train"), scans("val")
    assert not train & val
    assert len(train) + len(val) == len(load_digits().target)  # every scan used, each in one split


def test_labels_boxes_and_background_from_the_meta(val_dir):
    digits = load_digits()
    samples = split_samples(val_dir, "val")
    assert len(samples) == read_manifest(val_dir).counts["val"] == 5 * 360
    background = []
    for sample in samples:
        meta = json.loads(sample["json"])
        assert int(np.frombuffer(sample["lbl"], "<i4")[0]) == meta["label"] == digits.target[meta["scan"]]
        top, left, side = meta["digit_box"]
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=np.float32)
        assert image.shape == (CANVAS, CANVAS)
        scan = np.kron(digits.images[meta["scan"]] * (255 / 16), np.ones((2, 2)))
        assert np.abs(image[top : top + side, left : left + side] - scan).mean() < 8  # JPEG, quality 90
        box = np.zeros((CANVAS, CANVAS), bool)
        box[top : top + side, left : left + side] = True
        grid = CANVAS // PATCH
        touched = box.reshape(grid, PATCH, grid, PATCH).any(axis=(1, 3)).ravel()  # patches the box touches
        assert sorted(np.flatnonzero(touched)) == digit_patches(meta["digit_box"], PATCH)
        background.append(1.0 - touched.mean())
    assert min(background) >= 0.75  # at least three quarters of the patches hold no part of the digit


def test_preset_normalisation_is_the_train_split_statistics():
    mean, std = pixel_stats("train")
    assert mean == pytest.approx(PIXEL_MEAN, abs=5e-4) and std == pytest.approx(PIXEL_STD, abs=5e-4)


def test_more_canvases_per_scan_begin_with_the_fewer():
    """``per_scan`` (``hard_cluttered_digits.Drawing.train_per_scan``) extends a split: its first canvases are
    the default count's, so a larger train split holds the smaller one."""
    fewer, more = make_canvases("val"), make_canvases("val", per_scan=6)
    assert (len(fewer), len(more)) == (5 * 360, 6 * 360)  # 360 val scans
    for a, b in zip(fewer, more[: len(fewer)], strict=True):
        assert np.array_equal(a.pixels, b.pixels) and a.box == b.box and a.clutter == b.clutter
