"""Who can reach the server: `/metrics` stays inside the cluster, and the server's port admits only the
namespaces that need it.

`/metrics` needs no key and shows queue lengths, tenants and (with PREFIXSERVE_METRICS_ADAPTER_NAMES or
task labels turned on) customers' task names: the Gateway must not route it, and the NetworkPolicy
must not admit the port from anywhere.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.test_manifests import DEPLOY, OVERLAYS, find, one, render, route_backend, selects


def server_policies(objects) -> list[dict]:
    labels = one(objects, "Deployment", "prefixserve")["spec"]["template"]["metadata"]["labels"]
    return [
        p for p in find(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]


def test_the_gateway_does_not_publish_metrics():
    route = one(render("inference-pool"), "HTTPRoute", "prefixserve")
    for path in ("/metrics", "/metrics/"):
        assert route_backend(route, path) is None, path
    # Nor does a path the server may add later, until someone lists it.
    assert route_backend(route, "/debug/state") is None
    # The public API still is.
    assert route_backend(route, "/v1/prefixes/summarize/traffic") is not None
    assert route_backend(route, "/") is not None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_port_admits_only_named_in_cluster_peers(overlay):
    objects = render(overlay)
    policies = server_policies(objects)
    assert policies, "no NetworkPolicy selects the server pods: every pod and address may connect"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            # A rule without `from` admits every source, inside the cluster and out.
            assert rule.get("from"), f"{policy['metadata']['name']}: port(s) {rule.get('ports')} open to all"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                namespaces = peer.get("namespaceSelector")
                if namespaces is not None:  # {} would select every namespace
                    assert namespaces.get("matchLabels") or namespaces.get("matchExpressions"), peer


def admitted_namespace_names(objects) -> set[str]:
    return {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for policy in server_policies(objects)
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "kubernetes.io/metadata.name" in peer.get("namespaceSelector", {}).get("matchLabels", {})
    }


def same_namespace_peers(objects) -> list[dict]:
    return [
        peer["podSelector"]
        for policy in server_policies(objects)
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if "podSelector" in peer and "namespaceSelector" not in peer
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_and_the_picker_still_reach_the_server(overlay):
    objects = render(overlay)
    # Prometheus, in the namespace the KEDA trigger's address names (prometheus-operated.<ns>.svc).
    keda = yaml.safe_load((DEPLOY / "k8s" / "components" / "keda" / "scaledobject.yaml").read_text())
    address = keda["spec"]["triggers"][0]["metadata"]["serverAddress"]
    prometheus_namespace = re.search(r"//[\w-]+\.([\w-]+)\.svc", address).group(1)
    assert prometheus_namespace in admitted_namespace_names(objects)
    # The endpoint picker scrapes every server pod's /metrics.
    for epp in find(objects, "Deployment", "prefixserve-epp"):
        labels = epp["spec"]["template"]["metadata"]["labels"]
        assert any(selects(peer.get("matchLabels", {}), labels) for peer in same_namespace_peers(objects))
