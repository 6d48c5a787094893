"""Accuracy against cost: the Pareto front of a sweep and its plot (the paper's Fig. 4 style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FRONT_STATUS = "completed"  # only fully trained trials compete for the front


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points that no other point dominates, by increasing cost.

    A point dominates another when it costs no more and scores no less, and is strictly better in one of
    the two. Equal points do not dominate each other: both are on the front.
    """
    if len(costs) != len(scores):
        raise ValueError(f"{len(costs)} costs but {len(scores)} scores")
    points = list(zip(costs, scores, strict=True))
    front = [
        i for i, (c, s) in enumerate(points)
        if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in points)
    ]
    return sorted(front, key=lambda i: (costs[i], -scores[i]))


def plot_pareto(
    rows: Sequence[dict],
    path: str | Path,
    *,
    budget: float | None = None,
    dense_gmacs: float | None = None,
    title: str = "",
) -> Path:
    """Top-1 accuracy (%) against GMACs of every trial with the Pareto front drawn, written as a PNG.

    ``rows`` are result-table rows with ``gmacs``, ``val_acc1`` (0-1), ``rho``, ``status``, ``feasible``,
    ``pareto`` and ``best``. Completed trials are filled circles, trials stopped early hollow ones,
    trials over the ``budget`` grey crosses; the front is a line through its points, labelled with rho;
    the best feasible trial is a star; the budget a dashed vertical line, the dense backbone's cost a
    dotted one.
    """
    import matplotlib  # lazy: heavy, and only the end of a sweep draws; the backend is chosen before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (above)

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    feasible = [r for r in rows if r["feasible"]]
    groups = (
        ("completed", dict(marker="o", color="tab:blue")),
        ("stopped early", dict(marker="o", facecolors="none", edgecolors="tab:blue")),
    )
    for status, style in groups:
        points = [r for r in feasible if r["status"] == status]
        if points:
            ax.scatter([r["gmacs"] for r in points], [100 * r["val_acc1"] for r in points], s=36,
                       label=f"{status} ({len(points)})", zorder=3, **style)
    infeasible = [r for r in rows if not r["feasible"]]
    if infeasible:
        ax.scatter([r["gmacs"] for r in infeasible], [100 * r["val_acc1"] for r in infeasible], marker="x",
                   color="0.55", s=36, label=f"over budget ({len(infeasible)})", zorder=3)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["gmacs"])
    if front:
        ax.plot([r["gmacs"] for r in front], [100 * r["val_acc1"] for r in front], "-o", color="tab:red",
                mfc="none", ms=11, lw=1.6, zorder=2, label="Pareto front")
        for r in front:
            ax.annotate(f"ρ={r['rho']:.2f}", (r["gmacs"], 100 * r["val_acc1"]), textcoords="offset points",
                        xytext=(4, -11), fontsize=7, color="tab:red")
    for r in rows:
        if r["best"]:
            ax.scatter([r["gmacs"]], [100 * r["val_acc1"]], marker="*", s=220, color="gold",
                       edgecolors="black", linewidths=0.6, zorder=4, label="best (registered)")
    if budget is not None:
        ax.axvline(budget, color="0.3", ls="--", lw=1, label=f"budget {budget:g} GMACs")
    if dense_gmacs is not None:
        ax.axvline(
            dense_gmacs, color="0.5", ls=":", lw=1.2, label=f"dense backbone {dense_gmacs:.3g} GMACs"
        )
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
