"""The rendered workloads as the kubelet and the server will run them: environment variables expand,
the CPU and GPU overlays run GPT-2 on vLLM, and what the pods and Redis ask for covers what they hold.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from modeling.models import PRESETS
from server.settings import Settings
from tests.deploy.test_manifests import OVERLAYS, ROOT, find, one, render, server_config, server_container

DOCKER = ROOT / "deploy" / "docker"
GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def configured(objects) -> Settings:
    """The server's settings as the pods get them (ConfigMap defaults for what it leaves out)."""
    env = {k: v for k, v in server_config(objects).items() if k.startswith("PREFIXSERVE_")}
    return Settings(**{k.removeprefix("PREFIXSERVE_").lower(): v for k, v in env.items()})


def quantity_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[unit]


def gpt2_parameters(preset: str) -> int:
    p = PRESETS[preset]
    d, vocab = p["n_embd"], 50257
    return vocab * d + p["n_positions"] * d + p["n_layer"] * (12 * d * d + 13 * d) + 2 * d


# ---------------------------------------------------------------------------------------------------
# Environment variables


def unresolved_references(container: dict, config: dict[str, str]) -> list[str]:
    """`$(NAME)` references the kubelet leaves as literal text: in an env value, NAME must be defined
    earlier (envFrom, then the env entries above it); in command/args, anywhere in the container's env.
    In command/args only upper-case names count: `$(hostname)` there is a shell's command substitution,
    which the kubelet rightly leaves to the shell."""
    defined = set(config)
    missing = []
    for var in container.get("env", []):
        for name in re.findall(r"(?<!\$)\$\((\w+)\)", var.get("value", "")):
            if name not in defined:
                missing.append(f"env {var['name']} uses $({name}) before it is defined")
        defined.add(var["name"])
    for word in container.get("command", []) + container.get("args", []):
        names = re.findall(r"(?<!\$)\$\(([A-Z_][A-Z0-9_]*)\)", word)
        missing += [f"argument uses undefined $({name})" for name in names if name not in defined]
    return missing


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_reference_expands(overlay):
    objects = render(overlay)
    problems = {}
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            config: dict[str, str] = {}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    config.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
            where = f"{workload['metadata']['name']}/{container['name']}"
            if found := unresolved_references(container, config):
                problems[where] = found
    assert problems == {}


def test_a_reference_before_its_definition_is_caught():
    # Guards the check: the order Kubernetes leaves literal.
    late = {"env": [{"name": "URL", "value": "redis://:$(PASSWORD)@r"}, {"name": "PASSWORD", "value": "x"}]}
    assert unresolved_references(late, {}) == ["env URL uses $(PASSWORD) before it is defined"]
    assert unresolved_references({"env": late["env"][::-1]}, {}) == []
    assert unresolved_references({"env": [{"name": "ESCAPED", "value": "$$(PASSWORD)"}]}, {}) == []


# ---------------------------------------------------------------------------------------------------
# The images the overlays run


def dockerfile_install(dockerfile: Path) -> list[str]:
    """The arguments of the Dockerfile's scripts/install-python-env call."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    [line] = re.findall(r"^RUN .*install-python-env .*$", text, flags=re.M)
    return shlex.split(line.split("install-python-env", 1)[1].split("&&", 1)[0])


@pytest.mark.parametrize(("overlay", "device"), [("cpu", "cpu"), ("gpu", "cuda"), ("inference-pool", "cuda")])
def test_overlay_runs_gpt2_on_the_vllm_in_its_image(overlay, device):
    objects = render(overlay)
    settings = configured(objects)
    assert settings.device == device and settings.engine == "auto"
    assert PRESETS[settings.model]["arch"] == "gpt2"
    image = server_container(objects)["image"]
    dockerfile = DOCKER / ("Dockerfile.cpu" if image.endswith("-cpu") else "Dockerfile")
    install = dockerfile_install(dockerfile)
    # The image holds the vLLM build for the overlay's device, checked at build time (`--check`:
    # vLLM imports, our plugin is registered, pip check is clean).
    assert install[install.index("--vllm") + 1] == device
    assert "--check" in install
    # vLLM's CPU attention needs head_dim >= 32; the served model has it.
    preset = PRESETS[settings.model]
    assert preset["n_embd"] // preset["n_head"] >= 32


# ---------------------------------------------------------------------------------------------------
# Memory and start-up


def test_cpu_pod_memory_request_covers_what_vllm_holds():
    objects = render("cpu")
    settings = configured(objects)
    limits = settings.limits
    assert limits.vllm_kv_cache_bytes is not None, "the KV cache in the pod's RAM must be sized, not guessed"
    weights = gpt2_parameters(settings.model) * DTYPE_BYTES[settings.dtype]
    runtime = 2 * GIB  # two Python processes (API, vLLM's engine core) with torch and vLLM loaded
    held = limits.vllm_kv_cache_bytes + 2 * weights + limits.host_prefix_cache_bytes + runtime
    held += limits.vllm_prefix_table_bytes
    resources = server_container(objects)["resources"]
    assert quantity_bytes(resources["requests"]["memory"]) >= held
    assert quantity_bytes(resources["limits"]["memory"]) >= quantity_bytes(resources["requests"]["memory"])
    # vLLM binds its threads to the cores the cgroup quota allows: a limit keeps it to the request's.
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"]


@pytest.mark.parametrize("overlay", ["gpu", "inference-pool"])
def test_gpu_pod_leaves_gpu_memory_for_the_server_process(overlay):
    settings = configured(render(overlay))
    # vLLM's default (0.92) leaves the API process (CUDA context, prefix uploads) too little.
    assert settings.vllm_gpu_memory_utilization is not None
    assert 0.5 <= settings.vllm_gpu_memory_utilization <= 0.9


# The server answers nothing (not even /health) before the weights are loaded, vLLM has compiled the
# model (30-90 s on 2 CPU cores; CUDA graph capture on a GPU) and the warm start has run.
WEIGHTS_AND_COMPILE_S = 480


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_startup_probe_outlasts_vllms_start(overlay):
    objects = render(overlay)
    startup = server_container(objects)["startupProbe"]
    window = startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= WEIGHTS_AND_COMPILE_S + configured(objects).limits.warm_start_timeout_s


# ---------------------------------------------------------------------------------------------------
# Redis

# The fleet docs/architecture.md ("Fleet") sizes the Redis of components/redis-sentinel for.
FLEET_TASKS, FLEET_PREFIX_LENGTH = 100, 200


def redis_maxmemory(objects) -> int:
    redis = one(objects, "StatefulSet", "prefixserve-redis")["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(redis.get("command", []) + redis.get("args", []))
    number, unit = re.search(r"--maxmemory (\d+)(gb|mb)\b", script).groups()
    return int(number) * {"gb": 1 << 30, "mb": 1 << 20}[unit]


def test_redis_holds_the_documented_fleet_at_the_kept_versions():
    objects = render("gpu")
    settings = configured(objects)
    preset = PRESETS[settings.model]
    prefix_bytes = (
        preset["n_layer"] * 2 * preset["n_embd"] * DTYPE_BYTES[settings.dtype] * FLEET_PREFIX_LENGTH
    )
    keep = settings.limits.keep_versions
    assert FLEET_TASKS * keep * prefix_bytes <= redis_maxmemory(objects)
    fleet = (ROOT / "docs" / "architecture.md").read_text().split("## Fleet", 1)[1]
    assert f"`PREFIXSERVE_KEEP_VERSIONS={keep}`" in fleet, "docs/architecture.md sizes another keep_versions"
