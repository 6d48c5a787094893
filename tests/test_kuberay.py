"""The Kubernetes manifests (infra/kuberay/, infra/mlflow/mlflow.yaml) against schemas, not hand-picked keys.

The Ray resources (RayCluster, RayJob) are validated against KubeRay's own CRD schemas (the
openAPIV3Schema of the CRDs vendored in tests/data/kuberay_crds/, KubeRay v1.5.1), strictly: a field the
CRD does not declare is an error, as with `kubectl apply` (field validation Strict). Plain Kubernetes
objects, and every pod template of the Ray resources, are also validated strictly against the Kubernetes
OpenAPI schemas that the kubernetes-validate package ships.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = ["infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/mlflow/mlflow.yaml"]
K8S_VERSION = "1.33"  # a Kubernetes release EKS and GKE run; the schemas of kubernetes-validate
RAY_KINDS = {"RayCluster", "RayJob"}
CRDS = REPO / "tests/data/kuberay_crds"
KUBERAY_CRD_VERSION = "v1.5.1"  # see tests/data/kuberay_crds/README.md


def _structural_to_jsonschema(node):
    """A CRD's structural schema as plain JSON Schema: objects with declared properties admit no other
    field (unless x-kubernetes-preserve-unknown-fields), `nullable` admits null; the other x-kubernetes-*
    markers (list types, int-or-string, whose anyOf is already spelled out) need no conversion."""
    if isinstance(node, list):
        return [_structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_jsonschema(v) for k, v in node.items()}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    """The ray.io/v1 openAPIV3Schema of KubeRay's CRD for `kind`, as JSON Schema."""
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _structural_to_jsonschema(version["schema"]["openAPIV3Schema"])


def crd_errors(doc: dict) -> list[str]:
    """Every violation of the KubeRay CRD schema by a RayCluster / RayJob document ([] if none)."""
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


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
def test_ray_resources_pass_the_kuberay_crd_schema(kind):
    (doc,) = [d for _, d in docs() if d["kind"] == kind]
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []


def test_the_crd_check_finds_wrong_fields_types_and_values():
    (cluster,) = [d for _, d in docs() if d["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2  # misspelt
    bad["spec"]["workerGroupSpecs"][0]["minReplicas"] = "0"  # a string
    bad["spec"]["authOptions"]["mode"] = "tokens"  # not in the enum
    del bad["spec"]["headGroupSpec"]["template"]  # required
    bad["spec"]["headGroupSpec"]["template_"] = {}
    errors = "\n".join(crd_errors(bad))
    assert "'maxReplica' was unexpected" in errors
    assert "spec.workerGroupSpecs.0.minReplicas: '0' is not of type 'integer'" in errors
    assert "spec.authOptions.mode: 'tokens' is not one of" in errors
    assert "'template' is a required property" in errors
    (job,) = [d for _, d in docs() if d["kind"] == "RayJob"]
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["shutdownAfterJobFinish"] = True  # KubeRay's field ends in -es
    assert any("shutdownAfterJobFinish' was unexpected" in e for e in crd_errors(bad_job))
    # the pod templates inside are checked by the CRD too (strictly, like the rest)
    bad_pod = copy.deepcopy(cluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in crd_errors(bad_pod))


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
