"""Checks on deploy/: Kubernetes manifests, the Grafana dashboard and the Prometheus alert rules.

Each overlay is rendered with `kubectl kustomize` (offline, no cluster) and validated against the
Kubernetes OpenAPI schemas shipped in `kubernetes-validate` (strict: unknown fields are errors). The
rendered objects are then checked for the behaviour operators rely on: probes, graceful shutdown, GPU
requests, Secret-mounted API keys, Redis isolation. Every PromQL expression in the dashboard, the
alerts and the autoscalers must name only metrics from the contract table in docs/architecture.md.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("gpu", "cpu", "external-redis", "inference-pool")
# The oldest Kubernetes minor we support; the schemas ship inside kubernetes-validate.
KUBERNETES_VERSION = "1.32.0"
# CRDs have no schema in kubernetes-validate (it only warns on them). Only these API groups may be
# schema-less; any other missing schema is a typo'd apiVersion/kind and fails the test.
CRD_GROUPS = {
    "monitoring.coreos.com",
    "keda.sh",
    "inference.networking.k8s.io",
    "inference.networking.x-k8s.io",
    "gateway.networking.k8s.io",
    "networking.istio.io",
    "networking.gke.io",
}

# Kinds without a namespace (the picker's RBAC for its metrics endpoint is cluster-wide).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

# ---------------------------------------------------------------------------------------------------
# Rendering and validation helpers


def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize <directory>` produces."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found on PATH: cannot render the kustomize overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    return kustomize(DEPLOY / "k8s" / "overlays" / overlay)


def schema_problems(objects: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> list[str]:
    """What `kubernetes-validate --strict` rejects, plus kinds it has no schema for outside CRD_GROUPS.

    The CLI exits 0 when it finds no schema (it only warns), which would let `apiVersion: apps/v2`
    through; the library API tells the two cases apart.
    """
    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{name}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            if group not in CRD_GROUPS:
                problems.append(f"{name}: no schema for apiVersion {obj['apiVersion']}")
    return problems


def find(objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def server_container(objects) -> dict[str, Any]:
    pod = one(objects, "Deployment", "prefixserve")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "server")


def server_config(objects) -> dict[str, str]:
    """The server's settings: the ConfigMap(s) it loads via envFrom (kustomize adds a hash suffix)."""
    config: dict[str, str] = {}
    for source in server_container(objects).get("envFrom", []):
        if "configMapRef" in source:
            config.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return config


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes >= 1.30)
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    match = re.search(r"\bsleep\s+(\d+)", " ".join(command))
    assert match, f"preStop is not a sleep: {command}"
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------------
# Manifests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_strict_schema_validation(overlay):
    objects = render(overlay)
    assert objects, f"{overlay} rendered nothing"
    assert schema_problems(objects) == []


