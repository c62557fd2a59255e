"""deploy/kubernetes/ (docs/serving.md#deploying-a-fleet-on-kubernetes): every manifest, rendered
per overlay, is valid against the Kubernetes schemas that kubernetes-validate bundles (offline),
and the manifests agree with each other and with eqr's serving code: the model name, the ports and
flags eqr.serving.server gives tritonserver, its drain time, and the metric model.py exports.

The overlays are kustomize strategic-merge patches; `render` applies them the way kustomize does
for the fields they use (maps merge, lists of named items merge by name, other lists replace) and
refuses any kustomization field it does not implement, so the test never checks a different
rendering than `kubectl apply -k` would apply.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install 'eqr[test]')")
yaml = pytest.importorskip("yaml", reason="PyYAML (a kubernetes-validate dependency) is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a kubernetes-validate dependency) is not installed")

from eqr.serving.repository import ServeConfig  # noqa: E402
from eqr.serving.server import EXIT_TIMEOUT_S, Ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
EXTRA = ("model-loader.yaml",)  # Kubernetes objects outside the kustomizations
ADAPTER_VALUES = DEPLOY / "prometheus-adapter-rules.yaml"
# the oldest Kubernetes minor the manifests target, and the newest the installed package knows
VERSIONS = ("1.29", kubernetes_validate.latest_version())
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}  # what `render` implements
FINALIZE_JOIN_S = 10  # model.py's finalize joins its responder for up to this long after Triton's exit timeout
ENGINE_BUILD_S = 20 * 60

# Prometheus Operator CRD: not in the core schemas, so the fields this deployment relies on.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"}}}},
            },
        },
    },
}


# ---------------------------------------------------------------------------------------- rendering
def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to these patches."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        out = list(base)
        for item in patch:
            at = [i for i, old in enumerate(out) if old["name"] == item["name"]]
            if at:
                out[at[0]] = merge(out[at[0]], item)
            else:
                out.append(item)
        return out
    return patch


def _named(items: list) -> bool:  # containers, env, ports, volumes: merged by name
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` applies."""
    (kustomization,) = load(folder / "kustomization.yaml")
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}/kustomization.yaml uses {sorted(unknown)}: teach tests/{Path(__file__).name} them"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else load(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{folder}: only file patches are rendered here: {patch_entry}"
        for patch in load(folder / patch_entry["path"]):
            targets = [i for i, o in enumerate(objects)
                       if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
            assert len(targets) == 1, f"{folder}/{patch_entry['path']}: patches {len(targets)} objects, not one"
            objects[targets[0]] = merge(objects[targets[0]], patch)
    return objects


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one_named(one(objects, "Deployment")["spec"]["template"]["spec"]["containers"], "tritonserver")


def one_named(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, f"{len(found)} items named {name!r}"
    return found[0]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag value` pairs (and `--flag=value`) of a container's args."""
    values, i = {}, 0
    while i < len(args):
        flag = args[i]
        assert flag.startswith("--"), f"{flag!r} is not a flag"
        if "=" in flag:
            key, value = flag.split("=", 1)
            i += 1
        else:
            key, value = flag, args[i + 1]
            i += 2
        assert key not in values, f"{key} given twice"
        values[key] = value
    return values


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render(DEPLOY / "overlays" / overlay)


def source(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------- schemas
def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)  # strict: an unknown (misspelt) field fails


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid(overlay: str) -> None:
    objects = rendered(overlay)
    assert {o["kind"] for o in objects} == {"PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
                                             "HorizontalPodAutoscaler", "ServiceMonitor"}
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize("name", EXTRA)
def test_the_loader_pod_is_valid_and_mounts_the_claim(name: str) -> None:
    (pod,) = load(DEPLOY / name)
    validate(pod)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims == {one(render(DEPLOY / "base"), "PersistentVolumeClaim")["metadata"]["name"]}


def test_the_validator_catches_a_misspelt_field() -> None:
    deployment = one(rendered("gpu"), "Deployment")
    broken = merge(deployment, {"spec": {"template": {"spec": {"terminationGracePeriod": 45}}}})
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    misspelt = {"spec": {"endpoints": [{"port": "metrics", "intervl": "1s"}]}}
    monitor = merge(one(rendered("gpu"), "ServiceMonitor"), misspelt)
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_validation_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("kubernetes-validate tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for obj in rendered("gpu"):
        validate(obj)


def test_each_kustomization_lists_every_file_beside_it() -> None:
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        (spec,) = load(kustomization)
        listed = {entry for entry in spec.get("resources", [])} | {p["path"] for p in spec.get("patches", [])}
        present = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert present <= listed, f"{kustomization}: not listed: {sorted(present - listed)}"
    assert {p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")} == set(OVERLAYS)


# ---------------------------------------------------------------------------------------- overlays
def test_the_gpu_overlay_requests_one_gpu_and_the_cpu_overlay_none() -> None:
    gpu = server(rendered("gpu"))["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in yaml.safe_dump(rendered("cpu")), "the cpu overlay mentions GPUs"


@pytest.mark.parametrize("overlay, extra", [("gpu", "gpu"), ("cpu", "cpu")])
def test_each_overlay_installs_eqr_with_its_engine_and_no_torch(overlay: str, extra: str) -> None:
    pod = one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]
    init = one_named(pod["initContainers"], "install-eqr")
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["EQR_PACKAGE"] == f"eqr[{extra}]"
    assert "$(EQR_PACKAGE)" in init["command"]
    # the Python backend needs numpy 1.x (docs/serving.md#the-repository)
    assert any(re.fullmatch(r"numpy[^,]*,\s*<2", arg) or arg.endswith("<2") for arg in init["command"]
               if arg.startswith("numpy")), init["command"]
    pyproject = source("pyproject.toml")
    for heavy in ("export", "train", "all", "dev"):  # the extras that bring torch
        assert heavy not in env["EQR_PACKAGE"]
    assert f"\n{extra} = [" in pyproject, f"eqr has no {extra} extra"


# ---------------------------------------------------------------------------------------- cross-references
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod = deployment["spec"]["template"]["spec"]

    def selects(selector: dict[str, str], what: str) -> None:
        assert selector and selector.items() <= labels.items(), f"{what} {selector} does not select the pods {labels}"

    selects(deployment["spec"]["selector"]["matchLabels"], "the Deployment's selector")
    selects(one(objects, "Service")["spec"]["selector"], "the Service's selector")
    selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], "the PodDisruptionBudget")
    for spread in pod["topologySpreadConstraints"]:
        selects(spread["labelSelector"]["matchLabels"], f"the {spread['topologyKey']} spread")
    for term in pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]:
        selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], "the anti-affinity")
    assert any(s["topologyKey"] == "kubernetes.io/hostname" and s["whenUnsatisfiable"] == "DoNotSchedule"
               for s in pod["topologySpreadConstraints"]), "nothing keeps replicas on different nodes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_ports_are_the_server_ports(overlay: str) -> None:
    objects = rendered(overlay)
    container = server(objects)
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {"http": Ports().http, "grpc": Ports().grpc, "metrics": Ports().metrics}
    service = {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}
    assert set(service) == set(declared)
    for name, port in service.items():
        assert port["targetPort"] in (name, declared[name]), f"Service port {name} targets {port['targetPort']}"
        assert port["port"] == declared[name]
    args = flag_values(container["args"])
    assert (args["--http-port"], args["--grpc-port"], args["--metrics-port"]) == \
        (str(declared["http"]), str(declared["grpc"]), str(declared["metrics"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_runs_with_eqrs_flags(overlay: str) -> None:
    container = server(rendered(overlay))
    args = flag_values(container["args"])
    # every flag eqr.serving.server passes (but the serve extra's backend directory, which
    # NVIDIA's image has built in) is given here too
    passed = set(re.findall(r'"(--[a-z][a-z-]+)"', source("eqr/serving/server.py"))) - {"--backend-directory"}
    assert "--model-control-mode" in passed
    assert passed <= set(args), f"missing: {sorted(passed - set(args))}"
    assert args["--model-control-mode"] == "explicit" and args["--load-model"] == "*"
    assert args["--exit-timeout-secs"] == str(EXIT_TIMEOUT_S)
    assert args["--http-address"] == args["--grpc-address"] == "0.0.0.0"
    models = one_named(container["volumeMounts"], "models")
    assert args["--model-repository"] == models["mountPath"] and models["readOnly"] is True
    assert container["command"] == ["tritonserver"], "tritonserver must be PID 1 to get SIGTERM itself"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_for_eqrs_model_on_a_declared_port(overlay: str) -> None:
    container = server(rendered(overlay))
    names = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    ready = f"/v2/models/{ServeConfig().name}/ready"  # the name `eqr triton` writes by default
    paths = {"startupProbe": ready, "readinessProbe": ready, "livenessProbe": "/v2/health/live"}
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}"
        assert get["port"] in names, f"{probe} points at undeclared port {get['port']}"
        assert get["port"] in ("http", Ports().http)
    startup = container["startupProbe"]
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert budget >= ENGINE_BUILD_S, f"the startup probe gives {budget} s, an engine build may take {ENGINE_BUILD_S} s"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_covers_the_drain(overlay: str) -> None:
    deployment = one(rendered(overlay), "Deployment")
    container = server([deployment])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0].endswith("sleep"), command
    pre_stop = int(command[1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop > 0
    assert grace > pre_stop + EXIT_TIMEOUT_S, f"grace {grace} s <= preStop {pre_stop} s + Triton's {EXIT_TIMEOUT_S} s"
    assert grace >= pre_stop + EXIT_TIMEOUT_S + FINALIZE_JOIN_S, "model.py's finalize may be cut short"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_images_and_security(overlay: str) -> None:
    objects = rendered(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    containers = pod["containers"] + pod["initContainers"]
    for container in containers:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, f"{container['name']} mounts undeclared {mount['name']}"
        assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", container["image"]), container["image"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert len({c["image"] for c in containers}) == 1, "the eqr install must be built for the server's Python"
    assert pod["securityContext"]["runAsNonRoot"] is True
    claim = one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    init = one_named(pod["initContainers"], "install-eqr")
    target = init["command"][init["command"].index("--target") + 1]
    server_env = {e["name"]: e["value"] for e in server(objects)["env"]}
    assert server_env["PYTHONPATH"] == target
    assert one_named(server(objects)["volumeMounts"], "eqr-python")["mountPath"] == target
    assert one_named(init["volumeMounts"], "eqr-python")["mountPath"] == target
    if server(objects)["securityContext"]["readOnlyRootFilesystem"]:
        mounted = {m["mountPath"] for m in server(objects)["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounted, "Triton's Python backend and engine caches need these writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_the_metrics_port(overlay: str) -> None:
    objects = rendered(overlay)
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor selects no Service"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"], "it scrapes no metrics port"
    assert ports["metrics"] == int(flag_values(server(objects)["args"])["--metrics-port"])


# ---------------------------------------------------------------------------------------- autoscaling
def adapter_rules() -> list[dict[str, Any]]:
    (values,) = load(ADAPTER_VALUES)
    return values["rules"]["custom"]


def exported_metrics() -> set[str]:
    """The metric names model.py registers on Triton's /metrics (quoted eqr_* strings)."""
    return set(re.findall(r'"(eqr_[a-z_]+)"', source("eqr/serving/triton_model.py")))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_reads_the_metric_the_adapter_serves(overlay: str) -> None:
    objects = rendered(overlay)
    hpa = one(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "a re-apply would reset the autoscaler's count"
    pdb = one(objects, "PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    served = {}
    for rule in adapter_rules():
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        assert re.search(rule["name"]["matches"], series.group(1)), "the rule's name pattern misses its series"
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
        served[rule["name"]["as"]] = series.group(1)
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"the HPA reads {name}; the adapter serves {sorted(served)}"
        assert served[name] in exported_metrics(), \
            f"the adapter reads {served[name]}, which eqr/serving/triton_model.py does not export"


def test_the_metric_scan_sees_models_metrics() -> None:
    assert {"eqr_queue_depth", "eqr_ready", "eqr_puzzles_answered"} <= exported_metrics()


def test_the_adapter_values_are_helm_values_not_an_object() -> None:
    (values,) = load(ADAPTER_VALUES)
    assert set(values) == {"rules"} and "kind" not in values
    assert "helm" in ADAPTER_VALUES.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------- docs
def test_docs_describe_the_deployment() -> None:
    doc = source("docs/serving.md")
    assert "\n## Deploying a fleet on Kubernetes\n" in doc
    section = doc.split("\n## Deploying a fleet on Kubernetes\n", 1)[1]
    for needle in ("kubectl apply -k deploy/kubernetes/overlays/gpu", "kubectl get hpa", "port-forward",
                   "prometheus-adapter-rules.yaml", "/generate"):
        assert needle in section, f"docs/serving.md's Kubernetes section does not mention {needle}"
    assert "docs/serving.md" in (DEPLOY / "README.md").read_text(encoding="utf-8")
