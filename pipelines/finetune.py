#!/usr/bin/env python
"""Distributed SPOT fine-tuning on Ray Train (PyTorch DDP), tracked and registered in MLflow: the main job.

    python pipelines/finetune.py                      # built-in digits data on the CPU, a few minutes
    python pipelines/finetune.py --dense              # the same, dense backbone (baseline / teacher)
    python pipelines/finetune.py --backbone lvvit_s --data /data/imagenet-shards --pretrained lvvit_s.pth \\
        --address auto --num-workers 16 --gpus-per-worker 1 --cpus-per-worker 10 \\
        --storage s3://bucket/spot-runs --mlflow-uri http://head:5000

Reusable pieces (the Ray Tune sweep calls these instead of copying them): :func:`resolve_config` turns
explicitly given values into the full, validated run configuration; :func:`build_trainer` builds the
``TorchTrainer`` for a configuration; :func:`best_checkpoint` picks the best reported checkpoint. The last
line printed is ``RESULT_JSON: {...}``. Bad input exits with code 2 and one line on stderr; a failed
training run with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyarrow.fs
import yaml
from ray.train import UserCallback

import spot
from pipelines.errors import ConfigError, TrackingError, check, first_line
from pipelines.manifest import DataError, read_manifest
from pipelines.recipe import PAPER_RECIPE
from pipelines.shards import ensure_digits_shards
from pipelines.tracking import resolve_tracking_uri
from spot.checkpoint import load_pretrained
from spot.config import SELECTORS
from spot.flops import gmacs
from spot.losses import default_lambdas

DIGITS_DIR = "data/digits"
RUNS_DIR = "ray_results"
RUN_RECORD = "spot_run.json"
CONTROLLER_FAILURE_LIMIT = 3
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
AMP_MODES = ("bf16", "fp16", "off")
SCORE = "val_acc1"

# Defaults with a real dataset (--data): the paper's recipe.
DEFAULTS: dict = {
    "backbone": "deit_s",
    "data": None,
    "pretrained": None,
    "rho": 0.7,
    "selector": "learned",
    "epochs": PAPER_RECIPE["epochs"],
    "batch_size": PAPER_RECIPE["batch_size"],
    "lr": PAPER_RECIPE["lr"],
    "predictor_lr": None,
    "min_lr": PAPER_RECIPE["min_lr"],
    "weight_decay": PAPER_RECIPE["weight_decay"],
    "warmup_epochs": PAPER_RECIPE["warmup_epochs"],
    "freeze_epochs": PAPER_RECIPE["freeze_epochs"],
    "mixup": PAPER_RECIPE["mixup"],
    "cutmix": PAPER_RECIPE["cutmix"],
    "label_smoothing": PAPER_RECIPE["label_smoothing"],
    "randaugment": PAPER_RECIPE["randaugment"],
    "crop_scale": PAPER_RECIPE["crop_scale"],
    "hflip": PAPER_RECIPE["hflip"],
    "lambda_rate": None,
    "lambda_kl": None,
    "lambda_token": None,
    "img_size": 224,
    "model_args": {},
    "amp": "bf16",
    "seed": 0,
    "vis_images": 8,
    "num_workers": 2,
    "gpus_per_worker": None,
    "cpus_per_worker": 1,
    "placement_strategy": "PACK",
    "address": None,
    "storage": None,
    "experiment": "spot-finetune",
    "run_name": None,
    "register_as": None,
    "mlflow_uri": None,
    "max_failures": 3,
    "keep_checkpoints": 2,
}
# Without --data: the built-in digits (8x8 scans, 10 classes) with a small DeiT that trains in minutes on CPU.
DIGITS_DEFAULTS: dict = {
    "backbone": "deit_t",
    "epochs": 15,
    "batch_size": 64,
    "img_size": 32,
    "model_args": {"patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3},
    "warmup_epochs": 1,
    "freeze_epochs": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "randaugment": False,
    "crop_scale": 0.5,  # small crops of an 8x8 scan lose the digit
    "hflip": 0.0,  # a mirrored digit is another glyph
}
# What a run computes; fixed for its lifetime (--resume refuses to change these).
TRAINING_KEYS = (
    "backbone", "data", "pretrained", "rho", "selector", "epochs", "batch_size", "lr", "predictor_lr",
    "min_lr", "weight_decay", "warmup_epochs", "freeze_epochs", "mixup", "cutmix", "label_smoothing",
    "randaugment", "crop_scale", "hflip", "lambda_rate", "lambda_kl", "lambda_token", "img_size",
    "model_args", "amp", "seed", "vis_images",
)  # fmt: skip
HELP = {
    "backbone": f"backbone {{{','.join(spot.BACKBONES)}}}",
    "data": "shard directory (pipelines/make_shards.py); without it the built-in digits shards are made on "
    f"first use in ./{DIGITS_DIR} and the small digits defaults apply",
    "pretrained": "initial weights: checkpoint file, models:/NAME@ALIAS, or hub (needs network); SPOT runs "
    "distil from the frozen dense model built from the same weights",
    "rho": "token retention rate per stage in (0, 1]; 1 trains the dense backbone",
    "dense": "train the dense backbone (same as --rho 1)",
    "selector": f"token scoring {{{','.join(SELECTORS)}}}",
    "epochs": "training epochs",
    "batch_size": "global batch size (split over the workers)",
    "lr": "AdamW learning rate of the backbone",
    "predictor_lr": "learning rate of the relevance modules (default: 10 x --lr)",
    "min_lr": "final learning rate of the cosine schedule",
    "weight_decay": "AdamW weight decay (none on biases and norms)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "freeze_epochs": "epochs the pretrained backbone stays frozen while new modules warm up",
    "mixup": "mixup alpha (0 = off)",
    "cutmix": "cutmix alpha (0 = off)",
    "label_smoothing": "label smoothing",
    "randaugment": "RandAugment (m9, n2) on training images",
    "crop_scale": "smallest area fraction of the random resized crop of training images",
    "hflip": "probability of a horizontal flip of a training image",
    "lambda_rate": "weight of the keep-rate loss (default: per backbone, 2.0)",
    "lambda_kl": "weight of the KL to the teacher (default: 0.5 with --pretrained, else 0)",
    "lambda_token": "weight of the token cosine loss (default: 0 for DeiT, 10 for LV-ViT with --pretrained)",
    "img_size": "training / validation image side",
    "model_args": "backbone override KEY=VALUE, repeatable (e.g. depth=6, patch_size=4, drop_path_rate=0.1)",
    "amp": f"autocast on GPU {{{','.join(AMP_MODES)}}} (fp16 uses a gradient scaler; CPU runs in fp32)",
    "seed": "random seed",
    "vis_images": "validation images in the per-epoch token-mask figure",
    "num_workers": "Ray Train workers (DDP ranks)",
    "gpus_per_worker": "GPUs per worker (default: 1 if the Ray cluster has GPUs, else 0)",
    "cpus_per_worker": "CPUs per worker (also DALI and torch threads)",
    "placement_strategy": f"placement of the workers {{{','.join(PLACEMENT_STRATEGIES)}}}",
    "address": "Ray cluster address (e.g. auto, ray://head:10001); default: start a local Ray",
    "storage": f"checkpoint storage: local dir, s3://, gs://, or a shared FS (default: ./{RUNS_DIR})",
    "experiment": "MLflow experiment",
    "run_name": "run name = Ray storage dir = MLflow run name (default: <backbone>-<rho>-<time>)",
    "resume": "continue the run --run-name whose driver died (same checkpoints, same MLflow run)",
    "register_as": "registered model name (default: spot-<backbone>, spot-<backbone>-dense for dense runs)",
    "mlflow_uri": f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/{'mlflow.db'})",
    "max_failures": "worker-group restarts allowed (worker or node loss)",
    "keep_checkpoints": "checkpoints kept (best by validation top-1; the latest is always kept)",
    "config": "YAML file of any of these options (dashes or underscores); the command line wins",
}
FLAG_TYPES: dict = {
    "backbone": str, "data": str, "pretrained": str, "rho": float, "selector": str, "epochs": int,
    "batch_size": int, "lr": float, "predictor_lr": float, "min_lr": float, "weight_decay": float,
    "warmup_epochs": float, "freeze_epochs": int, "mixup": float, "cutmix": float, "label_smoothing": float,
    "crop_scale": float, "hflip": float,
    "lambda_rate": float, "lambda_kl": float, "lambda_token": float, "img_size": int, "amp": str, "seed": int,
    "vis_images": int, "num_workers": int, "gpus_per_worker": float, "cpus_per_worker": float,
    "placement_strategy": str, "address": str, "storage": str, "experiment": str, "run_name": str,
    "register_as": str, "mlflow_uri": str, "max_failures": int, "keep_checkpoints": int,
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _help(key: str) -> str:
    """Help text of an option with its defaults (with --data, and for the built-in digits)."""
    default, digits = DEFAULTS.get(key), DIGITS_DEFAULTS.get(key)
    shown = [json.dumps(v) for v in (default, digits) if v is not None]
    if not shown:
        return HELP[key]
    return f"{HELP[key]} [default: {shown[0]}" + (f"; digits: {shown[1]}]" if digits is not None else "]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finetune",
        description="SPOT fine-tuning on Ray Train with MLflow tracking and registry.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for key, kind in FLAG_TYPES.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=kind, default=None, help=_help(key))
        if key == "rho":
            parser.add_argument("--dense", action="store_true", default=None, help=HELP["dense"])
    parser.add_argument(
        "--randaugment", action=argparse.BooleanOptionalAction, default=None,
        help=_help("randaugment"),
    )  # fmt: skip
    parser.add_argument(
        "--model-arg", dest="model_args", action="append", default=None, metavar="KEY=VALUE",
        help=_help("model_args"),
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", default=None, help=HELP["resume"])
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help=HELP["config"])
    return parser


def parse_model_args(items: list[str], where: str) -> dict:
    """``["depth=6", "drop_path_rate=0.1"]`` -> ``{"depth": 6, "drop_path_rate": 0.1}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: model arg {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def read_config_file(path: str) -> dict:
    """Options from a YAML file (keys with dashes or underscores); raises ConfigError naming file and key."""
    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--config {file}: {first_line(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {file}: expected a mapping of options, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS and name not in ("dense", "resume"):
            raise ConfigError(f"--config {file}: unknown option {key!r}")
        if name == "model_args" and isinstance(value, list):
            value = parse_model_args([str(v) for v in value], f"--config {file}")
        values[name] = value
    return values


def given_values(args: argparse.Namespace) -> dict:
    """Explicitly given options: the YAML file's, overridden by the command line's."""
    values = read_config_file(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key == "config" or value is None:
            continue
        values[key] = parse_model_args(value, "--model-arg") if key == "model_args" else value
    return values


def _run_root(storage: str) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        return pyarrow.fs.FileSystem.from_uri(storage)
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise ConfigError(f"--storage {storage}: {first_line(err)}") from None


def read_run_record(storage: str, run_name: str) -> dict | None:
    """The record :func:`run` wrote for ``run_name`` in ``storage`` (None if the run does not exist)."""
    fs, root = _run_root(storage)
    path = f"{root}/{run_name}/{RUN_RECORD}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_run_record(storage: str, run_name: str, record: dict) -> None:
    fs, root = _run_root(storage)
    fs.create_dir(f"{root}/{run_name}", recursive=True)
    with fs.open_output_stream(f"{root}/{run_name}/{RUN_RECORD}") as f:
        f.write(json.dumps(record, indent=1).encode())


def _validate_choices(config: dict) -> None:
    choices = {"backbone": spot.BACKBONES, "selector": SELECTORS, "amp": AMP_MODES,
               "placement_strategy": PLACEMENT_STRATEGIES}  # fmt: skip
    for key, allowed in choices.items():
        check(config[key] in allowed, f"--{key.replace('_', '-')} {config[key]!r}: choose one of "
               f"{', '.join(allowed)}")  # fmt: skip
    for key, kind in FLAG_TYPES.items():
        value = config.get(key)
        if value is not None and kind in (int, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            check(ok and (kind is float or float(value).is_integer()),
                   f"--{key.replace('_', '-')} {value!r}: expected a number")  # fmt: skip


def _resolve_rho(config: dict, given: dict) -> None:
    rho = config["rho"]
    if config.pop("dense", None):
        check(given.get("rho") in (None, 1), f"--dense contradicts --rho {given.get('rho')}")
        rho = 1.0
    check(isinstance(rho, int | float) and 0 < rho <= 1,
           f"--rho {rho!r}: must be in (0, 1] (1 = dense backbone)")  # fmt: skip
    config["rho"] = None if rho == 1 else float(rho)


def _resolve_training(config: dict) -> None:
    """Validate values and derive the defaults that depend on others (lrs, lambdas)."""
    check(config["epochs"] >= 1, f"--epochs {config['epochs']}: must be >= 1")
    check(config["lr"] > 0 and config["min_lr"] >= 0, "--lr must be > 0 and --min-lr >= 0")
    check(config["img_size"] >= 8, f"--img-size {config['img_size']}: too small")
    check(config["vis_images"] >= 0, "--vis-images must be >= 0")
    check(0 < config["crop_scale"] <= 1, f"--crop-scale {config['crop_scale']}: must be in (0, 1]")
    check(0 <= config["hflip"] <= 1, f"--hflip {config['hflip']}: must be in [0, 1]")
    check(isinstance(config["model_args"], dict), "model_args must be a mapping of backbone overrides")
    for key in ("img_size", "num_classes", "pretrained"):
        check(key not in config["model_args"], f"--model-arg {key}: use --{key.replace('_', '-')} instead")
    if config["predictor_lr"] is None:
        config["predictor_lr"] = config["lr"] * PAPER_RECIPE["predictor_lr_scale"]
    teacher = config["rho"] is not None and config["pretrained"] is not None
    paper = default_lambdas(config["backbone"])
    for part in ("rate", "kl", "token"):
        key = f"lambda_{part}"
        if config["rho"] is None:
            config[key] = 0.0  # dense: cross-entropy only
        elif config[key] is None:
            config[key] = paper[part] if (teacher or part == "rate") else 0.0
        else:
            check(config[key] >= 0, f"--lambda-{part} {config[key]}: must be >= 0")
            check(teacher or part == "rate" or config[key] == 0,
                   f"--lambda-{part} {config[key]} needs a teacher, i.e. --pretrained weights")  # fmt: skip
    mixing = config["mixup"] > 0 or config["cutmix"] > 0
    per_worker = config["batch_size"] // config["num_workers"]
    check(config["num_workers"] >= 1, "--num-workers must be >= 1")
    check(
        config["batch_size"] % config["num_workers"] == 0 and per_worker >= 1,
        f"--batch-size {config['batch_size']} must be a multiple of --num-workers {config['num_workers']}",
    )
    check(not mixing or per_worker % 2 == 0,
           f"mixup/cutmix need an even batch per worker; got {per_worker}")  # fmt: skip


def _resolve_data(config: dict, cwd: Path) -> int:
    """Make the digits shards if no --data; returns the class count (raises DataError for bad data)."""
    if config["data"] is None:
        config["data"] = str(ensure_digits_shards(cwd / DIGITS_DIR))
    config["data"] = str(Path(config["data"]).expanduser().resolve())
    manifest = read_manifest(config["data"])
    for split in ("train", "val"):
        manifest.shard_infos(split)
    need = config["batch_size"]
    check(
        manifest.counts["train"] >= need,
        f"--data {config['data']}: {manifest.counts['train']} training samples < --batch-size {need}",
    )
    return manifest.num_classes


def resolve_config(given: dict, *, cwd: Path | None = None) -> dict:
    """The full run configuration from explicitly ``given`` options (keys as in :data:`DEFAULTS`, plus
    ``dense`` and ``resume``).

    Defaults: :data:`DEFAULTS` (the paper's recipe), with :data:`DIGITS_DEFAULTS` on top when no ``data`` is
    given. With ``resume``, the training options come from the run's record in ``storage`` and may not be
    changed. Paths (data, storage, SQLite URI) are made absolute against ``cwd`` here, on the driver: Ray
    workers run in directories of their own. Adds ``num_classes``. Raises :class:`ConfigError`,
    ``DataError`` or ``FileNotFoundError``.
    """
    cwd = cwd or Path.cwd()
    given = dict(given)
    resume = bool(given.pop("resume", False))
    config = dict(DEFAULTS)
    if given.get("data") is None:
        config.update(DIGITS_DEFAULTS)
    config.update({k: v for k, v in given.items() if v is not None})
    config["storage"] = config["storage"] or str(cwd / RUNS_DIR)
    if "://" not in config["storage"]:
        config["storage"] = str(Path(config["storage"]).expanduser().resolve())
    _validate_choices(config)
    if resume:
        check(given.get("run_name") is not None, "--resume needs the --run-name of the run to continue")
        record = read_run_record(config["storage"], config["run_name"])
        check(record is not None, f"--resume: no run {config['run_name']!r} in {config['storage']}")
        saved = record["config"]
        changed = [k for k in TRAINING_KEYS if k in given and given[k] != saved[k]]
        check(not changed, f"--resume cannot change training options: {', '.join(changed)}")
        config.update({k: saved[k] for k in (*TRAINING_KEYS, "num_classes", "experiment", "register_as")})
        config["mlflow_uri"] = resolve_tracking_uri(given.get("mlflow_uri") or record["tracking_uri"], cwd)
        config.pop("dense", None)
        config["resume"] = True
        return config
    _resolve_rho(config, given)
    _resolve_training(config)
    if config["pretrained"] and not config["pretrained"].startswith(("hub", "models:/", "runs:/")):
        path = Path(config["pretrained"]).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained {path}: file not found")
        config["pretrained"] = str(path)
    config["num_classes"] = _resolve_data(config, cwd)
    config["mlflow_uri"] = resolve_tracking_uri(config["mlflow_uri"], cwd)
    dense = config["rho"] is None
    rho_text = "dense" if dense else f"rho{config['rho']}"
    config["run_name"] = (
        config["run_name"] or f"{config['backbone']}-{rho_text}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    config["register_as"] = config["register_as"] or f"spot-{config['backbone']}{'-dense' if dense else ''}"
    config["resume"] = False
    return config


def _pretrained_file(source: str, tmp: Path) -> str:
    """A local checkpoint file (or "hub") for ``source``; MLflow models are saved to ``tmp`` first."""
    if not source.startswith(("models:/", "runs:/")):
        return source
    import torch

    from pipelines.registry import load_model

    path = tmp / "pretrained.pt"
    torch.save(load_model(source).state_dict(), path)
    return str(path)


def prepare_init(config: dict) -> tuple[dict, dict]:
    """Build the student (and teacher) once on the driver: validates the architecture and ``--pretrained``.

    Returns the ``init_weights`` payload of :mod:`pipelines.train_loop` and a summary (``gflops``,
    ``params``, ``dense_gflops``).
    """
    import torch

    arch = {"num_classes": config["num_classes"], "img_size": config["img_size"], **config["model_args"]}
    torch.manual_seed(config["seed"])
    student = spot.create_model(config["backbone"], rho=config["rho"], selector=config["selector"], **arch)
    dense = spot.create_model(config["backbone"], rho=None, **arch)
    fresh = [name for name, _ in student.named_parameters()]
    teacher = None
    if config["pretrained"]:
        with tempfile.TemporaryDirectory() as tmp:
            source = _pretrained_file(config["pretrained"], Path(tmp))
            try:
                untouched = set(load_pretrained(student, source))
            except RuntimeError as err:  # the hub without network
                raise ConfigError(f"--pretrained {source}: {err}") from None
            fresh = [name for name, _ in student.named_parameters() if name in untouched]
            if config["rho"] is not None:
                load_pretrained(dense, source)
                teacher = dense.state_dict()
    summary = {
        "gflops": gmacs(student, config["img_size"]),
        "dense_gflops": gmacs(dense, config["img_size"]),
        "params": sum(p.numel() for p in student.parameters()),
    }
    init = {"spot_config": student.spot_config, "student": student.state_dict(), "teacher": teacher,
            "fresh": fresh}  # fmt: skip
    return init, summary


class ProgressCallback(UserCallback):
    """Prints one line per epoch and per worker failure (runs on the Ray Train controller)."""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0]
        print(
            f"epoch {m['epoch'] + 1}: train loss {m['train_total']:.4f}, val top-1 {m['val_acc1']:.4f} "
            f"top-5 {m['val_acc5']:.4f}, {m['gflops']:.4g} GFLOPs, {m['epoch_time_s']:.1f} s",
            flush=True,
        )

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            print(f"worker rank {rank} failed: {first_line(error)}; restarting from the latest checkpoint",
                  flush=True)  # fmt: skip


def build_trainer(config: dict, *, name: str, storage: str, callbacks=(), init: dict | None = None):
    """The ``TorchTrainer`` of a resolved ``config`` (Ray must be initialised).

    ``name`` is the Ray run name (same name in the same ``storage`` = resume from its latest checkpoint);
    ``callbacks`` are ``ray.train.UserCallback`` s (e.g. :class:`pipelines.tracking.MlflowReportCallback`,
    ``ray.tune.integration.ray_train.TuneReportCallback``); ``init`` is :func:`prepare_init`'s payload
    (built here if not given).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train_loop import train_loop_per_worker

    if init is None:
        init, _ = prepare_init(config)
    gpus = config["gpus_per_worker"]
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    resources = {"CPU": config["cpus_per_worker"], **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**config, "init_weights": ray.put(init)},
        scaling_config=ScalingConfig(
            num_workers=config["num_workers"],
            use_gpu=bool(gpus),
            resources_per_worker=resources,
            placement_strategy=config["placement_strategy"],
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=config["max_failures"], controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=CheckpointConfig(
                num_to_keep=config["keep_checkpoints"],
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=[ProgressCallback(), *callbacks],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def best_checkpoint(result) -> tuple:
    """``(checkpoint, metrics)`` with the highest validation top-1 (the later epoch on ties)."""
    if not result.best_checkpoints:
        raise RuntimeError(f"run {result.path} reported no checkpoint")
    return max(result.best_checkpoints, key=lambda item: (item[1][SCORE], item[1]["epoch"]))


def _check_local_resources(config: dict) -> None:
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    need = config["num_workers"] * config["cpus_per_worker"]
    check(
        need <= have,
        f"{config['num_workers']} workers x {config['cpus_per_worker']} CPUs need {need} CPUs; the local "
        f"Ray has {have:g} (lower --num-workers / --cpus-per-worker)",
    )


def _evaluation_table(rows: list[dict], best: dict, summary: dict) -> str:
    keys = ["epoch", "val_acc1", "val_acc5", "val_total", "train_total", "gflops"]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(f"{row.get(k, float('nan')):.4g}" for k in keys) + " |" for row in rows]
    return (
        f"# Best checkpoint: epoch {best['epoch']}, val top-1 {best['val_acc1']:.4f}, top-5 "
        f"{best['val_acc5']:.4f}, {best['gflops']:.4f} GFLOPs (dense {summary['dense_gflops']:.4f}), "
        f"{summary['params']} parameters\n\n" + "\n".join(lines) + "\n"
    )


def _probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast if a ``host:port`` or ``ray://host:port`` address does not accept connections (``ray.init``
    itself retries for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and friends: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({err})") from None


def _connect_ray(config: dict) -> bool:
    """Join ``--address`` or start a local Ray (unless one is running); True if started here."""
    import ray

    if ray.is_initialized():
        return False
    if config["address"] is not None:
        _probe_address(config["address"])
    try:
        ray.init(address=config["address"])
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"--address {config['address']}: {first_line(err)}") from None
    if config["address"] is not None:
        return False
    try:
        _check_local_resources(config)
    except ConfigError:
        ray.shutdown()
        raise
    return True


def run_params(config: dict, summary: dict) -> dict:
    """The MLflow params of a training run: its training options and the model they give."""
    return {k: config[k] for k in TRAINING_KEYS} | {
        "num_classes": config["num_classes"], "world_size": config["num_workers"],
        "params": summary["params"], "gflops": round(summary["gflops"], 6),
    }  # fmt: skip


def _open_mlflow_run(config: dict, summary: dict) -> str:
    """Create the run's MLflow run (params, resolved config, run record) or reopen it on resume; its id."""
    import mlflow

    from pipelines import tracking

    uri, name, storage = config["mlflow_uri"], config["run_name"], config["storage"]
    record = read_run_record(storage, name)
    if config["resume"]:
        run_id = tracking.start_run(uri, config["experiment"], name, artifact_location=None,
                                    run_id=record["mlflow_run_id"])  # fmt: skip
    else:
        check(record is None, f"run {name!r} already exists in {storage}: pass --resume to continue it "
               "or choose another --run-name")  # fmt: skip
        artifacts = tracking.local_artifact_root(uri, Path.cwd())
        run_id = tracking.start_run(uri, config["experiment"], name, artifact_location=artifacts)
        write_run_record(storage, name, {"config": config, "mlflow_run_id": run_id, "tracking_uri": uri})
        tracking.log_params(uri, run_id, run_params(config, summary) | tracking.versions())
        mlflow.log_dict(config, "config/resolved_config.json", run_id=run_id)
    tracking.set_tags(uri, run_id, tracking.system_info() | {
        "storage": f"{storage}/{name}", "address": config["address"] or "local",
        "num_workers": config["num_workers"], "placement_strategy": config["placement_strategy"],
    })  # fmt: skip
    return run_id


def run(config: dict) -> dict:
    """Train ``config`` (from :func:`resolve_config`) on Ray, track it in MLflow, register the best model.

    Returns the ``RESULT_JSON`` dict. Before any worker starts, raises ``TrackingError`` if MLflow is not
    usable and :class:`ConfigError` for a bad ``--pretrained``, ``--address`` or run name; raises
    ``ray.train.TrainingFailedError`` if training fails for good (the MLflow run is then FAILED).
    """
    import mlflow
    import ray
    from ray.train import TrainingFailedError

    from pipelines import tracking
    from pipelines.registry import register_checkpoint

    started = time.monotonic()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri, name, storage = config["mlflow_uri"], config["run_name"], config["storage"]
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    init, summary = prepare_init(config)
    local = _connect_ray(config)
    try:
        run_id = _open_mlflow_run(config, summary)
        trainer = build_trainer(
            config, name=name, storage=storage, init=init,
            callbacks=[tracking.MlflowReportCallback(uri, run_id)],
        )  # fmt: skip
        try:
            result = trainer.fit()
        except TrainingFailedError:
            tracking.end_run(uri, run_id, "FAILED")
            raise
        checkpoint, best = best_checkpoint(result)
        rows = tracking.metric_table(
            uri, run_id, ["val_acc1", "val_acc5", "val_total", "train_total", "gflops"]
        )
        mlflow.log_text(_evaluation_table(rows, best, summary), "evaluation.md", run_id=run_id)
        with checkpoint.as_directory() as directory:
            registered = register_checkpoint(
                directory, run_id=run_id, name=config["register_as"], metrics=best
            )
        tracking.end_run(uri, run_id, "FINISHED")
    finally:
        if local:
            ray.shutdown()
    return {
        "run_name": name,
        "best_val_acc1": best["val_acc1"],
        "best_val_acc5": best["val_acc5"],
        "best_epoch": best["epoch"],
        "epochs_logged": [row["epoch"] for row in rows],
        "gflops": best["gflops"],
        "dense_gflops": summary["dense_gflops"],
        "checkpoint": checkpoint.path,
        "storage": f"{storage}/{name}",
        "mlflow_tracking_uri": uri,
        "mlflow_experiment": config["experiment"],
        "mlflow_run_id": run_id,
        "registered_model": registered["name"],
        "registered_version": registered["version"],
        "champion": registered["champion"],
        "worker_node_ids": best["worker_node_ids"],
        "wall_time_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(given_values(args))
        result = run(config)
    except (ConfigError, DataError, FileNotFoundError, TrackingError, ValueError) as err:
        print(f"finetune: error: {first_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from ray.train import TrainingFailedError

        if not isinstance(err, TrainingFailedError):
            raise
        print(f"finetune: training failed: {first_line(err)}", file=sys.stderr)
        return 1
    print("RESULT_JSON: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
