"""Faults and bad input, injected for real (issue 14): no silent loss, no false champion, no secret left
behind. Real Ray, DALI, MLflow and files; tiny models, one worker, short runs."""

import contextlib
import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipelines import finetune
from pipelines.run_record import RUN_RECORD


@pytest.mark.integration
def test_nonfinite_loss_stops_the_run_keeps_the_last_good_checkpoint_and_registers_nothing(
    ray_cluster, pipeline_dir, tiny_options, mlflow_uri, tmp_path, capsys
):
    """lr 1e8 from the first step (the issue's reproduction): the loss is NaN / inf within epoch 1."""
    name = "nonfinite"
    options = {**tiny_options, "dense": True, "num_workers": 1, "epochs": 2, "run_name": name, "lr": 1e8,
               "warmup_epochs": 0, "register_as": "nonfinite-test", "vis_images": 0}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(options))
    with contextlib.chdir(pipeline_dir):
        code = finetune.main(["--config", str(path)])
    out, err = capsys.readouterr()
    assert code == 1, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("finetune: training failed: ")]
    assert "non-finite training loss at epoch 1, step " in line and "nothing registered" in line, line
    assert "RESULT_JSON" not in out
    run_dir = Path(tiny_options["storage"]) / name
    run_id = json.loads((run_dir / RUN_RECORD).read_text())["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["nonfinite_loss"].startswith("non-finite training loss at epoch 1, step ")
    assert client.get_metric_history(run_id, "val_acc1") == []  # no epoch finished, nothing NaN logged
    assert client.search_model_versions("name = 'nonfinite-test'") == []
    assert not list(run_dir.glob("checkpoint_*"))  # no checkpoint of NaN weights
    assert "last good checkpoint: none" in line
