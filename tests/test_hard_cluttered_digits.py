"""The harder built-in task: the digit on the patch grid, clutter as bright as it and over it, noise."""

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipelines.data import hard_cluttered_digits as hard
from pipelines.data.cluttered_digits import digit_patches
from pipelines.data.manifest import read_manifest
from pipelines.data.shards import JPEG_QUALITY, Item, encode, write_shards
from pipelines.training.config import BUILTIN_TASKS, make_builtin_data, resolve_config
from tests.scripts import load_script
from tests.shard_reading import split_samples

ROOT = Path(__file__).resolve().parent.parent
SCANS = {"train": 1437, "val": 360}  # scikit-learn's 1797 digit scans, split 80 / 20


@pytest.fixture(scope="module")
def canvases():
    return hard.TASK.make_canvases("val")


def test_digit_on_the_patch_grid_anywhere_among_clutter_as_bright_as_it(canvases):
    boxes = np.array([c.box for c in canvases])
    assert (boxes[:, :2] % hard.OFFSET_GRID == 0).all() and hard.OFFSET_GRID == 8
    assert all(len(digit_patches(c.box, 8, hard.TASK.canvas)) == 4 for c in canvases)  # of 64 tokens
    places = {(int(t), int(left)) for t, left in boxes[:, :2]}
    side = hard.TASK.canvas
    assert len(places) == ((side - hard.DIGIT_SIDE) // 8 + 1) ** 2  # every place of the grid is used
    scans = load_digits().images * (255 / 16)
    overlapped, bright = 0, 0
    for c in canvases[:300]:
        top, left, side = c.box
        pixels = c.pixels.astype(np.float32)
        outside = pixels.copy()
        outside[top : top + side, left : left + side] = 0
        inside = pixels[top : top + side, left : left + side]
        bright += outside.max() >= 0.9 * inside.max()
        rest = np.ones_like(pixels, bool)
        rest[top : top + side, left : left + side] = False
        noise = pixels[rest][pixels[rest] < 60].std()  # the background carries sensor noise
        assert noise > 0.03 * 255
        blank = np.kron(scans[c.scan], np.ones((2, 2))) == 0  # where the digit itself has no ink
        overlapped += (inside[blank] > 150).any()  # clutter drawn inside the digit's box
    assert bright / 300 > 0.95 and overlapped / 300 > 0.25  # clutter ink inside the box: a third of them


def test_same_seed_same_canvases_and_shards_hold_the_boxes_and_pixels(tmp_path, canvases):
    again = hard.TASK.make_canvases("val")[:20]
    for a, b in zip(canvases[:20], again, strict=True):
        assert np.array_equal(a.pixels, b.pixels) and a.box == b.box
    write_shards("cluttered-digits-hard", tmp_path, split="val", shard_size=2000, workers=1)
    samples = split_samples(tmp_path, "val")
    assert len(samples) == read_manifest(tmp_path).counts["val"] == len(canvases)
    meta = json.loads(samples[0]["json"])
    image = np.asarray(Image.open(io.BytesIO(samples[0]["jpg"])).convert("L"))
    side = hard.TASK.canvas
    assert image.shape == (side, side) and meta["source"].startswith("cluttered-digits-hard:")
    assert len(meta["digit_box"]) == 3
    # the pixels as drawn: the shard writer's default JPEG quality smooths the sensor noise in 8 x 8 blocks
    # (the patch grid), which changed what the pipeline's models learned (docs/benchmarks.md, the harder task)
    assert read_manifest(tmp_path).info["val"]["params"]["task"]["jpeg_quality"] == hard.JPEG_QUALITY == 100
    drawn = {f"cluttered-digits-hard:{c.scan}:{i}": c.pixels.astype(int) for i, c in enumerate(canvases)}
    stored = np.stack([decoded(s["jpg"]) for s in samples[:300]])
    originals = np.stack([drawn[json.loads(s["json"])["source"]] for s in samples[:300]])[..., None]
    assert np.abs(stored - originals).max() <= 1  # every channel of every pixel: at most one grey level off
    default = np.stack([decoded(encode(Item("c", 0, pixels=c.astype(np.uint8)), None)[0])  # at JPEG_QUALITY
                        for c in originals[..., 0]])
    assert JPEG_QUALITY == 90 and np.sqrt(((default - originals) ** 2).mean()) > 2  # what the old shards held


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


# sha256 of the val split's pixels (seed 0) as drawn at 8fdc800, before the canvas side became an option.
# Shards record TASK_PARAMS and are made again only when those change: a change of the drawing must change
# TASK_PARAMS and this pin together.
VAL_PIXELS_SHA256 = "7470896b5d75f523b0a8b2511f11d9149b7f44e52c2c302a40d34e10b49e543d"


def test_the_built_in_canvases_are_the_ones_the_recorded_task_params_stand_for(canvases):
    assert hashlib.sha256(np.stack([c.pixels for c in canvases]).tobytes()).hexdigest() == VAL_PIXELS_SHA256


def test_a_larger_canvas_holds_the_same_digit_among_more_tokens():
    """``LARGE`` (benchmarks/hard_task.py --canvas 96 --clutter-pieces 63): 96 px canvases, the digit's box
    inside it on the patch grid, 4 of its 144 tokens, at every place of the grid."""
    larger = hard.LARGE.make_canvases("val")
    assert {c.pixels.shape for c in larger} == {(96, 96)}
    boxes = np.array([c.box for c in larger])
    assert (boxes[:, :2] % 8 == 0).all() and (boxes[:, :2] + hard.DIGIT_SIDE <= 96).all()
    assert {int(t) for t in boxes[:, 0]} == set(range(0, 96 - hard.DIGIT_SIDE + 1, 8))
    assert all(len(digit_patches(c.box, 8, 96)) == 4 for c in larger)
    with pytest.raises(ValueError, match="canvas 8: a canvas must hold the 16 px digit"):
        hard.Drawing(canvas=8, clutter_pieces=1, pixel_mean=0.3, pixel_std=0.4)
    with pytest.raises(ValueError, match="train_per_scan 0: at least one canvas per scan"):
        hard.Drawing(canvas=96, clutter_pieces=1, pixel_mean=0.3, pixel_std=0.4, train_per_scan=0)


def test_the_benchmark_refuses_a_canvas_off_the_patch_grid_and_rates_it_does_not_compare(capsys):
    bench = load_script("benchmarks/hard_task.py")
    refusals = {("--canvas", "60"): "--canvas must be a multiple of 8 px of at least 16, not 60",
                ("--canvas", "8"): "--canvas must be a multiple of 8 px of at least 16, not 8",
                ("--train-per-scan", "0"): "--train-per-scan must be at least 1, not 0",
                ("--rho", "0.7", "0.6"): "--rho: several fine-tuning rates must be the compared ones, "
                                         "0.7 0.5; not 0.7 0.6"}
    for argv, message in refusals.items():
        with pytest.raises(SystemExit) as stop:
            bench.main(list(argv))
        assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")


def test_the_benchmark_takes_a_built_in_drawing_s_statistics_and_measures_a_variant_s(monkeypatch):
    """Asked for a built-in size, the benchmark uses its recorded statistics (no pass over its train split);
    a variant is normalised by its own."""
    bench = load_script("benchmarks/hard_task.py")
    with monkeypatch.context() as patch:
        patch.setattr(hard.Drawing, "pixel_stats", lambda *_: pytest.fail("a pass over a built-in split"))
        assert bench.builtin_or_variant(replace(hard.TASK, pixel_mean=0.0, pixel_std=1.0)) is hard.TASK
        assert bench.builtin_or_variant(replace(hard.TASK, canvas=96, clutter_pieces=63, train_per_scan=32)) \
            is hard.LARGE
    asked = replace(hard.TASK, clutter_pieces=8, train_per_scan=1)
    variant = bench.builtin_or_variant(asked)
    assert replace(variant, pixel_mean=0.0, pixel_std=1.0) == replace(asked, pixel_mean=0.0, pixel_std=1.0)
    assert (variant.pixel_mean, variant.pixel_std) == asked.pixel_stats("train")
    assert variant.pixel_mean < hard.TASK.pixel_mean - 0.01  # fewer bright fragments: a darker mean


@pytest.mark.parametrize("drawing", [hard.TASK, hard.LARGE], ids=["64px", "96px"])
def test_preset_normalisation_is_the_train_split_statistics(drawing):
    mean, std = drawing.pixel_stats("train")
    assert mean == pytest.approx(drawing.pixel_mean, abs=5e-4)
    assert std == pytest.approx(drawing.pixel_std, abs=5e-4)


def test_pixel_stats_summed_canvas_by_canvas_are_numpys_over_the_whole_split(canvases):
    pixels = np.stack([c.pixels for c in canvases]).astype(np.float64) / 255
    assert hard.TASK.pixel_stats("val") == pytest.approx((pixels.mean(), pixels.std()), rel=1e-9)


def test_the_64_px_task_records_what_its_shards_were_made_with():
    """Shards of the 64 px task made before the 96 px one existed record these: they are kept, not made
    again (a change here remakes every user's shards, as a change of the drawing must)."""
    assert hard.TASK_PARAMS == {"canvas": 64, "offset_grid": 8, "fragment": 6, "clutter_pieces": 28,
                                "max_overlap": 0.25, "noise_std": 0.08, "jpeg_quality": 100}
    assert hard.LARGE.task_params == {**hard.TASK_PARAMS, "canvas": 96, "clutter_pieces": 63,
                                      "train_per_scan": 32}


@pytest.mark.parametrize(("source", "drawing", "epochs", "per_scan", "tuning_epochs"),
                         [("cluttered-digits-hard", hard.TASK, 6, 8, 2),
                          ("cluttered-digits-hard-96", hard.LARGE, 4, 32, 1)])
def test_source_option_makes_the_hard_shards_with_its_own_preset_and_model_names(
    tmp_path, source, drawing, epochs, per_scan, tuning_epochs
):
    make_builtin_data({"source": source}, cwd=tmp_path)
    config = resolve_config({"source": source, "dense": True}, cwd=tmp_path)
    assert config.data == str(tmp_path / "data" / source)
    manifest = read_manifest(config.data)
    params = manifest.info["val"]["params"]
    assert params["source"] == source and params["task"] == drawing.task_params
    assert manifest.counts == {"train": per_scan * SCANS["train"], "val": 5 * SCANS["val"]}
    side = drawing.canvas
    assert (config.img_size, config.mean, config.std) == (side, [drawing.pixel_mean] * 3,
                                                          [drawing.pixel_std] * 3)
    first = split_samples(config.data, "val")[0]
    assert decoded(first["jpg"]).shape == (side, side, 3)
    assert len(digit_patches(json.loads(first["json"])["digit_box"], 8, side)) == 4  # of (side / 8)^2 tokens
    preset = BUILTIN_TASKS[source]  # the dense recipe that learns the task
    assert (config.epochs, config.lr, config.batch_size) == (epochs, 5e-4, 32) == (
        preset["epochs"], preset["lr"], preset["batch_size"])
    if drawing is hard.LARGE:  # the steps of 16 epochs over 8 canvases a scan, on 4 x as many distinct ones
        assert manifest.counts["train"] * epochs == 16 * 8 * SCANS["train"]
    weights = tmp_path / "dense.pt"  # resolve_config only checks that it is a file
    weights.touch()
    tuned = resolve_config({"source": source, "pretrained": str(weights), "rho": 0.5}, cwd=tmp_path)
    # a sparse run from --pretrained takes the demo's fine-tuning recipe, as finetune.py runs it by hand
    assert (tuned.epochs, tuned.lr, tuned.predictor_lr, tuned.freeze_epochs, tuned.warmup_epochs) == (
        tuning_epochs, 1e-4, 1e-3, 0, 0.25)
    assert (tuned.img_size, tuned.batch_size) == (side, 32)  # the task's, as in the dense run
    given = resolve_config({"source": source, "pretrained": str(weights), "rho": 0.5, "epochs": 3,
                            "lr": 5e-4}, cwd=tmp_path)
    assert (given.epochs, given.lr) == (3, 5e-4)  # given options win
    assert given.predictor_lr == pytest.approx(5e-3)  # the predictors' 10 x the lr given
    continued = resolve_config({"source": source, "pretrained": str(weights), "dense": True}, cwd=tmp_path)
    assert (continued.epochs, continued.lr) == (epochs, 5e-4)  # a dense run keeps the dense recipe
    assert config.register_as == f"spot-deit_t-dense-{source}"  # apart from the digits' models
    spot_run = resolve_config({"source": source, "selector": "cls_attn_avg"}, cwd=tmp_path)
    assert spot_run.register_as == f"spot-deit_t-cls-attn-{source}"
