"""deploy/k8s's training workers (components/fine-tuning): their own Deployment running `prefixserve
train-worker` with the servers' settings and Redis, the fine-tuning volume shared with the servers,
a GPU each on the gpu overlay and none on the cpu one, and servers that never train."""

from __future__ import annotations

import pytest
import yaml

from server.settings import Settings
from tests.deploy.test_manifests import one, render, schema_problems, server_config, server_container

OVERLAYS = ("gpu", "cpu", "external-redis", "inference-pool")


def worker_pod(objects) -> dict:
    return one(objects, "Deployment", "prefixserve-train-worker")["spec"]["template"]["spec"]


def worker_container(objects) -> dict:
    return next(c for c in worker_pod(objects)["containers"] if c["name"] == "worker")


def mounted_claim(pod: dict, container: dict, path: str) -> str:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return str(volume["persistentVolumeClaim"]["claimName"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_run_with_the_servers_settings_and_share_their_volume(overlay):
    objects = render(overlay)
    assert schema_problems(objects) == []
    worker, server = worker_container(objects), server_container(objects)
    assert worker["command"] == ["prefixserve", "train-worker"]
    assert worker["image"] == server["image"]
    assert worker["envFrom"] == server["envFrom"]  # the same model, limits and directories
    env = {e["name"]: e for e in worker.get("env", [])}
    assert env["PREFIXSERVE_REDIS_URL"] == {e["name"]: e for e in server["env"]}["PREFIXSERVE_REDIS_URL"]
    # Kubernetes expands $(VAR) only from variables defined before it.
    names = [e["name"] for e in worker["env"]]
    if "REDIS_PASSWORD" in names:
        assert names.index("REDIS_PASSWORD") < names.index("PREFIXSERVE_REDIS_URL")

    config = server_config(objects)
    assert config["PREFIXSERVE_TRAIN_WORKERS"] == "0"  # serving pods never train
    volume = config["PREFIXSERVE_FINE_TUNING_DIR"]
    server_pod = one(objects, "Deployment", "prefixserve")["spec"]["template"]["spec"]
    claim = mounted_claim(worker_pod(objects), worker, volume)
    assert claim == mounted_claim(server_pod, server, volume) == "prefixserve-fine-tuning"
    assert one(objects, "PersistentVolumeClaim", claim)
    assert mounted_claim(worker_pod(objects), worker, "/models") == "prefixserve-model-cache"
    # SIGTERM: the worker checkpoints its job and re-queues it before it is killed.
    assert worker_pod(objects)["terminationGracePeriodSeconds"] >= 30
    settings = Settings(
        **{
            k.removeprefix("PREFIXSERVE_").lower(): v
            for k, v in config.items()
            if k.startswith("PREFIXSERVE_")
        }
    )
    assert str(settings.fine_tuning_data_dir()) == volume and settings.embedded_train_workers() == 0


def test_gpu_workers_train_on_a_gpu_each_and_the_fine_tuning_volume_is_shared_across_nodes():
    objects = render("gpu")
    resources = worker_container(objects)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker_pod(objects)["tolerations"])
    assert one(objects, "PersistentVolumeClaim", "prefixserve-fine-tuning")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_cpu_workers_need_no_gpu_and_one_node():
    objects = render("cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump(one(objects, "Deployment", "prefixserve-train-worker"))
    assert server_config(objects)["PREFIXSERVE_DEVICE"] == "cpu"
    assert one(objects, "PersistentVolumeClaim", "prefixserve-fine-tuning")["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
