"""`FileArea`: the bytes of uploaded training files, in a directory (`{data_dir}/files/{tenant}/`).

Both job stores keep file bytes here: on local disk for the embedded default, on a volume every
pod mounts (ReadWriteMany) in a fleet, so the worker that trains a job reads what a replica stored.
Written atomically (temp file, fsync, rename), 0600 in 0700 directories.
"""

from __future__ import annotations

from pathlib import Path

from prefix_store.base import validate_name
from prefix_store.jobs.base import JobNotFound
from prefix_store.jobs.model import FILE_PREFIX, is_id
from prefix_store.local_store import atomic_write

__all__ = ["FileArea", "write_atomic"]


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (the local prefix store's way), creating its directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, data)


class FileArea:
    """File bytes by (tenant, file id) under `data_dir` (module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    def path(self, tenant: str, file_id: str, suffix: str = ".data") -> Path:
        if not is_id(file_id, FILE_PREFIX):
            raise JobNotFound(f"no file {file_id!r}")
        return self.data_dir / "files" / validate_name(tenant, "tenant") / f"{file_id}{suffix}"

    def write(self, tenant: str, file_id: str, data: bytes) -> None:
        write_atomic(self.path(tenant, file_id), data)

    def read(self, tenant: str, file_id: str) -> bytes:
        try:
            return self.path(tenant, file_id).read_bytes()
        except FileNotFoundError:
            raise JobNotFound(f"no file {file_id!r}") from None

    def delete(self, tenant: str, file_id: str) -> None:
        self.path(tenant, file_id).unlink(missing_ok=True)
