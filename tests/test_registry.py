"""pipelines/tracking/registry.py: registered SPOT models load back (no pickled code) and keep their
accuracy; the
champion alias only moves to a strictly more accurate model that costs no more GMACs."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import spot
from pipelines.evaluation.metrics import evaluate_model
from pipelines.tracking.registry import CHAMPION, load_model, register_checkpoint
from pipelines.utils.ports import free_port
from tests.mlflow_server import MlflowServer
from tests.tiny import TINY_NORMALIZATION


def test_champion_loads_and_reproduces_the_logged_validation_accuracy(trained, digits_shards, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    sparse = trained["spot"]
    model = load_model(f"models:/{sparse['registered_model']}@{CHAMPION}")
    assert not model.training and model.spot_config["rho"] == 0.7
    assert spot.input_normalization(model) == {k: tuple(v) for k, v in TINY_NORMALIZATION.items()}
    accuracy = evaluate_model(model, digits_shards, batch_size=32, device=torch.device("cpu"))
    assert accuracy["samples"] == 360
    assert accuracy["top1"] == pytest.approx(sparse["best_val_acc1"], abs=1e-9)
    assert accuracy["top5"] == pytest.approx(sparse["best_val_acc5"], abs=1e-9)
    # the same model by its run (export's documented runs:/ID/NAME form): the same weights
    by_run = load_model(f"runs:/{sparse['mlflow_run_id']}/{sparse['registered_model']}")
    assert by_run.spot_config == model.spot_config
    expected, loaded = model.state_dict(), by_run.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_pyfunc_predicts_the_module_logits(trained, mlflow_uri):
    mlflow.set_tracking_uri(mlflow_uri)
    uri = f"models:/{trained['spot']['registered_model']}@{CHAMPION}"
    pyfunc = mlflow.pyfunc.load_model(uri)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = load_model(uri)(images).numpy()
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), expected, rtol=1e-5, atol=1e-6)


def test_champion_moves_only_for_better_accuracy_at_no_more_gmacs(trained, tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'registry.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    steps = [  # (val top-1, GMACs, becomes champion)
        (0.50, 1.0, True),  # first version
        (0.60, 1.2, False),  # more accurate but more expensive
        (0.55, 0.9, True),  # more accurate and cheaper than v1
        (0.55, 0.8, False),  # cheaper but not more accurate
        (0.56, 0.9, True),  # more accurate at equal GMACs
    ]
    for version, (acc, gmacs, promoted) in enumerate(steps, start=1):
        metrics = {"val_acc1": acc, "val_acc5": 1.0, "gmacs": gmacs, "epoch": 0}
        out = register_checkpoint(
            trained["spot"]["checkpoint"], run_id=run_id, name="spot-test", metrics=metrics
        )
        assert (out["version"], out["champion"]) == (version, promoted)
    champion = client.get_model_version_by_alias("spot-test", CHAMPION)
    assert int(champion.version) == 5 and champion.tags["val_acc1"] == "0.560000"


def test_load_model_names_what_is_missing(tmp_path, mlflow_uri):
    with pytest.raises(FileNotFoundError, match="no SPOT checkpoint or MLflow model"):
        load_model(tmp_path)
    (tmp_path / "spot_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        load_model(tmp_path)
    mlflow.set_tracking_uri(mlflow_uri)
    with pytest.raises(ValueError, match="cannot load MLflow model models:/no-such-model@champion"):
        load_model("models:/no-such-model@champion")


FOREIGN_MODEL = '''
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

Path({marker!r}).write_text("ran")  # what a foreign model's code could do on load


class Foreign(PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Foreign())
'''


def test_a_model_this_project_did_not_register_is_refused_before_its_code_runs(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'foreign.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("foreign", artifact_location=(tmp_path / "artifacts").as_uri())
    marker = tmp_path / "code_ran"
    code = tmp_path / "foreign_model.py"
    code.write_text(FOREIGN_MODEL.format(marker=str(marker)))
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), registered_model_name="foreign")
    marker.unlink(missing_ok=True)  # logging may have run it; loading must not
    for uri in ("models:/foreign/1", info.model_uri):
        with pytest.raises(ValueError, match=f"{uri} is not a SPOT model registered by this project"):
            load_model(uri)
    assert not marker.exists()


def test_the_registered_model_serves_over_http_from_another_directory_without_the_checkout(
    trained, mlflow_uri, tmp_path
):
    """``mlflow models serve --env-manager local`` in a Python that cannot import this checkout's ``spot``
    (its editable install hidden): the model brings the package along and answers with the module's
    logits."""
    hide = tmp_path / "hide_checkout"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "editable = [f for f in sys.meta_path if getattr(f, '__module__', '').startswith('__editable')]\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if f not in editable]\n"
    )
    bindir = Path(sys.executable).parent  # as with the environment activated: uvicorn on PATH
    env = {**os.environ, "PYTHONPATH": str(hide), "MLFLOW_TRACKING_URI": mlflow_uri,
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    probe = subprocess.run([sys.executable, "-c", "import spot"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0, "the checkout's spot package is still importable"

    uri = f"models:/{trained['spot']['registered_model']}@{CHAMPION}"
    port = free_port()
    mlflow_cli = bindir / "mlflow"
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    images = torch.randn(2, 3, 32, 32)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float32)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    mlflow.set_tracking_uri(mlflow_uri)
    with torch.no_grad():
        expected = load_model(uri)(images).numpy()
    assert served.shape == (2, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    assert (served.argmax(1) == expected.argmax(1)).all()


REGISTRAR = """
import json, sys, time
import mlflow
from mlflow import MlflowClient
from pipelines.tracking.registry import register_checkpoint

