"""The `docker run` lines in README.md, deploy/README.md and the Dockerfiles' comments work as written,
as far as this machine (no Docker) can tell:

- the arguments after the image, appended to the Dockerfile's ENTRYPOINT, and the environment (the
  Dockerfile's ENV plus `-e`) are accepted by `prefixserve serve`'s own argument and settings parsing;
- the model is a directory that a `make-model` line of the same document writes into the same volume
  (or the model is given some other way the settings accept);
- the image is one a `docker build` line of the document builds, from the Dockerfile whose ENTRYPOINT
  and ENV are used (images ending in `-cpu` from Dockerfile.cpu, `-cuda` from Dockerfile).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modeling.models import PRESETS
from prefixserve.cli import COMMANDS
from server.main import parse_args
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "deploy" / "README.md",
    DOCKER / "Dockerfile",
    DOCKER / "Dockerfile.cpu",
]
# `docker run` options that take a value (the rest used here are flags).
VALUED = {"-p", "--publish", "-v", "--volume", "-e", "--env", "--name", "--entrypoint", "--gpus", "--network",
          "-u", "--user", "-w", "--workdir", "--mount", "--env-file"}  # fmt: skip


@dataclass
class DockerRun:
    image: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)  # container path -> source
    entrypoint: str | None = None


def commands(path: Path, verb: str) -> list[str]:
    """`docker <verb> ...` command lines in a document, continuation lines joined, comment marks removed."""
    text = path.read_text()
    if path.name.startswith("Dockerfile"):
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("#   "))
    text = re.sub(r"\\\n\s*(?:#\s*)?", " ", text)
    return [m.group(0).split("  #")[0] for m in re.finditer(rf"^\s*docker {verb} .*$", text, flags=re.M)]


def parse_run(line: str) -> DockerRun:
    words = shlex.split(line)[2:]
    run = DockerRun(image="", args=[])
    i = 0
    while words[i].startswith("-"):
        option, _, inline = words[i].partition("=")
        if option in VALUED:
            value = inline or words[i + 1]
            i += 1 if inline else 2
            if option in ("-e", "--env"):
                key, _, val = value.partition("=")
                run.env[key] = val
            elif option in ("-v", "--volume"):
                source, target = value.split(":")[:2]
                run.volumes[target] = source
            elif option == "--entrypoint":
                run.entrypoint = value
        else:
            i += 1
    run.image, run.args = words[i], words[i + 1 :]
    return run


def dockerfile_for(image: str) -> Path:
    return DOCKER / ("Dockerfile.cpu" if image.endswith("-cpu") else "Dockerfile")


def dockerfile_entrypoint_and_env(path: Path) -> tuple[list[str], dict[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    entrypoint = shlex.split(re.search(r"^ENTRYPOINT \[(.*)\]$", text, flags=re.M).group(1).replace(",", " "))
    runtime = text.rsplit("\nFROM ", 1)[1]  # the last stage is the image that runs
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", runtime, flags=re.M):
        env.update(word.split("=", 1) for word in shlex.split(line))
    return entrypoint, env


def serve_settings(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """What `prefixserve serve argv` would run with under `env`: server.main's own parsing."""
    import os

    for key in [k for k in os.environ if k.startswith("PREFIXSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    return Settings(**parse_args(argv))  # type: ignore[arg-type]


def runs() -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), line) for path in DOCUMENTS for line in commands(path, "run")]


def test_every_document_has_docker_run_lines():
    found = {where for where, _ in runs()}
    assert found == {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}


@pytest.mark.parametrize(("where", "line"), runs(), ids=[f"{w}:{i}" for i, (w, _) in enumerate(runs())])
def test_docker_run_line_is_accepted_by_the_image(where, line, monkeypatch, tmp_path):
    run = parse_run(line)
    document = ROOT / where
    built = {parse_build_tag(b) for b in commands(document, "build")} if document.suffix == ".md" else set()
    if built:
        assert run.image in built, f"{where}: {run.image} is not built by this document's docker build lines"
    entrypoint, image_env = dockerfile_entrypoint_and_env(dockerfile_for(run.image))
    if run.entrypoint is not None:
        # A one-off command of the image's CLI (make-model): a known command with valid arguments.
        assert run.entrypoint == "prefixserve" and run.args[0] == "make-model", line
        preset, out_dir = run.args[1:3]
        assert preset in PRESETS and any(out_dir.startswith(v + "/") for v in run.volumes), line
        return
    assert entrypoint[-2:] == ["prefixserve", "serve"] and "serve" in COMMANDS
    settings = serve_settings(entrypoint[entrypoint.index("serve") + 1 :] + run.args,
                              {**image_env, **run.env}, monkeypatch, tmp_path)  # fmt: skip
    assert settings.host == "0.0.0.0", "a container must listen on all interfaces"
    assert f"{settings.port}:" in line or f":{settings.port}" in line, "the published port is the served one"
    # The model directory is written by a make-model line into the same volume first.
    made = [parse_run(other) for doc, other in runs() if doc == where and "make-model" in other]
    assert settings.model, f"{where}: no model: the server would exit with a config error"
    volume_path = next(p for p in run.volumes if settings.model.startswith(p + "/"))
    assert any(
        m.args[2] == settings.model and m.volumes.get(volume_path) == run.volumes[volume_path] for m in made
    ), f"{where}: nothing writes {settings.model} into volume {run.volumes[volume_path]}"
    if settings.api_keys_file is not None:
        assert str(settings.api_keys_file) in run.volumes, "the keys file must be mounted"


def parse_build_tag(line: str) -> str:
    words = shlex.split(line)
    return words[words.index("-t") + 1]


def test_a_docker_run_without_a_model_is_caught(monkeypatch, tmp_path):
    # Guards the check: the Dockerfile's old example (no model) gives settings without one.
    run = parse_run("docker run -p 8000:8000 -v prefixserve-models:/models prefixserve:0.1.0-cpu")
    entrypoint, env = dockerfile_entrypoint_and_env(DOCKER / "Dockerfile.cpu")
    settings = serve_settings(run.args, {**env, **run.env}, monkeypatch, tmp_path)
    assert settings.model is None
    with pytest.raises(SystemExit):  # an option `prefixserve serve` does not have
        serve_settings(["--modle", "/models/gpt2"], env, monkeypatch, tmp_path)
