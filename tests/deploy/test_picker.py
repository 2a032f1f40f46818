"""The endpoint picker's surroundings (overlays/inference-pool): its namespace, its RBAC, its
InferenceObjective and the Gateway-specific components (Istio's TLS to it, GKE's health check).

Field names follow gateway-api-inference-extension v1.0.0 (its Helm chart and manifests).
"""

from __future__ import annotations

from server.api.routes import health
from tests.deploy.test_manifests import find, one, picker_flags, render, render_own_overlay, schema_problems


def test_picker_follows_the_namespace_the_overlay_renders_into(tmp_path):
    objects = render_own_overlay(tmp_path, base="inference-pool", namespace="inference")
    assert schema_problems(objects) == []
    pool = one(objects, "InferencePool", "prefixserve")
    epp = one(objects, "Deployment", "prefixserve-epp")
    assert pool["metadata"]["namespace"] == epp["metadata"]["namespace"] == "inference"
    # A hard-coded --pool-namespace would watch a pool that is not there.
    assert picker_flags(epp)["pool-namespace"] == "inference"
    account = epp["spec"]["template"]["spec"]["serviceAccountName"]
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        for subject in binding["subjects"]:
            if subject["name"] == account:
                assert subject["namespace"] == "inference", binding["metadata"]["name"]


def test_picker_may_authenticate_its_metrics_callers_and_prometheus_may_read_them():
    objects = render("inference-pool")
    account = one(objects, "Deployment", "prefixserve-epp")["spec"]["template"]["spec"]["serviceAccountName"]

    def granted_to(subject: dict) -> set[tuple[str, str, str]]:
        grants = set()
        for binding in find(objects, "ClusterRoleBinding"):
            if any(s["kind"] == "ServiceAccount" and s["name"] == subject["name"] and
                   s["namespace"] == subject["namespace"] for s in binding["subjects"]):  # fmt: skip
                for rule in one(objects, "ClusterRole", binding["roleRef"]["name"])["rules"]:
                    for verb in rule["verbs"]:
                        grants |= {
                            (g, r, verb) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
                        }
                        grants |= {("", url, verb) for url in rule.get("nonResourceURLs", [])}
        return grants

    # EPP v1.0.0 serves /metrics behind the API server's authentication and authorization.
    picker = granted_to({"name": account, "namespace": "prefixserve"})
    assert picker == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }
    prometheus = [
        s for b in find(objects, "ClusterRoleBinding") for s in b["subjects"] if s["name"] != account
    ]
    assert prometheus and all(("", "/metrics", "get") in granted_to(s) for s in prometheus)
    # The picker reads objectives (its CRD must be installed; deploy/README.md says how).
    rules = one(objects, "Role", "prefixserve-epp")["rules"]
    assert any("inferenceobjectives" in r["resources"] and "watch" in r["verbs"] for r in rules)


def test_batch_objective_is_sheddable_and_names_the_pool():
    objects = render("inference-pool")
    objective = one(objects, "InferenceObjective", "batch")
    assert objective["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert objective["spec"]["priority"] < 0  # the picker refuses it first when the pool is saturated
    pool = one(objects, "InferencePool", "prefixserve")
    ref = objective["spec"]["poolRef"]
    assert (ref["group"], ref["name"]) == (pool["apiVersion"].split("/")[0], pool["metadata"]["name"])


def test_istio_component_encrypts_to_the_picker(tmp_path):
    objects = render_own_overlay(
        tmp_path, base="inference-pool", components=["k8s/components/inference-pool-istio"]
    )
    assert schema_problems(objects) == []
    rule = one(objects, "DestinationRule", "prefixserve-epp-tls")
    pool = one(objects, "InferencePool", "prefixserve")
    assert rule["spec"]["host"] == pool["spec"]["endpointPickerRef"]["name"]
    assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    assert rule["metadata"]["namespace"] == pool["metadata"]["namespace"]


def test_gke_component_health_checks_the_pool_where_the_server_answers(tmp_path):
    objects = render_own_overlay(
        tmp_path, base="inference-pool", components=["k8s/components/inference-pool-gke"]
    )
    assert schema_problems(objects) == []
    pool = one(objects, "InferencePool", "prefixserve")
    target = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "prefixserve"}
    check = one(objects, "HealthCheckPolicy", "prefixserve")
    assert check["spec"]["targetRef"] == target
    http = check["spec"]["default"]["config"]["httpHealthCheck"]
    assert http["port"] in [p["number"] for p in pool["spec"]["targetPorts"]]
    served = {route.path: route.methods for route in health.router.routes}
    assert "GET" in served[http["requestPath"]]
    backend = one(objects, "GCPBackendPolicy", "prefixserve")
    route = one(objects, "HTTPRoute", "prefixserve")
    assert backend["spec"]["targetRef"] == target
    assert f"{backend['spec']['default']['timeoutSec']}s" == route["spec"]["rules"][0]["timeouts"]["request"]
