"""The DALI loader on real shards (CPU decoding): labels and pixels, rank sharding, padding, clear errors."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipelines.data.loader import PAD_LABEL, make_loader
from pipelines.data.manifest import (
    CorruptSampleError,
    DataDirError,
    ManifestError,
    MissingLabelError,
    NotEnoughSamplesError,
    ShardMismatchError,
    read_manifest,
    sha256_file,
)
from pipelines.data.shards import write_shards

pytestmark = pytest.mark.timeout(120)  # a data error must fail fast, never hang


def tar_order(data_dir: Path, split: str) -> list[dict]:
    """JSON meta of every sample of ``split`` in shard order (the order DALI reads without shuffling)."""
    metas = []
    for tar in read_manifest(data_dir).shards(split):
        with tarfile.open(tar) as archive:
            metas += [json.load(archive.extractfile(m)) for m in archive if m.name.endswith(".json")]
    return metas


def rank_loaders(data_dir: Path, split: str, batch_size: int, img_size: int, train: bool) -> list:
    """The loaders of two simulated ranks."""
    kwargs = {"batch_size": batch_size, "img_size": img_size, "train": train, "num_shards": 2}
    return [make_loader(data_dir, split, shard_id=rank, **kwargs) for rank in range(2)]


def epoch_labels(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_shards("digits", out, shard_size=400, workers=1)
    return out


@pytest.fixture(scope="module")
def unique_dir(tmp_path_factory) -> Path:
    """47 small photos-like JPEGs, each its own class, so a label identifies a sample; 10 per shard."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(47):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        rows.append(f"{i}.jpg,{i}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    write_shards(f"csv:{root / 'list.csv'}", root / "shards", shard_size=10, workers=1)
    return root / "shards"


@pytest.fixture()
def copy_of(tmp_path):
    def copy(data_dir: Path) -> Path:
        return Path(shutil.copytree(data_dir, tmp_path / data_dir.name))

    return copy


