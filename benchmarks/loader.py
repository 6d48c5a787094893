"""Images/s of the DALI loader against a plain webdataset + PIL + torchvision pipeline, in one run.

Both read the same shards with the same transforms (train: random resized crop + flip + normalise; eval:
resize shorter side + center crop + normalise), batch size and number of CPU threads (DALI threads vs
DataLoader worker processes). DALI decodes on the GPU ("mixed") when ``--device`` is CUDA.

    python benchmarks/loader.py --shards data/bench-photos --batch-size 64 --make-photos 512
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance
from torchvision import transforms as T

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

from pipelines.data.loader import make_loader  # noqa: E402
from pipelines.data.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from pipelines.data.shards import write_shards  # noqa: E402


def make_photo_shards(out: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct ~500x375 JPEGs cut from scikit-learn's sample photos, sharded with our writer."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            which = i % len(photos.images)
            photo = Image.fromarray(photos.images[which])
            area, aspect = rng.uniform(0.35, 1.0), rng.uniform(0.8, 1.5)
            w = min(photo.width, round(math.sqrt(area * photo.width * photo.height * aspect)))
            h = min(photo.height, round(w / aspect))
            x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
            crop = photo.crop((x, y, x + w, y + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            long_side = int(rng.integers(450, 501))
            size = (long_side, long_side * 3 // 4) if rng.random() < 0.75 else (long_side * 3 // 4, long_side)
            crop = ImageEnhance.Brightness(crop.resize(size, Image.Resampling.BICUBIC)).enhance(
                rng.uniform(0.8, 1.2)
            )
            folder = Path(tmp) / Path(photos.filenames[which]).stem
            folder.mkdir(exist_ok=True)
            crop.save(folder / f"{i:05d}.jpg", "JPEG", quality=int(rng.integers(85, 96)))
        write_shards(f"imagefolder:{tmp}", out, split="train", shard_size=64, seed=seed)


def pil_batches(shards: list[Path], args: argparse.Namespace, train: bool) -> Iterator[tuple]:
    """webdataset reads, PIL decodes, torchvision transforms; ``args.threads`` DataLoader workers."""
    if train:
        ops = [T.RandomResizedCrop(args.img_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(math.floor(args.img_size / args.crop_pct)), T.CenterCrop(args.img_size)]
    transform = T.Compose([*ops, T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])

    def decode(sample: dict) -> tuple[torch.Tensor, int]:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return transform(image), int(np.frombuffer(sample["lbl"], "<i4")[0])

    # resampled: every worker streams shards endlessly, so no epoch restarts are timed (DALI has none either)
    urls = [str(s) for s in shards]
    dataset = wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
    if train:
        dataset = dataset.shuffle(256)
    dataset = dataset.map(decode).batched(args.batch_size, partial=False)
    cuda = args.device.type == "cuda"
    for images, labels in wds.WebLoader(dataset, batch_size=None, num_workers=args.threads, pin_memory=cuda):
        yield images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)


def dali_batches(args: argparse.Namespace, train: bool) -> Iterator[tuple]:
    """The project's loader, epoch after epoch."""
    loader = make_loader(
        args.shards, args.split, batch_size=args.batch_size, img_size=args.img_size, train=train,
        num_threads=args.threads, device=args.device, crop_pct=args.crop_pct,
    )
    while True:
        yield from loader


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its live children (Linux ``/proc``)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if os.getpid() in (int(stat.parent.name), int(fields[1])):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(batches: Iterable[tuple], args: argparse.Namespace) -> tuple[float, float]:
    """(images per second, images per CPU-second) over ``args.batches`` batches after ``args.warmup``."""
    stream = iter(batches)
    for _ in islice(stream, args.warmup):
        pass
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for images, _ in islice(stream, args.batches):
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)
        assert images.shape == (args.batch_size, 3, args.img_size, args.img_size)
        count += len(images)
    assert count == args.batches * args.batch_size
    return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=Path, required=True, help="shard directory (from make_shards.py)")
    parser.add_argument(
        "--make-photos", type=int, default=0, metavar="N",
        help="if --shards has no manifest yet, fill it with N photo-like 500x375 JPEGs",
    )
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI threads = PIL workers")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (pipeline start-up)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline; median shown")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_photos and not (args.shards / MANIFEST_NAME).exists():
        make_photo_shards(args.shards, args.make_photos)
    manifest = read_manifest(args.shards)
    size = manifest.info[args.split]["image_size"]
    width, height = (size[side]["mean"] for side in ("width", "height"))
    print(
        f"{manifest.counts[args.split]} images (mean {width:.0f}x{height:.0f}) in "
        f"{len(manifest.shards(args.split))} shards; batch {args.batch_size}, {args.img_size}px, "
        f"{args.threads} threads, device {args.device}"
    )
    decoder = "mixed (GPU)" if args.device.type == "cuda" else "CPU"
    for train in (True, False):
        runs: dict[str, Callable[[], Iterable[tuple]]] = {
            f"DALI ({decoder} decode)": partial(dali_batches, args, train),
            "webdataset + PIL + torchvision": partial(pil_batches, manifest.shards(args.split), args, train),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, make in runs.items():
                results[name].append(measure(make(), args))
        print(
            f"{'train' if train else 'eval'} transforms:         median img/s  img/CPU-s  (img/s of each run)"
        )
        medians = {}
        for name, values in results.items():
            medians[name] = [statistics.median(column) for column in zip(*values, strict=True)]
            each = ", ".join(f"{wall:.0f}" for wall, _ in values)
            print(f"  {name:32s} {medians[name][0]:10.1f} {medians[name][1]:10.1f}  ({each})")
        (dali_wall, dali_cpu), (pil_wall, pil_cpu) = medians.values()
        ratios = f"{dali_wall / pil_wall:.2f}x images/s, {dali_cpu / pil_cpu:.2f}x images per CPU-second"
        print(f"  DALI / PIL: {ratios}")


if __name__ == "__main__":
    main()
