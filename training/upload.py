"""Upload client: POST an artifact to a running server's `/v1/prefixes`.

Multipart body: form field `task` and file field `artifact`; `Authorization: Bearer <key>` when a key
is given. Non-2xx answers raise `UploadError` carrying the server's `{"error", "error_type"}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class UploadError(RuntimeError):
    """The server refused the upload (or could not be reached); the message says why."""

    def __init__(self, message: str, status_code: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


def upload_artifact(
    server: str, task: str, artifact_path: str | Path, api_key: str | None = None, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Upload `artifact_path` as the new current version of `task`; returns the server's JSON answer."""
    path = Path(artifact_path)
    data = path.read_bytes()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = server.rstrip("/") + "/v1/prefixes"
    try:
        response = httpx.post(
            url,
            data={"task": task},
            files={"artifact": (path.name, data, "application/octet-stream")},
            headers=headers,
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise UploadError(f"could not reach {url}: {exc}") from exc
    if not response.is_success:
        error, error_type = response.text.strip() or response.reason_phrase, None
        try:
            body = response.json()
            if isinstance(body, dict):
                error = str(body.get("error", body.get("detail", error)))
                error_type = body.get("error_type")
        except ValueError:
            pass  # not JSON: report the raw text
        kind = f" ({error_type})" if error_type else ""
        raise UploadError(
            f"upload of {path} to {url} failed: HTTP {response.status_code}{kind}: {error}",
            status_code=response.status_code,
            error_type=error_type,
        )
    try:
        return response.json()
    except ValueError:
        return {"status_code": response.status_code, "text": response.text}
