"""Prefix management logic behind the `/v1/prefixes` routes: validate uploads, talk to the store.

Uploads are validated *before* they are stored, with the same checks and the same `Limits` the engine
applies when it loads a prefix (`state.uploads`: `prefix_store.uploads.ArtifactUploadChecks`, injected
by `server.main` so this torch-free layer never imports the tensor code), so what is stored is always
servable. PEFT adapters are converted to our artifact format and the converted artifact is stored. Nothing is ever unpickled: only safetensors bytes are parsed.

Validation builds tensors, so it runs in a worker thread to keep the event loop serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import anyio
from fastapi import UploadFile

from prefix_store.artifact_types import ArtifactError, CheckedUpload
from prefix_store.base import StoreCorrupt, StoreUnavailable, TaskPage, VersionInfo, validate_name
from server.api.deps import AppState
from server.api.errors import ApiError
from server.api.schemas import PrefixDetail, PrefixVersion

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def store_call(state: AppState, operation: str) -> Iterator[None]:
    """Count store failures (`prefixserve_store_errors_total`) and track `prefixserve_store_up`; corrupt
    data (`prefixserve_store_corrupt_total`) is one task's problem, not the store being down."""
    try:
        yield
    except StoreCorrupt:
        state.metrics.observe_store_corrupt(operation)
        raise
    except StoreUnavailable:
        state.metrics.observe_store(operation, ok=False)
        raise
    state.metrics.observe_store(operation, ok=True)


async def read_upload(upload: UploadFile, field: str, limit: int) -> bytes:
    """The bytes of one uploaded file, refusing (422) a file over `limit` without reading all of it."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"{field}: file exceeds the limit of {limit} bytes")
    if not data:
        raise ArtifactError(f"{field}: the file is empty")
    return data


async def validate_upload(
    state: AppState,
    task: str,
    artifact: UploadFile | None,
    adapter_config: UploadFile | None,
    adapter_model: UploadFile | None,
) -> tuple[bytes, dict[str, Any]]:
    """Check one upload form and return (artifact bytes to store, metadata to store with them)."""
    check_task_name(state, task)
    limits = state.config.limits  # the engine loads what is stored with these same limits
    peft_parts = (adapter_config is not None, adapter_model is not None)
    if artifact is not None and any(peft_parts):
        raise ApiError(
            422, "send either 'artifact' or 'adapter_config' + 'adapter_model', not both", "validation"
        )
    if artifact is not None:
        data = await read_upload(artifact, "artifact", limits.max_artifact_bytes)
        checked = await anyio.to_thread.run_sync(lambda: state.uploads.artifact(data, state.spec, limits))
        source = "artifact"
    elif all(peft_parts):
        assert adapter_config is not None and adapter_model is not None
        config_bytes = await read_upload(adapter_config, "adapter_config", 1 << 20)
        model_bytes = await read_upload(adapter_model, "adapter_model", limits.max_artifact_bytes)

        checked = await anyio.to_thread.run_sync(
            lambda: state.uploads.peft(config_bytes, model_bytes, state.spec, task, limits)
        )
        source = "peft"
    elif any(peft_parts):
        missing = "adapter_model" if adapter_config is not None else "adapter_config"
        raise ApiError(
            422,
            f"a PEFT upload needs both adapter_config and adapter_model; '{missing}' is missing",
            "validation",
        )
    else:
        raise ApiError(
            422,
            "no file: send 'artifact' (safetensors) or 'adapter_config' + 'adapter_model' (PEFT)",
            "validation",
        )
    return stored_form(state, checked, source)


def check_task_name(state: AppState, task: str) -> None:
    """A name a task can be stored and called under (422 otherwise)."""
    validate_name(task, "task")
    if task == state.config.model_id:  # `model` in /v1/completions would name the base model, not it
        raise ApiError(
            422,
            f"task name '{task}' is the served model's id, which selects the base model in "
            "/v1/completions: the task could not be reached there; choose another name",
            "validation",
        )


async def validate_artifact(state: AppState, task: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """The checks of an uploaded artifact file, for artifact bytes from elsewhere (a fine-tuning job)."""
    check_task_name(state, task)
    limits = state.config.limits
    checked = await anyio.to_thread.run_sync(lambda: state.uploads.artifact(data, state.spec, limits))
    return stored_form(state, checked, "artifact")


def stored_form(state: AppState, checked: CheckedUpload, source: str) -> tuple[bytes, dict[str, Any]]:
    """(bytes, metadata) to store for a checked upload (`UploadChecks`' result)."""
    data, summary = checked.data, checked.summary
    # Stored with every version and returned by describe/list: bounded, so listing stays cheap.
    training_bytes = len(json.dumps(summary["training"], separators=(",", ":")))
    max_training = state.config.limits.max_training_metadata_bytes
    if training_bytes > max_training:
        raise ArtifactError(
            f"training metadata is {training_bytes} bytes of JSON; the limit is {max_training}"
        )
    metadata = {
        "source": source,
        "prefix_lengths": summary["prefix_lengths"],
        "num_parameters": summary["num_parameters"],
        "dtype": summary["dtype"],
        "model_fingerprint": summary["model_fingerprint"],
        "artifact_created_at": summary["created_at"],
        "training": summary["training"],
    }
    return data, metadata


def version_out(info: VersionInfo) -> PrefixVersion:
    """A stored version as the API shows it."""
    meta = info.metadata
    lengths = {str(k): int(v) for k, v in (meta.get("prefix_lengths") or {}).items()}
    return PrefixVersion(
        task=info.task,
        version=info.version,
        prefix_lengths=lengths,
        prefix_length=lengths.get("decoder", 0),
        num_parameters=int(meta.get("num_parameters", 0)),
        sha256=info.sha256,
        size_bytes=info.size_bytes,
        created_at=datetime.fromtimestamp(info.created_at, timezone.utc).isoformat(timespec="seconds"),
        source=str(meta.get("source", "artifact")),
    )


def detail_out(current: VersionInfo, versions: list[VersionInfo]) -> PrefixDetail:
    return PrefixDetail(
        **version_out(current).model_dump(),
        current_version=current.version,
        versions=[version_out(v) for v in versions],
    )


def note_broken(state: AppState, tenant: str, page: TaskPage) -> None:
    """A listing leaves out the tasks whose stored data is corrupt (each was logged with its key or path
    where it was found): say which in one line and count them, so the rest of the listing serves."""
    if page.broken:
        logger.warning(
            "listing of tenant %s leaves out %d task(s) with corrupt store data: %s",
            tenant,
            len(page.broken),
            ", ".join(page.broken[:20]),
        )
        state.metrics.observe_store_corrupt("list_tasks", len(page.broken))


async def list_all_tasks(state: AppState, tenant: str, max_items: int) -> tuple[list[VersionInfo], list[str]]:
    """Up to `max_items` of the tenant's tasks, following the store's pages: (current versions of the
    readable ones, names of those whose data is corrupt; they exist, but cannot be shown)."""
    items: list[VersionInfo] = []
    broken: list[str] = []
    cursor: str | None = None
    with store_call(state, "list_tasks"):
        while len(items) + len(broken) < max_items:
            page = await state.store.list_tasks(
                tenant, cursor, min(1000, max_items - len(items) - len(broken))
            )
            note_broken(state, tenant, page)
            items += page.items
            broken += page.broken
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    return items, broken
