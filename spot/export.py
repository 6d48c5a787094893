"""ONNX export of a SPOT model in prune mode, and parity of any runtime's outputs against eager PyTorch.

Prune mode keeps ``int(N0 * rho**k)`` patch tokens at stage k, a count fixed by the config, so the
pruned model has static token shapes: only the batch dimension is dynamic. The model is captured
with ``torch.export`` (non-strict) and translated by torch's dynamo-based ONNX exporter. While
exporting, ``torch.compiler.is_compiling()`` is true, so the attention maps are handled as one
batch chunk (``spot.descriptors.batch_chunks``) and the attention history is built without
in-place writes (``AttentionHistory``); the maths is that of the eager path.

The exported graph has the input ``images`` ``(batch, 3, S, S)`` and the outputs ``logits``
``(batch, classes)`` and, for a SPOT model, ``kept_0 .. kept_{K-1}``: the original patch indices
kept at each stage ``(batch, k_s)`` (``info.kept_indices`` of the eager model), so that the very
file that is shipped can be checked for the same token selection as eager.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from spot.schedule import keep_counts

INPUT = "images"
LOGITS = "logits"
LOGITS_ATOL = 1e-4  # float32 logits of the exported model against eager PyTorch


class ExportError(RuntimeError):
    """A model could not be exported; the message names the module where it failed."""

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


def kept_names(model: nn.Module) -> list[str]:
    """Output names of the per-stage kept indices of ``model`` (none for a dense model)."""
    return [f"kept_{k}" for k in range(model.spot_options.num_stages)]


def output_names(model: nn.Module, with_indices: bool = True) -> list[str]:
    return [LOGITS, *(kept_names(model) if with_indices else [])]


class PruneModeOutputs(nn.Module):
    """``model`` in prune mode as ``images -> (logits, kept_0, ..)``: what the ONNX graph computes."""

    def __init__(self, model: nn.Module, with_indices: bool = True) -> None:
        super().__init__()
        self.model = model
        self.with_indices = with_indices

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        tokens, state = self.model.forward_spot(images)
        logits = self.model.head_logits(tokens, state)
        return (logits, *state.info.kept_indices) if self.with_indices else (logits,)


@dataclass
class Exported:
    """What :func:`export_onnx` wrote."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    opset: int
    img_size: int
    keep_counts: list[int] = field(default_factory=list)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    with_indices: bool = True,
    example_batch: int = 2,
    opset: int | None = None,
) -> Exported:
    """Export ``model`` (dense or SPOT, prune mode) to the ONNX file ``path`` with a dynamic batch axis.

    Raises :class:`ExportError` naming the module whose forward could not be captured or whose
    operator has no ONNX translation. The model's train/eval state and SPOT mode are restored.
    """
    path = Path(path)
    side = int(model.patch_embed.img_size[0])
    example = torch.randn(example_batch, 3, side, side)
    was_training, mode = model.training, model.spot_mode
    wrapper = PruneModeOutputs(model, with_indices).eval()  # prune mode
    try:
        program = _torch_export(wrapper, example)
        onnx_program = _to_onnx(program, opset, output_names(model, with_indices))
    finally:
        model.train(was_training)
        model.spot_mode = mode
    batch = onnx_program.model.graph.inputs[0].shape[0]
    if not isinstance(batch, int):
        onnx_program.rename_axes({batch: "batch"})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(path, external_data=False)
    counts = [] if model.spot_options.dense else list(_keep_counts(model))
    version = onnx_program.model.opset_imports.get("", opset or 0)
    return Exported(path, [INPUT], output_names(model, with_indices), version, side, counts)


def _keep_counts(model: nn.Module) -> list[int]:
    cfg = model.spot_options
    return keep_counts(model.num_patches, cfg.rho, cfg.num_stages)


def _torch_export(wrapper: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch; on failure, the innermost module being run is named."""
    names = {m: n.removeprefix("model.") or "model" for n, m in wrapper.named_modules() if n}
    stack: list[str] = []
    handles = []

    def enter(module: nn.Module, args: tuple) -> None:
        stack.append(names[module])

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        stack.pop()

    for module in names:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:
        where = stack[-1] if stack else type(wrapper.model).__name__
        kind = type(_module_at(wrapper, where)).__name__
        raise ExportError(
            f"cannot export module {where!r} ({kind}): torch.export failed: {_first_line(err)}", where
        ) from err
    finally:
        for h in handles:
            h.remove()


def _to_onnx(program: torch.export.ExportedProgram, opset: int | None, outputs: list[str]):
    """The exported program translated to ONNX; a failure names the module of the failing node."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                program,
                dynamo=True,
                input_names=[INPUT],
                output_names=outputs,
                opset_version=opset,
                verbose=False,
            )
    except Exception as err:
        node = _failing_node(program, err)
        where, kind = _node_module(node) if node is not None else ("?", "?")
        op = f" operator {node.target}" if node is not None else ""
        raise ExportError(
            f"cannot export module {where!r} ({kind}):{op} has no ONNX translation: "
            f"{_first_line(_innermost(err))}",
            where,
        ) from err


def _failing_node(program: torch.export.ExportedProgram, err: BaseException) -> torch.fx.Node | None:
    """The FX node named in the exporter's error chain (by node name, else by operator)."""
    messages = []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__ or err.__context__
    text = "\n".join(messages)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "call_function"}
    for name in re.findall(r"translating node %(\w+)", text):
        if name in nodes:
            return nodes[name]
    for node in nodes.values():
        if str(node.target) in text or repr(node.target) in text:
            return node
    return None


