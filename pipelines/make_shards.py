"""Turn a dataset into WebDataset shards for the DALI loader (command line over pipelines/data/shards.py).

python pipelines/make_shards.py --source cluttered-digits --out data/cluttered-digits
python pipelines/make_shards.py --source cluttered-digits-hard --out data/cluttered-digits-hard
python pipelines/make_shards.py --source digits --out data/digits
python pipelines/make_shards.py --source imagefolder:/data/imagenet/train --out data/in1k --split train
python pipelines/make_shards.py --source csv:/data/imagenet/val.csv --out data/in1k --split val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.data.manifest import DataError
from pipelines.data.shards import BUILTIN, BUILTIN_SOURCES, write_shards
from pipelines.utils.cli import Parser, bad_input

BUILTIN_SIDES = ", ".join(f"{name} {source.img_size}" for name, source in BUILTIN.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="make_shards", description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--source", required=True,
        help=f"{' | '.join(BUILTIN_SOURCES)} (built in) | imagefolder:DIR | csv:FILE (path,label rows)",
    )
    parser.add_argument("--out", required=True, type=Path, help="shard directory (manifest.json goes here)")
    parser.add_argument(
        "--split", default=None, help="split (default: train+val for built-in sources, else train)"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffle (and of the cluttered-digits canvases)"
    )
    parser.add_argument(
        "--img-size", type=int, default=None,
        help=f"built-in: image side (default: {BUILTIN_SIDES}); files: cap on the shorter side",
    )
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="fail on the first unreadable/unlabeled image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = write_shards(
            args.source,
            args.out,
            split=args.split,
            shard_size=args.shard_size,
            seed=args.seed,
            img_size=args.img_size,
            workers=args.workers,
            strict=args.strict,
        )
    except DataError as err:
        return bad_input("make_shards", err)
    for split, count in sorted(manifest.counts.items()):
        skipped = len(manifest.info[split]["skipped"])
        print(f"{split}: {count} samples in {len(manifest.shards(split))} shards ({skipped} skipped)")
    print(f"{manifest.num_classes} classes -> {manifest.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
