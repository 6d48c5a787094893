"""Shard writer + manifest reader on real data: scikit-learn digits, image folders, CSV lists, bad files."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image
from sklearn.datasets import load_digits

from pipelines.data.manifest import (
    CorruptSampleError,
    DataDirError,
    ManifestError,
    MissingLabelError,
    ShardMismatchError,
    SourceError,
    read_manifest,
)
from pipelines.data.shards import ensure_digits_shards, write_shards
from tests.shard_reading import read_samples, split_samples

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=400, workers=1)
    return out


def save(path: Path, image: Image.Image, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """3 classes of mixed formats and sizes, a truncated JPEG, an image outside any class, a text file."""
    root = tmp_path / "folder"
    for c, name in enumerate(["bird", "cat", "dog"]):
        for i in range(4):
            save(root / name / f"{i}.jpg", noise(40 + 8 * i, 30, seed=10 * c + i))
    save(root / "cat" / "rgba.png", noise(20, 20, "RGBA"), "PNG")
    save(root / "dog" / "grey.jpg", noise(24, 36, "L"))
    save(root / "dog" / "sub" / "big.jpg", noise(300, 200))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored landscape, shown rotated 90 degrees
    (root / "dog" / "rotated.jpg").parent.mkdir(parents=True, exist_ok=True)
    noise(30, 20).save(root / "dog" / "rotated.jpg", "JPEG", exif=exif)
    good = (root / "bird" / "0.jpg").read_bytes()
    (root / "bird" / "broken.jpg").write_bytes(good[: len(good) // 3])
    save(root / "stray.jpg", noise(16, 16))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_digits_labels_meta_and_pixels_match_sklearn(digits_dir):
    digits = load_digits()
    manifest = read_manifest(digits_dir, verify=True)
    assert manifest.classes == [str(d) for d in range(10)] and manifest.num_classes == 10
    seen: dict[str, set[int]] = {}
    for split in ("train", "val"):
        samples = split_samples(digits_dir, split)
        assert len(samples) == manifest.counts[split]
        seen[split] = set()
        for sample in samples:
            meta = json.loads(sample["json"])
            index = int(meta["source"].removeprefix("digits:"))
            label = int(np.frombuffer(sample["lbl"], dtype="<i4")[0])
            assert len(sample["lbl"]) == 4 and label == meta["label"] == digits.target[index]
            assert meta["key"] == sample["__key__"] and meta["class"] == str(label)
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
            assert image.shape == (64, 64, 3)
            original = np.kron(digits.images[index], np.ones((8, 8)))  # 8x8 -> 64x64 nearest
            assert np.corrcoef(original.ravel(), image[..., 0].ravel().astype(float))[0, 1] > 0.9
            seen[split].add(index)
        assert sum(manifest.info[split]["class_counts"]) == manifest.counts[split]
    assert not seen["train"] & seen["val"]
    assert seen["train"] | seen["val"] == set(range(len(digits.target)))
    assert manifest.counts == {"train": 1437, "val": 360}
    assert len(manifest.shards("train")) == 4 and manifest.info["val"]["image_size"]["width"]["max"] == 64


def test_dali_index_points_at_the_members(digits_dir):
    manifest = read_manifest(digits_dir)
    tar, index = manifest.shards("val")[0], manifest.index_files("val")[0]
    lines = index.read_text().splitlines()
    assert lines[0] == f"v1.2 {manifest.shard_infos('val')[0].count}"
    data = tar.read_bytes()
    first = read_samples(tar)[0]
    fields = lines[1].split()
    for ext, offset, size, name in zip(fields[::4], fields[1::4], fields[2::4], fields[3::4], strict=True):
        assert name == f"{first['__key__']}.{ext}"
        assert data[int(offset) : int(offset) + int(size)] == first[ext]


def test_rewriting_is_byte_identical(digits_dir, tmp_path):
    again = write_shards("digits", tmp_path / "again", shard_size=400, workers=2)
    for split in ("train", "val"):
        for ours, theirs in zip(read_manifest(digits_dir).shards(split), again.shards(split), strict=True):
            assert ours.read_bytes() == theirs.read_bytes()
            assert ours.with_suffix(".idx").read_bytes() == theirs.with_suffix(".idx").read_bytes()
    assert (digits_dir / "manifest.json").read_bytes() == (tmp_path / "again" / "manifest.json").read_bytes()
    reshuffled = write_shards("digits", tmp_path / "seed1", split="val", seed=1, workers=1)
    assert reshuffled.shards("val")[0].read_bytes() != again.shards("val")[0].read_bytes()


def test_imagefolder_reports_and_skips_bad_images(image_folder, tmp_path, capsys):
    manifest = write_shards(f"imagefolder:{image_folder}", tmp_path / "out", img_size=64, workers=2)
    assert manifest.classes == ["bird", "cat", "dog"] and manifest.counts == {"train": 16}
    skipped = {s["source"]: s["reason"] for s in manifest.info["train"]["skipped"]}
    broken, stray = str(image_folder / "bird" / "broken.jpg"), str(image_folder / "stray.jpg")
    assert set(skipped) == {broken, stray}
    assert "truncated" in skipped[broken].lower() and "missing label" in skipped[stray]
    err = capsys.readouterr().err
    assert f"skipped {broken}: " in err and f"skipped {stray}: " in err
    by_source = {}
    for sample in split_samples(tmp_path / "out", "train"):
        meta = json.loads(sample["json"])
        assert meta["class"] == meta["source"].split("/")[0] == manifest.classes[meta["label"]]
        assert np.frombuffer(sample["lbl"], "<i4")[0] == meta["label"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == (meta["width"], meta["height"])
        by_source[meta["source"]] = (image, sample["jpg"])
    assert by_source["dog/sub/big.jpg"][0].size == (96, 64)  # shorter side capped at img_size
    assert by_source["dog/rotated.jpg"][0].size == (20, 30)  # EXIF orientation applied
    assert by_source["cat/rgba.png"][0].mode == "RGB"  # PNG/RGBA re-encoded as RGB JPEG
    assert by_source["bird/1.jpg"][1] == (image_folder / "bird" / "1.jpg").read_bytes()  # stored as is
    assert manifest.info["train"]["image_size"]["height"]["max"] == 64


def test_strict_mode_fails_on_the_first_bad_image(image_folder, tmp_path):
    with pytest.raises(MissingLabelError, match="stray.jpg"):
        write_shards(f"imagefolder:{image_folder}", tmp_path / "out", strict=True, workers=1)
    (image_folder / "stray.jpg").unlink()
    with pytest.raises(CorruptSampleError, match=r"(?i)broken\.jpg: OSError: .*truncated"):
        write_shards(f"imagefolder:{image_folder}", tmp_path / "out", strict=True, workers=1)
    assert not any((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "manifest.json").exists()


def test_csv_val_split_reuses_the_train_classes(image_folder, tmp_path):
    out = tmp_path / "out"
    write_shards(f"imagefolder:{image_folder}", out, split="train", workers=1)
    rows = ["path,label", "dog/0.jpg,dog", "bird/2.jpg,bird", "cat/1.jpg,", "missing.jpg,cat", ""]
    (image_folder / "val.csv").write_text("\n".join(rows) + "\n")
    manifest = write_shards(f"csv:{image_folder / 'val.csv'}", out, split="val", workers=1)
    assert manifest.counts == {"train": 16, "val": 2} and manifest.classes == ["bird", "cat", "dog"]
    reasons = [s["reason"] for s in manifest.info["val"]["skipped"]]
    assert "missing label" in reasons and any("FileNotFoundError" in r for r in reasons)
    labels = sorted(json.loads(s["json"])["label"] for s in split_samples(out, "val"))
    assert labels == [0, 2]
    (image_folder / "new.csv").write_text("dog/1.jpg,horse\n")
    with pytest.raises(SourceError, match="horse"):
        write_shards(f"csv:{image_folder / 'new.csv'}", out, split="test", workers=1)


def test_csv_integer_labels_are_class_indices(image_folder, tmp_path):
    (image_folder / "list.csv").write_text("bird/0.jpg,4\ncat/0.jpg,0\n")
    manifest = write_shards(f"csv:{image_folder / 'list.csv'}", tmp_path / "out", workers=1)
    assert manifest.classes == ["0", "1", "2", "3", "4"]
    metas = [json.loads(s["json"]) for s in split_samples(tmp_path / "out", "train")]
    assert {m["source"]: m["label"] for m in metas} == {"bird/0.jpg": 4, "cat/0.jpg": 0}


def test_manifest_errors_name_the_file(digits_dir, tmp_path):
    with pytest.raises(DataDirError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataDirError, match="empty"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(ManifestError, match="no split 'test'"):
        read_manifest(digits_dir).shards("test")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in digits_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["classes"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="missing key 'classes'"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(copy)
    (copy / "manifest.json").write_bytes((digits_dir / "manifest.json").read_bytes())
    tar = copy / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    read_manifest(copy)  # same size: only the checksum can tell
    with pytest.raises(ShardMismatchError, match="val-000000.tar: sha256"):
        read_manifest(copy, verify=True)
    tar.write_bytes(bytes(data[:-512]))
    with pytest.raises(ShardMismatchError, match="val-000000.tar: .* bytes on disk"):
        read_manifest(copy)
    tar.unlink()
    with pytest.raises(ShardMismatchError, match="val-000000.tar does not exist"):
        read_manifest(copy)


def test_ensure_digits_shards_builds_once_and_guards_other_data(image_folder, tmp_path):
    out = ensure_digits_shards(tmp_path / "d", img_size=32)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_digits_shards(tmp_path / "d", img_size=32) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    ensure_digits_shards(tmp_path / "d", img_size=48)  # other size: rebuilt
    assert read_manifest(out).info["train"]["image_size"]["width"]["max"] == 48
    (out / "val-000000.tar").unlink()  # damaged: rebuilt
    assert read_manifest(ensure_digits_shards(out, img_size=48), verify=True).counts["val"] == 360
    write_shards(f"imagefolder:{image_folder}", tmp_path / "photos", workers=1)
    with pytest.raises(DataDirError, match="another source"):
        ensure_digits_shards(tmp_path / "photos")


def test_builtin_canvases_drawn_otherwise_are_made_again(tmp_path):
    """Built-in canvas shards record how they were drawn; shards of another drawing (an older default, or
    none recorded) are made again instead of being trained on as today's task, valid ones are kept."""
    from pipelines.data import cluttered_digits
    from pipelines.data.shards import ensure_builtin_shards

    out = ensure_builtin_shards(tmp_path / "cluttered", "cluttered-digits", img_size=16)
    manifest = out / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert all(split["params"]["task"] == cluttered_digits.TASK_PARAMS for split in raw["splits"].values())
    made = manifest.stat().st_mtime_ns
    assert ensure_builtin_shards(out, "cluttered-digits", img_size=16) == out
    assert manifest.stat().st_mtime_ns == made  # the same drawing: kept
    for older in ({**cluttered_digits.TASK_PARAMS, "clutter_pieces": 4}, None):
        raw = json.loads(manifest.read_text())
        for split in raw["splits"].values():
            split["params"].pop("task")
            if older is not None:
                split["params"]["task"] = older
        manifest.write_text(json.dumps(raw))
        ensure_builtin_shards(out, "cluttered-digits", img_size=16)
        remade = json.loads(manifest.read_text())["splits"]
        assert all(split["params"]["task"] == cluttered_digits.TASK_PARAMS for split in remade.values())


