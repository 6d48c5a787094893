"""pipelines/demo.py: its parent run ends in a true state whichever step stops it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines.storage.run_record import RUN_RECORD
from pipelines.training.config import RUNS_DIR
from tests.ray_faults import STOP_RAYLETS
from tests.scripts import ROOT

pytestmark = pytest.mark.integration


def test_a_demo_whose_local_ray_cannot_start_ends_its_parent_run_failed_in_one_line(tmp_path):
    """The demo's parent run exists before Ray starts (it holds the data set): every raylet stopped, the demo
    says so in one line, exit 1, and its parent run is FAILED, not left RUNNING."""
    demo = ROOT / "pipelines" / "demo.py"
    script = STOP_RAYLETS + f"""
import subprocess, sys
driver = subprocess.Popen([sys.executable, {str(demo)!r}], stderr=subprocess.PIPE, text=True)
stopped = stop_raylets(driver.pid, first_only=False)
stderr = driver.communicate(timeout=600)[1]
print("exit", driver.returncode, "stopped", len(stopped))
sys.stderr.write(stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=700)
    assert "exit 1 stopped 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("demo: the local Ray did not start (")
    assert "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("spot-demo").experiment_id])
    assert parent.info.run_name.startswith("demo-") and parent.info.status == "FAILED"
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"cluttered-digits-train",
                                                                        "cluttered-digits-val"}


@pytest.mark.parametrize("rates, message", [
    (["1.0"], "--finetune-rho 1.0: must be in (0, 1) (a sparse model's keep rate)"),
    (["0.5", "0.5"], "--finetune-rho 0.5: given twice; each rate is compared once"),
    (["0.7", "0.5", "0.5000000001"], "--finetune-rho 0.5000000001: given twice; each rate is compared once"),
])
def test_a_bad_fine_tuning_rate_is_refused_before_anything_runs(rates, message, tmp_path, monkeypatch,
                                                                 capsys):
    from pipelines import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--finetune-rho", *rates]) == 2
    assert capsys.readouterr().err.strip() == f"demo: error: {message}"
    assert list(tmp_path.iterdir()) == []  # no data, no store, no run


def test_the_demos_run_options_are_finetunes():
    """--num-workers, --verbose and --seed mean in the demo what they mean in finetune.py: the same flag,
    help, type and bounds (RunConfig's fields)."""
    from pipelines import demo, finetune

    def actions(parser):
        return {a.dest: a for a in parser._actions}

    ours, theirs = actions(demo.build_parser()), actions(finetune.build_parser())
    for name in ("num_workers", "verbose", "seed"):
        mine, its = ours[name], theirs[name]
        assert (mine.option_strings, mine.help, mine.type, mine.nargs) == (
            its.option_strings, its.help, its.type, its.nargs), name
    assert "[default: 2; >= 1]" in ours["num_workers"].help


def test_the_demos_comparison_of_its_registered_models_is_a_child_run_naming_them(
    trained, trained_heuristic, tiny_options, mlflow_uri, tmp_path, monkeypatch
):
    """The demo's last step on the session's registered dense, SPOT (rho 0.7) and class-attention models:
    every selector at rho 0.7 and 0.5, the fine-tuned rows labelled with their weights, one comparison run
    under the demo's parent that names each compared model."""
    from pipelines import demo
    from pipelines.tracking.mlflow_run import MlflowRun
    from pipelines.training.config import resolve_config

    monkeypatch.chdir(tmp_path)  # the figures go to ./ray_results
    finetune = tiny_options | {"pretrained": "models:/dense/1", "epochs": 2}
    runs = {"dense": [(resolve_config(tiny_options | {"dense": True, "epochs": 2}), trained["dense"])],
            "spot": [(resolve_config(finetune), trained["spot"])],
            "heuristic": [(resolve_config(finetune | {"selector": "cls_attn_avg"}), trained_heuristic)]}
    parent = MlflowRun.create(mlflow_uri, "tests-demo", "demo-parent")
    comparison = demo.compare_models(runs, "now", parent)
    rows = [(r["selector"], r["rho"], r["weights"]) for r in comparison["rows"]]
    assert rows[0] == ("none (dense)", None, "dense (2 epochs)")
    for rho, block in zip((0.7, 0.5), (rows[1:5], rows[5:9]), strict=True):
        assert block == [("random", rho, "dense (2 epochs)"), ("cls_attn_avg", rho, "dense (2 epochs)"),
                         ("cls_attn_avg (fine-tuned)", rho, "class attention rho 0.7 (2 + 2 epochs)"),
                         ("learned (SPOT)", rho, "SPOT rho 0.7 (2 + 2 epochs)")]
    assert len(rows) == 9
    run = MlflowClient(mlflow_uri).get_run(comparison["evaluation_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    for role in ("dense", "spot", "heuristic"):
        result = runs[role][0][1]
        assert run.data.params[f"{role}_uri"] == result["registered_uri"]
        assert run.data.tags[f"{role}_source_run"] == result["mlflow_run_id"]


def test_sigterm_to_a_demo_s_group_while_it_trains_ends_its_runs_killed_in_one_line(tmp_path):
    """SIGTERM to the demo's process group (``timeout``, a scheduler, ``kill -- -PGID``) once its dense run
    has logged an epoch is handled as Ctrl-C (Ray Train aborts the run): one line, exit 143, no traceback;
    the parent run and the dense run KILLED, not left RUNNING."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    out, err = (tmp_path / "demo.out").open("w"), (tmp_path / "demo.err").open("w+")
    driver = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "demo.py")], cwd=tmp_path, env=env,
                              stdout=out, stderr=err, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    records: list[Path] = []
    epochs: list = []
    try:
        while not epochs:  # the dense run's record names its MLflow run once the run exists
            assert driver.poll() is None and time.monotonic() < deadline, "the dense run logged no epoch"
            time.sleep(1)
            records = records or list(tmp_path.glob(f"{RUNS_DIR}/demo-dense-*/{RUN_RECORD}"))
            if records:
                run_id = json.loads(records[0].read_text())["mlflow_run_id"]
                epochs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id,
                                                                                               "val_acc1")
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        out.close()
        err.seek(0)
        stderr = err.read()
        err.close()
    assert driver.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "demo: interrupted (SIGTERM); its parent run and any run in progress marked KILLED, the models "
        "registered before kept; nothing continues a demo: run it again")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dense = client.get_run(run_id)
    assert dense.info.status == "KILLED"
    assert client.get_run(dense.data.tags[MLFLOW_PARENT_RUN_ID]).info.status == "KILLED"
