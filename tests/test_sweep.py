"""The Ray Tune sweep: Pareto front and ranking by hand, then real sweeps (Ray Tune, Ray Train trials, MLflow
SQLite store) of a tiny model on the digits shards: tracking, plot, registry, budget, interrupt + resume."""

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch
from mlflow import MlflowClient
from PIL import Image

import spot
from pipelines.tracking.datasets import CONTEXTS
from pipelines.training.config import GivenOptions, RunConfig
from spot.flops import macs
from tuning.pareto import pareto_front
from tuning.results import mark_rows
from tuning.sweep import SweepError, default_max_concurrent
from tuning.trial import train_name

SCRIPT = Path(__file__).parents[1] / "tuning" / "sweep_lambdas.py"
TINY = {"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
TINY_ARGS = [
    *(arg for key, value in TINY.items() for arg in ("--model-arg", f"{key}={value}")),
    "--img-size", "32", "--num-workers", "1", "--seed", "3", "--gpus-per-worker", "0",
]
BUDGET_RHO = 0.5  # the budget of the budget sweep: the tiny model's cost at this rho


def test_pareto_front_hand_computed():
    # (GMACs, accuracy): C and D are dominated by B, H by A; A and G are equal, so both stay on the front.
    points = {"A": (1.0, 0.70), "B": (2.0, 0.80), "C": (2.0, 0.75), "D": (3.0, 0.78), "E": (0.5, 0.60),
              "F": (4.0, 0.90), "G": (1.0, 0.70), "H": (1.5, 0.70)}
    names = list(points)
    front = pareto_front([points[n][0] for n in names], [points[n][1] for n in names])
    assert [names[i] for i in front] == ["E", "A", "G", "B", "F"]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="2 costs but 1 scores"):
        pareto_front([1.0, 2.0], [0.5])


def _row(trial_id, acc, gmacs, *, feasible=True, status="completed"):
    return {"trial_id": trial_id, "val_acc1": acc, "gmacs": gmacs, "feasible": feasible, "status": status,
            "mlflow_run_id": f"run-{trial_id}"}


def test_ranking_never_picks_an_infeasible_trial():
    rows = mark_rows([
        _row("over", 0.99, 3.0, feasible=False),
        _row("early", 0.95, 1.0, status="stopped early"),
        _row("cheap", 0.90, 1.0),
        _row("dear", 0.90, 2.0),
        _row("slow", 0.80, 0.5),
        {"trial_id": "crash", "val_acc1": math.nan, "gmacs": math.nan, "feasible": False, "status": "error"},
    ])
    assert [r["trial_id"] for r in rows] == ["early", "cheap", "dear", "slow", "over", "crash"]
    assert [r["trial_id"] for r in rows if r["best"]] == ["early"]
    # the front holds completed trials only ("early" was stopped by ASHA), feasible or not: "over" is the
    # most accurate (the plot marks it over the budget); "dear" is dominated by "cheap"
    assert {r["trial_id"] for r in rows if r["pareto"]} == {"cheap", "slow", "over"}
    only_infeasible = mark_rows([_row("over", 0.99, 3.0, feasible=False)])
    assert not only_infeasible[0]["best"]


def test_default_max_concurrent_counts_train_workers():
    cpu = RunConfig(num_workers=1, cpus_per_worker=1, gpus_per_worker=None)
    assert default_max_concurrent({"CPU": 2.0}, cpu) == 1  # 1 worker CPU + the driver's share
    assert default_max_concurrent({"CPU": 16.0}, replace(cpu, num_workers=2)) == 7
    gpu = RunConfig(num_workers=8, cpus_per_worker=10, gpus_per_worker=None)
    assert default_max_concurrent({"CPU": 192.0, "GPU": 16.0}, gpu) == 2
    assert default_max_concurrent({"CPU": 192.0, "GPU": 16.0}, replace(gpu, gpus_per_worker=0.5)) == 4
    with pytest.raises(SweepError, match="shows no GPUs"):
        default_max_concurrent({"CPU": 8.0}, replace(gpu, gpus_per_worker=1))
    with pytest.raises(SweepError, match="a trial needs 4.25 CPUs"):
        default_max_concurrent({"CPU": 2.0}, replace(cpu, num_workers=4))


