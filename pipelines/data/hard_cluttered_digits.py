"""A harder built-in task (``cluttered-digits-hard``): clutter as bright as the digit and over it, noise.

Each sample is a square grey canvas (a :class:`Drawing`): a scikit-learn digit scan (8 x 8, blown up to
``DIGIT_SIDE`` px) with its corner on the ``OFFSET_GRID`` px grid (the patch grid: 4 patches of 8 px), among
``clutter_pieces`` fragments of other scans of the same split, blown up alike, scaled to the digit's own
brightness and allowed to overlap its box (at most ``MAX_OVERLAP`` of a fragment's area lies inside it);
then Gaussian sensor noise (``NOISE_STD`` of full scale) on every pixel. Unlike
:mod:`pipelines.data.cluttered_digits`, the digit is no longer the one bright compact blob. (At any pixel
offset the small DeiT trained from scratch stays at chance: docs/benchmarks.md.)

Splits, seeds and meta are as in :mod:`pipelines.data.cluttered_digits` (split by scan, clutter from the
split's own scans, everything from ``numpy.random.default_rng``). The built-in sizes: :data:`TASK`, 64 px
(64 tokens of 8 px, ``cluttered-digits-hard``), and :data:`LARGE`, the same drawing on 96 px (144 tokens)
at the same clutter density (``cluttered-digits-hard-96``; docs/benchmarks.md: there, in the benchmark,
class attention is a poor relevance signal; through the pipeline the gap is smaller). A variant is another
:class:`Drawing` (``benchmarks/hard_task.py --clutter-pieces --fragment --canvas
--train-per-scan``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipelines.data import cluttered_digits
from pipelines.data.cluttered_digits import SCALE, Canvas

DIGIT_SIDE = 8 * SCALE
OFFSET_GRID = 8  # the digit's corner lies on this grid: the patch grid (docs/benchmarks.md: why not 1)
FRAGMENT = 6  # side of a clutter fragment in scan pixels (12 px: three quarters of a digit)
MAX_OVERLAP = 0.25  # largest fraction of a fragment's area inside the digit's box
NOISE_STD = 0.08  # Gaussian sensor noise, fraction of full scale
# JPEG quality of the canvases in the shards: at 100 a pixel is at most a grey level or so off the canvas as
# drawn; at the shard writer's 90 the compression (8 x 8 blocks, on the patch grid) smooths the noise, and it
# changed the task (docs/benchmarks.md, the harder task: the pipeline's class attention did better there)
JPEG_QUALITY = 100
TRAIN_PER_SCAN = cluttered_digits.CANVASES_PER_SCAN["train"]  # training canvases per scan, by default


def _blow_up(scan: np.ndarray) -> np.ndarray:
    return np.kron(scan.astype(np.float32), np.ones((SCALE, SCALE), np.float32))


def _overlap(y: int, x: int, side: int, top: int, left: int) -> float:
    """Fraction of the fragment at ``(y, x)`` that lies inside the digit's box."""
    dy = max(0, min(y + side, top + DIGIT_SIDE) - max(y, top))
    dx = max(0, min(x + side, left + DIGIT_SIDE) - max(x, left))
    return dy * dx / (side * side)


