"""The built-in task where tokens matter: one real digit scan placed among clutter on a larger canvas.

Each sample is a ``CANVAS`` x ``CANVAS`` grey image: a scikit-learn digit scan (8 x 8, blown up to
``DIGIT_SIDE`` px) at a random place on the ``GRID`` px grid, and ``CLUTTER_PIECES`` fragments of other scans
of the same split (a random ``FRAGMENT`` x ``FRAGMENT`` window of a scan, blown up alike) anywhere else. The
label is the placed digit. With patch 8 the digit fills 4 of the 36 patches; the rest is clutter or empty,
so which tokens a model keeps decides whether it can still read the digit.

Scans are split 80/20 by scan (stratified, fixed), and clutter is cut from the split's own scans, so no scan
appears in both splits. Everything is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the
same canvases. Each sample's meta records the digit's box, from which its patches follow
(:func:`digit_patches`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CANVAS = 48
SCALE = 2  # scan pixel -> canvas pixels
DIGIT_SIDE = 8 * SCALE
GRID = 8  # the digit's corner lies on this grid
FRAGMENT = 3  # side of a clutter fragment in scan pixels
CLUTTER_PIECES = 8
VAL_FRACTION = 0.2
CANVASES_PER_SCAN = {"train": 8, "val": 5}
# Pixel mean / std of the train split on the [0, 1] scale (``pixel_stats("train")``, checked by the tests):
# the built-in preset's input normalisation. ImageNet's would put the empty background at about -2.
PIXEL_MEAN = 0.081
PIXEL_STD = 0.237
# What draws the canvases, recorded with the shards: built-in shards of another drawing are made again
TASK_PARAMS = {"canvas": CANVAS, "grid": GRID, "fragment": FRAGMENT, "clutter_pieces": CLUTTER_PIECES}


@dataclass(frozen=True)
class Canvas:
    """A sample: image, label, the digit's scan and box ``(top, left, side)``, the clutter's scans."""

    pixels: np.ndarray  # (CANVAS, CANVAS) uint8
    label: int
    scan: int
    box: tuple[int, int, int]
    clutter: tuple[int, ...]


def split_scans(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted scan indices of ``split`` (``train`` / ``val``: a fixed stratified split, ``VAL_FRACTION`` of
    the scans for validation), and scikit-learn's digits (images, targets)."""
    # lazy: scikit-learn takes a second to import and only making the built-in shards needs it; this module
    # is imported everywhere (the digits preset's normalisation), Ray workers included
    from sklearn.datasets import load_digits  # lazy (above)
    from sklearn.model_selection import train_test_split  # lazy (above)

    if split not in CANVASES_PER_SCAN:
        raise ValueError(f"cluttered digits has splits {tuple(CANVASES_PER_SCAN)}, not {split!r}")
    digits = load_digits()
    train, val = train_test_split(
        np.arange(len(digits.target)), test_size=VAL_FRACTION, stratify=digits.target, random_state=0
    )
    return np.sort(train if split == "train" else val), digits


def _blow_up(scan: np.ndarray) -> np.ndarray:
    return np.kron(scan, np.ones((SCALE, SCALE))).astype(np.float32)


def render(
    scan: np.ndarray, fragments: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A canvas with ``scan`` (8x8, 0-255) at a random place and ``fragments`` around it, and the box."""
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    top, left = (GRID * int(v) for v in rng.integers(0, (CANVAS - DIGIT_SIDE) // GRID + 1, size=2))
    side = FRAGMENT * SCALE
    for fragment in fragments:
        for _ in range(20):  # a place that leaves the digit's box (with a 1 px margin) untouched
            y, x = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
            apart = y + side <= top - 1 or y >= top + DIGIT_SIDE + 1 or x + side <= left - 1
            if apart or x >= left + DIGIT_SIDE + 1:
                window = canvas[y : y + side, x : x + side]
                np.maximum(window, _blow_up(fragment), out=window)
                break
    canvas[top : top + DIGIT_SIDE, left : left + DIGIT_SIDE] = _blow_up(scan)
    return np.clip(canvas, 0, 255).astype(np.uint8), (top, left, DIGIT_SIDE)


def make_canvases(
    split: str,
    seed: int = 0,
    *,
    draw: Callable = render,
    clutter_pieces: int = CLUTTER_PIECES,
    fragment: int = FRAGMENT,
    stream: tuple[int, ...] = (),
    per_scan: int | None = None,
) -> list[Canvas]:
    """``per_scan`` (default ``CANVASES_PER_SCAN[split]``) canvases per scan of ``split``, deterministic in
    ``seed``; with more per scan the first are the same. A variant of the task
    (:mod:`pipelines.data.hard_cluttered_digits`) passes its own ``draw`` (``render``'s signature), clutter
    count and fragment side, and a ``stream`` that keeps its random numbers apart."""
    scans, digits = split_scans(split)
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng([seed, list(CANVASES_PER_SCAN).index(split), *stream])
    out = []
    for _ in range(CANVASES_PER_SCAN[split] if per_scan is None else per_scan):
        for scan in scans:
            others = rng.choice(scans[scans != scan], size=clutter_pieces)
            fragments = []
            for other in others:
                y, x = (int(v) for v in rng.integers(0, 8 - fragment + 1, size=2))
                fragments.append(images[other, y : y + fragment, x : x + fragment])
            pixels, box = draw(images[scan], fragments, rng)
            clutter = tuple(int(o) for o in others)
            out.append(Canvas(pixels, int(digits.target[scan]), int(scan), box, clutter))
    return out


def digit_patches(box: tuple[int, int, int] | list[int], patch_size: int, canvas: int = CANVAS) -> list[int]:
    """Row-major indices of the ``patch_size`` patches that the digit's box ``(top, left, side)`` overlaps."""
    top, left, side = box
    grid = canvas // patch_size
    rows = range(top // patch_size, (top + side - 1) // patch_size + 1)
    cols = range(left // patch_size, (left + side - 1) // patch_size + 1)
    return [r * grid + c for r in rows for c in cols]


def pixel_stats(split: str, seed: int = 0) -> tuple[float, float]:
    """Mean and std of all pixels of ``split``'s canvases, on the [0, 1] scale."""
    pixels = np.stack([c.pixels for c in make_canvases(split, seed)]).astype(np.float64) / 255
    return float(pixels.mean()), float(pixels.std())
