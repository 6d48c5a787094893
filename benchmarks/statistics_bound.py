"""How fast SPOT could run if its attention statistics cost less: the statistics switched off in turn.

    python benchmarks/statistics_bound.py --rounds 13

Timing only. The variants below compute wrong decisions on purpose (zero features, stale sums), but
each keeps the same number of tokens at every stage, so every GEMM is the same as in the real model.
The dense model and the variants of one SPOT model run in one process, taking turns each round; the
first round is discarded, and the median of the rest is printed per variant with its ratio to dense.

- ``current``: the library as it is.
- ``features_free``: history sums updated and compacted as now, stage features all zeros (what a
  perfect feature kernel would cost: nothing).
- ``history_free``: no sums updated or compacted; the features read fixed, already allocated buffers.
- ``no_statistics``: neither; explicit attention in the blocks before the last stage, predictors,
  top-k and token gathers remain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import spot
from spot.descriptors import AttentionHistory
from spot.engine import TokenState
from spot.selectors import num_descriptors

VARIANTS = ("current", "features_free", "history_free", "no_statistics")
_FIXED: dict[tuple, torch.Tensor] = {}  # history_free: one zero buffer per map shape, faulted in once


@contextmanager
def variant(name: str, feature_width: int) -> Iterator[None]:
    """Within the block, the history update and / or the stage features are replaced as ``name`` says."""

    def zero_features(state: TokenState, x: torch.Tensor):
        n = state.patches(x).shape[1]
        return lambda attn, s1, s2, layers, rows: attn.new_zeros(attn.shape[0], n, feature_width)

    def add_without_sums(history: AttentionHistory, attn: torch.Tensor, rows: slice = slice(None)) -> None:
        if history._describe is None:
            return
        key = (history.batch, *attn.shape[1:])
        if key not in _FIXED:
            _FIXED[key] = attn.new_zeros(key)
        fixed = _FIXED[key][rows]
        history._features.append(history._describe(attn, fixed, fixed, history.layers, rows))

    swaps = []
    if name in ("features_free", "no_statistics"):
        swaps.append((TokenState, "describer", zero_features))
    if name in ("history_free", "no_statistics"):
        swaps.append((AttentionHistory, "add", add_without_sums))
        swaps.append((TokenState, "_gather_history", lambda state, seq: None))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
    for owner, attr, stand_in in swaps:
        setattr(owner, attr, stand_in)
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="deit_s", choices=spot.BACKBONES)
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)

    dense = spot.create_model(args.backbone, rho=None, img_size=args.img_size).eval()
    sparse = spot.create_model(args.backbone, rho=args.rho, img_size=args.img_size).eval()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    width = num_descriptors(sparse.spot_options, sparse.blocks[0].attn.num_heads)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    times = {name: [] for name in ("dense", *VARIANTS)}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in times:
                model = dense if name == "dense" else sparse
                with variant(name, width):  # "dense" and "current" replace nothing
                    start = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:>14}: {value:7.0f} ms per batch  {ms['dense'] / value:.3f}x dense")
    return ms


if __name__ == "__main__":
    main()
