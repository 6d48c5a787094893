"""Accuracy of a model over the val split of a shard directory, and the throughput of its forward."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import spot
from pipelines.data.loader import PAD_LABEL, make_loader
from pipelines.data.manifest import DataError, read_manifest


@torch.inference_mode()
def evaluate_model(model: nn.Module, data: str | Path, *, batch_size: int, device: torch.device) -> dict:
    """Exact top-1 / top-5 of ``model`` (eval mode) over the val split of ``data``."""
    config = model.spot_config
    img_size = config.get("img_size", 224)
    manifest = read_manifest(data)
    if manifest.num_classes != config["num_classes"]:
        raise DataError(
            f"{manifest.root}: {manifest.num_classes} classes, the model predicts {config['num_classes']}"
        )
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


@torch.inference_mode()
def measure_throughput(
    model: nn.Module, *, batch_size: int, device: torch.device, warmup: int = 3, min_time_s: float = 2.0
) -> float:
    """Images/s of ``model``'s forward on a random batch, timed over at least ``min_time_s``."""
    img_size = model.spot_config.get("img_size", 224)
    model = model.eval().to(device)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model(images)
    sync()
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time_s or runs < 3:
        model(images)
        sync()
        runs += 1
    return runs * batch_size / elapsed
