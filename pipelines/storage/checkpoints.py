"""A training checkpoint directory: what it holds, writing and reading it, and picking the best one.

``model.pt`` (state_dict) and ``spot_config.json`` (architecture: ``spot.create_model(**spot_config)``) are
what the registry and evaluation need; ``train_state.pt`` (optimizer, scheduler, scaler, epoch) is what a
restart needs; ``metrics.json`` is the epoch's report and ``token_masks.png`` its figure (SPOT models).
Everything is read with ``weights_only=True``: no code is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import spot

MODEL_FILE = "model.pt"
CONFIG_FILE = "spot_config.json"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
MASKS_FILE = "token_masks.png"
MASKS_MIN_SIDE = 128  # token-mask figures enlarge smaller images to this side so patches stay visible
SCORE = "val_acc1"  # what "best" means: validation top-1
URI_SCHEMES = {"s3": "s3://", "gcs": "gs://"}  # pyarrow file system type -> URI scheme of its paths


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer, scheduler, scaler, epoch: int, metrics: dict
) -> None:
    """Write what a restart or the registry needs: weights + architecture apart from the training state."""
    net = unwrap(model)
    torch.save(net.state_dict(), directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(net.spot_config, indent=1))
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    torch.save(state, directory / STATE_FILE)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=1))


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, scaler) -> int:
    """Restore a :func:`save_checkpoint` directory into a training run; returns its epoch."""
    unwrap(model).load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(spot_config, state_dict)`` of a checkpoint directory; raises FileNotFoundError naming the file."""
    directory = Path(directory)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a SPOT checkpoint: {name} is missing")
    config = json.loads((directory / CONFIG_FILE).read_text())
    return config, torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)


def build_model(config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model of ``spot_config`` (any saved format: ``spot.upgrade_saved_config``) with ``state``
    loaded, in eval (prune) mode. Raises ``ValueError``
    naming the keys where weights and architecture disagree."""
    model = spot.create_model(**spot.upgrade_saved_config(config))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("shape (weights vs architecture)", shapes)) if keys]
        raise ValueError(f"weights do not fit the architecture {config.get('name')} of {CONFIG_FILE}: "
                         + "; ".join(parts))
    model.load_state_dict(state)
    return model.eval()


def model_from_checkpoint(directory: str | Path) -> nn.Module:
    """Rebuild a checkpoint's model in eval (prune) mode."""
    return build_model(*read_checkpoint(directory))


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train ``Checkpoint`` is: its local path, or a URI with its file system's scheme
    (``s3://bucket/...``; Ray's ``Checkpoint.path`` alone has none)."""
    scheme = URI_SCHEMES.get(checkpoint.filesystem.type_name)
    return checkpoint.path if scheme is None else scheme + checkpoint.path


def best_checkpoint(result) -> tuple:
    """``(checkpoint, metrics)`` of a Ray Train ``Result`` with the highest validation top-1 (the later
    epoch on ties)."""
    if not result.best_checkpoints:
        raise RuntimeError(f"run {result.path} reported no checkpoint")
    return max(result.best_checkpoints, key=lambda item: (item[1][SCORE], item[1]["epoch"]))
