"""Errors the pipelines report to a user in one line (exit code 2), and that line."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid or inconsistent options; the message names the option and the value."""


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message says why in one line."""


class RayStartError(RuntimeError):
    """A local Ray that did not come up (twice); the message says why in one line (exit code 1)."""


class TrainingError(RuntimeError):
    """A training run that stopped for good (e.g. a non-finite loss); the message says where (exit code 1)."""


class TrackingOutage(RuntimeError):
    """Training finished but MLflow could not take its results (metrics, model); they wait in the run's
    storage and the message ends with the command that sends them (exit code 75, "try again later")."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or SIGTERM / SIGHUP) after its MLflow run existed; the message is the command
    that continues it, ``checkpoints`` how many it has (None: unknown), ``marked`` whether its MLflow run
    was marked KILLED (False: MLflow could not record it; it shows RUNNING until the run is continued); exit
    code 128 + the signal (:mod:`pipelines.utils.signals`)."""

    def __init__(self, command: str, checkpoints: int | None = None, marked: bool = True) -> None:
        super().__init__(command)
        self.checkpoints = checkpoints
        self.marked = marked


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name if empty): one-line error reports."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check(condition: bool, message: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error(message)`` unless ``condition``."""
    if not condition:
        raise error(message)
