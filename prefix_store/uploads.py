"""`ArtifactUploadChecks`: the artifact checks as the API layer runs them on uploads (torch code).

`server.main` hands an instance to the torch-free `server.api` (`create_app(uploads=...)`), so the API
validates with exactly the checks the engine applies when it loads a stored blob.
"""

from __future__ import annotations

from modeling.model_spec import ModelSpec
from prefix_store.artifact import dump_artifact, load_artifact
from prefix_store.artifact_types import ArtifactLimits, CheckedUpload
from prefix_store.peft_format import peft_to_artifact


class ArtifactUploadChecks:
    """Implements `prefix_store.artifact_types.UploadChecks`."""

    def artifact(self, data: bytes, spec: ModelSpec, limits: ArtifactLimits) -> CheckedUpload:
        """Our safetensors artifact: stored as uploaded once it passes every check."""
        return CheckedUpload(data, load_artifact(data, spec, limits).summary())

    def peft(
        self, config_bytes: bytes, model_bytes: bytes, spec: ModelSpec, task: str, limits: ArtifactLimits
    ) -> CheckedUpload:
        """A PEFT adapter: converted, and the converted artifact is what is stored."""
        converted = peft_to_artifact(config_bytes, model_bytes, spec, task, limits)
        return CheckedUpload(dump_artifact(converted), converted.summary())
