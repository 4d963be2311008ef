"""cluster/: the launcher YAML against Ray's own cluster config schema, the KubeRay manifest's fields."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SHARED = "/mnt/dldr"


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_the_launcher_yaml_passes_rays_schema_and_checks():
    config = _launcher()
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs: defaults filled, then checked
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(n["node_config"]["InstanceType"].startswith("p4d") for n in nodes.values())
    assert all(f"{SHARED}" in command for command in config["setup_commands"][:1])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    start = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in start if "ray start" in c)


@pytest.mark.parametrize("mistake", ["unknown key", "node type without resources"])
def test_the_schema_check_catches_a_mistake(mistake):
    config = _launcher()
    if mistake == "unknown key":
        config["setup_comands"] = config.pop("setup_commands")
    else:
        del config["available_node_types"]["gpu_8x"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_kuberay_manifest_names_what_kuberay_requires():
    documents = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__  # the version dldr pins
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    workers = spec["workerGroupSpecs"]
    assert isinstance(head["rayStartParams"], dict) and workers
    for group in workers:  # the fields KubeRay's CRD requires of a worker group
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= group.keys()
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert int(_containers(group)[0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    claims = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PersistentVolumeClaim"}
    for group in [head, *workers]:
        container = _containers(group)[0]
        assert container["name"] and ray.__version__ in container["image"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert mounts["shared"] == SHARED
        claim = volumes["shared"]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod sees the run directory
    assert {p["containerPort"] for p in _containers(head)[0]["ports"]} >= {6379, 8265}
