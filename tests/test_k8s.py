"""The KubeRay manifests: valid against KubeRay's CRDs, serving exactly the config `raymoe config` writes."""

import copy
import functools
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from cli.main import parse_settings
from cluster.app import settings_from_args
from cluster.serve_config import serve_config, to_yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
# The project's shared/ folder sits beside the checkout (here and in CI); RAYMOE_KUBERAY_CRDS overrides.
CRDS = next((p for p in (Path(os.environ.get("RAYMOE_KUBERAY_CRDS", "")), REPO.parent / "shared" / "kuberay-crds",
                         Path("/work/shared/kuberay-crds")) if (p / "ray.io_rayservices.yaml").is_file()),
            REPO.parent / "shared" / "kuberay-crds")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def strict(schema):
    """The CRD schema as the API server applies it with strict field validation: unknown fields are
    errors, except where the schema says x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str) -> tuple[Draft7Validator, str]:
    """The schema of the CRD's storage version, and its apiVersion."""
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 18k lines: libyaml when there
    crd = next(d for d in yaml.load_all(path.read_text(), Loader=loader) if d)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = strict(version["schema"]["openAPIV3Schema"])
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema), f"{crd['spec']['group']}/{version['name']}"


def errors(kind: str, doc: dict) -> list[str]:
    v, _ = validator(kind)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


@pytest.mark.parametrize("kind,file", [("RayService", "rayservice.yaml"), ("RayCluster", "raycluster.yaml")])
def test_manifest_matches_crd(kind, file):
    doc = manifest(file)
    _, api_version = validator(kind)
    assert doc["kind"] == kind and doc["apiVersion"] == api_version
    assert errors(kind, doc) == []


@pytest.mark.parametrize("path,value", [
    (("spec", "rayClusterConfig", "workerGroupSpec"), []),  # misspelled field
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "one"),  # wrong type
    (("spec", "serveConfigV2"), {"applications": []}),  # an object where KubeRay wants the YAML text
])
def test_validator_rejects_broken_manifests(path, value):
    """The check above would catch a typo or a wrong type: it is strict, not vacuous."""
    doc = copy.deepcopy(manifest("rayservice.yaml"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert errors("RayService", doc)


def documented_command(text: str) -> list[str]:
    """The `raymoe config ...` command the manifest's header says its serveConfigV2 comes from."""
    lines = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    command = next(line for line in lines if line.startswith("raymoe config"))
    return shlex.split(command)[2:]


def test_serve_config_is_raymoe_configs_output():
    text = (K8S / "rayservice.yaml").read_text()
    embedded = yaml.safe_load(text)["spec"]["serveConfigV2"]
    assert embedded == to_yaml(serve_config(*parse_settings(documented_command(text))))
    app = yaml.safe_load(embedded)["applications"][0]
    assert app["import_path"] == "cluster.app:build_app"
    _, plane, server = settings_from_args(app["args"])  # the builder accepts exactly these args
    assert plane.expert_backend == "ray" and plane.num_gpus > 0 and not server.api_key
    assert yaml.safe_load(embedded)["http_options"]["host"] == "0.0.0.0"  # reachable from the service


def test_cluster_has_gpu_workers_for_experts():
    service, cluster = manifest("rayservice.yaml"), manifest("raycluster.yaml")
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                    for c in g["template"]["spec"]["containers"])]
    assert gpu and gpu[0]["maxReplicas"] >= gpu[0]["minReplicas"]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dockerfile_args(text: str) -> tuple[dict, str]:
    """The Dockerfile's ARG defaults and its FROM image with them substituted (the image a plain
    `docker build .` starts from)."""
    args, image = {}, None
    for line in text.replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "ARG" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            args[name] = value
        elif words[0] == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[1])
    return args, image


def test_dockerfile_matches_what_raymoe_is_tested_with():
    """The image is Ray's own image of the Ray version and Python raymoe runs here, with the same torch."""
    import ray
    import torch
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    args, image = dockerfile_args((REPO / "Dockerfile").read_text())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{ray.__version__}-{py}", image  # the CPU tag by default
    assert args["CUDA_TAG"] == ""  # a CUDA image is `--build-arg CUDA_TAG=-gpu` (k8s/README.md)
    project = pyproject()["project"]
    ray_req = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    assert "serve" in ray_req.extras and ray_req.specifier.contains(args["RAY_VERSION"])
    assert SpecifierSet(project["requires-python"]).contains(f"{sys.version_info.major}.{sys.version_info.minor}")
    makefile_torch = re.search(r"torch==([\w.]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch == torch.__version__.split("+")[0]
    for name in ("rayservice.yaml", "raycluster.yaml"):
        doc = manifest(name)
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        assert spec["rayVersion"] == args["RAY_VERSION"]
        images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
                  for c in g["template"]["spec"]["containers"]}
        assert images == {"raymoe:latest"}  # what k8s/README.md builds and loads


