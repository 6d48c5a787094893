"""The Kubernetes manifests (infra/kuberay/, infra/mlflow/mlflow.yaml) against schemas, not hand-picked keys.

Plain Kubernetes objects, and every pod template of the Ray resources, are validated strictly (unknown
fields are errors) against the Kubernetes OpenAPI schemas that the kubernetes-validate package ships. The
Ray resources themselves are checked against the field names and types of KubeRay's ray.io/v1 API
(RayCluster, RayJob), written down below from KubeRay's Go API types (ray-operator/apis/ray/v1).
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/mlflow/mlflow.yaml"]
K8S_VERSION = "1.33"  # a Kubernetes release EKS and GKE run; the schemas of kubernetes-validate
RAY_KINDS = {"RayCluster", "RayJob"}

# --- ray.io/v1, from KubeRay's API types. A spec is a type name, [item spec], {"map": value spec},
# {"enum": [...]}, or a Fields object. "pod" is a corev1.PodTemplateSpec (validated by the Kubernetes
# schema), "object" another Kubernetes type this test does not descend into.


class Fields(dict):
    """An object's fields: name -> spec; `required` names the ones that must be present."""

    def __init__(self, fields: dict, required: tuple[str, ...] = ()):
        super().__init__(fields)
        self.required = required


STR, INT, BOOL, NUM, OBJ, POD = "string", "integer", "boolean", "number", "object", "pod"
MAP_STR = {"map": STR}

AUTH_OPTIONS = Fields(
    {"enableK8sTokenAuth": BOOL, "secretName": STR, "mode": {"enum": ["disabled", "token"]}}
)
AUTOSCALER_OPTIONS = Fields({
    "resources": OBJ, "image": STR, "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
    "securityContext": OBJ, "idleTimeoutSeconds": INT,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "version": {"enum": ["v1", "v2"]},
    "env": [OBJ], "envFrom": [OBJ], "volumeMounts": [OBJ], "command": [STR], "args": [STR],
})
HEAD_GROUP = Fields({
    "template": POD, "headService": OBJ, "enableIngress": BOOL, "ingressOptions": OBJ, "resources": MAP_STR,
    "labels": MAP_STR, "rayStartParams": MAP_STR, "serviceType": STR,
}, required=("template",))
WORKER_GROUP = Fields({
    "suspend": BOOL, "groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT,
    "idleTimeoutSeconds": INT, "priority": INT, "resources": MAP_STR, "labels": MAP_STR,
    "rayStartParams": MAP_STR, "template": POD, "scaleStrategy": Fields({"workersToDelete": [STR]}),
    "numOfHosts": INT,
}, required=("groupName", "minReplicas", "maxReplicas", "template"))
RAY_CLUSTER_SPEC = Fields({
    "upgradeStrategy": Fields({"type": {"enum": ["Recreate", "None"]}}), "authOptions": AUTH_OPTIONS,
    "suspend": BOOL, "managedBy": STR, "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headServiceAnnotations": MAP_STR,
    "enableInTreeAutoscaling": BOOL, "gcsFaultToleranceOptions": OBJ, "historyServerOptions": OBJ,
    "networkPolicy": OBJ, "tlsOptions": Fields({"enabled": BOOL}), "headGroupSpec": HEAD_GROUP,
    "rayVersion": STR, "workerGroupSpecs": [WORKER_GROUP],
}, required=("headGroupSpec",))
RAY_JOB_SPEC = Fields({
    "activeDeadlineSeconds": INT, "backoffLimit": INT, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD, "metadata": MAP_STR, "clusterSelector": MAP_STR,
    "submitterConfig": Fields({"backoffLimit": INT}), "managedBy": STR, "deletionStrategy": OBJ,
    "entrypoint": STR, "runtimeEnvYAML": STR, "jobId": STR,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "entrypointResources": STR, "entrypointNumCpus": NUM, "entrypointNumGpus": NUM,
    "ttlSecondsAfterFinished": INT, "shutdownAfterJobFinishes": BOOL, "suspend": BOOL,
})
SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC}
PY_TYPES = {STR: str, INT: int, BOOL: bool, NUM: (int, float), OBJ: dict, POD: dict}


def check(value, spec, path: str) -> list[str]:
    """Errors of `value` against a ray.io/v1 spec (empty when it conforms)."""
    if isinstance(spec, Fields):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errors = [f"{path}.{k}: not a field of ray.io/v1" for k in value if k not in spec]
        errors += [f"{path}.{k}: required" for k in spec.required if k not in value]
        for key, sub in value.items():
            if key in spec:
                errors += check(sub, spec[key], f"{path}.{key}")
        return errors
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in check(item, spec[0], f"{path}[{i}]")]
    if isinstance(spec, dict) and "map" in spec:
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        return [e for k, v in value.items() for e in check(v, spec["map"], f"{path}.{k}")]
    if isinstance(spec, dict) and "enum" in spec:
        return [] if value in spec["enum"] else [f"{path}: {value!r} is not one of {spec['enum']}"]
    ok = isinstance(value, PY_TYPES[spec]) and not (spec in (INT, NUM) and isinstance(value, bool))
    return [] if ok else [f"{path}: expected {spec}, got {type(value).__name__} {value!r}"]