def test_hard_shards_written_at_the_default_jpeg_quality_are_made_again(tmp_path):
    """The hard canvases' shards record their JPEG quality with the drawing: shards of the hard task written
    before it was raised from the writer's default (none recorded) are made again, as today's are kept."""
    from pipelines.data import hard_cluttered_digits as hard
    from pipelines.data.shards import ensure_builtin_shards

    out = ensure_builtin_shards(tmp_path / "hard", "cluttered-digits-hard", img_size=16)
    manifest = out / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert all(split["params"]["task"] == hard.TASK_PARAMS for split in raw["splits"].values())
    assert hard.TASK_PARAMS["jpeg_quality"] == hard.JPEG_QUALITY
    for split in raw["splits"].values():
        split["params"]["task"].pop("jpeg_quality")  # as written before the quality was recorded
    manifest.write_text(json.dumps(raw))
    older = manifest.stat().st_mtime_ns
    ensure_builtin_shards(out, "cluttered-digits-hard", img_size=16)
    assert manifest.stat().st_mtime_ns != older
    remade = json.loads(manifest.read_text())["splits"]
    assert all(split["params"]["task"] == hard.TASK_PARAMS for split in remade.values())


def test_cli_one_line_errors_and_summary(image_folder, tmp_path):
    cli = [sys.executable, str(REPO / "pipelines" / "make_shards.py"), "--out", str(tmp_path / "out")]
    bad = subprocess.run(
        [*cli, "--source", f"imagefolder:{image_folder}", "--strict"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1].startswith("make_shards: error: ") and "stray.jpg" in bad.stderr
    )
    args = ["--source", f"imagefolder:{image_folder}", "--shard-size", "4", "--workers", "1"]
    ok = subprocess.run([*cli, *args], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "train: 16 samples in 4 shards (2 skipped)" in ok.stdout
