"""A finetune.py run read back: the command's result line and its MLflow runs and metric histories."""

import json
from pathlib import Path

from mlflow import MlflowClient

from pipelines import finetune

FINETUNE = Path(finetune.__file__)


def result_json(stdout: str) -> dict:
    """The command's one ``RESULT_JSON:`` line, parsed."""
    [line] = [ln for ln in stdout.splitlines() if ln.startswith("RESULT_JSON: ")]
    return json.loads(line.removeprefix("RESULT_JSON: "))


def runs_named(uri: str, experiment: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{name}'")


def history_steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))