def render(
    scan: np.ndarray, fragments: list[np.ndarray], rng: np.random.Generator, *, side: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A ``side`` x ``side`` canvas with ``scan`` (8x8, 0-255) at a random place on the ``OFFSET_GRID``
    grid, ``fragments`` over and around it, noise; and the digit's box."""
    canvas = np.zeros((side, side), np.float32)
    places = (side - DIGIT_SIDE) // OFFSET_GRID + 1
    top, left = (OFFSET_GRID * int(v) for v in rng.integers(0, places, size=2))
    digit = _blow_up(scan)
    canvas[top : top + DIGIT_SIDE, left : left + DIGIT_SIDE] = digit
    peak = float(digit.max())
    for fragment in fragments:
        piece = _blow_up(fragment)
        piece_side = piece.shape[0]
        piece *= peak / max(float(piece.max()), 1.0)  # as bright as the digit
        for _ in range(20):
            y, x = (int(v) for v in rng.integers(0, side - piece_side + 1, size=2))
            if _overlap(y, x, piece_side, top, left) <= MAX_OVERLAP:
                window = canvas[y : y + piece_side, x : x + piece_side]
                np.maximum(window, piece, out=window)
                break
    canvas += rng.normal(0.0, NOISE_STD * 255, size=canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), (top, left, DIGIT_SIDE)


@dataclass(frozen=True)
class Drawing:
    """One size of the task: the canvas side, the clutter on it (``clutter_pieces`` fragments of
    ``fragment`` x ``fragment`` scan pixels), the pixel mean / std of its train split (:meth:`pixel_stats`,
    seed 0) that its inputs are normalised by, and how many training canvases it draws per scan."""

    canvas: int
    clutter_pieces: int
    pixel_mean: float
    pixel_std: float
    fragment: int = FRAGMENT
    train_per_scan: int = TRAIN_PER_SCAN

    def __post_init__(self) -> None:
        if self.canvas < DIGIT_SIDE:
            raise ValueError(f"canvas {self.canvas}: a canvas must hold the {DIGIT_SIDE} px digit")
        if self.train_per_scan < 1:
            raise ValueError(f"train_per_scan {self.train_per_scan}: at least one canvas per scan")

    @property
    def task_params(self) -> dict:
        """What draws and stores the canvases, recorded with the shards: built-in shards of another are made
        again. The training canvases per scan only where they are not the default (shards made before the
        count could differ are still the default's)."""
        params = {"canvas": self.canvas, "offset_grid": OFFSET_GRID, "fragment": self.fragment,
                  "clutter_pieces": self.clutter_pieces, "max_overlap": MAX_OVERLAP, "noise_std": NOISE_STD,
                  "jpeg_quality": JPEG_QUALITY}
        if self.train_per_scan != TRAIN_PER_SCAN:
            params["train_per_scan"] = self.train_per_scan
        return params

    def make_canvases(self, split: str, seed: int = 0) -> list[Canvas]:
        """The canvases of ``split`` (its scans; ``train_per_scan`` canvases per scan of the train split),
        drawn by :func:`render`, deterministic in ``seed``."""
        draw = functools.partial(render, side=self.canvas)
        return cluttered_digits.make_canvases(split, seed, draw=draw, clutter_pieces=self.clutter_pieces,
                                              fragment=self.fragment, stream=(1,),
                                              per_scan=self.train_per_scan if split == "train" else None)

    def pixel_stats(self, split: str, seed: int = 0) -> tuple[float, float]:
        """Mean and std of all pixels of ``split``'s canvases, on the [0, 1] scale."""
        canvases = self.make_canvases(split, seed)
        total = squares = 0.0  # canvas by canvas: a float64 copy of a whole 96 px split is GBs
        for c in canvases:
            pixels = c.pixels.astype(np.float64) / 255
            total += float(pixels.sum())
            squares += float(np.square(pixels).sum())
        count = len(canvases) * self.canvas * self.canvas
        mean = total / count
        return mean, float(np.sqrt(max(squares / count - mean * mean, 0.0)))


# The built-in sizes; their pixel mean / std are their train splits' (checked by the tests).
# 64 px: 64 tokens of 8 px, 28 fragments (``cluttered-digits-hard``)
TASK = Drawing(canvas=64, clutter_pieces=28, pixel_mean=0.326, pixel_std=0.381)
TASK_PARAMS = TASK.task_params
# 96 px: 144 tokens; 63 fragments keep the 64 px task's density (``cluttered-digits-hard-96``). Its dense
# model needs the steps of 16 epochs of an 8-per-scan split and overfits one such set of canvases
# (docs/benchmarks.md, 144 tokens), so it draws 4 x as many.
LARGE = Drawing(canvas=96, clutter_pieces=63, pixel_mean=0.323, pixel_std=0.380, train_per_scan=32)
# the built-in sources (--source) these drawings make
SOURCES = {"cluttered-digits-hard": TASK, "cluttered-digits-hard-96": LARGE}
