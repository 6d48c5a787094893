"""Where the MLflow tracking store is: the URI a run uses, made absolute, and the credentials a server URI
may carry, moved out of it into MLflow's own environment variables (no MLflow import: the run
configuration, which every Ray worker unpickles, resolves its URI here)."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from pipelines.utils.errors import ConfigError, TrackingError

DB_FILE = "mlflow.db"
# what MLflow's client reads to authenticate to a tracking server
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
# an MLflow model's URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/NAME
MODEL_URI_PREFIXES = ("models:/", "runs:/")
# what a tracking URI may be: a server, or a database that also holds the model registry
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
USABLE_STORES = "sqlite:///PATH.db, postgresql://..., mysql://... or http(s)://SERVER"


def _check_store_kind(uri: str, source: str) -> None:
    """Refuse what is no usable store, naming where the URI came from: MLflow's file store (``file:`` or a
    bare directory: no model registry here), an unknown scheme."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if uri.startswith("file:"):
        reason = "a file store, which has no model registry"
    elif not scheme:
        reason = "a bare path (MLflow would make a file store there, which has no model registry)"
    elif scheme not in ("http", "https", "sqlite", "databricks", *DATABASE_SCHEMES):
        reason = f"unknown scheme {scheme!r}"
    else:
        return
    raise TrackingError(f"{source} {uri}: {reason}; use {USABLE_STORES}")


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
    a relative SQLite path made absolute against ``base``. Raises :class:`TrackingError` for a file store, a
    bare directory or an unknown scheme. A server URI must hold no credentials any more
    (:func:`move_credentials_to_env`); ConfigError, without the URI, if it does."""
    source = "--mlflow-uri" if uri else "$MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(base).resolve() / DB_FILE}"
    if uri == "databricks" or uri.startswith("databricks://"):
        return uri
    if uri.startswith(("http://", "https://")):
        if _has_credentials(uri):
            raise ConfigError("the MLflow tracking URI holds user:password@: move_credentials_to_env first")
        return uri
    _check_store_kind(uri, source)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path if path.is_absolute() else Path(base).resolve() / path}"
    return uri
