"""The sweep's search space: a YAML file plus command-line overrides, validated, budget-clipped, for Tune.

File format (``tuning/search_space.yaml`` is the default)::

    lambda_rate: {distribution: loguniform, low: 0.5, high: 8.0}   # searched
    lambda_token: 0.0                                              # fixed for every trial

Searchable keys are fine-tuning options (:data:`SEARCHABLE`). A command-line override is ``VALUE`` (fixed),
``LOW:HIGH`` (the file's distribution, else the key's default one) or ``DISTRIBUTION:LOW:HIGH``. Every error
is a :class:`SpaceError` naming the file and key (or the flag) and the value, raised before any trial starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from ray import tune

import spot

# Searchable option -> distribution of a "LOW:HIGH" override of a key the file does not have.
SEARCHABLE: dict[str, str] = {
    "lambda_rate": "loguniform",
    "lambda_kl": "loguniform",
    "lambda_token": "uniform",
    "lr": "loguniform",
    "predictor_lr": "loguniform",
    "rho": "uniform",
}
DISTRIBUTIONS = ("uniform", "loguniform")
TEACHER_KEYS = ("lambda_kl", "lambda_token")  # distillation weights: need a teacher (--pretrained)
DEFAULT_SPACE = Path(__file__).with_name("search_space.yaml")


class SpaceError(ValueError):
    """An invalid search space; the message names the file and key (or flag) and the value."""


@dataclass(frozen=True)
class Dim:
    """One searched option: ``distribution`` over [low, high], or a fixed value (``distribution`` None)."""

    name: str
    source: str  # where it was defined, for messages: "FILE: key" or "--flag SPEC"
    low: float
    high: float
    distribution: str | None = None

    @property
    def fixed(self) -> bool:
        return self.distribution is None

    def describe(self) -> str:
        return f"{self.low:g}" if self.fixed else f"{self.distribution}({self.low:g}, {self.high:g})"

    def to_tune(self):
        sample = tune.loguniform if self.distribution == "loguniform" else tune.uniform
        return sample(self.low, self.high)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _number(value, source: str) -> float:
    if isinstance(value, bool):
        raise SpaceError(f"{source}: {value!r} is not a number")
    try:
        number = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    except (TypeError, ValueError):
        raise SpaceError(f"{source}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise SpaceError(f"{source}: {value!r} is not a finite number")
    return number


def _check_bounds(dim: Dim) -> Dim:
    """Range rules of ``dim``'s option; returns it (with low == high meaning a fixed value)."""
    where, name = dim.source, dim.name
    values = f"{dim.low:g}" if dim.fixed else f"low {dim.low:g}, high {dim.high:g}"
    if not dim.fixed:
        if dim.distribution not in DISTRIBUTIONS:
            raise SpaceError(
                f"{where}: distribution {dim.distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}"
            )
        if dim.low > dim.high:
            raise SpaceError(f"{where}: low {dim.low:g} > high {dim.high:g}")
        if dim.low == dim.high:
            raise SpaceError(f"{where}: low == high == {dim.low:g}; give a number to fix the value")
        if dim.distribution == "loguniform" and dim.low <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {dim.low:g}")
    if name == "rho" and not (dim.low > 0 and dim.high <= 1):
        raise SpaceError(f"{where}: rho must be in (0, 1], got {values}")
    if name in ("lr", "predictor_lr") and dim.low <= 0:
        raise SpaceError(f"{where}: {name} must be > 0, got {values}")
    if name.startswith("lambda_") and dim.low < 0:
        raise SpaceError(f"{where}: {name} must be >= 0, got {values}")
    return dim


def _entry(key: str, value, source: str) -> Dim:
    """A file entry: a number or ``{distribution, low, high}``."""
    if not isinstance(value, dict):
        number = _number(value, source)
        return _check_bounds(Dim(key, source, number, number))
    fields = {"distribution", "low", "high"}
    if set(value) != fields:
        missing, extra = sorted(fields - set(value)), sorted(set(value) - fields)
        what = "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}",
                              extra and f"unknown {', '.join(map(str, extra))}") if part
        )
        raise SpaceError(f"{source}: expected a number or {{distribution, low, high}} ({what})")
    low, high = _number(value["low"], f"{source}: low"), _number(value["high"], f"{source}: high")
    return _check_bounds(Dim(key, source, low, high, str(value["distribution"])))


