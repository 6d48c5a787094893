"""The Ray Train worker function: SPOT (or dense) fine-tuning with DDP, one process per GPU / CPU slot.

``train_loop_per_worker(job)`` is a plain Ray Train V2 function of one :class:`WorkerJob` (bound by
:func:`pipelines.training.trainer.build_trainer`, pickled to every worker): the resolved
:class:`~pipelines.training.config.RunConfig`, read by attribute, the run's location and ``init_weights``,
an ``ObjectRef`` of the driver's :func:`pipelines.training.weights.prepare_init` payload::

    {"spot_config": {...}, "student": state_dict, "teacher": state_dict | None, "fresh": [param names]}

Every epoch: train in mask mode (``model.train()``), validate in prune mode (``model.eval()``) on this rank's
shard of the val split, all-reduce the sums, and ``ray.train.report`` the same metrics from every rank with
a checkpoint from rank 0. Every epoch draws its random numbers (Gumbel noise, mixup, DALI augmentation) from
seeds derived from ``(seed, rank, epoch)``, so an epoch re-run after a restart sees the same randomness as it
would have in the uninterrupted run. A restart resumes from ``ray.train.get_checkpoint()``: model,
optimizer, scheduler, gradient scaler and epoch.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.experimental import tqdm_ray
from torch import Tensor, nn

import spot
from pipelines.data.loader import PAD_LABEL, make_loader, verify_rank_shards
from pipelines.data.manifest import DataError
from pipelines.storage.checkpoints import MASKS_FILE, MASKS_MIN_SIDE, load_checkpoint, save_checkpoint, unwrap
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import FAULT_RECORD, STOPPED, write_record
from pipelines.training.config import RunConfig
from pipelines.training.recipe import build_mixup, build_optimizer, freeze_embeddings
from spot.flops import gmacs
from spot.losses import spot_loss
from spot.visualize import draw_token_masks


@dataclass(frozen=True)
class WorkerJob:
    """What every worker of a run gets: the resolved ``config``, where the run's records go
    (``location``) and the ``ObjectRef`` of the initial weights (``init_weights``)."""

    config: RunConfig
    location: RunLocation
    init_weights: Any  # ray.ObjectRef of prepare_init's payload


def derived_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (e.g. seed, rank, epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_models(init: dict, device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """Student and frozen teacher (or None) from the driver's ``init_weights`` payload, on ``device``."""
    student = spot.create_model(**init["spot_config"])
    student.load_state_dict(init["student"])
    teacher = None
    if init["teacher"] is not None:
        teacher = spot.create_model(**{**init["spot_config"], "rho": None})
        teacher.load_state_dict(init["teacher"])
        teacher.requires_grad_(False)
        teacher.eval().to(device)
    return student, teacher


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum a float64 vector over ranks (no-op on one worker)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def gather_node_ids() -> list[str]:
    """The Ray node id of every worker, in rank order."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def autocast(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA; nothing on the CPU."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class NonFiniteLoss(Exception):
    """A NaN / inf loss on some rank; the message names the epoch (1-based, as on the console) and step."""


class DataFault(Exception):
    """A batch that could not be read on some rank (a label out of range, an undecodable image), raised on
    every rank at the same step; ``message`` names shard and sample on the rank that met it, else None."""

    def __init__(self, message: str | None) -> None:
        super().__init__(message or "stopped: a data error on another rank (named in the run's fault record)")
        self.message = message


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce; no-op on one worker)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def checked_batches(loader, device: torch.device):
    """The loader's batches; a :class:`~pipelines.data.manifest.DataError` on any rank stops every rank at the
    same step with :class:`DataFault` (one tiny all-reduce per step), so no rank waits in a collective for
    one that failed and no restart reads the same bad sample again."""
    batches = iter(loader)
    while True:
        error = None
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as err:
            error = str(err)
        if any_rank(error is not None, device):
            raise DataFault(error)
        yield batch


def checked_shards(data_dir: str, rank: int, world: int, device: torch.device) -> DataFault | None:
    """Every rank checks the shards it will read against the manifest's checksums before DALI opens them;
    a :class:`DataFault` on every rank if any rank found a corrupt one (a restart would read it again)."""
    error = None
    try:
        verify_rank_shards(data_dir, ("train", "val"), rank, world)
    except DataError as err:
        error = str(err)
    return DataFault(error) if any_rank(error is not None, device) else None


def _lambdas(config: RunConfig) -> dict[str, float]:
    return {"rate": config.lambda_rate, "kl": config.lambda_kl, "token": config.lambda_token}


# What an epoch's report holds: "epoch" (MLflow's step), per-epoch series (the loss parts of
# :func:`loss_parts`, the kept shares where :func:`learns_keep_rates`, lr, images/s, val top-1/5, epoch time)
# and these values of the whole run, no series: the model's GMACs (a run parameter the driver logs; the
# sweep's budget check, the console line and the registry's tags read it here) and the workers' nodes
RUN_VALUES = ("gmacs", "worker_node_ids")


def learns_keep_rates(config: RunConfig) -> bool:
    """Whether the run's keep rates move in training: the learned selector's Gumbel masks do; a heuristic
    selector keeps a fixed count per stage, so its rate loss and kept shares are constants (not reported)."""
    return config.rho is not None and config.selector == "learned"


def loss_parts(config: RunConfig, has_teacher: bool, *, pruned: bool = False) -> tuple[str, ...]:
    """The loss parts that this run computes and that vary, in training (mask mode) or, ``pruned``, in
    validation (the others are constants, not reported): the rate loss needs a learned selector
    (:func:`learns_keep_rates`) and the mask mode (pruning keeps fixed counts with every selector), the KL
    loss a teacher, the token loss a teacher and ``lambda_token`` > 0."""
    parts = ["ce"]
    if learns_keep_rates(config) and not pruned:
        parts.append("rate")
    if has_teacher:
        parts.append("kl")
        if config.lambda_token > 0:
            parts.append("token")
    return (*parts, "total")


def lr_metrics(param_groups: list[dict]) -> dict[str, float]:
    """The learning rate per part of the model under one name in every run: ``lr_backbone`` and
    ``lr_predictor`` (their pretrained groups if any, else their fresh ones), plus ``lr_<part>_fresh`` only
    when a part has both (a re-initialised head next to pretrained weights). Decay and no-decay groups of a
    part share one lr."""
    found: dict[tuple[str, bool], float] = {}
    for group in param_groups:
        part = "predictor" if group["name"].startswith("predictor") else "backbone"
        found.setdefault((part, bool(group.get("pretrained"))), group["lr"])
    metrics = {}
    for part in ("backbone", "predictor"):
        pretrained, fresh = found.get((part, True)), found.get((part, False))
        if pretrained is not None:
            metrics[f"lr_{part}"] = pretrained
            if fresh is not None:
                metrics[f"lr_{part}_fresh"] = fresh
        elif fresh is not None:
            metrics[f"lr_{part}"] = fresh
    return metrics


def _teacher_outputs(teacher: nn.Module | None, images: Tensor, lambdas: dict) -> tuple[Tensor | None, ...]:
    if teacher is None:
        return None, None
    with torch.no_grad():
        logits, info = teacher(images, return_info=True)
    return logits, (info.tokens if lambdas["token"] > 0 else None)


def step_bar(config: RunConfig, rank: int, steps: int, epoch: int):
    """Rank 0's progress bar over the ``steps`` of an epoch (Ray's tqdm: the driver draws it), if the epoch
    is long enough (``step_bar``); else None."""
    if rank != 0 or not config.step_bar or steps < config.step_bar:
        return None
    return tqdm_ray.tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")


def train_one_epoch(
    model, teacher, loader, optimizer, scheduler, scaler, mixup, config: RunConfig, device, epoch: int = 0,
    bar=None,
) -> dict:
    """One epoch in mask mode; returns mean loss parts, mean kept ratio per stage, lr and images/s. ``bar``
    (:func:`step_bar`) advances by one per step and is closed at the end."""
    model.train()
    lambdas = _lambdas(config)
    sums: dict[str, float] = {}
    kept = None  # summed kept share per stage, only where they move (:func:`learns_keep_rates`)
    count_kept = learns_keep_rates(config)
    start, steps, images_seen = time.perf_counter(), 0, 0
    try:
        for images, labels in checked_batches(loader, device):
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with autocast(device, config.amp):
                logits, info = model(images, return_info=True)
                teacher_logits, teacher_tokens = _teacher_outputs(teacher, images, lambdas)
                loss, parts = spot_loss(
                    logits,
                    targets,
                    info,
                    rho=config.rho or 1.0,
                    lambdas=lambdas,
                    teacher_logits=teacher_logits,
                    teacher_tokens=teacher_tokens,
                    label_smoothing=0.0 if mixup is not None else config.label_smoothing,
                )
            if any_rank(not torch.isfinite(loss.detach()).item(), device):  # all ranks stop together
                raise NonFiniteLoss(
                    f"non-finite training loss at epoch {epoch + 1}, step {steps + 1} of {len(loader)} "
                    f"(this rank's loss: {loss.item()})"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(epoch * len(loader) + steps + 1)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if count_kept and info.masks:
                stage_kept = torch.stack([m.detach().float().mean() for m in info.masks])
                kept = stage_kept if kept is None else kept + stage_kept
            steps += 1
            images_seen += images.shape[0]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    kept_parts = loss_parts(config, teacher is not None)
    metrics = {f"train_{name}": value / max(steps, 1) for name, value in sums.items() if name in kept_parts}
    if kept is not None:
        metrics.update({f"train_kept_s{k + 1}": v / steps for k, v in enumerate(kept.tolist())})
        # health: how far the train-mode (Gumbel) keep rate is from its target rho^k (Eq. 12)
        metrics.update({f"train_keep_gap_s{k}": metrics[f"train_kept_s{k}"] - config.rho ** k
                        for k in range(1, len(kept) + 1)})
    metrics.update(lr_metrics(optimizer.param_groups))
    metrics["train_images_per_s"] = images_seen / elapsed
    return metrics


@torch.no_grad()
def validate(
    model, teacher, loader, config: RunConfig, device
) -> tuple[dict, tuple[Tensor, list[Tensor]] | None]:
    """Top-1/5, loss parts and kept ratio per stage in prune mode over the whole val split (all ranks).

    Also returns the first ``vis_images`` images of this rank's first batch with their kept indices (the
    fixed images of the token-mask figure), or None for a dense model.
    """
    net = unwrap(model).eval()
    lambdas = _lambdas(config)
    names = ("ce", "rate", "kl", "token", "total")
    sums = torch.zeros(3 + len(names), dtype=torch.float64)  # samples, top-1, top-5, loss parts
    shown = None
    for images, labels in checked_batches(loader, device):
        with autocast(device, config.amp):
            logits, info = net(images, return_info=True)
            teacher_logits, teacher_tokens = _teacher_outputs(teacher, images, lambdas)
        if shown is None and info.kept_indices and config.vis_images > 0:
            n = config.vis_images
            shown = (images[:n].float().cpu(), [k[:n].cpu() for k in info.kept_indices])
        valid = labels != PAD_LABEL
        count = int(valid.sum())
        if count == 0:
            continue
        subset = SimpleNamespace(
            masks=[m[valid] for m in info.masks], tokens=info.tokens[valid], keep=info.keep[valid]
        )
        _, parts = spot_loss(
            logits[valid].float(),
            labels[valid],
            subset,
            rho=config.rho or 1.0,
            lambdas=lambdas,
            teacher_logits=None if teacher_logits is None else teacher_logits[valid],
            teacher_tokens=None if teacher_tokens is None else teacher_tokens[valid],
        )
        top = logits[valid].topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[valid, None]
        batch = [count, hits[:, 0].sum().item(), hits.any(dim=1).sum().item()]
        sums += torch.tensor(batch + [parts[name] * count for name in names], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(device)).cpu()
    total = sums[0].item()
    metrics = {"val_acc1": sums[1].item() / total, "val_acc5": sums[2].item() / total}
    kept_parts = loss_parts(config, teacher is not None, pruned=True)
    metrics.update({f"val_{name}": sums[3 + i].item() / total for i, name in enumerate(names)
                    if name in kept_parts})
    return metrics, shown


def stop_for_good(location: RunLocation, epoch: int, message: str, *, record: bool) -> None:
    """Tell the driver (a fault record in the run's storage, written by the rank that ``record`` s) and the
    callbacks (a report without a checkpoint, so the last good checkpoint stays the latest) that the run
    stops: a NaN / inf loss or a bad sample, which a restart would meet again."""
    if record:
        write_record(location, {"epoch": epoch, "error": message}, FAULT_RECORD)
    ray.train.report({"epoch": epoch, STOPPED: message})


def train_loop_per_worker(job: WorkerJob) -> None:
    """Ray Train entry point (see the module docstring)."""
    config = job.config
    if not config.verbose:  # Ray Train's per-report INFO lines go to the root logger's console
        logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    threads = max(1, int(config.cpus_per_worker))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    init = ray.get(job.init_weights)
    student, teacher = build_models(init, device)
    if config.pretrained:
        freeze_embeddings(student)
    patch_size = student.patch_embed.patch_size[0]
    model_gmacs = gmacs(student, config.img_size)
    model = ray.train.torch.prepare_model(student)
    batch = config.batch_size // world
    normalization = spot.input_normalization(student)
    if (fault := checked_shards(config.data, rank, world, device)) is not None:
        stop_for_good(job.location, 0, str(fault), record=fault.message is not None)
        return
    loader_args = {"img_size": config.img_size, "shard_id": rank, "num_shards": world,
                   "num_threads": threads, "device": device, **normalization}

    def train_loader(epoch: int):
        return make_loader(
            config.data, "train", batch_size=batch, train=True, randaugment=config.randaugment,
            crop_scale=config.crop_scale, hflip=config.hflip, seed=derived_seed(config.seed, epoch),
            **loader_args,
        )

    val_loader = make_loader(config.data, "val", batch_size=batch, train=False, **loader_args)
    num_classes = init["spot_config"]["num_classes"]
    mixup = build_mixup(config, num_classes)
    start = 0
    loader = train_loader(start)
    optimizer, scheduler = build_optimizer(unwrap(model), config, set(init["fresh"]),
                                           steps_per_epoch=len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config.amp == "fp16")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = load_checkpoint(Path(directory), model, optimizer, scheduler, scaler) + 1
        loader = train_loader(start)
    node_ids = gather_node_ids()
    for epoch in range(start, config.epochs):
        seed_everything(derived_seed(config.seed, rank, epoch))
        began = time.perf_counter()
        try:
            metrics = {"epoch": epoch, **train_one_epoch(
                model, teacher, loader, optimizer, scheduler, scaler, mixup, config, device, epoch,
                bar=step_bar(config, rank, len(loader), epoch),
            )}
            val_metrics, shown = validate(model, teacher, val_loader, config, device)
        except NonFiniteLoss as err:  # deterministic: a retry would fail the same way, so no exception
            stop_for_good(job.location, epoch, str(err), record=rank == 0)
            return
        except DataFault as err:
            stop_for_good(job.location, epoch, str(err), record=err.message is not None)
            return
        if not np.isfinite(val_metrics["val_total"]):
            stop_for_good(job.location, epoch, f"non-finite validation loss at epoch {epoch + 1}",
                          record=rank == 0)
            return
        metrics.update(val_metrics)
        metrics.update({"gmacs": model_gmacs, "epoch_time_s": time.perf_counter() - began})
        metrics["worker_node_ids"] = node_ids
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, scaler, epoch, metrics)
                if shown is not None:
                    draw_token_masks(*shown, patch_size, Path(tmp) / MASKS_FILE, min_side=MASKS_MIN_SIDE,
                                     **normalization)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if epoch + 1 < config.epochs:
            del loader
            loader = train_loader(epoch + 1)
