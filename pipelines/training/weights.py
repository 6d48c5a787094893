"""The initial weights of a run, prepared once on the driver: the student (and its frozen teacher) built,
``--pretrained`` loaded and checked, so a bad checkpoint fails before any worker (or trial) starts."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import spot
from pipelines.tracking.registry import load_model
from pipelines.tracking.uri import MODEL_URI_PREFIXES
from pipelines.training.config import RunConfig
from pipelines.utils.errors import ConfigError, first_line
from spot.checkpoint import load_pretrained
from spot.flops import gmacs


@dataclass(frozen=True)
class ModelSummary:
    """What a run's model costs: GMACs per image (the paper's "GFLOPs"), dense GMACs, parameters."""

    gmacs: float
    dense_gmacs: float
    params: int


def _pretrained_file(source: str, tmp: Path) -> tuple[str, dict]:
    """A local checkpoint file (or "hub") for ``source``, and the input normalisation it was trained with
    (known for MLflow models, which are saved to ``tmp`` first; else empty)."""
    if not source.startswith(MODEL_URI_PREFIXES):
        return source, {}
    path = tmp / "pretrained.pt"
    model = load_model(source)
    torch.save(model.state_dict(), path)
    return str(path), spot.input_normalization(model)


def _overlay(config: RunConfig, inherited: dict) -> dict:
    """Backbone arguments that set the input normalisation: ``--mean`` / ``--std``, else the pretrained
    model's; nothing when both are the backbone's own (ImageNet's)."""
    given = {k: tuple(getattr(config, k)) for k in ("mean", "std") if getattr(config, k) is not None}
    norm = {**inherited, **given}
    return {"pretrained_cfg_overlay": norm} if norm else {}


def prepare_init(config: RunConfig) -> tuple[dict, ModelSummary]:
    """Build the student (and teacher) once: validates the architecture and ``--pretrained``.

    Returns the ``init_weights`` payload of :mod:`pipelines.training.worker` (``spot_config``, ``student`` and
    ``teacher`` state_dicts, ``fresh`` parameter names) and the model's :class:`ModelSummary`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        source, inherited = _pretrained_file(config.pretrained, Path(tmp)) if config.pretrained else ("", {})
        arch = {"num_classes": config.num_classes, "img_size": config.img_size, **config.model_args,
                **_overlay(config, inherited)}
        torch.manual_seed(config.seed)
        try:
            student = spot.create_model(config.backbone, rho=config.rho, selector=config.selector, **arch)
            dense = spot.create_model(config.backbone, rho=None, **arch)
        except (TypeError, ValueError, AssertionError, ZeroDivisionError) as err:
            raise ConfigError(f"--model-arg {config.model_args}: the {config.backbone} backbone cannot be "
                              f"built: {first_line(err)}") from None
        fresh = [name for name, _ in student.named_parameters()]
        teacher = None
        if config.pretrained:
            try:
                untouched = set(load_pretrained(student, source))
            except RuntimeError as err:  # the hub without network
                raise ConfigError(f"--pretrained {source}: {err}") from None
            fresh = [name for name, _ in student.named_parameters() if name in untouched]
            if config.rho is not None:
                load_pretrained(dense, source)
                teacher = dense.state_dict()
    summary = ModelSummary(
        gmacs=gmacs(student, config.img_size),
        dense_gmacs=gmacs(dense, config.img_size),
        params=sum(p.numel() for p in student.parameters()),
    )
    init = {"spot_config": student.spot_config, "student": student.state_dict(), "teacher": teacher,
            "fresh": fresh}
    return init, summary
