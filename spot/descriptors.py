"""Attention statistics the relevance module reads (paper Eq. 3-9) and their history over layers.

Every statistic is taken over KEPT tokens only, so that a token gets the same features in training
(dropped tokens still present, masked) as at inference (dropped tokens removed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CPU_CHUNK_BYTES = 2 << 20  # attention maps per batch chunk on CPU: small enough to stay in cache

# what a stage reads of one batch chunk: f(A, S1 or None, S2 or None, L, rows) -> (b, N, F) features
Describe = Callable[[Tensor, Tensor | None, Tensor | None, int, slice], Tensor]


def batch_chunks(batch: int, heads: int, tokens: int, device: torch.device) -> list[slice]:
    """Batch slices for work on attention maps: cache-sized chunks on CPU, the whole batch on GPU.

    A whole batch's maps (60 MB per layer for DeiT-S at batch 64) are page-faulted in afresh by every
    operation that allocates one and streamed through memory by each pass (softmax, ``probs @ v``,
    the history sums, the descriptors); on CPU, chunks whose maps stay in cache avoid both. Under
    ``torch.compile`` the batch is one chunk too: Inductor writes its own kernels for those passes,
    and unrolled chunk loops make compiling slow (DeiT-S at batch 64 on CPU: 486 s, against 43 s).
    """
    if device.type != "cpu" or torch.compiler.is_compiling():
        return [slice(0, batch)]
    step = max(1, CPU_CHUNK_BYTES // (heads * tokens * tokens * 4))
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def attention_descriptors(attn: Tensor, keep: Tensor | None = None) -> Tensor:
    """Per-head token descriptors D^A of one attention map (Eq. 3-9).

    Args:
        attn: ``(B, H, N+1, N+1)`` attention probabilities, row = query, index 0 = class token.
        keep: optional ``(B, N+1)`` bool mask of kept tokens; means and (population) variances of the
            patch-patch sub-matrix are then taken over kept rows / columns only, and dropped tokens'
            descriptors are zero.

    Returns:
        ``(B, H, N, 6)``: ``[cls_out, cls_in, row_mean, col_mean, row_var, col_var]`` per patch token.
    """
    cls_out = attn[..., 0, 1:]  # Eq. 3: class token attends to t
    cls_in = attn[..., 1:, 0]  # Eq. 4: t attends to the class token
    patches = attn[..., 1:, 1:]
    if keep is None:
        count = float(patches.shape[-1])
    else:
        kept = keep[:, 1:].to(attn.dtype)  # (B, N)
        count = kept.sum(-1).clamp_min(1.0)[:, None, None]  # (B, 1, 1)
        patches = patches * kept[:, None, :, None] * kept[:, None, None, :]  # dropped rows/cols -> 0
    # sums of P and P^2 over rows and columns: one pass each, far cheaper than var_mean on strided data
    squares = patches * patches
    row_mean = patches.sum(-1) / count  # Eq. 5
    col_mean = patches.sum(-2) / count  # Eq. 6
    row_var = (squares.sum(-1) / count - row_mean.square()).clamp_min(0.0)  # Eq. 7 (squared)
    col_var = (squares.sum(-2) / count - col_mean.square()).clamp_min(0.0)  # Eq. 8 (squared)
    out = torch.stack((cls_out, cls_in, row_mean, col_mean, row_var, col_var), dim=-1)
    return out if keep is None else out * kept[:, None, :, None]


class AttentionHistory:
    """Running element-wise mean M and variance Sigma of the attention maps of all layers so far.

    Keeps what the stages read, over the L layers so far: with ``maps``, the sums S1 of A (and with
    ``squares`` S2 of A^2), both ``(B, H, T, T)``, from which M = S1 / L and Sigma = S2 / L - M^2
    (population variance over layers); with ``cls_rows``, only the sum of the class-token rows
    ``(B, H, T)`` (``cls_sum``, all that the class-attention baseline reads). With ``last_cls_row``,
    ``cls_row`` is the latest layer's class-token row ``(B, H, T)``. When tokens are pruned, the sums
    are gathered to the kept tokens, so they always cover the tokens still present.

    A layer is added with ``start_layer`` and then ``add`` per batch chunk. For the layer right before
    a stage, ``start_layer(describe=f)`` has ``add`` call ``f(A, S1, S2, L, rows)`` on each chunk once
    it is added, while the chunk's maps are still in cache; the results, in batch order, are
    ``features``.
    """

    def __init__(
        self,
        batch: int,
        *,
        maps: bool = True,
        squares: bool = True,
        cls_rows: bool = False,
        last_cls_row: bool = False,
    ) -> None:
        if squares and not maps:
            raise ValueError("the sums of A^2 are kept only with the sums of A (maps=True)")
        self.batch = batch
        self.maps, self.squares, self.cls_rows, self.last_cls_row = maps, squares, cls_rows, last_cls_row
        self.layers = 0
        self.sum: Tensor | None = None
        self.sum_sq: Tensor | None = None
        self.cls_sum: Tensor | None = None
        self.cls_row: Tensor | None = None
        self._describe: Describe | None = None
        self._features: list[Tensor] = []

    @property
    def accumulates(self) -> bool:
        """Whether the history sums maps over layers (else only the layer before a stage is read)."""
        return self.maps or self.cls_rows

    def start_layer(self, describe: Describe | None = None) -> None:
        self.layers += 1
        self._describe = describe
        self._features = []
        self.cls_row = None

    def add(self, attn: Tensor, rows: slice = slice(None)) -> None:
        """Add the current layer's attention probabilities ``(b, H, T, T)`` of batch rows ``rows``."""
        attn = attn.detach()  # statistics are inputs of the predictor, not a path into the backbone
        if self.last_cls_row:
            self.cls_row = self._write(self.cls_row, attn[:, :, 0], rows)
        if self.cls_rows:
            self.cls_sum = self._accumulate(self.cls_sum, attn[:, :, 0], rows)
        if self.maps:
            self.sum = self._accumulate(self.sum, attn, rows)
        if self.squares and self.layers == 1:
            self.sum_sq = self._write(self.sum_sq, attn * attn, rows)
        elif self.squares and torch.compiler.is_exporting():  # one chunk; no in-place writes in the graph
            self.sum_sq = torch.addcmul(self.sum_sq, attn, attn)
        elif self.squares:
            self.sum_sq[rows].addcmul_(attn, attn)
        if self._describe is not None:
            s1, s2 = (None if s is None else s[rows] for s in (self.sum, self.sum_sq))
            self._features.append(self._describe(attn, s1, s2, self.layers, rows))

    @property
    def features(self) -> Tensor:
        """What ``describe`` gave for the whole batch of the last layer, concatenated in batch order."""
        return torch.cat(self._features) if len(self._features) > 1 else self._features[0]

    def _write(self, buffer: Tensor | None, values: Tensor, rows: slice) -> Tensor:
        """``buffer`` (allocated for the whole batch on first use) with ``values`` written to ``rows``."""
        if torch.compiler.is_exporting():  # one chunk covers the batch: the values are the buffer
            return values
        if buffer is None:
            buffer = values.new_empty((self.batch, *values.shape[1:]))
        buffer[rows] = values
        return buffer

    def _accumulate(self, buffer: Tensor | None, values: Tensor, rows: slice) -> Tensor:
        """``buffer[rows] += values``; in the first layer ``values`` are written to a fresh buffer."""
        if self.layers == 1:
            return self._write(buffer, values, rows)
        if torch.compiler.is_exporting():
            return buffer + values
        buffer[rows].add_(values)
        return buffer

    def gather(self, index: Tensor) -> None:
        """Keep only tokens ``index`` ((B, T') long, prefix included) on every token axis."""
        if self.sum is not None:
            self.sum = _compact_square(self.sum, index)
        if self.sum_sq is not None:
            self.sum_sq = _compact_square(self.sum_sq, index)
        if self.cls_sum is not None:
            heads = self.cls_sum.shape[1]
            self.cls_sum = torch.gather(self.cls_sum, 2, index[:, None, :].expand(-1, heads, -1))

    def pad_one(self) -> None:
        """Add a token slot (all-zero history) at the end, for a newly appended fused token."""
        if self.sum is not None:
            self.sum = F.pad(self.sum, (0, 1, 0, 1))
        if self.sum_sq is not None:
            self.sum_sq = F.pad(self.sum_sq, (0, 1, 0, 1))
        if self.cls_sum is not None:
            self.cls_sum = F.pad(self.cls_sum, (0, 1))

    def free(self) -> None:
        """Drop the sums (after the last stage, which no later stage reads)."""
        self.sum = self.sum_sq = self.cls_sum = None


