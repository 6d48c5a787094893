"""What an evaluation run evaluated: the registered models behind its model URIs, as parameters, tags and
MLflow model inputs, so the run page links to the models and their training runs."""

from __future__ import annotations

from typing import Protocol

from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException

SOURCE_RUN_TAG = "{role}_source_run"


class TrackedRun(Protocol):
    """What :func:`log_model_inputs` needs of a run (:class:`pipelines.tracking.mlflow_run.MlflowRun`)."""

    client: MlflowClient
    run_id: str

    def log_params(self, params: dict) -> None: ...

    def set_tags(self, tags: dict) -> None: ...


def registered_version(client, uri: str):
    """The registry's ``ModelVersion`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; None for
    any other URI (a checkpoint directory, ``runs:/``) or a version the registry does not know."""
    if not uri.startswith("models:/"):
        return None
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        return client.get_model_version(name, version) if version.isdigit() else None
    except MlflowException:
        return None


def logged_model_id(version) -> str | None:
    """The id of the logged model behind a registered ``version`` (MLflow's SQL registry keeps it only in
    the version's source, ``models:/<model id>``)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def log_model_inputs(run: TrackedRun, models: dict[str, str]) -> None:
    """For each ``role -> URI``: params ``<role>_uri`` and (a registered model) ``<role>_version``, a tag
    ``<role>_source_run`` with the run that trained it, and the logged model as a model input of ``run``."""
    client = run.client
    params, tags, inputs = {}, {}, []
    for role, uri in models.items():
        params[f"{role}_uri"] = uri
        version = registered_version(client, uri)
        if version is None:
            continue
        params[f"{role}_version"] = f"{version.name}/{version.version}"
        if version.run_id:
            tags[SOURCE_RUN_TAG.format(role=role)] = version.run_id
        if model_id := logged_model_id(version):
            inputs.append(LoggedModelInput(model_id))
    run.log_params(params)
    if tags:
        run.set_tags(tags)
    if inputs:
        client.log_inputs(run.run_id, models=inputs)
