"""The cluster files: every YAML parses, the `ray up` configs pass Ray's own validation, the KubeRay and
MLflow manifests have what they need, and every command or path they name exists in this repository."""

import copy
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.finetune import build_parser

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ["ray_cluster.yaml", "infra/gcp/ray_cluster_gcp.yaml"]
KUBERAY = ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"]
MLFLOW_MANIFEST = "infra/mlflow/mlflow.yaml"
MLFLOW_START = REPO / "infra/mlflow/start_server.sh"
ALL_YAML = sorted({"ray_cluster.yaml", *(str(p.relative_to(REPO)) for p in (REPO / "infra").rglob("*.y*ml"))})
# Paths inside the containers that map to this repository.
REPO_IN_CONTAINER = re.compile(r"(?:~|/home/ray)/spot/([\w./-]+)")


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def load_all(rel: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((REPO / rel).read_text()) if doc is not None]


def pyproject_deps() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_the_infra_yaml_files_are_all_found():
    assert set(LAUNCHER_CONFIGS + KUBERAY + [MLFLOW_MANIFEST]) <= set(ALL_YAML)


@pytest.mark.parametrize("rel", ALL_YAML)
def test_yaml_parses_into_mappings(rel):
    docs = load_all(rel)
    assert docs, f"{rel} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{rel}: every document must be a mapping"


# --------------------------------------------------------------------------------------------------------
# `ray up` configs


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(rel):
    """What `ray up` does before touching the cloud: fill in defaults, merge commands, schema-check."""
    prepared = prepare_config(load(rel))
    validate_config(prepared)
    gpu = prepared["available_node_types"]["gpu_8x_a100"]
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= prepared["max_workers"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # setup_commands were merged into the head's and workers' command lists
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_ray_validation_rejects_broken_configs():
    """The validation above is live: it refuses an unknown field and a head type that does not exist."""
    config = load("ray_cluster.yaml")
    bad_field = copy.deepcopy(config)
    bad_field["available_node_types"]["gpu_8x_a100"]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad_field))
    bad_head = copy.deepcopy(config)
    bad_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad_head))


def test_aws_config_shape():
    config = load("ray_cluster.yaml")
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["gpu_8x_a100"]
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert "GPU" not in head["resources"], "the head must not offer GPUs (Train workers belong on GPU nodes)"
    assert "IamInstanceProfile" in gpu["node_config"], "GPU workers need S3 access for checkpoints"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_security_and_image(rel):
    config = load(rel)
    image = config["docker"]["image"]
    assert "ray-ml" not in image, "rayproject/ray-ml is discontinued"
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    mounts = config["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["/home/ray/spot"] == "."
    head_start = " ".join(config["head_start_ray_commands"])
    assert "infra/mlflow/start_server.sh" in head_start and "--autoscaling-config" in head_start
    # no secret values in the config: they come from the mounted ~/.spot/cluster.env
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*=\S", yaml.safe_dump(config))


def test_gcp_config_keeps_the_shared_parts_identical():
    """The GCP file repeats the AWS commands by necessity (YAML has no include); they must not drift."""
    aws, gcp = load(LAUNCHER_CONFIGS[0]), load(LAUNCHER_CONFIGS[1])
    for key in ["file_mounts", "rsync_exclude", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"]:  # fmt: skip
        assert aws[key] == gcp[key], key
    assert aws["docker"]["run_options"] == gcp["docker"]["run_options"]
    assert aws["head_setup_commands"][1:] == gcp["head_setup_commands"][1:]


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_pins_match_the_project(rel):
    """The packages installed on the nodes are the ones this checkout is tested with."""
    config = load(rel)
    setup = " ".join(config["setup_commands"] + config["head_setup_commands"])
    import mlflow
    import torch
    import torchvision

    assert f"torch=={torch.__version__.split('+')[0]}" in setup
    assert f"torchvision=={torchvision.__version__.split('+')[0]}" in setup
    assert f"mlflow[auth]=={mlflow.__version__}" in setup


def test_repo_paths_named_in_cluster_files_exist():
    """Every ~/spot/... or /home/ray/spot/... path in the cluster files is a file of this checkout."""
    named = set()
    for rel in LAUNCHER_CONFIGS + KUBERAY + [MLFLOW_MANIFEST]:
        named |= {(rel, m) for m in REPO_IN_CONTAINER.findall((REPO / rel).read_text())}
    assert named, "expected the cluster files to reference repository files"
    missing = [(rel, path) for rel, path in named if not (REPO / path.rstrip(".")).exists()]
    assert not missing, missing


# --------------------------------------------------------------------------------------------------------
# KubeRay


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for rel in KUBERAY:
        for doc in load_all(rel):
            if doc["kind"] == "RayCluster":
                specs.append((rel, doc["spec"]))
            elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
                specs.append((rel, doc["spec"]["rayClusterSpec"]))
    return specs


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kuberay_manifests_use_ray_io_v1():
    kinds = set()
    for rel in KUBERAY:
        for doc in load_all(rel):
            if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
                assert doc["apiVersion"] == "ray.io/v1", rel
                kinds.add(doc["kind"])
    assert kinds == {"RayCluster", "RayJob"}


def test_kuberay_cluster_has_an_8_gpu_worker_group_with_token_auth_and_shm():
    specs = ray_cluster_specs()
    assert specs
    for rel, spec in specs:
        assert spec["rayVersion"] == ray.__version__, rel
        assert spec["authOptions"]["mode"] == "token", rel
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if any(
                str(c["resources"]["limits"].get("nvidia.com/gpu")) == "8"
                for c in g["template"]["spec"]["containers"]
            )
        ]
        assert gpu_groups, f"{rel}: no worker group with nvidia.com/gpu: 8 limits"
        assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups)
        head_containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head_containers)
        for template in pod_templates(spec):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "/dev/shm" in mounts, f"{rel}: {container['name']} lacks /dev/shm"
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
                assert container["image"] == head_containers[0]["image"], "one image for head and workers"


