"""Token selectors compared (paper Table 7): random, class attention (training-free and fine-tuned), SPOT.

    python pipelines/compare.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 \
        --heuristic models:/spot-deit_t-cls-attn/1 --rho 0.7 0.5

From the dense model, ``random`` and ``cls_attn_avg`` (training-free) are evaluated at each rho on the dense
weights; the SPOT model and the class-attention model fine-tuned from the same dense model under the same
recipe (``finetune.py --selector cls_attn_avg``, as the paper's Table 7 did) are evaluated at each rho with
their own weights (given several, one per rho they were fine-tuned at, each rho with its own). Every row
reads the whole val split in prune mode; GMACs are ``spot.gmacs``; images/s are measured in this process
after the accuracy pass, interleaved over the rows (median, and "noisy" where the repeats spread too wide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import spot
from pipelines.data.loader import make_loader
from pipelines.evaluation.metrics import images_per_s_cell, measure_throughputs, model_row
from pipelines.storage.checkpoints import MASKS_MIN_SIDE
from pipelines.tracking.mlflow_run import log_results
from pipelines.utils.table import markdown_table

COLUMNS = ("selector", "weights", "rho", "top-1", "GMACs", "images/s")
TRAINING_FREE = ("random", "cls_attn_avg")
FINETUNED_HEURISTIC = "cls_attn_avg (fine-tuned)"
# the fine-tuned models' rows by the option that gives them: (row label, selector)
FINE_TUNED_ROWS = {"--heuristic": (FINETUNED_HEURISTIC, "cls_attn_avg"),
                   "--spot": ("learned (SPOT)", "learned")}


def row_key(selector: str) -> str:
    """A row's selector label as a metric / file name: ``learned``, ``cls_attn_avg_finetuned``..."""
    return selector.split()[0] + ("_finetuned" if "fine-tuned" in selector else "")


def with_selector(model: nn.Module, rho: float | None, selector: str = "learned") -> nn.Module:
    """``model``'s architecture at another ``rho`` / ``selector``, with its weights (predictors if any)."""
    config = {**model.spot_config, "rho": rho, "selector": selector}
    out = spot.create_model(**config)
    out.load_state_dict(model.state_dict(), strict=selector != "learned" or model.spot_predictors is not None)
    return out.eval()


def comparison_models(
    dense: nn.Module,
    rhos: list[float],
    *,
    dense_weights: str,
    spot_models: Sequence[tuple[nn.Module, str]] = (),
    heuristic_models: Sequence[tuple[nn.Module, str]] = (),
) -> list[tuple[dict, nn.Module]]:
    """``(row labels, model)`` per row: the dense model, then per rho each training-free selector, the
    fine-tuned class-attention model and SPOT. ``spot_models`` / ``heuristic_models`` are ``(model, weights
    label)`` pairs: one model is compared at every rho; several, one per rho each was fine-tuned at, compare
    each rho with the model fine-tuned at it (paper Table 7 compares models trained for one budget). Raises
    ``ValueError`` for a rho given twice, a dense model among them, two fine-tuned at one rho, or a rho that
    none of several was fine-tuned at."""
    check_rates(rhos)
    given = {"--heuristic": heuristic_models, "--spot": spot_models}
    for option, models in given.items():
        check_fine_tuned(option, models, rhos)
    rows = [({"selector": "none (dense)", "weights": dense_weights, "rho": None}, with_selector(dense, None))]
    for rho in rhos:
        for selector in TRAINING_FREE:
            labels = {"selector": selector, "weights": dense_weights, "rho": rho}
            rows.append((labels, with_selector(dense, rho, selector)))
        for option, models in given.items():
            if models:
                label, selector = FINE_TUNED_ROWS[option]
                model, weights = fine_tuned_at(models, rho)
                rows.append(({"selector": label, "weights": weights, "rho": rho},
                             with_selector(model, rho, selector)))
    return rows


def check_rates(rhos: Sequence[float], *, option: str = "--rho") -> None:
    """Raise ``ValueError`` if a rate is given twice (each rate is one set of rows); the message names
    ``option``, the command-line option the rates came from."""
    for i, rho in enumerate(rhos):
        if any(math.isclose(rho, earlier) for earlier in rhos[:i]):
            raise ValueError(f"{option} {rho}: given twice; each rate is compared once")


def trained_rho(model: nn.Module) -> float | None:
    """The keep rate ``model`` was fine-tuned at (None: a dense model)."""
    return model.spot_config.get("rho")


def check_fine_tuned(option: str, models: Sequence[tuple[nn.Module, str]], rhos: list[float]) -> None:
    """Raise ``ValueError`` naming ``option`` if a model is dense, two were fine-tuned at one rho, or, given
    several, one of ``rhos`` has none fine-tuned at it."""
    trained_at = [trained_rho(model) for model, _ in models]
    for (_, weights), rho in zip(models, trained_at, strict=True):
        if rho is None:
            raise ValueError(f"{option} {weights}: a dense model, with no trained token selection; pass "
                             "one fine-tuned from --dense")
    for rho in trained_at:
        same = [w for (_, w), r in zip(models, trained_at, strict=True) if math.isclose(r, rho)]
        if len(same) > 1:
            raise ValueError(f"{option} {', '.join(same)}: fine-tuned at the same rho {rho}; give one model "
                             "per rho")
    if len(models) > 1:
        for rho in rhos:
            if not any(math.isclose(r, rho) for r in trained_at):
                raise ValueError(f"{option}: none fine-tuned at rho {rho} (they were at "
                                 f"{', '.join(map(str, trained_at))}); compare at those rates")


