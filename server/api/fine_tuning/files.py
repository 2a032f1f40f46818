"""Training files: upload (`POST /v1/files`), and what the files routes do beyond the store.

An upload is read up to `max_training_file_bytes` (413 beyond, without reading the rest), parsed as a
training file (`training.job_data.parse_file`: 400 naming the first bad line; nothing is stored), and
counted against the tenant's `tenant_max_training_files` (429). Only then are its bytes and record
stored. Its tokens are counted when a job uses it (the base model and the prefix length decide
whether an example fits).
"""

from __future__ import annotations

import anyio
from fastapi import UploadFile

from prefix_store.jobs.model import FILE_PREFIX, TrainingFile, new_id
from server.api.errors import ApiError
from server.api.fine_tuning.service import FineTuning, api_errors
from server.api.quotas import QuotaExceeded
from training.job_data import DataFileError, parse_file

PURPOSE = "fine-tune"
MAX_FILENAME_CHARS = 256


async def upload(service: FineTuning, tenant: str, file: UploadFile, purpose: str) -> TrainingFile:
    """Check and store one training file (module docstring)."""
    if purpose != PURPOSE:
        raise ApiError(400, f"purpose must be {PURPOSE!r}: this server keeps training files only",
                       "invalid_request_error", param="purpose")  # fmt: skip
    limits = service.state.config.limits
    limit = limits.max_training_file_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"the file exceeds the limit of {limit} bytes for a training file",
                       "payload_too_large", param="file")  # fmt: skip
    filename = (file.filename or "training.jsonl")[-MAX_FILENAME_CHARS:]
    try:
        shape, examples = await anyio.to_thread.run_sync(parse_file, data, filename)
    except DataFileError as exc:
        raise ApiError(400, f"invalid training file: {exc}", "invalid_request_error", param="file") from None
    store = service.store
    quota = limits.tenant_max_training_files
    if quota > 0 and await store.count_files(tenant) >= quota:
        raise QuotaExceeded(
            429, f"the tenant stores {quota} training files, its quota: delete one to upload another"
        )
    record = TrainingFile(
        id=new_id(FILE_PREFIX),
        tenant=tenant,
        filename=filename,
        bytes=len(data),
        created_at=int(service.clock()),
        shape=shape.name,
        num_examples=len(examples),
    )
    return await store.add_file(record, data)


async def delete(service: FineTuning, tenant: str, file_id: str) -> None:
    """Delete a file no unfinished job of the tenant still needs (409 while one does)."""
    with api_errors():
        await service.store.get_file(tenant, file_id)
        users = [
            job.id
            for job in await service.store.active_jobs()
            if job.tenant == tenant and file_id in (job.training_file, job.validation_file)
        ]
        if users:
            raise ApiError(
                409, f"job {users[0]} still uses this file; cancel it or wait for it to finish", "conflict"
            )
        await service.store.delete_file(tenant, file_id)
