"""The one data loader: NVIDIA DALI reads the WebDataset shards and decodes, augments and normalises.

Decoding runs on the GPU ("mixed", nvJPEG) when the target device is CUDA, on the CPU otherwise; the
pipeline is otherwise identical. Sharding across ranks is DALI's, by sample index: rank ``r`` of ``k`` always
reads the same contiguous ``1/k`` of the (shuffle-written) split (``stick_to_shard``), reshuffled every
epoch with a buffer of ``INITIAL_FILL`` samples. Epoch length is fixed up front and equal on every rank:

* train: ``len = (N // k) // batch_size`` full batches of distinct samples; each rank leaves out at most
  ``batch_size`` of its samples per epoch, a different random few every epoch. No padding.
* eval: ``len = ceil(ceil(N / k) / batch_size)``. Every sample of the split is yielded exactly once across
  ranks; the batches are filled up to the fixed size with repeats whose label is ``PAD_LABEL`` (-100,
  ``torch.nn.functional.cross_entropy``'s default ``ignore_index``). Count correct predictions with
  ``(pred == labels).sum()`` and samples with ``(labels != PAD_LABEL).sum()`` to get exact accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipelines.data.manifest import (
    COMPONENTS,
    CorruptSampleError,
    DataError,
    LabelRangeError,
    Manifest,
    MissingLabelError,
    NotEnoughSamplesError,
    ShardInfo,
    ShardMismatchError,
    read_manifest,
    verify_shard,
)

CROP_PCT = 0.875  # evaluation: centre crop of an image resized to img_size / CROP_PCT
PAD_LABEL = -100
INITIAL_FILL = 1024  # shuffle buffer (samples) of the train reader
PREFETCH = 2  # batches DALI prepares ahead
READER = "Reader"
RANDAUGMENT_N, RANDAUGMENT_M = 2, 9


@dataclass(frozen=True)
class ImageTransform:
    """What the loader does to an image after decoding (see :func:`make_loader` for each option)."""

    img_size: int
    crop_pct: float
    crop_scale: float
    hflip: float
    randaugment: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


@pipeline_def
def _dali_graph(
    files: list[str],
    index_files: list[str],
    *,
    train: bool,
    transform: ImageTransform,
    decoder: str,
    shard_id: int,
    num_shards: int,
):
    t = transform
    jpegs, labels = fn.readers.webdataset(
        paths=files,
        index_paths=index_files,
        ext=[COMPONENTS["image"], COMPONENTS["label"]],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        stick_to_shard=True,
        pad_last_batch=True,
        random_shuffle=train,
        initial_fill=INITIAL_FILL,
        name=READER,
    )
    if train:  # RandomResizedCrop fused into decoding (only the crop is decoded), flip, RandAugment
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB, random_area=[t.crop_scale, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
        )
        images = fn.resize(images, size=[t.img_size, t.img_size], antialias=True)
        if t.randaugment:
            images = rand_augment.rand_augment(images, n=RANDAUGMENT_N, m=RANDAUGMENT_M,
                                               shape=[t.img_size] * 2)
        mirror = fn.random.coin_flip(probability=t.hflip)
    else:  # resize shorter side to img_size / crop_pct, center crop
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=math.floor(t.img_size / t.crop_pct), antialias=True)
        mirror = False
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(t.img_size, t.img_size), mirror=mirror,
        mean=[255 * m for m in t.mean], std=[255 * s for s in t.std],
    )
    return images, labels.gpu() if decoder == "mixed" else labels


def _shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Sample range ``[begin, end)`` DALI assigns to ``shard_id`` (same formula as DALI's readers)."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


def rank_shards(manifest: Manifest, split: str, shard_id: int, num_shards: int) -> list[ShardInfo]:
    """The shard files holding the samples rank ``shard_id`` of ``num_shards`` reads from ``split`` (DALI's
    ``stick_to_shard``: the same contiguous range every epoch)."""
    begin, end = _shard_bounds(manifest.counts[split], shard_id, num_shards)
    shards, first = [], 0
    for shard in manifest.shard_infos(split):
        if first < end and first + shard.count > begin:
            shards.append(shard)
        first += shard.count
    return shards


def verify_rank_shards(data_dir: str | Path, splits: Sequence[str], shard_id: int, num_shards: int) -> None:
    """Check the bytes of every shard rank ``shard_id`` will read from ``splits`` against the manifest's
    sha256 before DALI reads them (a corrupt tar can crash DALI's reader outright); each shard once per
    process. Raises a :class:`~pipelines.data.manifest.DataError` naming the shard."""
    manifest = read_manifest(data_dir)
    for split in splits:
        for shard in rank_shards(manifest, split, shard_id, num_shards):
            verify_shard(shard)


def _components(index_line: str) -> dict[str, tuple[int, int, str]]:
    """``{ext: (offset, size, member name)}`` of one sample line of a DALI index file."""
    fields = index_line.split()
    return {
        fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)
    }


def _decode_error(data: bytes) -> str | None:
    """Why DALI's CPU decoder rejects ``data``, or None if it decodes."""
    import nvidia.dali.experimental.dynamic as ndd  # lazy: eager DALI ops, only on this error path

    try:
        np.asarray(ndd.decoders.image(ndd.tensor(np.frombuffer(data, np.uint8)), device="cpu"))
    except RuntimeError as err:
        return str(err.__cause__ or err).strip().splitlines()[-1]
    return None


class DaliLoader:
    """Iterable of ``(images, labels)`` batches for one rank; each ``iter()`` is one epoch.

    ``images``: float32 ``(B, 3, img_size, img_size)``, ``(pixel / 255 - mean) / std`` per channel;
    ``labels``: int64 ``(B,)`` (``PAD_LABEL`` marks eval padding); both on ``device``. Stopping an epoch
    early is allowed: the next ``iter()`` rebuilds the pipeline and starts a fresh epoch.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        batch_size: int,
        transform: ImageTransform,
        train: bool,
        shard_id: int,
        num_shards: int,
        num_threads: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.manifest, self.split, self.train, self.device = manifest, split, train, device
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self._shards = manifest.shard_infos(split)
        self.transform = transform
        self._decoder = "mixed" if device.type == "cuda" else "cpu"
        self._num_threads, self._seed = num_threads, seed
        total = manifest.counts[split]
        self._begin, end = _shard_bounds(total, shard_id, num_shards)
        self._rank_samples = end - self._begin
        self._runs = math.ceil(math.ceil(total / num_shards) / batch_size)  # DALI pads every rank to this
        self._len = (total // num_shards) // batch_size if train else self._runs
        self._pipe: Pipeline | None = None
        self._builds = 0
        self._run = 0  # batches taken from the pipeline in the current epoch

    @property
    def num_samples(self) -> int:
        """Samples per epoch on this rank, padding included (``len(self) * batch_size``)."""
        return self._len * self.batch_size

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None or self._run != 0:
            self._pipe = self._build()
        for run in range(self._runs):
            images, labels = self._next_batch()
            if run >= self._len:  # train: drain the reader's padded end of epoch
                continue
            if not self.train:  # positions past this rank's samples are DALI's padding (repeats)
                labels[max(self._rank_samples - run * self.batch_size, 0) :] = PAD_LABEL
            yield images, labels
        self._run = 0

    def _build(self) -> Pipeline:
        """A fresh pipeline (its seed depends on seed, rank and how many were built before)."""
        seed = int(np.random.SeedSequence([self._seed, self.shard_id, self._builds]).generate_state(1)[0])
        self._builds += 1
        self._run = 0
        pipe = _dali_graph(
            [str(s.path) for s in self._shards],
            [str(s.index_path) for s in self._shards],
            train=self.train,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            transform=self.transform,
            decoder=self._decoder,
            batch_size=self.batch_size,
            num_threads=self._num_threads,
            device_id=self.device.index,  # None (CPU-only pipeline) on the CPU
            seed=seed,
            prefetch_queue_depth=PREFETCH,
            enable_conditionals=self.transform.randaugment,
        )
        try:
            pipe.build()
        except RuntimeError as err:
            self._raise_data_error(err)
        epoch_size = pipe.reader_meta(READER)["epoch_size"]
        if epoch_size != self.manifest.counts[self.split]:
            raise ShardMismatchError(
                f"{self.manifest.root}: DALI finds {epoch_size} samples in split {self.split!r}, "
                f"the manifest records {self.manifest.counts[self.split]}"
            )
        return pipe

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            images, labels = self._pipe.run()
        except RuntimeError as err:
            self._pipe = None
            self._raise_data_error(err)
        self._run += 1
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        out = []
        for batch, dtype in ((images, torch.float32), (labels, torch.int32)):
            tensor = batch.as_tensor()
            out.append(
                feed_ndarray(tensor, torch.empty(tensor.shape(), dtype=dtype, device=self.device), stream)
            )
        labels = out[1].view(-1).long()
        if bool(((labels < 0) | (labels >= self.manifest.num_classes)).any()):
            self._pipe = None
            raise self._find_bad_label()
        return out[0], labels

    def _find_bad_label(self) -> DataError:
        """The first sample of this rank whose label is outside [0, num_classes), named by shard and key."""
        index_lines: dict[int, list[str]] = {}
        for position in range(self._rank_samples):
            number, sample = self._locate(self._begin + position)
            shard = self._shards[number]
            line = index_lines.setdefault(number, shard.index_path.read_text().splitlines())[sample + 1]
            offset, size, name = _components(line)[COMPONENTS["label"]]
            with open(shard.path, "rb") as f:
                f.seek(offset)
                label = int(np.frombuffer(f.read(size), "<i4")[0])
            if not 0 <= label < self.manifest.num_classes:
                return LabelRangeError(
                    f"{shard.path}: sample {name.split('.', 1)[0]!r} has label {label}, outside the "
                    f"{self.manifest.num_classes} classes of {self.manifest.root / 'manifest.json'}"
                )
        return LabelRangeError(f"{self.manifest.root}: split {self.split!r} yielded a label outside "
                               f"[0, {self.manifest.num_classes})")

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard number, sample number in that shard) of the split's ``position``-th sample."""
        for number, shard in enumerate(self._shards):
            if position < shard.count:
                return number, position
            position -= shard.count
        raise IndexError(position)

    def _raise_data_error(self, err: RuntimeError) -> NoReturn:
        """Re-raise a DALI failure as a :class:`DataError` naming shard and sample key, if it is one."""
        message = str(err)
        if match := re.search(r'index file at "([^"]+)" line (\d+)', message):
            index_file, line = Path(match[1]), int(match[2])
            tar = next((s.path for s in self._shards if s.index_path == index_file), index_file)
            entry = _components(index_file.read_text().splitlines()[line])  # line 0 is the header
            key = next(iter(entry.values()))[2].split(".", 1)[0]
            missing = [ext for ext in COMPONENTS.values() if ext not in entry]
            error = MissingLabelError if COMPONENTS["label"] in missing else CorruptSampleError
            raise error(
                f"{tar}: sample {key!r} has no {' / '.join('.' + m for m in missing)} component"
            ) from err
        if "decoders" not in message:
            raise err
        raise self._find_undecodable(message) from err

    def _find_undecodable(self, message: str) -> DataError:
        """Scan this rank's samples back from the furthest one DALI may have read; name the first bad one."""
        ahead = (self._run + PREFETCH + 1) * self.batch_size + (INITIAL_FILL if self.train else 0)
        index_lines: dict[int, list[str]] = {}
        for position in reversed(range(min(ahead, self._rank_samples))):
            number, sample = self._locate(self._begin + position)
            shard = self._shards[number]
            lines = index_lines.setdefault(number, shard.index_path.read_text().splitlines())
            offset, size, name = _components(lines[sample + 1])[COMPONENTS["image"]]
            with open(shard.path, "rb") as f:
                f.seek(offset)
                reason = _decode_error(f.read(size))
            if reason is not None:
                key = name.split(".", 1)[0]
                return CorruptSampleError(f"{shard.path}: sample {key!r} cannot be decoded ({reason})")
        names = ", ".join(s.path.name for s in self._shards)
        return CorruptSampleError(
            f"{self.manifest.root} [{names}]: DALI failed to decode a sample: {message}"
        )


def make_loader(
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    img_size: int,
    train: bool,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    seed: int = 0,
    device: torch.device | str | None = None,
    crop_pct: float | None = None,
    crop_scale: float = 0.08,
    hflip: float = 0.5,
    randaugment: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> DaliLoader:
    """DALI loader over ``split`` of the shard directory ``data_dir`` for rank ``shard_id`` of ``num_shards``.

    Training images: a random crop of ``crop_scale`` to all of the image area (aspect 3/4 to 4/3) resized
    to ``img_size``, flipped horizontally with probability ``hflip``, then RandAugment if asked; evaluation
    images: shorter side resized to ``img_size / crop_pct``, centre crop; ``crop_pct=None`` means 1 (whole
    images) when the manifest says every image of the split is ``img_size`` square, else ``CROP_PCT``.
    Both are then normalised with ``mean`` / ``std`` (per channel, on the [0, 1] scale; a model's own are
    :func:`spot.input_normalization`). ``device=None`` picks the current CUDA device if there is one (GPU
    decoding), else the CPU. Raises a :class:`~pipelines.data.manifest.DataError` subclass for a missing/empty
    directory, a manifest that does not match the shards, or too few samples (train: fewer than
    ``num_shards * batch_size``; eval: fewer than ``num_shards``). Corrupt images and missing labels are
    reported (shard and key) when read.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if batch_size < 1 or not 0 <= shard_id < num_shards or not 0 < (crop_pct or 1) <= 1:
        raise ValueError(f"need batch_size >= 1, 0 <= shard_id < num_shards, 0 < crop_pct <= 1; got "
                         f"{batch_size=}, {shard_id=}, {num_shards=}, {crop_pct=}")
    if not 0 < crop_scale <= 1 or not 0 <= hflip <= 1:
        raise ValueError(f"need 0 < crop_scale <= 1 and 0 <= hflip <= 1; got {crop_scale=}, {hflip=}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"need 3 channel means and 3 positive stds; got {mean=}, {std=}")
    manifest = read_manifest(data_dir)
    manifest.shard_infos(split)  # raises ManifestError naming the known splits
    if crop_pct is None:
        sizes = manifest.info[split].get("image_size", {})
        whole = {v for axis in sizes.values() for v in (axis["min"], axis["max"])} == {img_size}
        crop_pct = 1.0 if whole else CROP_PCT
    total = manifest.counts[split]
    need = num_shards * batch_size if train else num_shards
    if total < need:
        raise NotEnoughSamplesError(
            f"{manifest.root}: split {split!r} has {total} samples, fewer than "
            + (f"{num_shards} ranks x batch size {batch_size}" if train else f"{num_shards} ranks")
        )
    transform = ImageTransform(img_size=img_size, crop_pct=crop_pct, crop_scale=crop_scale, hflip=hflip,
                               randaugment=randaugment, mean=tuple(mean), std=tuple(std))
    return DaliLoader(manifest, split, batch_size=batch_size, transform=transform, train=train,
                      shard_id=shard_id, num_shards=num_shards, num_threads=num_threads, seed=seed,
                      device=device)