def fine_tuned_at(models: Sequence[tuple[nn.Module, str]], rho: float) -> tuple[nn.Module, str]:
    """Of ``(model, weights label)`` pairs (:func:`check_fine_tuned`), the one: the only one, or the one
    fine-tuned at ``rho``."""
    if len(models) == 1:
        return models[0]
    return next(pair for pair in models if math.isclose(trained_rho(pair[0]), rho))


def model_roles(models: dict[str, Sequence[tuple[nn.Module, str]]]) -> dict[str, str]:
    """The compared models by role (``dense``, ``spot``, ``heuristic``) as :func:`log_comparison` records
    them: role -> weights label (its URI), or ``<role>_rho<rho>`` per model where a role has several."""
    roles = {}
    for role, given in models.items():
        for model, weights in given:
            key = role if len(given) == 1 else f"{role}_rho{trained_rho(model)}"
            roles[key] = weights
    return roles


def compare(
    rows: list[tuple[dict, nn.Module]],
    data: str | Path,
    *,
    batch_size: int,
    throughput_batch: int,
    device: torch.device,
    seed: int = 0,
) -> list[dict]:
    """Top-1 over the val split and GMACs of each model (``random`` draws from ``seed``), then images/s of
    all of them in a separate timing phase (:func:`~pipelines.evaluation.metrics.measure_throughputs`)."""
    results = []
    for labels, model in rows:
        torch.manual_seed(seed)
        results.append({**labels, **model_row(model, data, batch_size=batch_size, device=device)})
    timings = measure_throughputs([model for _, model in rows], batch_size=throughput_batch, device=device)
    for row, timing in zip(results, timings, strict=True):
        row.update(timing)
    return results


def format_comparison(results: list[dict]) -> str:
    """The comparison as one markdown table (top-1 in %, GMACs as counted by ``spot.gmacs``)."""

    def fmt(column: str, value) -> str:
        if column == "top-1":
            return f"{100 * value:.2f}"
        if column == "GMACs":
            return f"{value:.4f}"
        return "" if value is None else str(value)

    cells = [{**r, "top-1": r["top1"], "GMACs": r["gmacs"], "images/s": images_per_s_cell(r)}
             for r in results]
    return markdown_table(cells, COLUMNS, fmt)


@torch.inference_mode()
def mask_figures(
    rows: list[tuple[dict, nn.Module]], data: str | Path, out_dir: Path, *, images: int = 8
) -> list[Path]:
    """Kept tokens per stage of the first ``images`` val images (paper Fig. 3), one PNG per sparse row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    first = None
    for labels, model in rows:
        if labels["rho"] is None:
            continue
        if first is None:
            size = model.spot_config.get("img_size", 224)
            normalization = spot.input_normalization(model)
            loader = make_loader(data, "val", batch_size=images, img_size=size, train=False, **normalization)
            first = next(iter(loader))[0][:images]
        torch.manual_seed(0)
        _, info = model(first, return_info=True)
        name = f"masks_{row_key(labels['selector'])}_rho{labels['rho']:g}.png"
        spot.draw_token_masks(first, info.kept_indices, model.patch_embed.patch_size[0], out_dir / name,
                              min_side=MASKS_MIN_SIDE, **normalization)
        paths.append(out_dir / name)
    return paths


def log_comparison(
    results: list[dict], table: str, figures: list[Path], *, tracking_uri: str, experiment: str, data: str,
    models: dict[str, str] | None = None, parent=None,
) -> str:
    """One MLflow run holding the rows (a table artifact, ``comparison_table.json``, whose images/s is null
    where the timing was noise), the markdown table, the figures, the val split as its dataset and the
    evaluated ``models`` (role -> URI) with their source runs; a child of ``parent`` if given."""
    columns = ("selector", "weights", "rho", "top1", "gmacs", "images_per_s", "images_per_s_spread", "noisy")
    rows = [{k: r[k] for k in columns} | ({"images_per_s": None} if r["noisy"] else {}) for r in results]
    return log_results(
        tracking_uri, experiment, "compare-selectors",
        params={"data": data}, metrics={}, text=("comparison.md", table), artifacts={"token_masks": figures},
        data=data, models=models, table=(rows, "comparison_table.json"), parent=parent,
        description=(f"Token selectors compared on the val split of {data} ({', '.join(sorted(models or {}))}"
                     " models): top-1 and GMACs per selector and rho; the rows are the artifact "
                     "comparison_table.json (and comparison.md), the kept-token figures token_masks/"),
    )
