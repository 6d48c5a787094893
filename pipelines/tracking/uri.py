"""Where the MLflow tracking store is: the URI a run uses, made absolute, and the credentials a server URI
may carry, moved out of it into MLflow's own environment variables (no MLflow import: the run
configuration, which every Ray worker unpickles, resolves its URI here)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from pipelines.utils.errors import ConfigError

DB_FILE = "mlflow.db"
# what MLflow's client reads to authenticate to a tracking server
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _has_credentials(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and urllib.parse.urlsplit(uri).username is not None


def _without_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@``, which goes to ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``."""
    if not _has_credentials(uri):
        return uri
    parts = urllib.parse.urlsplit(uri)
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def move_credentials_to_env(uri: str | None) -> str | None:
    """What a command does with ``--mlflow-uri`` before anything resolves it: a server URI's
    ``user:password@`` (also one in ``$MLFLOW_TRACKING_URI``) goes to ``MLFLOW_TRACKING_USERNAME`` /
    ``_PASSWORD``, where MLflow's client reads them, so no stored, logged or printed URI holds a password.
    Returns ``uri`` without them (None stays None)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and _has_credentials(env):
        os.environ["MLFLOW_TRACKING_URI"] = _without_credentials(env)
    return None if uri is None else _without_credentials(uri)


def resolve_tracking_uri(uri: str | None, base: str | Path) -> str:
    """The tracking URI to use (``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<base>/mlflow.db``),
    relative SQLite / file paths made absolute against ``base``. A server URI must hold no credentials any
    more (:func:`move_credentials_to_env`); ConfigError, without the URI, if it does."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(base).resolve() / DB_FILE}"
    if uri.startswith(("http://", "https://")):
        if _has_credentials(uri):
            raise ConfigError("the MLflow tracking URI holds user:password@: move_credentials_to_env first")
        return uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path if path.is_absolute() else Path(base).resolve() / path}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        return (Path(base) / uri).resolve().as_uri()  # a bare directory: MLflow's file store
    return uri
