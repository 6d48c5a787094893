"""The one run configuration of a fine-tuning job: every option with its type, default, help text, the
built-in digits preset, validation, and which options a ``--resume`` must keep, declared once.

The command line (:func:`add_options` generates the flags, for ``finetune`` and, a subset, for the sweep),
a YAML file (``--config``: the same names, dashes or underscores) and the defaults feed :class:`RunConfig`,
in that order of precedence; what was given explicitly is one :class:`GivenOptions`, checked once.
:func:`resolve_config` validates the values and derives the rest (lrs, loss weights, absolute paths, class
count) before any Ray worker starts; it writes nothing. What a command does before it:
:func:`make_builtin_data` (the built-in shards without ``--data``) and
:func:`pipelines.tracking.store.move_credentials_to_env`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import torch
import yaml

import spot
from pipelines.data import cluttered_digits, hard_cluttered_digits
from pipelines.data.manifest import MANIFEST_NAME, DataError, read_manifest
from pipelines.data.shards import ensure_builtin_shards
from pipelines.storage.location import RunLocation
from pipelines.storage.run_record import read_record
from pipelines.tracking.uri import MODEL_URI_PREFIXES, resolve_tracking_uri
from pipelines.training import recipe
from pipelines.utils.errors import ConfigError, check, first_line
from spot.config import SELECTORS
from spot.losses import default_lambdas

log = logging.getLogger(__name__)
DIGITS_SOURCE = "cluttered-digits"  # the built-in task (pipelines/data/cluttered_digits.py)
DIGITS_DIR = f"data/{DIGITS_SOURCE}"
HARD = hard_cluttered_digits
# SPOT fine-tuned from the dense digits model (--pretrained without --data: finetune.py, make demo, the
# sweep): lower learning rates than the dense run from scratch (the predictors' 10 x lr, derived as
# always), no freeze, a quarter epoch of warm-up (docs/benchmarks.md, cluttered digits)
DIGITS_SPOT_FINETUNE = {"epochs": 2, "lr": 1e-4, "freeze_epochs": 0, "warmup_epochs": 0.25}
# The built-in tasks (--source, without --data): what each changes in the digits preset for the dense run,
# and in DIGITS_SPOT_FINETUNE for the sparse runs fine-tuned from it (BUILTIN_FINETUNE, applied by
# resolve_config). The harder canvases (pipelines/data/hard_cluttered_digits.py): their side, their own
# pixel statistics, and the dense recipe that learns them from scratch (lr 5e-4, batch 32; 6 epochs at
# 64 px; at 96 px the dense model needs the steps of 16 epochs over 8 canvases a scan and overfits one such
# set, so 4 epochs over 32 a scan, and one fine-tuning epoch; docs/benchmarks.md, the harder task)
# source -> (dense epochs, fine-tuning epochs); a source of HARD.SOURCES missing here fails the import
_HARD_EPOCHS = {"cluttered-digits-hard": (6, 2), "cluttered-digits-hard-96": (4, 1)}
BUILTIN_TASKS = {
    DIGITS_SOURCE: {},
    **{name: {"img_size": drawing.canvas, "mean": [drawing.pixel_mean] * 3, "std": [drawing.pixel_std] * 3,
              "epochs": _HARD_EPOCHS[name][0], "lr": 5e-4, "batch_size": 32}
       for name, drawing in HARD.SOURCES.items()},
}
BUILTIN_FINETUNE = {
    DIGITS_SOURCE: DIGITS_SPOT_FINETUNE,
    **{name: {**DIGITS_SPOT_FINETUNE, "epochs": _HARD_EPOCHS[name][1]} for name in HARD.SOURCES},
}
RUNS_DIR = "ray_results"
# where a run runs: a --resume keeps the recorded values unless they are given again
PLACEMENT_KEYS = ("num_workers", "gpus_per_worker", "cpus_per_worker", "placement_strategy", "address",
                  "max_failures", "keep_checkpoints")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
AMP_MODES = ("bf16", "fp16", "off")
NO_DIGITS = object()
SELECTOR_SUFFIX = {"cls_attn_avg": "-cls-attn", "random": "-random"}  # registered apart from SPOT's models


def option(
    default: Any,
    help: str,  # noqa: A002 - the argparse name
    *,
    digits: Any = NO_DIGITS,
    training: bool = False,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    cli: bool = True,
    flags: tuple[str, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A :class:`RunConfig` field: ``digits`` is its value in the built-in digits preset (no ``--data``),
    ``training`` marks what a run computes (``--resume`` may not change it), ``cli`` False for derived
    values that are no flag; ``ge`` / ``gt`` / ``le`` / ``lt`` bound a number (each element of a list),
    checked by :func:`check_ranges`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "digits": digits, "training": training, "choices": choices, "metavar": metavar,
            "cli": cli, "flags": flags, "bounds": bounds}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """A fine-tuning run. Defaults with ``--data``: the paper's recipe (:mod:`pipelines.training.recipe`)."""

    # what the run computes (fixed for its lifetime)
    backbone: str = option("deit_s", "backbone", digits="deit_t", training=True, choices=spot.BACKBONES)
    data: str | None = option(
        None, f"shard directory (pipelines/make_shards.py); without it the built-in {DIGITS_SOURCE} shards "
        f"are made on first use in ./{DIGITS_DIR} and the small digits defaults apply", training=True,
        metavar="DIR",
    )
    source: str = option(DIGITS_SOURCE, "the built-in task of a run without --data, made on first use in "
                         "./data/<source> with its preset", training=True, choices=tuple(BUILTIN_TASKS))
    pretrained: str | None = option(
        None, "initial weights: checkpoint file, models:/NAME@ALIAS, or hub (needs network); SPOT runs "
        "distil from the frozen dense model built from the same weights", training=True, metavar="SOURCE",
    )
    rho: float | None = option(0.7, "token retention rate per stage in (0, 1]; 1 trains the dense backbone",
                               training=True)
    selector: str = option("learned", "token scoring", training=True, choices=SELECTORS)
    epochs: int = option(recipe.PAPER_RECIPE["epochs"], "training epochs", digits=4, training=True, ge=1)
    batch_size: int = option(recipe.PAPER_RECIPE["batch_size"], "global batch size (split over the workers)",
                             digits=64, training=True, ge=1)
    lr: float = option(recipe.PAPER_RECIPE["lr"], "AdamW learning rate of the backbone", training=True, gt=0)
    predictor_lr: float | None = option(
        None, "learning rate of the relevance modules (default: "
        f"{recipe.PAPER_RECIPE['predictor_lr_scale']:g} x --lr)", training=True, gt=0,
    )
    min_lr: float = option(recipe.PAPER_RECIPE["min_lr"], "final learning rate of the cosine schedule",
                           training=True, ge=0)
    weight_decay: float = option(recipe.PAPER_RECIPE["weight_decay"],
                                 "AdamW weight decay (none on biases, norms and embeddings)",
                                 training=True, ge=0)
    warmup_epochs: float = option(recipe.PAPER_RECIPE["warmup_epochs"], "epochs of linear learning-rate "
                                  "warm-up", digits=1, training=True, ge=0)
    freeze_epochs: int = option(recipe.PAPER_RECIPE["freeze_epochs"], "epochs the pretrained backbone stays "
                                "frozen while new modules warm up", digits=1, training=True, ge=0)
    mixup: float = option(recipe.PAPER_RECIPE["mixup"], "mixup alpha (0 = off)", digits=0.0, training=True,
                          ge=0)
    cutmix: float = option(recipe.PAPER_RECIPE["cutmix"], "cutmix alpha (0 = off)", digits=0.0, training=True,
                           ge=0)
    label_smoothing: float = option(recipe.PAPER_RECIPE["label_smoothing"], "label smoothing", training=True,
                                    ge=0, lt=1)
    randaugment: bool = option(recipe.PAPER_RECIPE["randaugment"], "RandAugment (m9, n2) on training images",
                               digits=False, training=True)
    crop_scale: float = option(
        recipe.PAPER_RECIPE["crop_scale"], "smallest area fraction of the random resized crop of training "
        "images", digits=1.0, training=True, gt=0, le=1,  # a crop would cut the digit out of its canvas
    )
    hflip: float = option(recipe.PAPER_RECIPE["hflip"], "probability of a horizontal flip of a training "
                          "image",
                          digits=0.0, training=True, ge=0, le=1)  # a mirrored digit is another glyph
    lambda_rate: float | None = option(None, "weight of the keep-rate loss (default: per backbone, 2.0)",
                                       training=True, ge=0)
    lambda_kl: float | None = option(None, "weight of the KL to the teacher (default: 0.5 with --pretrained, "
                                     "else 0)", training=True, ge=0)
    lambda_token: float | None = option(None, "weight of the token cosine loss (default: 0 for DeiT, 10 for "
                                        "LV-ViT with --pretrained)", training=True, ge=0)
    img_size: int = option(224, "training / validation image side", digits=48, training=True, metavar="PX",
                           ge=8)
    mean: list[float] | None = option(
        None, "input normalisation: per-channel pixel mean on the [0, 1] scale (default: the --pretrained "
        "MLflow model's, else the backbone's, ImageNet's)", digits=[cluttered_digits.PIXEL_MEAN] * 3,
        training=True, metavar="M", ge=0, le=1,
    )
    std: list[float] | None = option(
        None, "input normalisation: per-channel pixel std (default: as --mean)",
        digits=[cluttered_digits.PIXEL_STD] * 3, training=True, metavar="S", gt=0,
    )
    model_args: dict = option(
        {}, "backbone override KEY=VALUE, repeatable (e.g. depth=6, patch_size=4, drop_path_rate=0.1)",
        digits={"patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 4}, training=True,
        metavar="KEY=VALUE",
    )
    amp: str = option("bf16", "autocast on GPU (fp16 uses a gradient scaler; CPU runs in fp32)",
                      training=True, choices=AMP_MODES)
    seed: int = option(0, "random seed", training=True, ge=0)
    vis_images: int = option(8, "validation images in the per-epoch token-mask figure", training=True, ge=0)
    # where it runs (may change on --resume)
    num_workers: int = option(2, "Ray Train workers (DDP ranks)", ge=1)
    gpus_per_worker: float | None = option(None, "GPUs per worker (default: without --address 1 if this "
                                           "machine has a GPU, else 0; with --address 1 if the cluster has "
                                           "or can start GPU nodes, else it must be given)", ge=0)
    cpus_per_worker: float = option(1, "CPUs per worker (also DALI and torch threads)", gt=0)
    placement_strategy: str = option("PACK", "placement of the workers", choices=PLACEMENT_STRATEGIES)
    address: str | None = option(None, "Ray cluster address (e.g. auto, ray://head:10001); default: start a "
                                 "local Ray", metavar="ADDR")
    storage: str | None = option(None, "checkpoint storage: local dir, s3://, gs://, or a shared FS "
                                 f"(default: ./{RUNS_DIR})", metavar="URI")
    shared_storage: bool = option(False, "with --address: the local --storage path is on a mount every node "
                                  "reads, of a kind the check does not recognise as shared")
    max_failures: int = option(3, "worker-group restarts allowed (worker or node loss)", ge=-1)
    keep_checkpoints: int = option(2, "checkpoints kept (best by validation top-1; the latest is always "
                                   "kept)", ge=1)
    # tracking
    experiment: str = option("spot-finetune", "MLflow experiment", metavar="NAME")
    run_name: str | None = option(None, "run name = Ray storage dir = MLflow run name (default: "
                                  "<backbone>-<rho>-<time>)", metavar="NAME")
    register_as: str | None = option(None, "registered model name (default: spot-<backbone>; "
                                     "spot-<backbone>-dense for dense runs, spot-<backbone>-cls-attn / "
                                     "-random for the non-learned selectors)", metavar="NAME")
    mlflow_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                    "sqlite:///<cwd>/mlflow.db)", metavar="URI")
    mlflow_wait: float = option(120.0, "seconds the end of a run waits for an unreachable MLflow server "
                                "before it stops and prints the command that finishes the run later",
                                metavar="S", ge=0)
    step_bar: int = option(200, "a progress bar over each epoch's steps (rank 0's, drawn by the driver) "
                           "when an epoch has at least this many steps; 0: never", metavar="N", ge=0)
    verbose: bool = option(False, "show Ray's and MLflow's own log lines (per-report metrics, actor "
                                  "warnings, run links) too")
    # derived by resolve_config
    num_classes: int | None = option(None, "class count of the data", cli=False)
    resume: bool = option(False, "continue the run --run-name whose driver died (same checkpoints, same "
                          "MLflow run); with --register-as, register it under that name")

    def to_dict(self) -> dict:
        return asdict(self)

    def training_options(self) -> dict:
        """What the run computes (:func:`training_keys`): its MLflow params and what ``--resume`` keeps."""
        return {k: getattr(self, k) for k in training_keys()}

    @property
    def dense(self) -> bool:
        return self.rho is None

    @property
    def location(self) -> RunLocation:
        """Where the run's checkpoints and records are: ``run_name`` in ``storage``."""
        return RunLocation(self.storage, self.run_name)