def test_dockerignore_keeps_what_the_image_needs():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    packages = pyproject()["tool"]["setuptools"]["packages"]
    needed = {*packages, "models", "pyproject.toml", "README.md"}
    assert not needed & ignored, needed & ignored
    assert {".git", ".venv"} <= ignored
    assert (REPO / "models" / "tiny-mixtral" / "model.safetensors").is_file()  # the bundled model goes in


def containers(doc: dict) -> dict[str, dict]:
    spec = doc["spec"].get("rayClusterConfig", doc["spec"])
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {f"{group}/{c['name']}": c for group, g in groups.items() for c in g["template"]["spec"]["containers"]}


@pytest.mark.parametrize("file", ["rayservice.yaml", "raycluster.yaml"])
def test_secrets_are_required_in_every_container(file):
    """The API key and the data-plane token come from the secret raymoe-secrets in the head and every worker;
    no reference is optional, so a missing secret stops the pods instead of serving without auth."""
    want = {"RAYMOE_API_KEY": ("raymoe-secrets", "api-key"),
            "RAYMOE_DATA_PLANE_TOKEN": ("raymoe-secrets", "data-plane-token")}
    for name, c in containers(manifest(file)).items():
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
        assert {k: (r["name"], r["key"]) for k, r in refs.items()} == want, name
        assert not any(r.get("optional") for r in refs.values()), name
        assert not [e for e in c.get("env", []) if e["name"] in want and "value" in e], name  # never a literal
    spec = manifest(file)["spec"]
    # Ray's own token (dashboard, GCS) from the same secret, key auth_token: KubeRay wires it into every pod.
    assert spec.get("rayClusterConfig", spec)["authOptions"] == {"mode": "token", "secretName": "raymoe-secrets"}


def test_dashboard_listens_for_the_operator():
    """KubeRay's operator reaches the head's dashboard from its own pod (to PUT serveConfigV2): 0.0.0.0."""
    for file in ("rayservice.yaml", "raycluster.yaml"):
        doc = manifest(file)
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("args,gpu_nodes,phrases", [
    ({"model": "models/no-such-model"}, [], ["model 'models/no-such-model'", "does not exist", "/app/models"]),
    ({"placement": [[[0, 0], [0, 1]]]}, [], ["expert shards of", "no shard holds"]),
    ({"num_gpus": 2.0}, [1.0, 1.0], ["num_gpus=2.0", "no node of this cluster has more than 1 GPU"]),
    ({"num_gpus": 1.5}, [], ["whole GPUs"]),
    ({"no_such_setting": 1}, [], ["no_such_setting"]),
])
def test_bad_configuration_is_a_config_error_at_build_time(monkeypatch, args, gpu_nodes, phrases):
    """What Serve shows as the app's DEPLOY_FAILED message (tests/test_kuberay.py checks it on a live cluster)."""
    import cluster.app as app

    monkeypatch.setattr(app, "node_gpus", lambda: gpu_nodes)
    with pytest.raises(app.ConfigError) as e:
        app.build_app({"model": "models/tiny-mixtral", "expert_backend": "ray", **args})
    assert str(e.value).startswith("raymoe: bad configuration: ")
    for phrase in phrases:
        assert phrase in str(e.value)


def test_gpu_check_waits_for_gpu_nodes_it_cannot_see(monkeypatch):
    """No GPU node up yet (a worker group at zero): the autoscaler may add one, so the config passes the check;
    a node with enough GPUs passes too."""
    import cluster.app as app

    for sizes in ([], [1.0], [1.0, 2.0]):
        monkeypatch.setattr(app, "node_gpus", lambda sizes=sizes: sizes)
        _, plane, _ = settings_from_args({"num_gpus": 1.0})
        model, ckpt = app.check_config(app.EngineConfig(), plane)
        assert ckpt.args.n_experts == 8 and model.endswith("tiny-mixtral")


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902's replace/remove/add on dict paths, as kustomize applies a JSON6902 patch."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = doc
        for p in parents:
            node = node[p]
        if op["op"] == "remove":
            del node[last]
        else:
            assert op["op"] in ("replace", "add") and (op["op"] == "add" or last in node or isinstance(last, int))
            node[last] = op["value"]
    return doc


def test_kind_overlay_is_the_manifest_without_gpus():
    kustomization = yaml.safe_load((K8S / "kind" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../rayservice.yaml"]
    doc = manifest("rayservice.yaml")
    for patch in kustomization["patches"]:
        assert patch["target"]["kind"] == doc["kind"] and patch["target"]["name"] == doc["metadata"]["name"]
        doc = json_patch(doc, yaml.safe_load(patch["patch"]))
    assert errors("RayService", doc) == []
    assert "nvidia.com/gpu" not in yaml.safe_dump(doc)
    assert doc["spec"]["serveConfigV2"] == manifest("rayservice.yaml")["spec"]["serveConfigV2"]
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    replicas = sum(d.get("num_replicas") or d["autoscaling_config"]["initial_replicas"] for d in app["deployments"])
    assert float(group["rayStartParams"]["num-gpus"]) >= replicas * app["args"]["num_gpus"]  # all fit one pod