def test_digits_val_labels_and_pixels_match_sklearn(digits_dir):
    digits = load_digits()
    loader = make_loader(digits_dir, "val", batch_size=100, img_size=64, train=False, crop_pct=1.0)
    assert len(loader) == 4 and loader.num_samples == 400
    images, labels = zip(*loader, strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.dtype == torch.float32 and images.shape == (400, 3, 64, 64) and labels.dtype == torch.int64
    assert (labels[360:] == PAD_LABEL).all()
    metas = tar_order(digits_dir, "val")
    expected = [digits.target[int(m["source"].removeprefix("digits:"))] for m in metas]
    assert labels[:360].tolist() == expected
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    pixels = (images[:360] * std + mean).clamp(0, 1)
    for image, meta in zip(pixels, metas, strict=True):
        original = np.kron(digits.images[int(meta["source"].removeprefix("digits:"))], np.ones((8, 8)))
        assert np.corrcoef(original.ravel(), image[0].numpy().ravel())[0, 1] > 0.9


def test_normalisation_is_the_one_asked_for(digits_dir):
    """The same val pixels come back with ImageNet's statistics by default and with the given ones."""
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    default = next(iter(make_loader(digits_dir, "val", batch_size=16, img_size=64, train=False)))[0]
    custom = next(iter(make_loader(digits_dir, "val", batch_size=16, img_size=64, train=False, mean=mean,
                                   std=std)))[0]
    as_pixels = [x * torch.tensor(s).view(3, 1, 1) + torch.tensor(m).view(3, 1, 1)
                 for x, m, s in ((default, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), (custom, mean, std))]
    torch.testing.assert_close(as_pixels[0], as_pixels[1], atol=1e-5, rtol=0)
    assert custom[:, 0].min() == pytest.approx(-0.1 / 0.5, abs=1e-6)  # black background: (0 - mean) / std
    with pytest.raises(ValueError, match="3 positive stds"):
        make_loader(digits_dir, "val", batch_size=16, img_size=64, train=False, std=(1.0, 0.0, 1.0))


def test_digits_train_epoch_two_ranks(digits_dir):
    manifest = read_manifest(digits_dir)
    loaders = rank_loaders(digits_dir, "train", 64, 32, train=True)
    assert [len(lo) for lo in loaders] == [11, 11] and loaders[0].num_samples == 11 * 64
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == 11
        images, labels = batches[0]
        assert images.shape == (64, 3, 32, 32) and torch.isfinite(images).all()
        assert labels.min() >= 0 and labels.max() < manifest.num_classes


def test_eval_covers_every_sample_exactly_once_across_ranks(unique_dir):
    loaders = rank_loaders(unique_dir, "train", 4, 16, train=False)
    assert [len(lo) for lo in loaders] == [6, 6]  # ceil(ceil(47 / 2) / 4) on both ranks
    for _ in range(2):
        seen = []
        for loader in loaders:
            labels = [y for batch in epoch_labels(loader) for y in batch]
            assert len(labels) == loader.num_samples == 24
            seen += [y for y in labels if y != PAD_LABEL]
        assert sorted(seen) == list(range(47))


def test_train_ranks_disjoint_equal_steps_over_epochs(unique_dir):
    order = [m["label"] for m in tar_order(unique_dir, "train")]
    partitions = [set(order[:23]), set(order[23:])]  # DALI's contiguous split of 47 samples over 2 ranks
    loaders = rank_loaders(unique_dir, "train", 4, 16, train=True)
    assert [len(lo) for lo in loaders] == [5, 5]  # (47 // 2) // 4: rank 1 (24 samples) drops its extra batch
    orders = []
    for _ in range(4):
        epoch = [epoch_labels(loader) for loader in loaders]
        for rank, batches in enumerate(epoch):
            assert len(batches) == 5 and all(len(b) == 4 for b in batches)
            labels = [y for b in batches for y in b]
            assert len(set(labels)) == 20 and set(labels) <= partitions[rank]
        orders.append(epoch[0])
    assert len({str(o) for o in orders}) == 4  # reshuffled every epoch


def test_stopping_mid_epoch_starts_a_full_fresh_epoch(unique_dir):
    loader = make_loader(unique_dir, "train", batch_size=4, img_size=16, train=True)
    for step, _ in enumerate(loader):
        if step == 1:
            break
    labels = [y for b in epoch_labels(loader) for y in b]
    assert len(labels) == len(loader) * 4 == 44 and len(set(labels)) == 44


def test_randaugment_and_eval_crop(digits_dir):
    loader = make_loader(
        digits_dir, "train", batch_size=32, img_size=32, train=True, randaugment=True, seed=3
    )
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 32, 32) and torch.isfinite(images).all() and labels.shape == (32,)
    val = make_loader(digits_dir, "val", batch_size=32, img_size=48, train=False, crop_pct=0.75)
    images, _ = next(iter(val))  # 64 -> 64 (= 48 / 0.75) -> center 48
    assert images.shape == (32, 3, 48, 48)


def test_hflip_mirrors_exactly_and_bad_augmentation_options_are_refused(digits_dir):
    """hflip=1 mirrors every training image that hflip=0 leaves as is (same seed: same crops, same order);
    crop_scale outside (0, 1] and hflip outside [0, 1] are refused."""

    def first_batch(**options):
        loader = make_loader(digits_dir, "train", batch_size=16, img_size=32, train=True, seed=5, **options)
        return next(iter(loader))

    kept, labels = first_batch(crop_scale=0.3, hflip=0.0)
    mirrored, same_labels = first_batch(crop_scale=0.3, hflip=1.0)
    assert torch.equal(labels, same_labels)
    assert not torch.equal(kept, mirrored)
    torch.testing.assert_close(mirrored, kept.flip(-1))
    for bad in ({"crop_scale": 0.0}, {"crop_scale": 1.5}, {"hflip": -0.1}, {"hflip": 2.0}):
        with pytest.raises(ValueError, match="crop_scale <= 1 and 0 <= hflip <= 1"):
            make_loader(digits_dir, "train", batch_size=16, img_size=32, train=True, **bad)


