"""Where SPOT's stages sit and how many patch tokens each one keeps."""

from __future__ import annotations


def check_rho(rho: float) -> float:
    """Return ``rho`` as a float, or raise if it is not a retention rate in (0, 1]."""
    rho = float(rho)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    return rho


def keep_counts(num_patches: int, rho: float, stages: int = 3) -> list[int]:
    """Patch tokens kept after stage k = 1..K: ``int(N0 * rho**k)`` (paper Sec. 3.2, rho_k = rho^k).

    Counts are relative to the ORIGINAL patch count N0, never below one token. The class token is
    always kept on top of these.
    """
    rho = check_rho(rho)
    if num_patches < 1 or stages < 0:
        raise ValueError(f"need num_patches >= 1 and stages >= 0, got {num_patches}, {stages}")
    # the small epsilon keeps exact products such as 196 * 0.5 from rounding down through float error
    return [max(1, int(num_patches * rho**k + 1e-9)) for k in range(1, stages + 1)]


def default_stage_blocks(depth: int, stages: int = 3) -> tuple[int, ...]:
    """0-indexed blocks whose INPUT is sparsified: one layer after each quarter of the depth.

    12 blocks -> (3, 6, 9) (paper's layers 4, 7, 10); 16 blocks -> (4, 8, 12) (layers 5, 9, 13).
    """
    if depth < stages + 1:
        raise ValueError(f"a {depth}-block model cannot host {stages} sparsification stages")
    return tuple(round(depth * k / (stages + 1)) for k in range(1, stages + 1))