def test_rayjob_runs_finetune_on_the_raycluster_with_valid_flags():
    (cluster,) = [d for d in load_all(KUBERAY[0]) if d["kind"] == "RayCluster"]
    (job,) = load_all(KUBERAY[1])
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = REPO_IN_CONTAINER.fullmatch(argv[1])
    assert script and script.group(1) == "pipelines/finetune.py" and (REPO / script.group(1)).is_file()
    args = build_parser().parse_args(argv[2:])  # exits (SystemExit) on an unknown flag
    assert args.backbone == "lvvit_s" and args.mlflow_uri.startswith("http://mlflow.")
    mounts = {m["mountPath"] for c in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c["volumeMounts"]}  # fmt: skip
    for path in (args.data, args.pretrained):
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is on no volume of the head pod"


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, script, args) of every `python <script> ...` in docs/cluster.md and the launcher configs'
    comments, with line continuations joined."""
    found = []
    for rel in ["docs/cluster.md", *LAUNCHER_CONFIGS]:
        lines = [re.sub(r"^#\s?", "", ln) for ln in (REPO / rel).read_text().splitlines()]
        text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
        for script, rest in re.findall(r"python (\S+\.py)((?:(?!&&|;)[^'\n`])*)", text):
            found.append((rel, script, shlex.split(rest)))
    return found


def test_documented_commands_use_existing_scripts_and_flags():
    """The commands a reader copies from docs/cluster.md and ray_cluster.yaml parse with the real CLIs."""
    from pipelines.make_shards import parse_args as make_shards_args
    from tuning.sweep_lambdas import build_parser as sweep_parser

    parsers = {
        "pipelines/finetune.py": build_parser().parse_args,
        "tuning/sweep_lambdas.py": sweep_parser().parse_args,
        "pipelines/make_shards.py": make_shards_args,
    }
    commands = documented_commands()
    assert {script for _, script, _ in commands} >= set(parsers) - {"tuning/sweep_lambdas.py"}
    for rel, script, args in commands:
        if script == "infra/local_multinode.py":
            continue
        assert script in parsers, f"{rel}: unexpected script {script}"
        assert (REPO / script).is_file()
        parsers[script](args)  # SystemExit on an unknown flag or a bad value


def test_finetune_parser_rejects_unknown_flags():
    """The entrypoint check above relies on the parser refusing what it does not know."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--no-such-flag", "1"])


# --------------------------------------------------------------------------------------------------------
# MLflow server


def test_mlflow_manifest_is_internal_authenticated_and_secret_free():
    docs = {d["kind"]: d for d in load_all(MLFLOW_MANIFEST)}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    assert "NetworkPolicy" in docs
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1].endswith("infra/mlflow/start_server.sh")
    env = {e["name"]: e for e in container["env"]}
    for name in ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"]:  # fmt: skip
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")


def test_ray_pods_get_mlflow_credentials_from_a_secret():
    (cluster,) = [d for d in load_all(KUBERAY[0]) if d["kind"] == "RayCluster"]
    for template in pod_templates(cluster["spec"]):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.spot.svc.cluster.local:5000"
            assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]


def run_start_script(**env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(env_overrides)
    return subprocess.run(["bash", str(MLFLOW_START)], env=env, capture_output=True, text=True, timeout=30)


COMPLETE = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db:5432/mlflow",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql://u:p@db:5432/mlflow_auth",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "x",
}


@pytest.mark.parametrize("missing", sorted(COMPLETE))
def test_mlflow_start_script_refuses_incomplete_config(missing, tmp_path):
    env = {k: v for k, v in COMPLETE.items() if k != missing}
    done = run_start_script(**env, SPOT_MLFLOW_RUNTIME_DIR=str(tmp_path / "rt"))
    assert done.returncode == 2 and missing in done.stderr, done.stderr
    assert not (tmp_path / "rt").exists(), "nothing is written before the configuration is complete"


def test_mlflow_start_script_refuses_a_shared_auth_database(tmp_path):
    env = {**COMPLETE, "MLFLOW_AUTH_DATABASE_URI": COMPLETE["MLFLOW_BACKEND_STORE_URI"]}
    done = run_start_script(**env, SPOT_MLFLOW_RUNTIME_DIR=str(tmp_path / "rt"))
    assert done.returncode == 2 and "different database" in done.stderr, done.stderr


# --------------------------------------------------------------------------------------------------------
# The image


def test_dockerfile_matches_the_project_cuda_and_runs_as_non_root():
    text = (REPO / "infra/Dockerfile").read_text()
    dali = next(d for d in pyproject_deps() if d.startswith("nvidia-dali-cuda"))
    cuda_major = re.match(r"nvidia-dali-cuda(\d+)", dali).group(1)[:-1]  # cuda130 -> 13
    import torch

    assert torch.version.cuda is None or torch.version.cuda.startswith(f"{cuda_major}.")
    assert re.search(rf"^ARG CUDA_IMAGE=nvidia/cuda:{cuda_major}\.\d+\.\d+-", text, re.M), "CUDA base"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", text, re.M)
    assert "pyproject.toml" in text and "uv pip install --no-cache --no-deps -e ." in text
    ignore = (REPO / "infra/Dockerfile.dockerignore").read_text().split()
    assert ".git" in ignore and ".venv" in ignore
