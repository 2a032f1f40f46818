"""The torch-free half of the artifact contract: its error and the limits protocol its checks read.

Split from `prefix_store.artifact` (which builds tensors) so that the torch-free API layer can name
them (`server.api` imports no torch, not even indirectly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from modeling.model_spec import ModelSpec


class ArtifactError(ValueError):
    """An artifact that cannot be served; the message names the problem."""


class ArtifactLimits(Protocol):
    """The upload policy the checks apply (`server.limits.Limits` is one); the defaults live there only.

    `None` where a function takes limits means no policy (offline tools reading their own artifacts):
    structure, the model's shape and finiteness are still checked.
    """

    @property
    def max_artifact_bytes(self) -> int: ...

    @property
    def max_prefix_length(self) -> int: ...


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that passed every artifact check: the bytes to store and `PrefixArtifact.summary()`."""

    data: bytes
    summary: dict[str, Any]


class UploadChecks(Protocol):
    """How the torch-free API checks uploaded files (`prefix_store.uploads.ArtifactUploadChecks` is the
    implementation, handed to `server.api.create_app` by `server.main`). Both raise `ArtifactError`."""

    def artifact(self, data: bytes, spec: ModelSpec, limits: ArtifactLimits) -> CheckedUpload: ...

    def peft(
        self, config_bytes: bytes, model_bytes: bytes, spec: ModelSpec, task: str, limits: ArtifactLimits
    ) -> CheckedUpload: ...