def _node_module(node: torch.fx.Node) -> tuple[str, str]:
    """(module path in the SPOT model, class name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "model", "?"
    path, kind = list(stack.values())[-1]
    kind = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", "?")
    return path.removeprefix("model.") or "model", kind


def _module_at(wrapper: nn.Module, name: str) -> nn.Module:
    try:
        return wrapper.model.get_submodule("" if name == "model" else name)
    except AttributeError:
        return wrapper.model


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# --- running and checking -------------------------------------------------------------------------


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads, default ORT's choice)."""
    import onnxruntime as ort  # lazy: heavy, and only the parity checks run models; spot is imported by
    # every Ray worker and every registered model

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of an ONNX Runtime session on ``images``, by output name."""
    names = [o.name for o in session.get_outputs()]
    return dict(
        zip(names, session.run(names, {INPUT: np.ascontiguousarray(images, np.float32)}), strict=True)
    )


def eager_outputs(
    model: nn.Module,
    images: np.ndarray | Tensor,
    with_indices: bool = True,
    replay: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """What the exported graph should give: eager prune-mode logits and kept indices, as numpy.

    ``replay`` (outputs ``kept_k`` of another run) makes every stage keep those tokens instead of
    selecting its own: the logits that run should have given for its selection (``random`` selector).
    """
    was_training, mode = model.training, model.spot_mode
    model.eval()
    if replay is not None:
        model.spot_replay = [torch.as_tensor(np.sort(replay[n], axis=1)).long() for n in kept_names(model)]
    try:
        with torch.no_grad():
            out = PruneModeOutputs(model, with_indices)(torch.as_tensor(np.asarray(images, np.float32)))
    finally:
        model.train(was_training)
        model.spot_mode = mode
        model.__dict__.pop("spot_replay", None)
    return {name: t.numpy() for name, t in zip(output_names(model, with_indices), out, strict=True)}


def selection_errors(outputs: dict[str, np.ndarray], keep_counts: list[int], num_patches: int) -> list[str]:
    """What is wrong with a runtime's kept indices: counts, range, duplicates, nesting across stages."""
    errors, previous = [], None
    for k, count in enumerate(keep_counts):
        kept = np.sort(np.asarray(outputs[f"kept_{k}"]).astype(np.int64), axis=1)
        if kept.shape[1] != count:
            errors.append(f"kept_{k}: {kept.shape[1]} tokens per image, expected {count}")
            continue
        if kept.size and (kept.min() < 0 or kept.max() >= num_patches):
            errors.append(f"kept_{k}: indices outside [0, {num_patches})")
        if (np.diff(kept, axis=1) == 0).any():
            errors.append(f"kept_{k}: a token kept twice")
        if previous is not None and not all(np.isin(r, p).all() for r, p in zip(kept, previous, strict=True)):
            errors.append(f"kept_{k}: keeps a token that stage {k - 1} dropped")
        previous = kept
    return errors


def compare(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float = LOGITS_ATOL) -> dict:
    """Parity of a runtime's outputs ``got`` with eager ``expected`` (both by output name).

    Kept indices must be equal per stage (per image: the set of kept tokens); logits within ``atol``
    (max-abs) where the selections agree. Returns ``{"ok", "logits_max_abs", "stages", "mismatched_images"}``.
    """
    missing = [name for name in expected if name not in got]
    if missing:
        raise KeyError(f"outputs missing from the runtime's results: {missing}")
    stages = sorted(n for n in expected if n.startswith("kept_"))
    same = np.ones(expected[LOGITS].shape[0], dtype=bool)
    per_stage = {}
    for name in stages:
        a, b = np.sort(expected[name], axis=1), np.sort(np.asarray(got[name]).astype(np.int64), axis=1)
        if a.shape != b.shape:
            raise ValueError(f"{name}: expected shape {a.shape}, got {b.shape}")
        equal = (a == b).all(axis=1)
        per_stage[name] = int((~equal).sum())
        same &= equal
    diff = np.abs(np.asarray(got[LOGITS], np.float64) - expected[LOGITS])
    max_abs = float(diff[same].max()) if same.any() else float("nan")
    return {
        "ok": bool(same.all() and max_abs <= atol),
        "logits_max_abs": max_abs,
        "stages": per_stage,  # images whose kept set differs, per stage
        "mismatched_images": int((~same).sum()),
    }


def check_outputs(
    model: nn.Module, images: np.ndarray, got: dict[str, np.ndarray], atol: float = LOGITS_ATOL
) -> dict:
    """Parity of one runtime's outputs on ``images`` with the eager model.

    Kept indices must be valid (:func:`selection_errors`) and equal eager's; logits within ``atol``.
    The ``random`` selector draws its scores from the runtime's own generator, so its indices cannot
    equal eager's: they are checked for validity, and the logits against eager keeping the same tokens.
    """
    cfg = model.spot_options
    errors = [] if cfg.dense else selection_errors(got, _keep_counts(model), model.num_patches)
    replayed = cfg.selector == "random" and not cfg.dense
    if errors:
        report = {"ok": False, "logits_max_abs": float("nan"), "stages": {}, "mismatched_images": -1}
    else:
        report = compare(eager_outputs(model, images, replay=got if replayed else None), got, atol)
    return {**report, "selection_errors": errors, "indices": "replayed" if replayed else "compared"}


def check_onnx(
    model: nn.Module,
    path: str | Path,
    batch_sizes: tuple[int, ...] = (1, 7),
    seed: int = 0,
    threads: int | None = None,
) -> dict[int, dict]:
    """Parity of the ONNX file ``path`` in ONNX Runtime with eager ``model`` on seeded random images."""
    session = ort_session(path, threads)
    rng = np.random.default_rng(seed)
    side = int(model.patch_embed.img_size[0])
    reports = {}
    for batch in batch_sizes:
        images = rng.standard_normal((batch, 3, side, side), dtype=np.float32)
        reports[batch] = check_outputs(model, images, run_onnx(session, images))
    return reports