# ---------------------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="session")  # a directory: shared by the sweeps a worker runs
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweeps")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return env | {"PYTHONUNBUFFERED": "1"}


def run_sweep(workdir: Path, *args: str, timeout: float = 900) -> tuple[int, str, dict | None]:
    """Run the CLI in ``workdir``; (exit code, stdout, RESULT_JSON or None). Prints the end of stderr."""
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=workdir, env=_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # say where it stood, and what the session's Ray had free
        free = ray.available_resources() if ray.is_initialized() else "no session Ray"
        ends = [(text or b"")[-3000:].decode(errors="replace") for text in (err.stdout, err.stderr)]
        pytest.fail(f"sweep still running after {timeout} s; session Ray free: {free}\n" + "\n".join(ends))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON: ")]
    result = json.loads(lines[-1].removeprefix("RESULT_JSON: ")) if lines else None
    assert proc.returncode != 0 or result is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stderr[-5000:], file=sys.stderr)  # shown by pytest when a test fails
    return proc.returncode, proc.stdout, result


def runs_of(client: MlflowClient, experiment: str) -> tuple:
    """(parent run, child runs) of the only sweep in ``experiment``."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


@pytest.fixture(scope="module")
def budget_sweep(workdir, ray_cluster):
    """3 trials, 2 epochs, rho searched over (0.3, 1) without clipping to a budget that cuts that range;
    lrs high enough for the tiny model to learn in 2 epochs (more tokens: more accurate, if anything)."""
    model = spot.create_model("deit_t", rho=0.5, img_size=32, num_classes=10, **TINY)
    budget = macs(model, 32, rho=BUDGET_RHO) / 1e9
    code, out, result = run_sweep(
        workdir, *TINY_ARGS, "--address", ray_cluster, "--num-samples", "3", "--epochs", "2",
        "--rho", "0.3:1.0", "--lr", "3e-3:1e-2",
        "--gmacs-budget", repr(budget), "--no-budget-clip", "--experiment", "budget",
        "--register-as", "tiny-budget", "--name", "budget",
    )
    assert code == 0, out[-3000:]
    return budget, out, result, MlflowClient(result["mlflow_tracking_uri"])


@pytest.mark.integration
def test_sweep_tracks_parent_and_children_plots_and_registers(budget_sweep, workdir):
    budget, out, result, client = budget_sweep
    parent, children = runs_of(client, "budget")
    assert result["trials"] == 3 == len(children)
    assert parent.info.status == "FINISHED" and parent.info.run_id == result["mlflow_run_id"]
    assert parent.data.params["space_rho"] == "uniform(0.3, 1)"
    assert parent.data.params["budget"] == str(budget)
    assert len({c.data.tags["sweep_trial_id"] for c in children}) == 3
    for child in children:
        trial = child.data.tags["sweep_trial_id"]
        assert child.info.run_name == train_name(trial)
        status = child.data.tags["trial_status"]
        assert (status, child.info.status) in {("completed", "FINISHED"), ("stopped early", "KILLED")}, trial
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc1")]
        assert steps == ([0, 1] if status == "completed" else [0]), trial
        assert {"rho", "lambda_rate", "lr", "predictor_lr", "gmacs"} <= set(child.data.params)
        assert float(child.data.params["gmacs"]) > 0 and "gmacs" not in child.data.metrics  # a constant
        assert f"trial {trial}: {status} after" in out
    assert result["completed"] + result["stopped_early"] == 3
    # the sweep's run and every trial's log the shards they read: the same two datasets (train, val)
    datasets = {frozenset((d.dataset.name, d.dataset.digest, d.tags[0].value)
                          for d in client.get_run(r.info.run_id).inputs.dataset_inputs)
                for r in (parent, *children)}
    assert len(datasets) == 1
    assert {context for *_, context in next(iter(datasets))} == set(CONTEXTS.values())
    # the artifacts of the sweep's run: the plot is a real PNG, the table has one row per trial
    local = Path(client.download_artifacts(parent.info.run_id, "pareto.png", str(workdir)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(local) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    table = Path(client.download_artifacts(parent.info.run_id, "sweep_results.csv", str(workdir)))
    assert len(table.read_text().strip().splitlines()) == 1 + 3
    # the champion exists, is the best trial's, and loads as a working model
    version = client.get_model_version_by_alias("tiny-budget", "champion")
    assert version.run_id == next(c.info.run_id for c in children
                                  if c.data.tags["sweep_trial_id"] == result["best_trial"])
    import mlflow

    from pipelines.tracking.registry import load_model

    mlflow.set_tracking_uri(result["mlflow_tracking_uri"])
    model = load_model("models:/tiny-budget@champion")
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.integration
def test_budget_sweep_never_registers_an_infeasible_trial(budget_sweep):
    budget, out, result, client = budget_sweep
    _, children = runs_of(client, "budget")
    gmacs = {c.info.run_id: float(c.data.params["gmacs"]) for c in children}
    over = {run for run, g in gmacs.items() if g > budget}
    assert over and len(over) < len(children), f"seed gave no mix of feasible and infeasible trials: {gmacs}"
    for child in children:
        assert child.data.tags["feasible"] == str(child.info.run_id not in over)
    best_acc = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "val_acc1"))
                for c in children}
    feasible_best = max(acc for run, acc in best_acc.items() if run not in over)
    versions = client.search_model_versions("name = 'tiny-budget'")
    assert len(versions) == 1
    (version,) = versions
    assert version.run_id not in over
    assert float(version.tags["gmacs"]) <= budget
    assert float(version.tags["val_acc1"]) == pytest.approx(feasible_best, abs=1e-6)
    assert result["best_val_acc1"] == pytest.approx(feasible_best) and result["best_gmacs"] <= budget
    assert "over the GMACs budget" in out


def _interrupt_and_resume(workdir: Path, address: str | None, tag: str) -> None:
    """SIGTERM to the sweep's process group while trial 2 trains, trial 1 finished: exit 143, the sweep's run
    and trial 2's run KILLED, one resume command (Tune's own hint silenced); that command completes the
    sweep without running trial 1 again or a second run of trial 2."""
    experiment, name = f"resume-{tag}", f"resumable-{tag}"
    args = [
        *TINY_ARGS, "--num-samples", "2", "--epochs", "1", "--max-concurrent", "1",
        "--searcher", "random", *(("--address", address) if address else ()),
        "--experiment", experiment, "--register-as", f"tiny-resume-{tag}", "--name", name,
    ]
    log = workdir / f"interrupted-{tag}.out"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")

    def trial_runs() -> int:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        return sum("mlflow.parentRunId" in r.data.tags for r in runs)

    with open(log, "w") as out, open(workdir / f"interrupted-{tag}.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=workdir, env=_env(), stdout=out,
                                stderr=err, start_new_session=True)
        deadline = time.monotonic() + 420
        first = None
        while (first is None or trial_runs() < 2) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            done = [line.split()[1].rstrip(":") for line in log.read_text().splitlines()
                    if line.startswith("trial ") and ": completed after" in line]
            first = done[0] if done else None
        assert first is not None and trial_runs() == 2, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    if address is not None:  # the joined cluster (this process's Ray): the interrupted trial's CPUs come back
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, f"a minute after the sweep, free: {ray.available_resources()}"
            time.sleep(1)
    stderr = (workdir / f"interrupted-{tag}.err").read_text()
    assert "Tuner.restore" not in stderr and "Stop signal received" not in stderr
    [line] = [ln for ln in stderr.splitlines() if ln.startswith("sweep_lambdas: interrupted")]
    assert line == ("sweep_lambdas: interrupted (SIGTERM); MLflow runs of the sweep and of its 1 running "
                    "trial(s) marked KILLED, finished trials and checkpoints kept. Continue with:")
    [command] = [ln.strip() for ln in stderr.splitlines() if "--resume" in ln]
    resume = shlex.split(command)
    assert resume[:2] == ["python", "tuning/sweep_lambdas.py"], command
    parent, children = runs_of(client, experiment)
    assert parent.info.status == "KILLED"
    state = {c.data.tags["sweep_trial_id"]: (c.info.status, c.data.tags["trial_status"]) for c in children}
    [second] = set(state) - {first}
    assert state == {first: ("FINISHED", "completed"), second: ("KILLED", "interrupted")}
    path = workdir / "ray_results" / name
    first_run = path / "train_runs" / train_name(first)
    before = {p.relative_to(first_run): p.stat().st_mtime_ns for p in first_run.rglob("*")}

    code, out, result = run_sweep(workdir, *resume[2:])
    assert code == 0, out[-3000:]
    assert result["trials"] == 2 and result["completed"] == 2
    assert f"trial {first}:" not in out  # finished before the interruption: not run (nor closed) again
    assert {p.relative_to(first_run): p.stat().st_mtime_ns for p in first_run.rglob("*")} == before
    parent, children = runs_of(client, experiment)
    assert parent.info.status == "FINISHED"
    train_runs = sorted(p.name for p in (path / "train_runs").iterdir())
    assert sorted(train_name(c.data.tags["sweep_trial_id"]) for c in children) == train_runs
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc1")] == [0]
    champion = client.get_model_version_by_alias(f"tiny-resume-{tag}", "champion")
    assert champion.run_id in {c.info.run_id for c in children}
    # a finished sweep is not resumed again
    code, _, _ = run_sweep(workdir, "--resume", str(path))
    assert code == 2


@pytest.mark.integration
def test_sigterm_to_a_local_sweep_s_process_group_kills_its_runs_and_its_one_command_resumes_it(workdir):
    """The sweep starts its own local Ray, whose processes are in the sweep's process group (``kill --
    -PGID``, a closed terminal): they keep running until the sweep has ended its runs."""
    _interrupt_and_resume(workdir, None, "local")


@pytest.mark.integration
def test_sigterm_to_a_sweep_on_a_joined_cluster_frees_its_trial_s_cpus_for_the_resume(workdir, ray_cluster):
    """On a joined cluster the interrupted trial's Ray Train worker group gives its CPUs back (the session's
    Ray has 2: the resumed trial needs them; conftest also checks that none stay reserved)."""
    _interrupt_and_resume(workdir, ray_cluster, "joined")


@pytest.mark.integration
def test_a_trial_with_a_nan_loss_fails_alone_and_nothing_is_registered(workdir, ray_cluster):
    """A poisoned learning rate: the trial fails with the reason (once: Tune's retry does not train it again),
    its MLflow run is FAILED, the sweep ends without a best trial (exit 1) and registers nothing."""
    code, out, result = run_sweep(
        workdir, *TINY_ARGS, "--address", ray_cluster, "--num-samples", "1", "--epochs", "1",
        "--lr", "1e8", "--experiment", "nan", "--register-as", "tiny-nan", "--name", "nan",
    )
    assert code == 1 and result["best_trial"] is None, out[-3000:]
    [line] = [line for line in out.splitlines() if line.startswith("trial ")]
    assert ": failed, see " in line
    error_file = Path(line.split(": failed, see ", 1)[1])
    errors = error_file.read_text()  # Tune appends each attempt's error
    assert "non-finite training loss at epoch 1" in errors
    # Tune's one retry (for a lost trial driver) fails at once instead of training into the same NaN again
    assert "(in its first attempt; not run again)" in errors
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent, [child] = runs_of(client, "nan")
    assert child.info.status == "FAILED" and child.data.tags["trial_status"] == "error"
    assert not client.search_registered_models("name = 'tiny-nan'")


def test_resume_takes_no_other_options(tmp_path, capsys):
    from tuning.sweep_lambdas import main

    assert main(["--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "--resume continues a sweep as it was started; remove epochs" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_digits_sweep_without_a_registered_dense_model_says_it_trains_from_scratch(tmp_path):
    from tuning.sweep import prepare
    from tuning.sweep_lambdas import build_parser

    plan = prepare(build_parser().parse_args(TINY_ARGS), tmp_path)
    assert plan["config"].pretrained is None
    assert any("trials train SPOT from scratch" in n for n in plan["notes"])
    assert any(n.startswith("lambda_kl fixed at 0") for n in plan["notes"])  # no teacher: l2 not searched
    # the options every trial is given (recorded; the trials and the results read them): the digits sweep's
    # preset under the flags, the driver's resolved data, the weight fixed for want of a teacher
    options = GivenOptions.from_mapping(plan["setup"]["options"])
    assert (options.data, options.img_size, options.seed) == (plan["config"].data, 32, 3)
    assert (options.num_workers, options.warmup_epochs, options.lambda_kl) == (1, 0.25, 0)
    assert not options.is_given("rho") and not options.is_given("pretrained")  # derived per trial; none


@pytest.mark.parametrize("source", ["cluttered-digits", "cluttered-digits-hard", "cluttered-digits-hard-96"])
def test_a_sweep_on_a_built_in_source_fine_tunes_as_its_demo_does(source, tmp_path):
    """Without --data each trial takes the source's own fine-tuning recipe (the demo's: one epoch at 96 px,
    two on the others), one worker, the source named by flag or in --finetune-config; a flag still wins."""
    from tuning.sweep import given_training_options
    from tuning.sweep_lambdas import build_parser

    epochs = {"cluttered-digits": 2, "cluttered-digits-hard": 2, "cluttered-digits-hard-96": 1}[source]
    given = given_training_options(build_parser().parse_args(["--source", source]))
    assert (given.epochs, given.warmup_epochs, given.freeze_epochs, given.num_workers) == (epochs, 0.25, 0, 1)
    assert not given.is_given("lr") and not given.is_given("predictor_lr")  # searched
    config = tmp_path / "finetune.yaml"
    config.write_text(f"source: {source}\n")
    given = given_training_options(build_parser().parse_args(["--finetune-config", str(config)]))
    assert (given.source, given.epochs) == (source, epochs)
    given = given_training_options(build_parser().parse_args(["--source", source, "--epochs", "3"]))
    assert given.epochs == 3


def test_a_teacher_trained_on_other_data_is_refused_before_anything_starts(digits_shards, tmp_path, capsys,
                                                                            monkeypatch):
    """A real SQLite registry: a dense teacher of the trials' architecture whose version records another
    data set (the same digits stored at 24 px, trained at 32 px, 10 classes: only the manifest differs) is
    refused in one line
    naming both data sets, exit 2, before the sweep's run or storage exist; the same model registered on
    the trials' data passes."""
    import mlflow

    from pipelines.data.shards import write_shards
    from pipelines.storage.checkpoints import CONFIG_FILE, MODEL_FILE
    from pipelines.tracking.registry import data_tags, register_checkpoint
    from tuning.sweep import prepare
    from tuning.sweep_lambdas import build_parser, main

    other = tmp_path / "other"
    for split in ("train", "val"):
        write_shards("digits", other, split=split, img_size=24, workers=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("teachers", artifact_location=(tmp_path / "mlartifacts").as_uri())
    checkpoint = tmp_path / "teacher"
    checkpoint.mkdir()
    model = spot.create_model("deit_t", rho=None, img_size=32, num_classes=10, **TINY)
    (checkpoint / CONFIG_FILE).write_text(json.dumps(model.spot_config))
    torch.save(model.state_dict(), checkpoint / MODEL_FILE)
    metrics = {"val_acc1": 0.5, "val_acc5": 0.9, "gmacs": 0.01, "epoch": 1}
    for name, data in (("teacher-other", other), ("teacher-same", digits_shards)):
        run_id = client.create_run(experiment).info.run_id
        client.log_param(run_id, "data", str(data))
        register_checkpoint(checkpoint, run_id=run_id, name=name, metrics=metrics, data=data_tags(data, 32))
    theirs, ours = data_tags(other, 32)["data_digest"], data_tags(digits_shards, 32)["data_digest"]
    assert theirs != ours

    base = [*TINY_ARGS, "--data", str(digits_shards), "--mlflow-uri", uri,
            "--storage", str(tmp_path / "sweeps"), "--name", "taught"]
    capsys.readouterr()
    assert main([*base, "--pretrained", "models:/teacher-other@champion"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"sweep_lambdas: error: --pretrained models:/teacher-other@champion: the teacher was trained on "
        f"{other} (manifest {theirs}, 10 classes, 32 px), the trials train on {digits_shards} (manifest "
        f"{ours}, 10 classes, 32 px); a teacher must know the trials' data set (--pretrained a model "
        "trained on it)")
    assert not (tmp_path / "sweeps").exists() and client.get_experiment_by_name("spot-sweep") is None
    plan = prepare(build_parser().parse_args([*base, "--pretrained", "models:/teacher-same/1"]), tmp_path)
    assert plan["config"].pretrained == "models:/teacher-same/1"