FIELDS = {f.name: f for f in fields(RunConfig)}
EXTRA_FLAGS = {  # flags that are no field of their own
    "dense": "train the dense backbone (same as --rho 1)",
    "config": "YAML file of any of these options (dashes or underscores); the command line wins",
}


def training_keys() -> tuple[str, ...]:
    """The options fixed for a run's lifetime, in declaration order."""
    return tuple(name for name, f in FIELDS.items() if f.metadata["training"])


def digits_preset() -> dict:
    """The values of the built-in digits preset (applied when no ``data`` is given)."""
    return {name: f.metadata["digits"] for name, f in FIELDS.items() if f.metadata["digits"] is not NO_DIGITS}


def task_preset(task: str, *, finetuning: bool = False) -> dict:
    """What the built-in ``task`` puts over the field defaults: the digits preset and the task's dense recipe
    (``BUILTIN_TASKS``), with ``finetuning`` (a sparse run from ``--pretrained``) its fine-tuning recipe
    (``BUILTIN_FINETUNE``) on top."""
    preset = {**digits_preset(), **BUILTIN_TASKS[task]}
    return preset | BUILTIN_FINETUNE[task] if finetuning else preset


def default_predictor_lr(lr: float) -> float:
    """The relevance modules' learning rate when none is given: the paper's multiple of ``lr``."""
    return lr * recipe.PAPER_RECIPE["predictor_lr_scale"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(owner: type, name: str) -> type:
    """The value type of a dataclass field (``float | None`` -> float)."""
    hint = typing.get_type_hints(owner)[name]
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


BOUND_TESTS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
               "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def describe_bounds(bounds: dict) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``">= 0, < 1"``."""
    return ", ".join(f"{BOUND_TESTS[k][0]} {v:g}" for k, v in bounds.items())


def check_ranges(owner: Any) -> None:
    """Every number of the dataclass instance ``owner`` within the bounds declared with its :func:`option`
    (each element of a list); None means "not set" and passes. Raises ConfigError naming flag and value."""
    for f in fields(owner):
        value, bounds = getattr(owner, f.name), f.metadata.get("bounds")
        if not bounds or value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        ok = all(BOUND_TESTS[k][1](v, b) for v in values for k, b in bounds.items())
        shown = " ".join(f"{v:g}" for v in values)
        check(ok, f"{flag(f.name)} {shown}: must be {describe_bounds(bounds)}"
              + (" (each value)" if isinstance(value, list | tuple) else ""))


def field_default(name: str) -> Any:
    """The default value of the ``RunConfig`` field ``name`` (a fresh one of a ``default_factory``)."""
    f = FIELDS[name]
    return f.default if f.default is not MISSING else f.default_factory()


def help_text(f: Field, *, default: Any = MISSING, digits: Any = MISSING) -> str:
    """A field's help with its defaults (with --data, in the built-in digits preset, and in its fine-tuning
    recipe from --pretrained)."""
    if default is MISSING:
        default = f.default if f.default is not MISSING else f.default_factory()
    digits = f.metadata["digits"] if digits is MISSING else digits
    parts = [] if default is None or default is False else [f"default: {json.dumps(default)}"]
    parts += [] if digits is NO_DIGITS else [f"digits: {json.dumps(digits)}"]
    if FIELDS.get(f.name) is f and f.name in DIGITS_SPOT_FINETUNE:
        parts.append(f"digits, SPOT from --pretrained: {json.dumps(DIGITS_SPOT_FINETUNE[f.name])}")
    parts += [describe_bounds(f.metadata["bounds"])] if f.metadata.get("bounds") else []
    choices = f.metadata["choices"]
    text = f.metadata["help"] + (f" {{{','.join(choices)}}}" if choices else "")
    return text + (f" [{'; '.join(parts)}]" if parts else "")


def add_field(parser, owner: type, name: str, **overrides) -> None:
    """Add the flag of dataclass ``owner``'s field ``name`` (declared with :func:`option`) to ``parser`` (a
    parser or argument group). The flag's default is None (= not given) unless ``overrides`` say else."""
    f, kind = {f.name: f for f in fields(owner)}[name], _base_type(owner, name)
    kwargs: dict = {"dest": name, "default": None, "help": help_text(f)}  # choices: checked with the values
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
    elif kind is dict:
        kwargs.update(action="append", metavar=f.metadata["metavar"])
        parser.add_argument("--model-arg", **(kwargs | overrides))
        return
    elif typing.get_origin(kind) is list:  # one value per RGB channel
        kwargs.update(type=typing.get_args(kind)[0], nargs=3, metavar=f.metadata["metavar"])
    else:
        kwargs.update(type=kind, metavar=f.metadata["metavar"])
    parser.add_argument(*f.metadata.get("flags", ()) or (flag(name),), **(kwargs | overrides))


def add_options(parser) -> None:
    """Add every :class:`RunConfig` flag, plus ``--dense`` and ``--config``."""
    for name, f in FIELDS.items():
        if f.metadata["cli"]:
            add_field(parser, RunConfig, name)
        if name == "rho":
            parser.add_argument("--dense", action="store_true", default=None, help=EXTRA_FLAGS["dense"])
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help=EXTRA_FLAGS["config"])


