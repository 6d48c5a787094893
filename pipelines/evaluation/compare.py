"""Token selectors compared on the same weights (paper Table 7): random, class attention, learned SPOT.

    python pipelines/compare.py --dense models:/spot-deit_t-dense/1 --spot models:/spot-deit_t/1 --rho 0.7 0.5

From the dense model, ``random`` and ``cls_attn_avg`` (training-free) are evaluated at each rho on the dense
weights; the SPOT model (fine-tuned from the dense one) is evaluated at each rho with its own weights. Every
row reads the whole val split in prune mode; GMACs are ``spot.gmacs``; images/s are measured in this process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import spot
from pipelines.data.loader import make_loader
from pipelines.evaluation.metrics import evaluate_model, measure_throughput
from pipelines.storage.checkpoints import MASKS_MIN_SIDE
from pipelines.tracking.mlflow_run import log_results
from pipelines.utils.table import markdown_table

COLUMNS = ("selector", "weights", "rho", "top-1", "GMACs", "images/s")
TRAINING_FREE = ("random", "cls_attn_avg")


def with_selector(model: nn.Module, rho: float | None, selector: str = "learned") -> nn.Module:
    """``model``'s architecture at another ``rho`` / ``selector``, with its weights (predictors if any)."""
    config = {**model.spot_config, "rho": rho, "selector": selector}
    out = spot.create_model(**config)
    out.load_state_dict(model.state_dict(), strict=selector != "learned" or model.spot_predictors is not None)
    return out.eval()


def comparison_models(
    dense: nn.Module, sparse: nn.Module | None, rhos: list[float], *, dense_weights: str, spot_weights: str
) -> list[tuple[dict, nn.Module]]:
    """``(row labels, model)`` per row: the dense model, then per rho each training-free selector and SPOT."""
    rows = [({"selector": "none (dense)", "weights": dense_weights, "rho": None}, with_selector(dense, None))]
    for rho in rhos:
        for selector in TRAINING_FREE:
            labels = {"selector": selector, "weights": dense_weights, "rho": rho}
            rows.append((labels, with_selector(dense, rho, selector)))
        if sparse is not None:
            labels = {"selector": "learned (SPOT)", "weights": spot_weights, "rho": rho}
            rows.append((labels, with_selector(sparse, rho)))
    return rows


def compare(
    rows: list[tuple[dict, nn.Module]],
    data: str | Path,
    *,
    batch_size: int,
    throughput_batch: int,
    device: torch.device,
    seed: int = 0,
) -> list[dict]:
    """Top-1 over the val split, GMACs and images/s of each model; ``random`` draws from ``seed``."""
    results = []
    for labels, model in rows:
        torch.manual_seed(seed)
        row = {**labels, **evaluate_model(model, data, batch_size=batch_size, device=device)}
        row["gmacs"] = spot.gmacs(model, model.spot_config.get("img_size", 224))
        row["images_per_s"] = measure_throughput(model, batch_size=throughput_batch, device=device)
        results.append(row)
    return results


def format_comparison(results: list[dict]) -> str:
    """The comparison as one markdown table (top-1 in %, GMACs as counted by ``spot.gmacs``)."""

    def fmt(column: str, value) -> str:
        if column == "top-1":
            return f"{100 * value:.2f}"
        if column == "GMACs":
            return f"{value:.4f}"
        if column == "images/s":
            return f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [{**r, "top-1": r["top1"], "GMACs": r["gmacs"], "images/s": r["images_per_s"]} for r in results]
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
        name = f"masks_{labels['selector'].split()[0]}_rho{labels['rho']:g}.png"
        spot.draw_token_masks(first, info.kept_indices, model.patch_embed.patch_size[0], out_dir / name,
                              min_side=MASKS_MIN_SIDE, **normalization)
        paths.append(out_dir / name)
    return paths


def log_comparison(
    results: list[dict], table: str, figures: list[Path], *, tracking_uri: str, experiment: str, data: str
) -> str:
    """One MLflow run holding the rows (metrics per selector and rho), the table and the figures."""
    metrics = {}
    for r in results:
        key = r["selector"].split()[0] + ("" if r["rho"] is None else f"_rho{r['rho']:g}")
        metrics |= {f"{key}_{k}": r[k] for k in ("top1", "gmacs", "images_per_s")}
    return log_results(
        tracking_uri, experiment, "compare-selectors",
        params={"data": data} | {f"weights_{r['selector'].split()[0]}": r["weights"] for r in results},
        metrics=metrics, text=("comparison.md", table), artifacts={"token_masks": figures},
    )
