"""OpenAI's `/v1/files` for training files: upload, list, retrieve, content, delete.

Files are the caller's tenant's: another tenant's id is 404. Uploading and deleting need a key with
role "manage"; reading needs any key. Checks on upload: `server.api.fine_tuning.files`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Response, UploadFile

from server.api.deps import Caller, Manager
from server.api.errors import error_responses
from server.api.fine_tuning import files
from server.api.fine_tuning.schemas import FileDeleted, FileObject, ListPage, file_out, page
from server.api.fine_tuning.service import Service, api_errors

router = APIRouter(prefix="/v1/files", tags=["files"])

FileId = Annotated[str, Path(min_length=1, max_length=64, description="A file id (`file-...`).")]


@router.post(
    "", response_model=FileObject, responses=error_responses(400, 401, 403, 413, 429, 503, openai=True)
)
async def upload_file(
    service: Service,
    caller: Manager,
    file: Annotated[
        UploadFile, File(description="JSONL of prompt/completion, chat messages, ... or E2E CSV.")
    ],
    purpose: Annotated[str, Form(max_length=64, description='"fine-tune"')],
) -> FileObject:
    """Store a training file (checked line by line first; 400 names the first bad line)."""
    return file_out(await files.upload(service, caller.tenant, file, purpose))


@router.get("", response_model=ListPage, responses=error_responses(401, 503, openai=True))
async def list_files(
    service: Service,
    caller: Caller,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> ListPage:
    """The tenant's training files, newest first."""
    if purpose not in (None, files.PURPOSE):
        return page([], False)
    listing = await service.store.list_files(caller.tenant, after, limit)
    return page([file_out(f) for f in listing.items], listing.has_more)


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(401, 404, 503, openai=True))
async def retrieve_file(service: Service, caller: Caller, file_id: FileId) -> FileObject:
    with api_errors():
        return file_out(await service.store.get_file(caller.tenant, file_id))


@router.get("/{file_id}/content", responses=error_responses(401, 404, 503, openai=True))
async def file_content(service: Service, caller: Caller, file_id: FileId) -> Response:
    """The file's bytes as uploaded."""
    with api_errors():
        data = await service.store.read_file(caller.tenant, file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete(
    "/{file_id}", response_model=FileDeleted, responses=error_responses(401, 403, 404, 503, openai=True)
)
async def delete_file(service: Service, caller: Manager, file_id: FileId) -> FileDeleted:
    """Delete a file (409 while an unfinished job uses it)."""
    await files.delete(service, caller.tenant, file_id)
    return FileDeleted(id=file_id)