def test_dataset_errors(digits_dir, unique_dir, tmp_path, copy_of):
    with pytest.raises(DataDirError, match="does not exist"):
        make_loader(tmp_path / "missing", "train", batch_size=4, img_size=16, train=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataDirError, match="is empty"):
        make_loader(tmp_path / "empty", "train", batch_size=4, img_size=16, train=True)
    with pytest.raises(ManifestError, match="no split 'test'"):
        make_loader(digits_dir, "test", batch_size=4, img_size=16, train=False)
    with pytest.raises(NotEnoughSamplesError, match="360 samples, fewer than 2 ranks x batch size 256"):
        make_loader(digits_dir, "val", batch_size=256, img_size=16, train=True, num_shards=2)
    with pytest.raises(NotEnoughSamplesError, match="47 samples, fewer than 48 ranks"):
        make_loader(unique_dir, "train", batch_size=1, img_size=16, train=False, num_shards=48)
    broken = copy_of(unique_dir)
    text = (broken / "manifest.json").read_text()
    raw = json.loads(text)
    raw["splits"]["train"]["shards"][1]["count"] -= 1
    raw["splits"]["train"]["count"] -= 1
    (broken / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardMismatchError, match=r"train-000001\.idx: header 'v1.2 10' does not list the 9"):
        make_loader(broken, "train", batch_size=4, img_size=16, train=True)
    (broken / "manifest.json").write_text(text)
    (broken / "train-000002.tar").unlink()
    with pytest.raises(ShardMismatchError, match=r"train-000002\.tar does not exist"):
        make_loader(broken, "train", batch_size=4, img_size=16, train=True)


def rewrite_shard(data_dir: Path, tar: Path, drop: tuple[str, str]) -> None:
    """Rewrite ``tar`` without member ``drop`` = (key, ext), re-index it and update the manifest."""
    from wds2idx import IndexCreator

    with tarfile.open(tar) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in members:
            if member.name != ".".join(drop):
                archive.addfile(member, io.BytesIO(data))
    with IndexCreator(str(tar), str(tar.with_suffix(".idx")), verbose=False) as creator:
        creator.create_index()
    raw = json.loads((data_dir / "manifest.json").read_text())
    for shard in raw["splits"]["train"]["shards"]:
        if shard["tar"] == tar.name:
            shard.update(bytes=tar.stat().st_size, sha256=sha256_file(tar))
    (data_dir / "manifest.json").write_text(json.dumps(raw))


def test_missing_label_component_is_named(unique_dir, copy_of):
    data = copy_of(unique_dir)
    rewrite_shard(data, data / "train-000002.tar", ("train-00000023", "lbl"))
    loader = make_loader(data, "train", batch_size=4, img_size=16, train=True)
    with pytest.raises(MissingLabelError, match=r"train-000002\.tar: sample 'train-00000023' has no \.lbl"):
        next(iter(loader))


@pytest.mark.parametrize("train", [True, False])
def test_corrupt_jpeg_fails_fast_naming_shard_and_key(unique_dir, copy_of, train):
    data = copy_of(unique_dir)
    tar, index = data / "train-000003.tar", data / "train-000003.idx"
    fields = index.read_text().splitlines()[6].split()  # 6th sample of shard 3: global position 35 (rank 1)
    offset, size = int(fields[fields.index("jpg") + 1]), int(fields[fields.index("jpg") + 2])
    with open(tar, "r+b") as f:  # bit rot in place: same size, so only a checksum or the decoder notices
        f.seek(offset + 200)
        f.write(bytes(size - 200))
    loader = make_loader(data, "train", batch_size=4, img_size=16, train=train, shard_id=1, num_shards=2)
    with pytest.raises(
        CorruptSampleError, match=r"train-000003\.tar: sample 'train-00000035' cannot be decoded"
    ):
        for _ in range(2):
            for _ in loader:
                pass
    clean = make_loader(unique_dir, "train", batch_size=4, img_size=16, train=train, shard_id=1, num_shards=2)
    assert len(list(clean)) == len(loader)


def test_images_stored_at_the_model_size_are_evaluated_whole(digits_dir):
    """The default 0.875 centre crop would zoom a 64 px image stored at 64 px; it is read whole instead."""
    def first_batch(img_size: int, **crop) -> torch.Tensor:
        loader = make_loader(digits_dir, "val", batch_size=16, img_size=img_size, train=False, **crop)
        return next(iter(loader))[0]

    torch.testing.assert_close(first_batch(64), first_batch(64, crop_pct=1.0), rtol=0, atol=0)
    assert not torch.equal(first_batch(64), first_batch(64, crop_pct=0.875))  # an explicit crop still applies