uri, checkpoint, start_at, steps = sys.argv[1:]
mlflow.set_tracking_uri(uri)
client = MlflowClient()
run_id = client.create_run(client.get_experiment_by_name("race").experiment_id).info.run_id
time.sleep(max(0.0, float(start_at) - time.time()))
for acc, gmacs in json.loads(steps):
    metrics = {"val_acc1": acc, "val_acc5": 1.0, "gmacs": gmacs, "epoch": 0}
    register_checkpoint(checkpoint, run_id=run_id, name="race", metrics=metrics)
"""


def _expected_champion(client: MlflowClient) -> str:
    """Reference: versions in order, each replacing the champion if more accurate at no more GMACs."""
    best = None
    for v in sorted(client.search_model_versions("name = 'race'"), key=lambda v: int(v.version)):
        acc, gmacs = float(v.tags["val_acc1"]), float(v.tags["gmacs"])
        if best is None or (acc > best[1] and gmacs <= best[2]):
            best = (v.version, acc, gmacs)
    return best[0]


def test_two_registrations_at_once_leave_the_champion_the_rule_picks(trained, tmp_path):
    """Two processes register three versions each into one tracking server at the same moment; then a
    stale write (the alias moved to a losing version, as a registrar working from an older view does) is
    corrected by the next registration."""
    server = MlflowServer(tmp_path / "server").start()
    client = MlflowClient(server.url)
    client.create_experiment("race")
    checkpoint, start_at = trained["spot"]["checkpoint"], time.time() + 15
    steps = ([[0.50, 1.0], [0.70, 1.0], [0.60, 0.5]], [[0.65, 0.9], [0.55, 0.4], [0.80, 0.9]])
    registrars = [subprocess.Popen([sys.executable, "-c", REGISTRAR, server.url, checkpoint, str(start_at),
                                    json.dumps(s)], stderr=subprocess.PIPE, text=True) for s in steps]
    for registrar in registrars:
        _, stderr = registrar.communicate(timeout=300)
        assert registrar.returncode == 0, stderr[-3000:]
    assert len(client.search_model_versions("name = 'race'")) == 6
    champion = client.get_model_version_by_alias("race", CHAMPION).version
    assert champion == _expected_champion(client)

    losing = next(v.version for v in client.search_model_versions("name = 'race'") if v.version != champion)
    client.set_registered_model_alias("race", CHAMPION, losing)
    run_id = client.create_run(client.get_experiment_by_name("race").experiment_id).info.run_id
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        out = register_checkpoint(checkpoint, run_id=run_id, name="race",
                                  metrics={"val_acc1": 0.1, "val_acc5": 1.0, "gmacs": 9.0, "epoch": 0})
    finally:
        mlflow.set_tracking_uri(previous)  # the server is killed below: no later test may look there
    assert not out["champion"]
    assert client.get_model_version_by_alias("race", CHAMPION).version == champion
    server.kill()
