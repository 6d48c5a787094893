"""Write WebDataset tar shards that NVIDIA DALI reads directly, plus a DALI index per shard and a manifest.

Each sample ``<split>-<n>`` holds three members: ``.jpg`` (JPEG bytes), ``.lbl`` (the class index as a raw
4-byte little-endian int32, so DALI's reader yields it with ``dtypes=INT32``; deliberately not webdataset's
ASCII ``.cls``) and ``.json`` (key, source, label, class, stored width/height). Samples are shuffled with
``seed`` before sharding; tar headers carry fixed mtime/owner, so the same input gives byte-identical shards.
Every image is decoded while writing: unreadable ones are reported and left out (``strict`` raises instead).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm
from wds2idx import IndexCreator

from pipelines.data import cluttered_digits, hard_cluttered_digits
from pipelines.data.cluttered_digits import Canvas
from pipelines.data.manifest import (
    COMPONENTS,
    FORMAT,
    MANIFEST_NAME,
    CorruptSampleError,
    DataDirError,
    DataError,
    Manifest,
    ManifestError,
    MissingLabelError,
    SourceError,
    read_manifest,
    sha256_file,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
DIGITS_IMG_SIZE = 64
DIGITS_SPLITS = ("train", "val")
MIN_IMG_SIZE = 8  # as finetune's --img-size
SPLIT_FOLDER_NAMES = ("train", "val", "validation", "test")  # an imagefolder root of splits, not classes
OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"
JPEG_QUALITY = 90  # of every image the writer (re-)encodes, unless its built-in source says otherwise
CHUNK = 512  # images decoded per round trip to the worker pool (bounds memory on large datasets)


@dataclass(frozen=True)
class BuiltinSource:
    """A source this project makes (no path): its default side, the JPEG quality its images are stored at,
    what draws its canvases of a split and seed (None: the plain scans), and what draws and stores them, as
    the manifest records it (None: the scans)."""

    img_size: int
    jpeg_quality: int = JPEG_QUALITY
    canvases: Callable[[str, int], list[Canvas]] | None = None
    task_params: dict | None = None


BUILTIN = {
    "digits": BuiltinSource(DIGITS_IMG_SIZE),
    "cluttered-digits": BuiltinSource(cluttered_digits.CANVAS, canvases=cluttered_digits.make_canvases,
                                      task_params=cluttered_digits.TASK_PARAMS),
    **{name: BuiltinSource(drawing.canvas, hard_cluttered_digits.JPEG_QUALITY, drawing.make_canvases,
                           drawing.task_params)
       for name, drawing in hard_cluttered_digits.SOURCES.items()},
}
BUILTIN_SOURCES = tuple(BUILTIN)


@dataclass(frozen=True)
class Item:
    """One source sample: where it comes from (for reports and meta), its class index and the JPEG quality
    it is stored at if the writer encodes it."""

    source: str
    label: int
    path: Path | None = None  # image file, or
    pixels: np.ndarray | None = None  # built-in sources: uint8 grey
    meta: dict | None = None  # extra fields of the sample's JSON meta
    jpeg_quality: int = JPEG_QUALITY


@dataclass(frozen=True)
class Problem:
    """A source sample left out of the shards, why, and the error it becomes in strict mode."""

    source: str
    reason: str
    error: type[DataError] = CorruptSampleError


def parse_source(source: str) -> tuple[str, Path | None]:
    """Split a built-in source (``digits``, ``cluttered-digits``, ``cluttered-digits-hard[-96]``),
    ``imagefolder:DIR`` or ``csv:FILE`` into kind and path."""
    kind, _, arg = source.partition(":")
    if kind in BUILTIN_SOURCES and not arg:
        return kind, None
    if kind in ("imagefolder", "csv") and arg:
        path = Path(arg).expanduser().resolve()
        if not (path.is_dir() if kind == "imagefolder" else path.is_file()):
            raise SourceError(f"source {source!r}: {path} does not exist")
        return kind, path
    raise SourceError(
        f"source {source!r}: expected one of {', '.join(map(repr, BUILTIN_SOURCES))}, 'imagefolder:DIR' or "
        "'csv:FILE'"
    )


def _merge_classes(found: list[str], existing: list[str] | None, where: str) -> list[str]:
    """Class list to use: the directory's existing one (other splits) if any, else ``found``."""
    if existing is None:
        return found
    unknown = [c for c in found if c not in existing]
    if unknown:
        raise SourceError(f"{where}: classes {unknown[:5]} are not among the classes of the other splits")
    return existing


def digits_items(split: str) -> list[Item]:
    """scikit-learn's bundled digits; the fixed stratified train/val split of the cluttered digits
    (:func:`pipelines.data.cluttered_digits.split_scans`, seed-independent)."""
    chosen, digits = cluttered_digits.split_scans(split)
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    quality = BUILTIN["digits"].jpeg_quality
    return [Item(f"digits:{i}", int(digits.target[i]), pixels=pixels[i], jpeg_quality=quality)
            for i in chosen]


