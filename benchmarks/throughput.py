"""Inference throughput of dense vs SPOT in one run: same kernels, random input, warm-up discarded.

    python benchmarks/throughput.py --backbone deit_s --batch-size 64 --rho 0.7
    python benchmarks/throughput.py --backbone deit_s --batch-size 64 --rho 0.7 --compile
    python benchmarks/throughput.py --backbone deit_s --batch-size 64 --rho 0.7 --runtime onnxruntime

Both models share weights; rounds alternate between them so that machine noise hits both alike. With
``--compile`` both run through ``torch.compile`` (Inductor); the first call of each, which compiles, is
timed on its own (``compile_s``) and not counted. With ``--runtime onnxruntime`` both models are also
exported to ONNX (``spot.export``, logits only) and run in ONNX Runtime (CPU, as many intra-op threads as
torch uses); the rounds then alternate over eager dense, eager SPOT, ORT dense and ORT SPOT, and the ORT
ratio (``ort_speedup``) is printed next to the eager one.
Prints images/s per model (median over timed rounds), the speed-up (ratio of the medians), the quartiles
of the per-round ratios (``speedup_q1_q3``: how far the machine's noise moves one round) and the GMACs
ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import spot
from spot.export import INPUT, export_onnx, ort_session


def time_forward(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds per forward pass, averaged over ``iters`` passes."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    sync()
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="deit_s", choices=spot.BACKBONES)
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--selector", default="learned")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per model (first quarter discarded)")
    p.add_argument("--iters", type=int, default=2, help="forward passes per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="run both models through torch.compile")
    p.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "onnxruntime"],
        help="onnxruntime: also run both models exported to ONNX in ONNX Runtime (CPU)",
    )
    args = p.parse_args(argv)
    if args.runtime == "onnxruntime" and (args.device != "cpu" or args.dtype != "float32" or args.compile):
        p.error("--runtime onnxruntime runs float32 on the CPU, without --compile")

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense = spot.create_model(args.backbone, rho=None, img_size=args.img_size)
    sparse = spot.create_model(args.backbone, rho=args.rho, selector=args.selector, img_size=args.img_size)
    sparse.load_state_dict(dense.state_dict(), strict=False)
    models = {"dense": dense, "spot": sparse}
    for m in models.values():
        m.eval().to(device, dtype)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    export_s, tmp = None, tempfile.TemporaryDirectory()
    if args.runtime == "onnxruntime":
        export_s = {}
        for name, m in models.items():
            start = time.perf_counter()
            path = export_onnx(m, Path(tmp.name) / f"{name}.onnx", with_indices=False).path
            export_s[name] = round(time.perf_counter() - start, 1)
            runners[f"ort_{name}"] = OrtRunner(ort_session(path, torch.get_num_threads()))
    times = {name: [] for name in runners}
    with torch.inference_mode():
        compile_s = None
        if args.compile:  # the first call of each model compiles it: timed on its own, not counted
            compile_s = {name: round(time_forward(r, x, 1), 1) for name, r in runners.items()}
        for _ in range(args.rounds):
            for name, r in runners.items():
                times[name].append(time_forward(r, x, args.iters))
    keep = args.rounds - args.rounds // 4  # ToMe-style: throw away the first quarter as warm-up
    ips = {name: args.batch_size / statistics.median(t[-keep:]) for name, t in times.items()}
    spread = _ratio_quartiles(times["dense"][-keep:], times["spot"][-keep:])
    result = {
        "backbone": args.backbone,
        "rho": args.rho,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "compile_s": compile_s,
        "dense_img_s": round(ips["dense"], 1),
        "spot_img_s": round(ips["spot"], 1),
        "speedup": round(ips["spot"] / ips["dense"], 3),
        "speedup_q1_q3": spread,  # quartiles of the per-round ratios
        "gmacs_dense": round(spot.gmacs(dense, args.img_size), 3),
        "gmacs_spot": round(spot.gmacs(sparse, args.img_size), 3),
    }
    result["flop_ratio"] = round(result["gmacs_dense"] / result["gmacs_spot"], 3)
    if args.runtime == "onnxruntime":
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
        result["export_s"] = export_s
        result["ort_dense_img_s"] = round(ips["ort_dense"], 1)
        result["ort_spot_img_s"] = round(ips["ort_spot"], 1)
        result["ort_speedup"] = round(ips["ort_spot"] / ips["ort_dense"], 3)
        result["ort_speedup_q1_q3"] = _ratio_quartiles(times["ort_dense"][-keep:], times["ort_spot"][-keep:])
        result["ort_dense_vs_eager"] = round(ips["ort_dense"] / ips["dense"], 3)
        result["ort_spot_vs_eager"] = round(ips["ort_spot"] / ips["spot"], 3)
    tmp.cleanup()
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    return result


class OrtRunner:
    """An ONNX Runtime session called like the model on a float32 CPU tensor."""

    def __init__(self, session) -> None:
        self.session = session
        self.output = session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor):
        return self.session.run([self.output], {INPUT: x.numpy()})


def _ratio_quartiles(dense: list[float], sparse: list[float]) -> list[float]:
    """Q1 and Q3 of the per-round ratios dense time / SPOT time."""
    per_round = [d / s for d, s in zip(dense, sparse, strict=True)]
    spread = per_round * 3 if len(per_round) < 2 else statistics.quantiles(per_round, n=4, method="inclusive")
    return [round(spread[0], 3), round(spread[2], 3)]


if __name__ == "__main__":
    main()
