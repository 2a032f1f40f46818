"""`ArtifactUploadChecks`: the artifact checks as the API layer runs them on uploads (torch code).

`server.main` hands an instance to the torch-free `server.api` (`create_app(uploads=...)`), so the API
validates with exactly the checks the engine applies when it loads a stored blob.

Stored dtype: an artifact is kept in the dtype it was uploaded in (float32, float16, bfloat16), except
that with `store_dtype` set (the model's serving dtype; `PREFIXSERVE_STORE_SERVED_DTYPE`, on by
default) an upload in a wider float dtype is converted to it: a float32 prefix for a bfloat16 server
is stored as bfloat16, half the bytes in Redis and on the wire to every replica. The engine casts
every blob to its serving dtype on load anyway, so the values served are the same bits either way.
Narrower uploads are never widened.
"""

from __future__ import annotations

import torch

from modeling.model_spec import ModelSpec
from prefix_store.artifact import PrefixArtifact, dump_artifact, load_artifact
from prefix_store.artifact_types import ArtifactError, ArtifactLimits, CheckedUpload
from prefix_store.peft_format import peft_to_artifact


class ArtifactUploadChecks:
    """Implements `prefix_store.artifact_types.UploadChecks`. `store_dtype`: see the module docstring."""

    def __init__(self, store_dtype: torch.dtype | None = None) -> None:
        self.store_dtype = store_dtype

    def _narrowed(self, artifact: PrefixArtifact) -> PrefixArtifact | None:
        """The artifact in `store_dtype` if that is narrower than its own, else None (kept as is)."""
        target = self.store_dtype
        if target is None or not target.is_floating_point or artifact.dtype == target:
            return None
        if torch.finfo(target).bits >= torch.finfo(artifact.dtype).bits:
            return None
        narrowed = artifact.to(dtype=target)
        if not all(bool(torch.isfinite(t).all()) for t in narrowed.prefixes.values()):
            # It could not be served either: the engine casts to this dtype on load.
            raise ArtifactError(f"prefix values overflow {target} (the serving dtype)")
        return narrowed

    def artifact(self, data: bytes, spec: ModelSpec, limits: ArtifactLimits) -> CheckedUpload:
        """Our safetensors artifact: stored as uploaded once it passes every check (narrowed to the
        serving dtype when that is set and narrower)."""
        artifact = load_artifact(data, spec, limits)
        narrowed = self._narrowed(artifact)
        if narrowed is None:
            return CheckedUpload(data, artifact.summary())
        return CheckedUpload(dump_artifact(narrowed), narrowed.summary())

    def peft(
        self, config_bytes: bytes, model_bytes: bytes, spec: ModelSpec, task: str, limits: ArtifactLimits
    ) -> CheckedUpload:
        """A PEFT adapter: converted, and the converted artifact is what is stored."""
        converted = peft_to_artifact(config_bytes, model_bytes, spec, task, limits)
        converted = self._narrowed(converted) or converted
        return CheckedUpload(dump_artifact(converted), converted.summary())