def parse_model_args(items: list[str], where: str) -> dict:
    """``["depth=6", "drop_path_rate=0.1"]`` -> ``{"depth": 6, "drop_path_rate": 0.1}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: model arg {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def read_config_file(path: str, option_name: str = "--config") -> dict:
    """Options from a YAML file (keys with dashes or underscores); raises ConfigError naming file and key."""
    file = Path(path).expanduser()
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{option_name} {file}: {first_line(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{option_name} {file}: expected a mapping of options, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS and name != "dense":
            raise ConfigError(f"{option_name} {file}: unknown option {key!r}")
        if name == "model_args" and isinstance(value, list):
            value = parse_model_args([str(v) for v in value], f"{option_name} {file}")
        values[name] = value
    return values


def given_values(args: argparse.Namespace, config_file: str | None = None) -> GivenOptions:
    """Explicitly given options: the YAML file's (``--config``), overridden by the command line's."""
    config_file = config_file or getattr(args, "config", None)
    values = read_config_file(config_file) if config_file else {}
    for key, value in vars(args).items():
        if (key not in FIELDS and key != "dense") or value is None:
            continue
        if key == "model_args":  # key by key over the file's
            value = {**(values.get("model_args") or {}), **parse_model_args(value, "--model-arg")}
        values[key] = value
    return GivenOptions.from_mapping(values)


def _check_types(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name not in FIELDS or value is None:
            continue
        kind, choices = _base_type(RunConfig, name), FIELDS[name].metadata["choices"]
        if choices is not None:
            check(value in choices, f"{flag(name)} {value!r}: choose one of {', '.join(choices)}")
        if kind in (int, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            integral = kind is float or (ok and float(value).is_integer())
            check(ok and integral, f"{flag(name)} {value!r}: expected a number")
        if typing.get_origin(kind) is list:
            ok = isinstance(value, list | tuple) and len(value) == 3
            ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            check(ok, f"{flag(name)} {value!r}: expected 3 numbers (R, G, B)")


@dataclass(frozen=True)
class GivenOptions:
    """The options given explicitly (command line, ``--config``, a caller's mapping), checked once: the
    value of each given :class:`RunConfig` field (None: not given) and ``dense``. Read by attribute
    (``given.rho``); a name that is no field raises AttributeError."""

    values: dict[str, Any]  # field name -> its given value (not to be changed)
    dense: bool = False

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GivenOptions:
        """Field names (plus ``dense``) to values; None means not given. Raises ConfigError for a value of
        the wrong type or a key that is no option, before anything else happens."""
        _check_types(mapping)
        unknown = sorted(set(mapping) - set(FIELDS) - {"dense"})
        check(not unknown, f"unknown option(s): {', '.join(unknown)}")
        values = {k: v for k, v in mapping.items() if k != "dense" and v is not None}
        return cls(values, bool(mapping.get("dense")))

    def __getattr__(self, name: str) -> Any:  # called for names that are no attribute of the instance
        if name.startswith("_") or name == "values":  # not an option (e.g. asked while copied or unpickled)
            raise AttributeError(name)
        return self.values.get(_option_name(name))

    def is_given(self, name: str) -> bool:
        return _option_name(name) in self.values

    def as_mapping(self) -> dict:
        """The mapping :meth:`from_mapping` takes back (``dense`` only when set)."""
        return {**self.values, **({"dense": True} if self.dense else {})}

    def with_options(self, **changes: Any) -> GivenOptions:
        """These options with ``changes`` on top (None: no longer given), checked again."""
        return GivenOptions.from_mapping({**self.as_mapping(), **changes})


def _option_name(name: str) -> str:
    if name not in FIELDS:
        raise AttributeError(f"{GivenOptions.__name__} has no option {name!r}")
    return name


def _given(given: GivenOptions | Mapping[str, Any]) -> GivenOptions:
    return given if isinstance(given, GivenOptions) else GivenOptions.from_mapping(given)


# Backbone overrides this project checks before building a model: type and bounds (as in :func:`option`).
MODEL_ARG_BOUNDS = {
    "depth": (int, {"ge": 1}), "embed_dim": (int, {"ge": 1}), "num_heads": (int, {"ge": 1}),
    "patch_size": (int, {"ge": 1}), "mlp_ratio": (float, {"gt": 0}),
    "drop_path_rate": (float, {"ge": 0, "lt": 1}), "drop_rate": (float, {"ge": 0, "lt": 1}),
    "attn_drop_rate": (float, {"ge": 0, "lt": 1}),
}
# run and registered model names: a directory under --storage and an MLflow name
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(option_name: str, value: str) -> None:
    """A user-given name that becomes a directory and an MLflow name: no separators, no ``..``."""
    ok = isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None and ".." not in value
    check(ok, f"{option_name} {value!r}: use letters, digits and . _ - (first a letter or digit, no '..', at "
          "most 128 characters): it names a directory in --storage and an MLflow object")


def _check_model_args(config: RunConfig) -> None:
    check(isinstance(config.model_args, dict), "model_args must be a mapping of backbone overrides")
    args = config.model_args
    for key in ("img_size", "num_classes", "pretrained"):
        check(key not in args, f"--model-arg {key}: use {flag(key)} instead")
    for key, (kind, bounds) in MODEL_ARG_BOUNDS.items():
        if key not in args:
            continue
        value = args[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        check(number and (kind is float or float(value).is_integer()),
              f"--model-arg {key}={value}: expected {'an integer' if kind is int else 'a number'}")
        check(all(BOUND_TESTS[k][1](value, b) for k, b in bounds.items()),
              f"--model-arg {key}={value}: must be {describe_bounds(bounds)}")
    if "patch_size" in args:
        check(config.img_size % args["patch_size"] == 0,
              f"--model-arg patch_size={args['patch_size']}: does not divide --img-size {config.img_size}")
    if "embed_dim" in args and "num_heads" in args:
        check(args["embed_dim"] % args["num_heads"] == 0,
              f"--model-arg embed_dim={args['embed_dim']}: not a multiple of num_heads={args['num_heads']}")


def check_storage_writable(storage: str) -> None:
    """A local ``--storage``: its nearest existing directory takes a file (a real write, as root too)."""
    if "://" in storage:
        return
    path = Path(storage)
    while not path.exists() and path != path.parent:
        path = path.parent
    check(path.is_dir(), f"--storage {storage}: {path} is not a directory")
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ConfigError(f"--storage {storage}: cannot write in {path} ({err.strerror})") from None


def _resolve_local_gpus(config: RunConfig) -> None:
    """Without ``--address`` the run uses this machine: GPUs per worker default to 1 if it has a GPU, and
    GPUs it does not have are refused (no other node can bring them)."""
    if config.address is not None or ray.is_initialized():
        return  # decided on the cluster (ray_session.worker_gpus), or by the Ray this runs in (a sweep trial)
    have = torch.cuda.device_count()
    if config.gpus_per_worker is None:
        config.gpus_per_worker = 1 if have else 0
    need = config.num_workers * config.gpus_per_worker
    check(need <= have, f"--gpus-per-worker {config.gpus_per_worker:g}: the run needs {need:g} GPUs "
          f"({config.num_workers} workers) and this machine has {have}; without --address no other GPU can "
          "come (--gpus-per-worker 0 trains on CPUs)")


def _builtin_task(data: str | None, cwd: Path, source: str) -> str | None:
    """The built-in task whose preset applies: ``source`` without ``data``, the task of a directory of
    built-in shards, else None."""
    if data is None:
        return source
    manifest = Path(data).expanduser()
    manifest = (manifest if manifest.is_absolute() else cwd / manifest) / "manifest.json"
    try:
        splits = json.loads(manifest.read_text()).get("splits", {})
    except (OSError, ValueError, AttributeError):
        return None  # read (and refused if bad) by _resolve_data
    sources = {s.get("params", {}).get("source") for s in splits.values() if isinstance(s, dict)}
    return next(iter(sources)) if splits and len(sources) == 1 and sources <= set(BUILTIN_TASKS) else None


def _resolve_rho(config: RunConfig, given: GivenOptions) -> None:
    rho = config.rho
    if given.dense:
        check(given.rho in (None, 1), f"--dense contradicts --rho {given.rho}")
        rho = 1.0
    ok = isinstance(rho, int | float) and not isinstance(rho, bool) and 0 < rho <= 1
    check(ok, f"--rho {rho!r}: must be in (0, 1] (1 = dense backbone)")
    config.rho = None if rho == 1 else float(rho)


def _resolve_training(config: RunConfig) -> None:
    """Validate values and derive the defaults that depend on others (lrs, lambdas)."""
    check(config.min_lr <= config.lr, f"--min-lr {config.min_lr:g}: above --lr {config.lr:g}")
    check(config.warmup_epochs <= config.epochs,
          f"--warmup-epochs {config.warmup_epochs:g}: more than --epochs {config.epochs}")
    check(config.freeze_epochs <= config.epochs,
          f"--freeze-epochs {config.freeze_epochs}: more than --epochs {config.epochs}")
    _check_model_args(config)
    if config.predictor_lr is None:
        config.predictor_lr = default_predictor_lr(config.lr)
    teacher = config.rho is not None and config.pretrained is not None
    paper = default_lambdas(config.backbone)
    for part in ("rate", "kl", "token"):
        key = f"lambda_{part}"
        value = getattr(config, key)
        if config.rho is None:
            value = 0.0  # dense: cross-entropy only
        elif value is None:
            value = paper[part] if (teacher or part == "rate") else 0.0
        else:
            check(teacher or part == "rate" or value == 0,
                  f"--lambda-{part} {value} needs a teacher, i.e. --pretrained weights")
        setattr(config, key, value)
    mixing = config.mixup > 0 or config.cutmix > 0
    per_worker = config.batch_size // config.num_workers
    check(config.batch_size % config.num_workers == 0 and per_worker >= 1,
          f"--batch-size {config.batch_size} must be a multiple of --num-workers "
          f"{config.num_workers}")
    check(not mixing or per_worker % 2 == 0, f"mixup/cutmix need an even batch per worker; got {per_worker}")


def make_builtin_data(given: GivenOptions | Mapping[str, Any], cwd: Path | None = None) -> Path | None:
    """Make the built-in digits shards in ``<cwd>/data/cluttered-digits`` (unless valid ones are there) when
    the ``given`` options name no ``data`` and continue no run: what a command does before
    :func:`resolve_config`. Their directory, or None when none is needed."""
    given = _given(given)
    if given.data is not None or given.resume:
        return None
    source = given.source or DIGITS_SOURCE
    return ensure_builtin_shards((cwd or Path.cwd()) / "data" / source, source)


def _resolve_data(config: RunConfig, cwd: Path) -> None:
    """The absolute shard directory (the built-in one without --data) and the class count (raises DataError
    for bad data)."""
    if config.data is None:
        builtin = (cwd / "data" / config.source).resolve()
        if not (builtin / MANIFEST_NAME).is_file():
            raise DataError(f"no --data and no built-in shards in {builtin}: make them first "
                            "(pipelines.training.config.make_builtin_data)")
        config.data = str(builtin)
    config.data = str(Path(config.data).expanduser().resolve())
    manifest = read_manifest(config.data)
    for split in ("train", "val"):
        manifest.shard_infos(split)
    check(manifest.counts["train"] >= config.batch_size,
          f"--data {config.data}: {manifest.counts['train']} training samples < --batch-size "
          f"{config.batch_size}")
    config.num_classes = manifest.num_classes


def resolve_config(given: GivenOptions | Mapping[str, Any], *, cwd: Path | None = None) -> RunConfig:
    """The full run configuration from explicitly ``given`` options (a mapping of field names, plus
    ``dense``, is checked into :class:`GivenOptions` first).

    Defaults: the field defaults (the paper's recipe), with :func:`digits_preset` and the built-in task's
    dense recipe (``BUILTIN_TASKS``) on top when no ``data`` is given (or ``data`` holds a built-in task's
    shards), and its fine-tuning recipe (``BUILTIN_FINETUNE``) on top of those for a sparse run from
    ``pretrained`` weights. With ``resume``, the training options come from the run's record in
    ``storage`` and may not be changed. Paths (data, storage, SQLite URI) are made absolute against ``cwd``
    here, on the driver: Ray workers run in directories of their own. Without ``data`` the built-in shards
    must have been made (:func:`make_builtin_data`). Raises ``ConfigError``, ``DataError`` or
    ``FileNotFoundError``.
    """
    cwd = cwd or Path.cwd()
    given = _given(given)
    task = _builtin_task(given.data, cwd, given.source or DIGITS_SOURCE)
    sparse_from_weights = bool(given.pretrained) and not (given.dense or given.rho == 1)
    defaults = RunConfig(**(task_preset(task, finetuning=sparse_from_weights) if task else {}))
    config = replace(defaults, **given.values)
    if isinstance(given.model_args, dict):  # key by key over the preset's
        config.model_args = {**defaults.model_args, **given.model_args}
    check_ranges(config)
    for key in ("run_name", "register_as"):
        if getattr(config, key) is not None:
            check_name(flag(key), getattr(config, key))
    config.storage = config.storage or str(cwd / RUNS_DIR)
    if "://" not in config.storage:
        config.storage = str(Path(config.storage).expanduser().resolve())
    check_storage_writable(config.storage)
    if config.resume:
        check(given.run_name is not None, "--resume needs the --run-name of the run to continue")
        record = read_record(config.location)
        check(record is not None and "config" in record,
              f"--resume: no run {config.run_name!r} in {config.storage}")
        saved = record["config"]
        unrecorded = [k for k in training_keys() if k not in saved]  # a record from before they existed
        if unrecorded:
            log.warning("--resume: run %r recorded no value of %s (older than these options); today's "
                        "defaults are used: %s", config.run_name, ", ".join(flag(k) for k in unrecorded),
                        ", ".join(f"{flag(k)} {field_default(k)!r}" for k in unrecorded))
        saved = {k: saved[k] if k in saved else field_default(k) for k in FIELDS}
        changed = [k for k in training_keys() if given.is_given(k) and given.values[k] != saved[k]]
        check(not changed, f"--resume cannot change training options: {', '.join(changed)}")
        kept = (*training_keys(), "num_classes", "experiment",
                *(() if given.register_as else ("register_as",)))  # a new name may be given
        # where it ran: as recorded unless given again (the resumed run is the run as started)
        placement = [k for k in PLACEMENT_KEYS if not given.is_given(k) and k in record["config"]]
        config = replace(config, **{k: saved[k] for k in (*kept, *placement)})
        _resolve_local_gpus(config)
        config.mlflow_uri = resolve_tracking_uri(given.mlflow_uri or record["tracking_uri"], cwd)
        return config
    _resolve_rho(config, given)
    _resolve_training(config)
    _resolve_local_gpus(config)
    if config.pretrained and not config.pretrained.startswith(("hub", *MODEL_URI_PREFIXES)):
        path = Path(config.pretrained).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained {path}: file not found")
        config.pretrained = str(path)
    _resolve_data(config, cwd)
    config.mlflow_uri = resolve_tracking_uri(config.mlflow_uri, cwd)
    rho_text = "dense" if config.dense else f"rho{config.rho}"
    config.run_name = config.run_name or f"{config.backbone}-{rho_text}-{datetime.now():%Y%m%d-%H%M%S}"
    kind = "-dense" if config.dense else SELECTOR_SUFFIX.get(config.selector, "")
    suffix = f"-{task}" if task and task != DIGITS_SOURCE else ""  # apart from the digits' models
    config.register_as = config.register_as or f"spot-{config.backbone}{kind}{suffix}"
    return config