def _gather_square(mat: Tensor, index: Tensor) -> Tensor:
    """``mat[b, h, index[b], :][..., index[b]]`` in one gather over the flattened maps."""
    b, h, t, _ = mat.shape
    k = index.shape[1]
    flat = (index[:, :, None] * t + index[:, None, :]).view(b, 1, k * k).expand(b, h, k * k)
    return torch.gather(mat.reshape(b, h, t * t), 2, flat).view(b, h, k, k)


def _compact_square(mat: Tensor, index: Tensor) -> Tensor:
    """``_gather_square(mat, index)`` written over the front of ``mat``'s own storage, chunk by chunk.

    Each chunk is gathered into a cache-sized buffer first, and the place it is written to ends
    before the next chunk's source begins (k <= T), so nothing is overwritten before it is read. On
    CPU this saves a fresh whole-batch buffer and its first-touch page faults; on GPU (one chunk)
    it is the plain gather.
    """
    b, h, t, _ = mat.shape
    chunks = batch_chunks(b, h, t, mat.device)
    if len(chunks) == 1:
        return _gather_square(mat, index)
    k = index.shape[1]
    out = mat.view(-1)[: b * h * k * k].view(b, h, k, k)
    for rows in chunks:
        out[rows] = _gather_square(mat[rows], index[rows])
    return out
