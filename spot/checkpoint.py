"""Pretrained weights: a local checkpoint file, or the timm hub when online."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from timm.models import load_state_dict as timm_load_state_dict
from torch import Tensor, nn

from spot.config import PREDICTOR_PREFIX

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order
HEAD_KEYS = ("head.", "aux_head.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file through timm's ``load_state_dict``: ``.safetensors`` or a torch file
    (loaded with ``weights_only=True``), EMA weights preferred, then ``state_dict`` / ``model``, a DDP
    ``module.`` prefix stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    try:
        state = timm_load_state_dict(str(path), use_ema=True, weights_only=True)
    except AttributeError:  # timm read the file but found no mapping in it
        state = None
    except Exception as err:  # torch / safetensors raise several types for corrupt or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict (expected tensors, optionally under {WRAPPER_KEYS})")
    return dict(state)


def hub_state_dict(model: nn.Module, tag: str | None) -> dict[str, Tensor]:
    """Download the backbone's pretrained weights through timm (needs network access); the architecture
    is the model's own ``pretrained_cfg``."""
    arch = model.pretrained_cfg["architecture"] + (f".{tag}" if tag else "")
    try:
        return timm.create_model(arch, pretrained=True).state_dict()
    except Exception as err:
        raise RuntimeError(
            f"cannot download pretrained weights {arch!r} from the hub ({err}); "
            "without network access pass a local checkpoint path"
        ) from err


def load_pretrained(model: nn.Module, source: str | Path) -> list[str]:
    """Load ``source`` (a file path, ``"hub"`` or ``"hub:<tag>"``) into ``model``; returns the keys left
    at their initial values (SPOT predictors, and a classifier head whose class count differs).

    Raises ValueError naming the keys when the checkpoint belongs to another architecture.
    """
    source = str(source)
    if source == "hub" or source.startswith("hub:"):
        state = hub_state_dict(model, source.partition(":")[2] or None)
    else:
        state = read_state_dict(source)
    state = model.spot_filter(state)
    own = model.state_dict()
    dropped = []
    for key in list(state):
        if key.startswith(HEAD_KEYS) and key in own and state[key].shape != own[key].shape:
            dropped.append(key)  # fine-tuning to another label set: the head starts fresh
            del state[key]
        elif key.startswith(PREDICTOR_PREFIX) and key not in own:
            del state[key]  # a SPOT checkpoint loaded into a dense model (teacher / baseline)
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith(PREDICTOR_PREFIX) and k not in dropped]
    problems = [
        ("shape mismatches", wrong_shape),
        ("unexpected keys", unexpected),
        ("missing keys", missing),
    ]
    details = "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in problems if keys)
    if details:
        name = model.spot_config.get("name", type(model).__name__)
        raise ValueError(f"checkpoint {source} does not fit {name}: {details}")
    model.load_state_dict(state, strict=False)
    untouched = [k for k in own if k not in state]
    if dropped:
        log.warning("classifier weights %s not loaded: class count differs from the checkpoint", dropped)
    return untouched