def cluttered_digits_items(split: str, seed: int, source: str = "cluttered-digits") -> list[Item]:
    """The canvases of ``split`` (:mod:`pipelines.data.cluttered_digits`, or for ``cluttered-digits-hard``
    and ``-hard-96`` :mod:`pipelines.data.hard_cluttered_digits`), with the digit's box in the meta."""
    builtin = BUILTIN[source]
    return [
        Item(
            f"{source}:{c.scan}:{i}",
            c.label,
            pixels=c.pixels,
            meta={"scan": c.scan, "digit_box": list(c.box), "clutter_scans": list(c.clutter)},
            jpeg_quality=builtin.jpeg_quality,
        )
        for i, c in enumerate(builtin.canvases(split, seed))
    ]


def imagefolder_items(root: Path, existing: list[str] | None) -> tuple[list[str], list[Item], list[Problem]]:
    """``root/<class>/**/<image>``; images directly under ``root`` have no class and are reported."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [n for n in found if n.lower() in SPLIT_FOLDER_NAMES and any(
        p.is_dir() for p in (root / n).iterdir())]
    if found and len(split_dirs) == len(found):
        raise SourceError(f"imagefolder {root}: holds split folders {', '.join(split_dirs)}, not class "
                          f"folders; make each split apart: --source imagefolder:{root}/{split_dirs[0]} "
                          f"--split {split_dirs[0]}")
    empty = [n for n in found if not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                         for p in (root / n).rglob("*"))]
    if empty:
        raise SourceError(f"imagefolder {root}: class folder(s) {', '.join(empty)} hold no image; remove "
                          "them or add images (a class without samples cannot be learned)")
    classes = _merge_classes(found, existing, f"imagefolder {root}")
    items: list[Item] = []
    problems = [
        Problem(str(p), "missing label: image is not inside a class folder", MissingLabelError)
        for p in sorted(root.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    for name in found:
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                items.append(Item(str(path.relative_to(root)), classes.index(name), path=path))
    return classes, items, problems


def csv_items(path: Path, existing: list[str] | None) -> tuple[list[str], list[Item], list[Problem]]:
    """Rows ``path,label`` (optional header ``path,label``), paths relative to the CSV's folder.

    ``label`` is a class name, or the class index when every label is a non-negative integer.
    """
    rows: list[tuple[int, str, str]] = []
    problems: list[Problem] = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or (line == 1 and cells[:2] == ["path", "label"]):
                continue
            if len(cells) < 2 or not cells[1]:
                problems.append(Problem(f"{path}:{line} ({cells[0]})", "missing label", MissingLabelError))
            else:
                rows.append((line, cells[0], cells[1]))
    if rows and all(re.fullmatch(r"\d+", label) for _, _, label in rows):
        top = max(int(label) for _, _, label in rows)
        classes = existing if existing is not None else [str(i) for i in range(top + 1)]
        if top >= len(classes):
            raise SourceError(f"csv {path}: label {top} is not a class index (only {len(classes)} classes)")
        index = {label: int(label) for _, _, label in rows}
    else:
        found = sorted({label for _, _, label in rows})
        classes = _merge_classes(found, existing, f"csv {path}")
        index = {label: classes.index(label) for label in found}
    items = [Item(rel, index[label], path=path.parent / rel) for _, rel, label in rows]
    return classes, items, problems


EncodeResult = tuple[bytes, int, int] | str


def encode(item: Item, img_size: int | None) -> EncodeResult:
    """Decode and check one image; return (JPEG bytes, width, height) or the reason it is rejected.

    JPEGs in RGB/grey that need no resize or rotation are stored byte for byte; everything else is
    converted to RGB (EXIF orientation applied, shorter side capped at ``img_size``) and re-encoded at the
    item's ``jpeg_quality``.
    """
    try:
        if item.pixels is not None:
            img = Image.fromarray(item.pixels, "L")
            if img_size is not None and img.size != (img_size, img_size):
                img = img.resize((img_size, img_size), Image.Resampling.BICUBIC)
            data = None
        else:
            data = item.path.read_bytes()
            img = Image.open(io.BytesIO(data))
            img.load()
        upright = img.getexif().get(ExifTags.Base.Orientation, 1) == 1
        too_big = img_size is not None and min(img.size) > img_size
        if data is None or img.format != "JPEG" or img.mode not in ("RGB", "L") or not upright or too_big:
            img = ImageOps.exif_transpose(img).convert("RGB")
            if too_big:
                scale = img_size / min(img.size)
                size = (round(img.width * scale), round(img.height * scale))
                img = img.resize(size, Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=item.jpeg_quality)
            data = buffer.getvalue()
    except Exception as err:  # PIL raises many exception types for bad files; all mean "unreadable"
        # the same reason for the same file on every run: no object addresses in the manifest
        return f"{type(err).__name__}: {OBJECT_ADDRESS.sub('the file', str(err))}"
    return data, img.width, img.height


def _encoded(items: list[Item], img_size: int | None, workers: int) -> Iterator[tuple[Item, EncodeResult]]:
    """``(item, encode(item))`` in order, decoded by ``workers`` processes ``CHUNK`` images at a time."""
    work = partial(encode, img_size=img_size)
    if workers <= 1:
        yield from zip(items, map(work, items), strict=True)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            yield from zip(chunk, pool.map(work, chunk, chunksize=16), strict=True)


def _skip(problem: Problem, strict: bool) -> None:
    """Report a left-out sample on stderr, or raise its error in strict mode."""
    if strict:
        raise problem.error(f"{problem.source}: {problem.reason} (strict mode)")
    tqdm.write(f"skipped {problem.source}: {problem.reason}", file=sys.stderr)


def _size_stats(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 2)}


def _index_shards(stage: Path, split: str) -> list[dict]:
    """Write DALI's index (``wds2idx``) next to every staged tar; return the manifest's shard entries."""
    shards = []
    for tar in sorted(stage.glob(f"{split}-*.tar")):
        index = tar.with_suffix(".idx")
        with IndexCreator(str(tar), str(index), verbose=False) as creator:
            creator.create_index()
        count = int(index.read_text().split(maxsplit=2)[1])
        entry = {"tar": tar.name, "index": index.name, "count": count, "bytes": tar.stat().st_size}
        shards.append({**entry, "sha256": sha256_file(tar)})
    return shards


def _write_split(
    items: list[Item],
    problems: list[Problem],
    stage: Path,
    split: str,
    classes: list[str],
    *,
    shard_size: int,
    seed: int,
    img_size: int | None,
    workers: int,
    strict: bool,
) -> dict:
    """Shuffle, validate and write one split into ``stage``; return its manifest entry."""
    for problem in problems:
        _skip(problem, strict)
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    widths: list[int] = []
    heights: list[int] = []
    class_counts = [0] * len(classes)
    pattern = str(stage / f"{split}-%06d.tar")
    writer = None
    try:
        encoded = _encoded(items, img_size, workers)
        for item, result in tqdm(encoded, total=len(items), desc=f"{split} shards", unit="img"):
            if isinstance(result, str):
                problems.append(Problem(str(item.path or item.source), result))
                _skip(problems[-1], strict)
                continue
            data, width, height = result
            key = f"{split}-{len(widths):08d}"
            meta = {"key": key, "source": item.source, "label": item.label, "class": classes[item.label],
                    "width": width, "height": height, **(item.meta or {})}
            if writer is None:  # fixed mtime and raw bytes (no ASCII encoding): reproducible tars
                writer = wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0, encoder=False)
            label = np.array(item.label, dtype="<i4").tobytes()
            writer.write({"__key__": key, "jpg": data, "lbl": label, "json": json.dumps(meta).encode()})
            widths.append(width)
            heights.append(height)
            class_counts[item.label] += 1
    finally:
        if writer is not None:
            writer.close()
    if not widths:
        raise SourceError(f"split {split!r}: no valid images ({len(problems)} skipped)")
    return {
        "count": len(widths),
        "shards": _index_shards(stage, split),
        "class_counts": class_counts,
        "image_size": {"width": _size_stats(widths), "height": _size_stats(heights)},
        "skipped": [{"source": p.source, "reason": p.reason} for p in problems],
    }


def _load_raw_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return {"format": FORMAT, "components": COMPONENTS, "classes": [], "splits": {}}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); delete it to start over") from err
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: key 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    return raw


def _commit(stage: Path, out_dir: Path, split: str, entry: dict, classes: list[str]) -> None:
    """Replace ``split``'s shards in ``out_dir`` by the complete staged ones, keeping the old split intact
    until the new one is in place.

    The new manifest is written first (the only write that needs space); then the old shards are moved
    aside, the new ones moved in (renames in one directory) and the manifest swapped with ``os.replace``;
    the old shards are deleted last. A failure before the swap puts the old shards back.
    """
    raw = _load_raw_manifest(out_dir)
    raw["classes"] = classes
    raw["splits"][split] = entry
    tmp = out_dir / f".{MANIFEST_NAME}.tmp"
    aside = out_dir / f".old-{split}"
    try:
        tmp.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        old = [*out_dir.glob(f"{split}-*.tar"), *out_dir.glob(f"{split}-*.idx")]
        for path in old:
            path.replace(aside / path.name)
        try:
            for new in sorted(stage.iterdir()):
                new.replace(out_dir / new.name)
            tmp.replace(out_dir / MANIFEST_NAME)
        except BaseException:
            for path in [*out_dir.glob(f"{split}-*.tar"), *out_dir.glob(f"{split}-*.idx")]:
                path.unlink()
            for path in old:
                (aside / path.name).replace(path)
            raise
    finally:
        if tmp.is_file():
            tmp.unlink()
    shutil.rmtree(aside, ignore_errors=True)


def write_shards(
    source: str,
    out_dir: str | Path,
    *,
    split: str | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    img_size: int | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> Manifest:
    """Write ``source`` (``digits``, ``cluttered-digits``, ``imagefolder:DIR``, ``csv:FILE``) as shards.

    ``split=None`` means both ``train`` and ``val`` for the built-in sources and ``train`` otherwise. Other
    splits already in ``out_dir`` are kept, and their class list is reused so indices agree (e.g. ImageNet
    train, then val). ``img_size``: side of the built-in images (default: ``BUILTIN``'s); for files,
    if set, the shorter side is capped at it. ``seed`` shuffles the samples (and draws the cluttered-digits
    canvases).
    Returns the re-read manifest. Raises :class:`SourceError` / :class:`MissingLabelError` on bad input.
    """
    kind, path = parse_source(source)
    if kind in BUILTIN and img_size is None:
        img_size = BUILTIN[kind].img_size
    splits = list(DIGITS_SPLITS) if kind in BUILTIN_SOURCES and split is None else [split or "train"]
    for name in splits:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise SourceError(f"split {name!r}: use letters, digits and '_' only")
    if shard_size < 1:
        raise SourceError(f"shard_size {shard_size} must be >= 1")
    if img_size is not None and img_size < MIN_IMG_SIZE:
        raise SourceError(f"--img-size {img_size}: must be >= {MIN_IMG_SIZE}")
    if workers is not None and workers < 1:
        raise SourceError(f"--workers {workers}: must be >= 1")
    out = Path(out_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise SourceError(f"--out {out}: cannot write there ({err.strerror})") from None
    for name in splits:
        raw = _load_raw_manifest(out)
        existing = raw["classes"] if set(raw["splits"]) - {name} else None
        problems: list[Problem] = []
        if kind in BUILTIN_SOURCES:
            classes = _merge_classes([str(d) for d in range(10)], existing, kind)
            if name not in DIGITS_SPLITS:
                raise SourceError(f"{kind} has splits {DIGITS_SPLITS}, not {name!r}")
            items = digits_items(name) if kind == "digits" else cluttered_digits_items(name, seed, kind)
        elif kind == "imagefolder":
            classes, items, problems = imagefolder_items(path, existing)
        else:
            classes, items, problems = csv_items(path, existing)
        if not items:
            raise SourceError(f"source {source!r}: no images found")
        stage = out / f".staging-{name}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            entry = _write_split(
                items,
                problems,
                stage,
                name,
                classes,
                shard_size=shard_size,
                seed=seed,
                img_size=img_size,
                workers=workers or os.cpu_count() or 1,
                strict=strict,
            )
            task = BUILTIN[kind].task_params if kind in BUILTIN else None
            entry["params"] = {
                "source": source,
                "seed": seed,
                "shard_size": shard_size,
                "img_size": img_size,
                **({"task": task} if task is not None else {}),
            }
            _commit(stage, out, name, entry, classes)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return read_manifest(out)


def ensure_builtin_shards(out_dir: str | Path, source: str, img_size: int | None = None) -> Path:
    """Make a built-in source's train/val shards in ``out_dir`` unless valid ones of that size exist.

    Safe to call from several processes at once (file lock). Refuses to overwrite another dataset.
    """
    if source not in BUILTIN_SOURCES:
        raise SourceError(f"source {source!r} is not built in; choose one of {BUILTIN_SOURCES}")
    img_size = img_size or BUILTIN[source].img_size
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        raw = _load_raw_manifest(out)
        params = {name: split.get("params", {}) for name, split in raw["splits"].items()}
        foreign = sorted(name for name, p in params.items() if p.get("source") != source)
        if foreign:
            raise DataDirError(
                f"{out} holds splits {foreign} of another source; use another directory for {source}"
            )
        try:
            read_manifest(out, verify=True)
            task = BUILTIN[source].task_params  # as drawn today
            if all(params.get(name, {}).get("img_size") == img_size and params[name].get("task") == task
                   for name in DIGITS_SPLITS):
                return out
        except DataError:
            pass
        write_shards(source, out, img_size=img_size, workers=1)
    return out


def ensure_digits_shards(out_dir: str | Path, img_size: int = DIGITS_IMG_SIZE) -> Path:
    """The plain digits shards (8x8 scans blown up to ``img_size``): :func:`ensure_builtin_shards`."""
    return ensure_builtin_shards(out_dir, "digits", img_size)
