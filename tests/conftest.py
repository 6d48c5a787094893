"""Shared test settings: deterministic, single-threaded-friendly torch on the 2-core CI box."""

import socket
import time

import pytest
import torch

from tests.tiny import TINY_NORMALIZATION, TINY_PIPELINE_MODEL

# `make test` runs the suite on 3 pytest-xdist workers (-n 3 --dist loadgroup): each worker has its own
# session (its own local Ray, digits shards and MLflow store). Tests that read one expensive result share a
# worker, so that it is made once: the tests of the session's ``trained`` runs, and the tests of a module
# that share a module-scoped fixture (a sweep, a rehearsal, a server, shards). Integration tests (marked,
# or on the session's Ray) and their groups are collected first; pytest-xdist then hands out the groups
# largest first (its --loadscope-reorder), then the rest in this order, each to whichever worker is free.
SHARED_SESSION_RUNS = ("trained",)


def _shared_group(item) -> str | None:
    for name in item.fixturenames:
        if name in SHARED_SESSION_RUNS:
            return name
    for name in item.fixturenames:
        definitions = item._fixtureinfo.name2fixturedefs.get(name)
        if definitions and definitions[-1].scope == "module":
            return item.module.__name__
    return None


def _heavy(item) -> bool:
    return item.get_closest_marker("integration") is not None or "ray_cluster" in item.fixturenames


@pytest.hookimpl(tryfirst=True)  # the groups must be marked before pytest-xdist's worker hook reads them
def pytest_collection_modifyitems(config, items):
    groups = {item: _shared_group(item) for item in items}
    for item, group in groups.items():
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    heavy_groups = {group for item, group in groups.items() if group is not None and _heavy(item)}
    first = [item for item in items if _heavy(item) or groups[item] in heavy_groups]
    chosen = set(first)  # a group moves whole: its module-scoped fixture is set up once
    items[:] = first + [item for item in items if item not in chosen]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """On a pytest-xdist worker of ``--dist loadgroup``, fail a grouped test before its fixtures if
    pytest-xdist did not put its group in its id (the "@<group>" suffix: missing when the groups are marked
    after pytest-xdist's hook, and on pytest 9.2, pytest-xdist issue 1386); every worker would then make
    the shared runs, rehearsals and sweeps itself, all at once."""
    nodeid = item.nodeid  # grouped: "<id>@<group>", after any "[parameters]" (as pytest-xdist reads it)
    if (getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group")
            and nodeid.rfind("@") <= nodeid.rfind("]")):
        pytest.fail(f"--dist loadgroup did not group this test (pytest {pytest.__version__}): see this hook "
                    "in tests/conftest.py and the pytest range in pyproject.toml", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections during the test: held bound, never listening."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, and a URI's ``user:password@`` goes to
    MLFLOW_TRACKING_USERNAME / _PASSWORD: keep one test's store and credentials out of the next."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # so that the value before the test (or its absence) is restored
        monkeypatch.delenv(name)


# --- pipelines (finetune, registry, evaluate): real Ray, DALI on the CPU and MLflow SQLite, tiny models ---


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The built-in digits as shards (train 1437, val 360 images of 32 px), made once per session."""
    from pipelines.data.shards import ensure_digits_shards

    return ensure_digits_shards(tmp_path_factory.mktemp("digits"), img_size=32)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray (with the dashboard: the state API finds Train workers); its GCS address."""
    import ray

    from pipelines.training.ray_session import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _session_ray_left_free(request):
    """A test on the session's Ray gives back every CPU it reserved (Train worker groups, Tune trials) within
    a minute: a leak fails the test that made it, not a later one that waits for the CPU until its timeout."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 60
    while (free := ray.available_resources().get("CPU", 0.0)) < total:
        if time.monotonic() > deadline:
            pytest.fail(f"{total - free:g} of the session Ray's {total:g} CPUs still reserved a minute after "
                        "the test; a later test on this Ray would wait for them")
        time.sleep(1)


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """Working directory of the pipeline runs: mlflow.db, mlartifacts/, ray_results/."""
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def mlflow_uri(pipeline_dir):
    return f"sqlite:///{pipeline_dir / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_options(digits_shards, pipeline_dir, mlflow_uri):
    """finetune options of a tiny 2-worker run on the digits shards (add run_name, epochs, rho...)."""
    return {
        "backbone": "deit_t",
        "data": str(digits_shards),
        "img_size": 32,
        "model_args": TINY_PIPELINE_MODEL,
        "batch_size": 64,
        "num_workers": 2,
        "warmup_epochs": 1,
        "freeze_epochs": 1,
        "randaugment": False,
        "vis_images": 4,
        "storage": str(pipeline_dir / "ray_results"),
        "mlflow_uri": mlflow_uri,
        "experiment": "tests",
    }


@pytest.fixture(scope="session")
def trained(ray_cluster, pipeline_dir, tiny_options):
    """A dense 2-worker run (with ``TINY_NORMALIZATION``), then a SPOT run fine-tuned from the registered
    dense model (which inherits it): RESULT_JSON dicts."""
    import contextlib

    from pipelines.training.config import resolve_config
    from pipelines.training.job import run

    with contextlib.chdir(pipeline_dir):
        dense = run(resolve_config({**tiny_options, **TINY_NORMALIZATION, "dense": True, "epochs": 2,
                                    "run_name": "dense"}))
        teacher = f"models:/{dense['registered_model']}/{dense['registered_version']}"
        sparse = run(resolve_config({**tiny_options, "pretrained": teacher, "epochs": 2, "run_name": "spot"}))
    return {"dense": dense, "spot": sparse}


@pytest.fixture(scope="session")
def trained_heuristic(trained, pipeline_dir, tiny_options):
    """The class-attention model fine-tuned from the same registered dense model with the same epochs and
    learning rates as ``trained``'s SPOT run (``finetune.py --selector cls_attn_avg``, paper Table 7)."""
    import contextlib

    from pipelines.training.config import resolve_config
    from pipelines.training.job import run

    teacher = f"models:/{trained['dense']['registered_model']}/{trained['dense']['registered_version']}"
    with contextlib.chdir(pipeline_dir):
        return run(resolve_config({**tiny_options, "pretrained": teacher, "epochs": 2,
                                   "selector": "cls_attn_avg", "run_name": "cls-attn"}))