def read_space_file(path: str | Path) -> dict[str, Dim]:
    """The dimensions of a search-space YAML file (raises :class:`SpaceError`)."""
    path = Path(path).expanduser()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SpaceError(f"search space {path}: {str(err).strip().splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpaceError(f"search space {path}: expected a mapping of options, got {type(raw).__name__}")
    space = {}
    for key, value in raw.items():
        if key not in SEARCHABLE:
            raise SpaceError(
                f"search space {path}: unknown key {key!r} (searchable: {', '.join(SEARCHABLE)})"
            )
        space[key] = _entry(key, value, f"search space {path}: {key}")
    return space


def parse_override(key: str, spec: str, current: Dim | None) -> Dim:
    """A command-line override: ``VALUE``, ``LOW:HIGH`` or ``DISTRIBUTION:LOW:HIGH``."""
    source = f"{flag(key)} {spec}"
    parts = spec.split(":")
    if len(parts) == 1:
        number = _number(parts[0], source)
        return _check_bounds(Dim(key, source, number, number))
    if len(parts) == 2:
        distribution = current.distribution if current is not None and not current.fixed else SEARCHABLE[key]
    elif len(parts) == 3:
        distribution = parts.pop(0)
    else:
        raise SpaceError(f"{source}: expected VALUE, LOW:HIGH or DISTRIBUTION:LOW:HIGH")
    low, high = (_number(p, source) for p in parts)
    return _check_bounds(Dim(key, source, low, high, distribution))


def load_space(path: str | Path = DEFAULT_SPACE, overrides: dict[str, str] | None = None) -> dict[str, Dim]:
    """The file's dimensions with the command line's ``overrides`` (key -> spec) applied."""
    space = read_space_file(path)
    for key, spec in (overrides or {}).items():
        if key not in SEARCHABLE:
            raise SpaceError(f"unknown search-space option {key!r} (searchable: {', '.join(SEARCHABLE)})")
        space[key] = parse_override(key, spec, space.get(key))
    return space


def without_teacher(space: dict[str, Dim]) -> tuple[dict[str, Dim], list[str]]:
    """The space for runs without a teacher: the file's distillation weights fixed at 0.

    Returns the new space and one note per weight that was fixed. A distillation weight given on the
    command line cannot be searched without a teacher: :class:`SpaceError`.
    """
    space, notes = dict(space), []
    for key in TEACHER_KEYS:
        dim = space.get(key)
        if dim is None or (dim.fixed and dim.low == 0):
            continue
        if dim.source.startswith("--"):
            raise SpaceError(
                f"{dim.source}: {key} weighs a distillation loss, which needs --pretrained weights"
            )
        space[key] = Dim(key, f"{dim.source} (no teacher)", 0.0, 0.0)
        notes.append(f"{key} fixed at 0 ({dim.describe()} in the search space needs --pretrained weights)")
    return space, notes


def rho_limit(config, budget_gmacs: float) -> float:
    """The largest rho whose model (the resolved fine-tuning ``config``'s architecture, a
    :class:`pipelines.training.config.RunConfig`) fits the budget of GMACs per image."""
    model = spot.create_model(
        config.backbone, rho=0.5, selector=config.selector, img_size=config.img_size,
        num_classes=config.num_classes, **config.model_args,
    )
    try:
        return spot.rho_for_budget(model, budget_gmacs, config.img_size)
    except ValueError as err:
        raise SpaceError(f"--gmacs-budget {budget_gmacs:g}: {err}") from None


def clip_rho(
    space: dict[str, Dim], rho_max: float, budget_gmacs: float, default_rho: float
) -> dict[str, Dim]:
    """The space with the rho range cut at ``rho_max`` (a fixed or default rho must already fit)."""
    dim = space.get("rho") or Dim("rho", f"fine-tuning default rho {default_rho:g}", default_rho, default_rho)
    if dim.low > rho_max:
        raise SpaceError(
            f"{dim.source}: a {budget_gmacs:g} GMACs budget allows rho <= {rho_max:.4f}, the range starts "
            f"at {dim.low:g}"
        )
    if dim.fixed or dim.high <= rho_max:
        return {**space, "rho": dim}
    source = f"{dim.source} (clipped to {budget_gmacs:g} GMACs)"
    clipped = (
        Dim("rho", source, dim.low, rho_max)
        if dim.low == rho_max
        else replace(dim, source=source, high=rho_max)
    )
    return {**space, "rho": clipped}


def is_feasible(gmacs: float, budget_gmacs: float | None) -> bool:
    """Whether a model of ``gmacs`` GMACs per image fits the budget (always without one)."""
    return budget_gmacs is None or gmacs <= budget_gmacs * (1 + 1e-9)


def split(space: dict[str, Dim], where: str) -> tuple[dict, dict[str, float]]:
    """``(param_space, fixed)``: Ray Tune distributions of the searched keys and the fixed values."""
    searched = {k: d.to_tune() for k, d in space.items() if not d.fixed}
    if not searched:
        raise SpaceError(f"{where}: nothing to search (every option is fixed)")
    return searched, {k: d.low for k, d in space.items() if d.fixed}