def test_schema_validation_rejects_broken_manifests():
    # Guards the guard: an unknown field, a wrong type and an apiVersion with no schema all fail.
    deployment = json.loads(json.dumps(one(render("gpu"), "Deployment", "prefixserve")))
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    bad_api = json.loads(json.dumps(deployment))
    bad_api["apiVersion"] = "apps/v2"
    assert schema_problems([deployment]) == []
    for broken in (typo, wrong_type, bad_api):
        assert len(schema_problems([broken])) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_labelled_and_namespaced(overlay):
    for obj in render(overlay):
        labels = obj["metadata"].get("labels", {})
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "prefixserve", name
        assert labels.get("app.kubernetes.io/component"), name
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == "prefixserve", name
        else:
            assert "namespace" not in obj["metadata"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_follow_model_loading_and_readiness(overlay):
    container = server_container(render(overlay))
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # Liveness never depends on Redis or the model: /health only.
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # Weight loading (and a first download) must not be cut short by a restart loop.
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(server_config(render(overlay))["PREFIXSERVE_PORT"]) == 8000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_shutdown_outlasts_presleep_and_drain(overlay):
    objects = render(overlay)
    pod = one(objects, "Deployment", "prefixserve")["spec"]["template"]["spec"]
    sleep_s = prestop_sleep_seconds(server_container(objects))
    drain_s = float(server_config(objects)["PREFIXSERVE_SHUTDOWN_GRACE_S"])
    assert sleep_s >= 5, "endpoint removal needs a few seconds before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + 60
    # Otherwise the kubelet SIGKILLs generations the server is still allowed to finish.
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s


def test_gpu_overlay_requests_one_gpu_in_bfloat16():
    objects = render("gpu")
    resources = server_container(objects)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    config = server_config(objects)
    assert config["PREFIXSERVE_DTYPE"] == "bfloat16"
    assert config["PREFIXSERVE_DEVICE"] == "cuda"
    assert server_container(objects)["image"].endswith("-cuda")


def test_cpu_overlay_requests_no_gpu_and_runs_one_replica():
    objects = render("cpu")
    deployment = one(objects, "Deployment", "prefixserve")
    assert "nvidia.com/gpu" not in yaml.safe_dump(deployment)
    assert deployment["spec"]["replicas"] == 1
    assert server_config(objects)["PREFIXSERVE_DTYPE"] == "float32"
    assert server_config(objects)["PREFIXSERVE_DEVICE"] == "cpu"
    # The CUDA image would pull gigabytes of CUDA libraries onto CPU nodes.
    assert server_container(objects)["image"].endswith("-cpu")
    # An autoscaler would override replicas: 1.
    assert find(objects, "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_file_is_mounted_from_a_secret(overlay):
    objects = render(overlay)
    keys_file = Path(server_config(objects)["PREFIXSERVE_API_KEYS_FILE"])
    pod = one(objects, "Deployment", "prefixserve")["spec"]["template"]["spec"]
    container = server_container(objects)
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == keys_file.parent)
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = one(objects, "Secret", volume["secret"]["secretName"])
    assert keys_file.name in secret.get("stringData", {}) | secret.get("data", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_secrets_and_configmaps_exist(overlay):
    # A dangling reference leaves the pod in CreateContainerConfigError.
    objects = render(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    text = json.dumps([o for o in objects if o["kind"] in ("Deployment", "StatefulSet")])
    for kind, key in (("Secret", "secretKeyRef"), ("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
        for ref in re.findall(rf'"{key}": \{{[^{{}}]*?"name": "([^"]+)"', text):
            assert (kind, ref) in names, f"{overlay}: {key} to missing {kind} {ref}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_autoscaler_target_the_server(overlay):
    objects = render(overlay)
    pod_labels = one(objects, "Deployment", "prefixserve")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service", "prefixserve")
    assert selects(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert selects(
        one(objects, "PodDisruptionBudget", "prefixserve")["spec"]["selector"]["matchLabels"], pod_labels
    )
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] == "prefixserve"


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_only_server_and_training_worker_pods_reach_redis(overlay):
    objects = render(overlay)
    redis = one(objects, "StatefulSet", "prefixserve-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    server_labels = one(objects, "Deployment", "prefixserve")["spec"]["template"]["metadata"]["labels"]
    worker = one(objects, "Deployment", "prefixserve-train-worker")["spec"]["template"]["metadata"]["labels"]
    assert "appendonly" in " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert redis["spec"]["volumeClaimTemplates"], "Redis holds the prefixes: it needs a persistent volume"

    policies = [
        p
        for p in find(objects, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], redis_labels)
    ]
    assert policies
    # Redis (6379) and, with the Sentinel component, Sentinel (26379): reached by server pods, by the
    # training workers (their jobs are in Redis), and by the Redis pods themselves (replication,
    # sentinel gossip), nothing else.
    sentinel = any(c["name"] == "sentinel" for c in redis["spec"]["template"]["spec"]["containers"])
    allowed_ports = {6379, 26379} if sentinel else {6379}
    server_ports: set[int] = set()
    worker_ports: set[int] = set()
    for policy in policies:
        spec = policy["spec"]
        assert "Ingress" in spec["policyTypes"]
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            assert ports <= allowed_ports
            for peer in rule["from"]:
                # No namespaceSelector / ipBlock: nothing outside this namespace's server and Redis pods.
                assert set(peer) == {"podSelector"}
                selector = peer["podSelector"]["matchLabels"]
                if selects(selector, server_labels):
                    assert not selects(selector, redis_labels)
                    server_ports |= ports
                elif selects(selector, worker):
                    assert not selects(selector, redis_labels) and not selects(selector, server_labels)
                    worker_ports |= ports
                else:
                    assert sentinel and selects(selector, redis_labels), selector
    assert server_ports == worker_ports == allowed_ports

    server_policy = next(
        p
        for p in find(objects, "NetworkPolicy")
        if selects(p["spec"]["podSelector"]["matchLabels"], server_labels)
    )
    assert [p["port"] for r in server_policy["spec"]["ingress"] for p in r["ports"]] == [8000]


def test_external_redis_overlay_uses_the_url_secret_and_no_in_cluster_redis():
    objects = render("external-redis")
    assert find(objects, "StatefulSet") == []
    env = {e["name"]: e for e in server_container(objects)["env"]}
    url = env["PREFIXSERVE_REDIS_URL"]
    assert "value" not in url
    assert one(objects, "Secret", url["valueFrom"]["secretKeyRef"]["name"])


def test_inference_pool_overlay_wires_the_endpoint_picker_to_the_servers():
    objects = render("inference-pool")
    pool = one(objects, "InferencePool", "prefixserve")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    server_pods = one(objects, "Deployment", "prefixserve")["spec"]["template"]
    # The pool is exactly the server pods, on their HTTP port.
    assert selects(pool["spec"]["selector"]["matchLabels"], server_pods["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]

    # The picker: its Service, its pods, its flags naming this pool and series the server exports.
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = one(objects, "Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = one(objects, "Deployment", "prefixserve-epp")["spec"]["template"]
    assert selects(epp_service["spec"]["selector"], epp["metadata"]["labels"])
    assert not selects(pool["spec"]["selector"]["matchLabels"], epp["metadata"]["labels"])
    flags = picker_flags(one(objects, "Deployment", "prefixserve-epp"))
    assert flags["pool-name"] == pool["metadata"]["name"]
    assert flags["pool-namespace"] == pool["metadata"]["namespace"]
    exported = exported_metric_names()
    for flag in ("total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"):
        assert flags[flag] in exported, flag
    # Its service account may read the pool and watch pods, in this namespace only.
    account = epp["spec"]["serviceAccountName"]
    binding = one(objects, "RoleBinding", "prefixserve-epp")
    assert {"kind": "ServiceAccount", "name": account, "namespace": "prefixserve"} in binding["subjects"]
    rules = one(objects, "Role", binding["roleRef"]["name"])["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("inference.networking.k8s.io", "inferencepools"), ("", "pods")} <= granted
    # Cluster-wide, only what its metrics endpoint's authentication needs (test_picker.py).
    for role in find(objects, "ClusterRole"):
        for rule in role["rules"]:
            assert rule["verbs"] == ["create"] or rule.get("nonResourceURLs") == ["/metrics"], rule

    # Task names are listed for the picker (they are off by default).
    assert server_config(objects)["PREFIXSERVE_METRICS_ADAPTER_NAMES"] == "task"


def picker_flags(deployment: dict[str, Any]) -> dict[str, str]:
    """The EPP container's `--flag=value` arguments, with `$(VAR)` expanded as the kubelet expands it
    from the container's env (a value, or the pod's namespace through the downward API)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for var in container.get("env", []):
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[var["name"]] = (
            deployment["metadata"]["namespace"] if field == "metadata.namespace" else var.get("value")
        )
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    return {
        k: re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), m.group(0))), v) for k, v in flags.items()
    }


def picker_config_text(objects) -> str:
    """The EndpointPickerConfig the EPP reads: its --config-file, followed through the volume mount to
    the ConfigMap key (as the kubelet would project it)."""
    container = one(objects, "Deployment", "prefixserve-epp")["spec"]["template"]["spec"]
    epp = container["containers"][0]
    flags = dict(a.removeprefix("--").split("=", 1) for a in epp["args"] if "=" in a)
    assert "config-text" in flags or "config-file" in flags, "the EPP refuses to start without a config"
    if "config-text" in flags:
        return flags["config-text"]
    path = Path(flags["config-file"])
    mount = next(m for m in epp["volumeMounts"] if path.parent == Path(m["mountPath"]))
    volume = next(v for v in container["volumes"] if v["name"] == mount["name"])
    return one(objects, "ConfigMap", volume["configMap"]["name"])["data"][path.name]


def test_picker_config_passes_the_pickers_loader_and_routes_by_task():
    from tests.deploy.epp_config_rules import load_config

    config = load_config(picker_config_text(render("inference-pool")))
    assert config.profile_handler == "single-profile-handler"
    [profile] = config.profiles.values()
    by_type = {config.plugin_types[name]: weight for name, weight in profile.scorers.items()}
    # Adapter affinity (the task's prefix resident on the pod) next to the load scorers, and it
    # outweighs each of them: a pod holding the task beats one whose device tier is full.
    assert set(by_type) == {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"}
    assert by_type["lora-affinity-scorer"] > max(
        by_type["queue-scorer"], by_type["kv-cache-utilization-scorer"]
    )
    assert min(by_type.values()) > 0
    assert config.plugin_types[profile.picker or ""] == "max-score-picker"


GOOD_PICKER_CONFIG = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [{"type": "lora-affinity-scorer"}, {"type": "max-score-picker"}],
    "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "lora-affinity-scorer"}]}],
}


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda c: c.update(kind="PickerConfig"), "no kind"),
        (lambda c: c.pop("kind"), "Kind' is missing"),
        (lambda c: c.update(scorers=[]), "unknown field"),
        (lambda c: c["plugins"].append({"type": "lora-affinity"}), "not found in registry"),
        (lambda c: c["plugins"].append({"type": "lora-affinity-scorer"}), "used more than once"),
        (lambda c: c["plugins"].append({"name": "x"}), "missing a type"),
        (lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "queue"}), "undefined Plugin"),
        (lambda c: c["schedulingProfiles"][0]["plugins"][0].update(weigth=2), "unknown field"),
        (lambda c: c["schedulingProfiles"].append({"name": "default", "plugins": []}), "more than one"),
        (lambda c: c["schedulingProfiles"].append({"name": "other", "plugins": []}), "no profile handler"),
        (
            lambda c: (
                c["plugins"].append({"type": "random-picker"}),
                c["schedulingProfiles"][0]["plugins"][:0].clear(),
                c["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "random-picker"}),
                c["schedulingProfiles"][0]["plugins"].insert(0, {"pluginRef": "max-score-picker"}),
            ),
            "already have a registered picker",
        ),
        (lambda c: c["plugins"][1].update(parameters={"maxNumOfEndpoints": "2"}), "must be an int"),
    ],
)
def test_picker_rules_refuse_what_the_picker_refuses(change, error):
    """The ported loader rules fail where the Go loader does (so the check above can fail)."""
    import copy

    from tests.deploy.epp_config_rules import PickerConfigError, dumps, load_config

    load_config(dumps(GOOD_PICKER_CONFIG))  # the baseline loads
    config = copy.deepcopy(GOOD_PICKER_CONFIG)
    change(config)
    with pytest.raises(PickerConfigError, match=error):
        load_config(dumps(config))


def route_backend(route: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The backendRef the Gateway sends `path` to, by Gateway API HTTPRoute precedence: an Exact match
    beats any PathPrefix, a longer prefix beats a shorter; PathPrefix matches whole path elements."""

    def matches(match: dict[str, Any]) -> int | None:  # precedence rank, None: no match
        rule = match.get("path", {"type": "PathPrefix", "value": "/"})
        value = rule["value"]
        if rule["type"] == "Exact":
            return 10**6 if path == value else None
        assert rule["type"] == "PathPrefix", rule
        prefix = value.rstrip("/")
        if path == prefix or path.startswith(prefix + "/") or value == "/":
            return len(prefix)
        return None

    best: tuple[int, dict[str, Any]] | None = None
    for rule in route["spec"]["rules"]:
        for match in rule.get("matches", [{}]):
            rank = matches(match)
            if rank is not None and (best is None or rank > best[0]):
                [backend] = rule["backendRefs"]
                best = (rank, backend)
    return None if best is None else best[1]


def test_route_sends_only_openai_generation_through_the_picker():
    objects = render("inference-pool")
    route = one(objects, "HTTPRoute", "prefixserve")
    service = one(objects, "Service", "prefixserve")
    pool = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "prefixserve"}
    # Every path the server answers (from its route table) goes somewhere.
    from server.api.routes import canary, chat, generate, health, openai, prefixes, tokenize

    modules = (generate, openai, chat, tokenize, prefixes, canary, health)  # as server.api.app mounts them
    paths = {route.path for module in modules for route in module.router.routes}
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/v1/prefixes/{task}"} <= set(paths)
    for template in paths:
        path = template.replace("{task}", "summarize")
        backend = route_backend(route, path)
        if template in ("/v1/completions", "/v1/chat/completions"):
            assert backend == pool, template
        elif template == "/metrics":  # in-cluster only (test_exposure.py)
            assert backend is None, template
        else:  # bodies without `model`: the picker would answer 400
            assert backend is not None and backend.get("kind", "Service") == "Service", template
            assert backend["name"] == service["metadata"]["name"], template
            assert backend["port"] in [p["port"] for p in service["spec"]["ports"]], template
    # Precedence is what sends them apart: a near miss of an Exact path goes to the Service.
    assert route_backend(route, "/v1/completions/") != pool
    assert route_backend(route, "/v1/completionsx") != pool


def render_own_overlay(
    tmp_path: Path, files: dict[str, str] | None = None, base: str = "gpu", **kustomization
) -> tuple:
    """Render an overlay of one of ours (the gpu overlay by default), as deploy/README.md tells users to
    write one."""
    for name, content in (files or {}).items():
        (tmp_path / name).write_text(content)
    # kustomize refuses absolute paths to other kustomizations.
    spec = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "prefixserve",
        "resources": [os.path.relpath(DEPLOY / "k8s" / "overlays" / base, tmp_path)],
    }
    for key, value in kustomization.items():
        spec[key] = [os.path.relpath(DEPLOY / v, tmp_path) for v in value] if key == "components" else value
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return kustomize(tmp_path)


def test_keda_component_replaces_the_hpa(tmp_path):
    objects = render_own_overlay(tmp_path, components=["k8s/components/keda"])
    assert schema_problems(objects) == []
    # Two autoscalers on one Deployment fight; KEDA brings its own HPA.
    assert find(objects, "HorizontalPodAutoscaler") == []
    scaled = one(objects, "ScaledObject", "prefixserve")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "prefixserve",
    }
    assert scaled["metadata"]["namespace"] == "prefixserve"


def test_placeholder_api_keys_are_refused_by_the_server(tmp_path):
    # An empty key map would mean single-tenant without authentication, a working example key would be
    # public: the placeholder must make the server refuse to start (fail closed).
    from server.settings import Settings

    placeholder = one(render("gpu"), "Secret", "prefixserve-api-keys")["stringData"]["api-keys.json"]
    assert json.loads(placeholder) != {}
    (tmp_path / "api-keys.json").write_text(placeholder)
    with pytest.raises(ValueError, match="API_KEYS_FILE"):
        Settings(api_keys=None, api_keys_file=tmp_path / "api-keys.json").resolve_api_keys()


def test_secrets_are_replaced_from_local_files(tmp_path):
    keys = {"k-1234567890": {"tenant": "acme", "role": "manage"}}
    objects = render_own_overlay(
        tmp_path,
        files={"api-keys.json": json.dumps(keys), "redis-password": "s3cret"},
        secretGenerator=[
            {"name": "prefixserve-api-keys", "behavior": "replace", "files": ["api-keys.json"]},
            {"name": "prefixserve-redis", "behavior": "replace", "files": ["password=redis-password"]},
        ],
    )
    assert schema_problems(objects) == []
    secret = one(objects, "Secret", "prefixserve-api-keys")
    assert json.loads(base64.b64decode(secret["data"]["api-keys.json"])) == keys
    assert base64.b64decode(one(objects, "Secret", "prefixserve-redis")["data"]["password"]) == b"s3cret"
    # Still what the pods mount and read.
    volumes = one(objects, "Deployment", "prefixserve")["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "prefixserve-api-keys", "defaultMode": 0o440} in [v.get("secret") for v in volumes]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_configured_setting_is_one_the_server_reads(overlay):
    # Settings ignore unknown PREFIXSERVE_* variables, so a misspelt key would silently do nothing.
    from server.settings import Settings

    known = {f"PREFIXSERVE_{name.upper()}" for name in Settings.model_fields}
    objects = render(overlay)
    configured = set(server_config(objects)) | {e["name"] for e in server_container(objects)["env"]}
    assert sorted(k for k in configured if k.startswith("PREFIXSERVE_") and k not in known) == []
    # And they parse: the values the pods get are valid settings.
    env = {k: v for k, v in server_config(objects).items() if k.startswith("PREFIXSERVE_")}
    settings = Settings(**{k.removeprefix("PREFIXSERVE_").lower(): v for k, v in env.items()})
    assert settings.host == "0.0.0.0" and settings.port == 8000


# ---------------------------------------------------------------------------------------------------
# Metrics contract: dashboard, alerts and autoscalers name only metrics from docs/architecture.md

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


# Ours, the process collector's, and the vLLM names routers read (docs/architecture.md lists each).
CONTRACT_PREFIXES = ("`prefixserve_", "`process_", "`vllm:")


@functools.cache
def contract_metrics() -> dict[str, str]:
    """name -> type from the table under '## Metrics' in docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].startswith(CONTRACT_PREFIXES):
            metrics[cells[0].strip("`")] = cells[1]
    assert len(metrics) >= 20, "could not parse the Metrics table in docs/architecture.md"
    return metrics


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana `label_values(...)` variable query).

    Removes what cannot be a metric name (strings, label matchers, ranges, grouping clauses, numbers,
    Grafana variables); the identifiers left that are not functions or keywords are metrics.
    """
    match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.S)
    if match:
        expr = match.group(1)
    elif re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", expr):
        return set()
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', " ", expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[smhdwy]?\b", " ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        is_call = re.match(r"\s*\(", expr[m.end() :])
        if not is_call and m.group().lower() not in _PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def base_metric_name(name: str, metrics: dict[str, str]) -> str:
    """Strip the _bucket/_sum/_count series suffix of a histogram named in the contract."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and metrics.get(name.removesuffix(suffix)) == "histogram":
            return name.removesuffix(suffix)
    return name


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "prefixserve-dashboard.json").read_text())


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> dict[str, str]:
    """'where' -> PromQL for every panel target and templating query in the dashboard."""
    exprs = {}

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs[f"variable {var['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def all_expressions() -> dict[str, str]:
    exprs = dashboard_expressions()
    exprs.update({f"alert {r['alert']}": r["expr"] for r in alert_rules()})
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-values.yaml").read_text())
    for i, rule in enumerate(adapter["rules"]["custom"]):
        exprs[f"prometheus-adapter rule {i}"] = rule["seriesQuery"]
    keda = DEPLOY / "k8s" / "components" / "keda" / "scaledobject.yaml"
    for trigger in yaml.safe_load(keda.read_text())["spec"]["triggers"]:
        exprs[f"KEDA trigger {trigger['type']}"] = trigger["metadata"]["query"]
    return exprs


def exported_metric_names() -> set[str]:
    """Names of the prefixserve_ metrics server.metrics registers, spelled as in the contract table.

    server.metrics keeps its metrics on the CollectorRegistry of a `Metrics` object (not the global
    one); module-level registries, then the global one, are fallbacks. prometheus_client reports
    counters without `_total` (and Info without `_info`); they are added back here.
    """
    from prometheus_client import REGISTRY, CollectorRegistry

    module = importlib.import_module("server.metrics")
    if hasattr(module, "Metrics"):
        registries = [module.Metrics().registry]
    else:
        registries = [v for v in vars(module).values() if isinstance(v, CollectorRegistry)] or [REGISTRY]
    names = set()
    for registry in registries:
        for family in registry.collect():
            if family.name.startswith(tuple(p.strip("`") for p in CONTRACT_PREFIXES)):
                suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
                names.add(family.name if family.name.endswith(suffix) else family.name + suffix)
    return names


def test_promql_metric_names_extracts_only_metrics():
    expr = (
        'histogram_quantile(0.99, sum by(le, pod)(rate(prefixserve_x_seconds_bucket{namespace="$ns", '
        'status=~"5.*"}[$__rate_interval]))) / on(pod) group_left up offset 5m > 1e-3 and bool x_total'
    )
    assert promql_metric_names(expr) == {"prefixserve_x_seconds_bucket", "up", "x_total"}
    assert promql_metric_names('label_values(prefixserve_engine_up{namespace="$namespace"}, pod)') == {
        "prefixserve_engine_up"
    }
    assert base_metric_name("prefixserve_batch_size_bucket", contract_metrics()) == "prefixserve_batch_size"
    assert base_metric_name("prefixserve_requests_total", contract_metrics()) == "prefixserve_requests_total"


def test_dashboard_alerts_and_autoscalers_use_only_contract_metrics():
    metrics = contract_metrics()
    used: dict[str, set[str]] = {}
    for where, expr in all_expressions().items():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            used.setdefault(base_metric_name(name, metrics), set()).add(where)
    hpa = yaml.safe_load((DEPLOY / "k8s" / "base" / "hpa.yaml").read_text())
    for metric in hpa["spec"]["metrics"]:
        used.setdefault(metric["pods"]["metric"]["name"], set()).add("HPA")

    unknown = {name: sorted(where) for name, where in used.items() if name not in metrics}
    assert unknown == {}, "names not in the docs/architecture.md Metrics table"
    # _bucket/_sum/_count exist only for histograms.
    for name in {n for e in all_expressions().values() for n in promql_metric_names(e)}:
        if name.endswith(HISTOGRAM_SUFFIXES) and name not in metrics:
            assert metrics[base_metric_name(name, metrics)] == "histogram", name

    missing = sorted(set(used) - exported_metric_names())
    assert missing == [], "used by deploy/ but not registered by server.metrics"


def test_dashboard_is_portable_across_prometheus_datasources():
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            # A fixed window breaks at scrape intervals other than the author's.
            without_strings = re.sub(r'"(?:\\.|[^"\\])*"', '""', target["expr"])
            for window in re.findall(r"\[([^\]]+)\]", without_strings):
                assert window == "$__rate_interval", f"{panel['title']}: [{window}]"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("time to first token", "inter-token", "end-to-end", "queue time", "tokens per second",
                  "batch size", "finish reasons", "kv-cache", "hit ratio", "per tenant", "uploads"):  # fmt: skip
        assert topic in titles, f"no panel about {topic}"


def test_alert_rules_are_complete():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    exprs = " ".join(r["expr"] for r in rules)
    for metric in ("prefixserve_requests_total", "prefixserve_requests_waiting", "prefixserve_store_up",
                   "prefixserve_store_errors_total", "prefixserve_engine_up",
                   "prefixserve_time_to_first_token_seconds_bucket", "prefixserve_kv_cache_usage_ratio",
                   "process_start_time_seconds", 'status="429"'):  # fmt: skip
        assert metric in exprs, f"no alert on {metric}"


def test_every_alert_links_its_runbook_section():
    runbook = (DEPLOY / "runbook.md").read_text()
    # GitHub's heading anchors: lower case, for headings that are just the alert's name.
    anchors = {h.strip().lower() for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://") and "/deploy/runbook.md#" in url, rule["alert"]
        assert url.rsplit("#", 1)[1] == rule["alert"].lower() in anchors, rule["alert"]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:  # `make test` installs it; a silent skip would let broken rules through
        pytest.fail("promtool not on PATH: run `make test-services` (apt-get install prometheus)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    checked = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_where_it_fires():
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yaml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert sorted(r["alert"] for r in alert_rules() if r["alert"] not in firing) == []


def test_promtool_unit_tests_catch_a_wrong_expectation(tmp_path):
    # Guards the guard: the same tests against an alert whose threshold moved must fail.
    rules = (DEPLOY / "prometheus" / "alerts.yaml").read_text()
    assert "> 0.05" in rules
    (tmp_path / "alerts.yaml").write_text(rules.replace("> 0.05", "> 0.5"))
    shutil.copy(DEPLOY / "prometheus" / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    tested = promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert tested.returncode != 0 and "PrefixserveHighErrorRate" in tested.stdout + tested.stderr


def test_gpu_overlay_runs_redis_under_sentinel_with_acknowledged_writes():
    from prefix_store.redis_connect import parse_sentinel_url

    objects = render("gpu")
    redis = one(objects, "StatefulSet", "prefixserve-redis")
    pod = redis["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert redis["spec"]["replicas"] == 3 and set(containers) == {"redis", "sentinel"}
    redis_script = " ".join(containers["redis"]["args"])
    for flag in (
        "--appendonly yes",
        "--min-replicas-to-write 1",
        "--masterauth",
        "--replicaof",
        "noeviction",
    ):
        assert flag in redis_script, flag
    sentinel_script = " ".join(containers["sentinel"]["args"])
    assert "sentinel monitor prefixserve $master 6379 2" in sentinel_script  # quorum 2 of 3
    service = one(objects, "Service", "prefixserve-redis")
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 26379}
    # The server finds the master through all three sentinels, by the pods' stable names, and waits
    # for a replica before acknowledging an upload.
    env = {e["name"]: e for e in server_container(objects)["env"]}
    address = parse_sentinel_url(env["PREFIXSERVE_REDIS_URL"]["value"])
    assert address is not None and address.service_name == "prefixserve"
    assert address.sentinels == tuple(
        (f"prefixserve-redis-{i}.{service['metadata']['name']}", 26379) for i in range(3)
    )
    assert server_config(objects)["PREFIXSERVE_REDIS_MIN_REPLICAS"] == "1"
    pdb = one(objects, "PodDisruptionBudget", "prefixserve-redis")
    assert pdb["spec"]["maxUnavailable"] == 1 and selects(
        pdb["spec"]["selector"]["matchLabels"], redis["spec"]["template"]["metadata"]["labels"]
    )