def docs() -> list[tuple[str, dict]]:
    return [(rel, d) for rel in MANIFESTS for d in yaml.safe_load_all((REPO / rel).read_text()) if d]


def pod_templates(spec, path: str):
    """(path, template) of every PodTemplateSpec inside a Ray resource's spec."""
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key in ("template", "submitterPodTemplate") and isinstance(value, dict):
                yield f"{path}.{key}", value
            else:
                yield from pod_templates(value, f"{path}.{key}")
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            yield from pod_templates(item, f"{path}[{i}]")


def as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


def test_the_manifests_hold_a_raycluster_and_a_rayjob():
    kinds = [d["kind"] for _, d in docs()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 1
    assert all(d["apiVersion"] == "ray.io/v1" for _, d in docs() if d["kind"] in RAY_KINDS)


@pytest.mark.parametrize("kind", sorted(RAY_KINDS))
def test_ray_resources_use_only_kuberay_v1_fields(kind):
    (doc,) = [d for _, d in docs() if d["kind"] == kind]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    assert check(doc["spec"], SPECS[kind], f"{kind}.spec") == []


def test_the_kuberay_check_finds_wrong_fields_and_types():
    (cluster,) = [d for _, d in docs() if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster["spec"])
    bad["workerGroupSpecs"][0]["maxReplica"] = 2  # misspelt
    bad["workerGroupSpecs"][0]["minReplicas"] = "0"  # a string
    bad["authOptions"]["mode"] = "tokens"
    del bad["headGroupSpec"]["template"]
    errors = check(bad, RAY_CLUSTER_SPEC, "spec")
    assert any("maxReplica: not a field" in e for e in errors)
    assert any("minReplicas: expected integer" in e for e in errors)
    assert any("mode: 'tokens'" in e for e in errors)
    assert any("headGroupSpec.template: required" in e for e in errors)


def test_every_ray_pod_template_passes_the_kubernetes_schema():
    templates = [(f"{rel}:{path}", t) for rel, d in docs() if d["kind"] in RAY_KINDS
                 for path, t in pod_templates(d["spec"], d["kind"])]
    assert len(templates) >= 2  # head and GPU workers
    for where, template in templates:
        try:
            kubernetes_validate.validate(as_pod_template(template), K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("rel, kind, name", [(rel, d["kind"], d["metadata"]["name"]) for rel, d in docs()
                                             if d["kind"] not in RAY_KINDS])
def test_plain_kubernetes_objects_pass_the_schema(rel, kind, name):
    (doc,) = [d for r, d in docs() if r == rel and d["kind"] == kind and d["metadata"]["name"] == name]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kubernetes_check_is_strict():
    (cluster,) = [d for _, d in docs() if d["kind"] == "RayCluster"]
    template = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["securityContxt"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContxt"):
        kubernetes_validate.validate(as_pod_template(template), K8S_VERSION, strict=True)


# --- what item 10 of issue 15 asked for, on the parsed manifests


def ray_templates() -> list[dict]:
    (cluster,) = [d for _, d in docs() if d["kind"] == "RayCluster"]
    return [t for _, t in pod_templates(cluster["spec"], "spec")]


def test_ray_pods_cannot_gain_privileges():
    """runAsNonRoot means little if a process can escalate (sudo): no escalation, no capabilities."""
    for template in ray_templates():
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000
        for container in template["spec"]["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_the_shared_volume_is_writable_by_the_pods_user():
    """EFS ignores fsGroup: the access points of the storage class must own files as the pods' uid/gid."""
    by_kind = {d["kind"]: d for _, d in docs()}
    storage_class, claim = by_kind["StorageClass"], by_kind["PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == storage_class["metadata"]["name"]
    params = storage_class["parameters"]
    assert storage_class["provisioner"] == "efs.csi.aws.com" and params["provisioningMode"] == "efs-ap"
    for template in ray_templates():
        pod = template["spec"]["securityContext"]
        assert (params["uid"], params["gid"]) == (str(pod["runAsUser"]), str(pod["runAsGroup"]))


def test_the_ray_head_has_a_network_policy():
    (cluster,) = [d for _, d in docs() if d["kind"] == "RayCluster"]
    policies = [d for _, d in docs() if d["kind"] == "NetworkPolicy"]
    head = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("ray.io/node-type") == "head"]
    assert len(head) == 1
    labels = head[0]["spec"]["podSelector"]["matchLabels"]
    assert labels["ray.io/cluster"] == cluster["metadata"]["name"]
    assert head[0]["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    assert head[0]["spec"]["policyTypes"] == ["Ingress"]
