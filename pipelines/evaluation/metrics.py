"""Accuracy of a model over the val split of a shard directory, the throughput of its forward (one model,
or several timed in a separate phase: interleaved repeats, median and spread), and the numbers of one row
of the evaluate and compare tables."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

import spot
from pipelines.data.loader import PAD_LABEL, make_loader, verify_rank_shards
from pipelines.data.manifest import DataError, read_manifest


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: str | Path, *, batch_size: int, device: torch.device) -> dict:
    """Exact top-1 / top-5 of ``model`` (eval mode) over the val split of ``data``, its shards checked
    against the manifest's checksums first (:class:`~pipelines.data.manifest.DataError` naming a bad one)."""
    config = model.spot_config
    img_size = config.get("img_size", 224)
    manifest = read_manifest(data)
    if manifest.num_classes != config["num_classes"]:
        raise DataError(
            f"{manifest.root}: {manifest.num_classes} classes, the model predicts {config['num_classes']}"
        )
    verify_rank_shards(data, ("val",), 0, 1)  # a corrupt tar can crash DALI's reader outright
    loader = make_loader(data, "val", batch_size=batch_size, img_size=img_size, train=False, device=device,
                         **spot.input_normalization(model))
    model = model.eval().to(device)
    seen = top1 = top5 = 0
    for images, labels in loader:
        valid = labels != PAD_LABEL
        top = model(images[valid]).topk(min(5, config["num_classes"]), dim=1).indices
        hits = top == labels[valid, None]
        seen += int(valid.sum())
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
    return {"top1": top1 / seen, "top5": top5 / seen, "samples": seen}


def model_row(model: nn.Module, data: str | Path, *, batch_size: int, device: torch.device) -> dict:
    """``top1``, ``top5``, ``samples`` (:func:`evaluate_model`) and ``gmacs`` (``spot.gmacs`` at the
    model's image size) of ``model``: the accuracy columns of an evaluate or compare row."""
    row = evaluate_model(model, data, batch_size=batch_size, device=device)
    row["gmacs"] = spot.gmacs(model, model.spot_config.get("img_size", 224))
    return row


MAX_SPREAD = 0.2  # a throughput whose repeats spread wider than this (relative to the median) is noise


@torch.inference_mode()
def measure_throughputs(
    models: list[nn.Module], *, batch_size: int, device: torch.device, repeats: int = 5, warmup: int = 3,
    burst_s: float = 0.5,
) -> list[dict]:
    """Images/s of each model's forward, measured apart from any accuracy pass: every model warmed up, then
    ``repeats`` rounds that time each model in turn for one burst of at least ``burst_s`` (interleaved, so a
    stall of the machine hits a round, not one model). Per model: ``images_per_s`` (median of the rounds),
    ``images_per_s_spread`` ((max - min) / median) and ``noisy`` (spread above :data:`MAX_SPREAD`)."""
    batches = []
    for model in models:
        size = model.spot_config.get("img_size", 224)
        model.eval().to(device)
        batches.append(torch.randn(batch_size, 3, size, size, device=device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for model, images in zip(models, batches, strict=True):
        for _ in range(warmup):
            model(images)
    sync()
    rounds: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (model, images) in enumerate(zip(models, batches, strict=True)):
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < burst_s or runs < 1:
                model(images)
                sync()
                runs += 1
            rounds[i].append(runs * batch_size / elapsed)
    results = []
    for values in rounds:
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median
        results.append({"images_per_s": median, "images_per_s_spread": spread, "noisy": spread > MAX_SPREAD})
    return results


def images_per_s_cell(row: dict) -> str:
    """A :func:`measure_throughputs` result as a table cell: the median and ± half the range of the rounds,
    or "noisy" and the half range where the rounds spread too wide to give a figure."""
    half_range = f"±{100 * row['images_per_s_spread'] / 2:.0f} %"
    return f"noisy ({half_range})" if row["noisy"] else f"{row['images_per_s']:.0f} {half_range}"
