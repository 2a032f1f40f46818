"""Client of a running server's prefix API: uploads (`prefixserve upload`) and the admin CLI
(`prefixserve prefixes ...`) share it.

- The API key comes from `PREFIXSERVE_API_KEY` or a key file (`PREFIXSERVE_API_KEY_FILE` or a path
  given on the command line), never from a command-line value: command lines are visible to every
  user of the machine (`ps`) and land in shell history. `resolve_api_key` takes the environment as an
  argument: only the CLI entry point reads it.
- Retries: 429 and 503 mean "not now" (overloaded, rate limited, draining, store briefly down). The
  client waits for the server's `Retry-After` (seconds or an HTTP date, capped at `max_wait_s`), else
  for an exponential backoff with jitter, and tries again, `retries` times at most. Connection errors
  are retried only for GET/DELETE: a POST that may have reached the server is not repeated blindly.
- Errors: non-2xx answers raise `UploadError` with the status and the server's `{"error", "error_type"}`.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

RETRY_STATUSES = frozenset({429, 503})
IDEMPOTENT_METHODS = frozenset({"GET", "DELETE", "HEAD"})
API_KEY_ENV = "PREFIXSERVE_API_KEY"
API_KEY_FILE_ENV = "PREFIXSERVE_API_KEY_FILE"


class UploadError(RuntimeError):
    """The server refused the request (or could not be reached); the message says why."""

    def __init__(self, message: str, status_code: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


def resolve_api_key(environ: Mapping[str, str], key_file: str | Path | None = None) -> str | None:
    """The key: `$PREFIXSERVE_API_KEY`, else the first line of `key_file` / `$PREFIXSERVE_API_KEY_FILE`.

    None when neither is set (a single-tenant server needs no key). Raises `UploadError` for a key file
    that cannot be read or is empty, rather than silently sending no key.
    """
    if environ.get(API_KEY_ENV):
        return environ[API_KEY_ENV].strip()
    path = key_file or environ.get(API_KEY_FILE_ENV)
    if not path:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UploadError(f"cannot read the API key file {path}: {exc.strerror}") from None
    if not key:
        raise UploadError(f"the API key file {path} is empty")
    return key.splitlines()[0].strip()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date (RFC 9110); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ApiClient:
    """A small retrying HTTP client for one server and key (see the module docstring)."""

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_wait_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.base = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.on_retry = on_retry

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        told = retry_after_seconds(response.headers.get("retry-after")) if response is not None else None
        if told is not None:
            return min(told, self.max_wait_s)
        # Full jitter: clients told "not now" at the same moment should not all come back together.
        return random.uniform(0.5, 1.0) * min(self.backoff_s * 2**attempt, self.max_wait_s)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send, retrying 429/503 (and connection errors of idempotent methods); raise on non-2xx."""
        url = self.base + path
        for attempt in range(self.retries + 1):
            response: httpx.Response | None = None
            try:
                response = httpx.request(method, url, headers=self.headers, timeout=self.timeout_s, **kwargs)
            except httpx.HTTPError as exc:
                if method.upper() not in IDEMPOTENT_METHODS or attempt == self.retries:
                    raise UploadError(f"could not reach {url}: {exc}") from exc
                reason = f"could not reach {url} ({type(exc).__name__})"
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    break
                reason = f"HTTP {response.status_code}"
            wait = self._wait(attempt, response)
            if self.on_retry is not None:
                self.on_retry(f"{method} {path}: {reason}; retrying in {wait:.1f}s")
            self.sleep(wait)
        assert response is not None
        if not response.is_success:
            raise _error(method, url, response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return {"status_code": response.status_code, "text": response.text}


def _error(method: str, url: str, response: httpx.Response) -> UploadError:
    error, error_type = response.text.strip() or response.reason_phrase, None
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = body.get("error", body.get("detail", error))
            if isinstance(detail, dict):  # OpenAI's nested shape
                error_type, detail = detail.get("type"), detail.get("message", detail)
            else:
                error_type = body.get("error_type")
            error = str(detail)
    except ValueError:
        pass  # not JSON: report the raw text
    kind = f" ({error_type})" if error_type else ""
    return UploadError(
        f"{method} {url} failed: HTTP {response.status_code}{kind}: {error}",
        status_code=response.status_code,
        error_type=error_type,
    )


def upload_files(client: ApiClient, task: str, path: str | Path) -> dict[str, Any]:
    """Upload an artifact file, or a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    path = Path(path)
    if path.is_dir():
        files = {
            name: (filename, (path / filename).read_bytes(), "application/octet-stream")
            for name, filename in (
                ("adapter_config", "adapter_config.json"),
                ("adapter_model", "adapter_model.safetensors"),
            )
        }
    else:
        files = {"artifact": (path.name, path.read_bytes(), "application/octet-stream")}
    return client.json("POST", "/v1/prefixes", data={"task": task}, files=files)


def upload_artifact(
    server: str,
    task: str,
    artifact_path: str | Path,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    retries: int = 5,
) -> dict[str, Any]:
    """Upload `artifact_path` (a file or a PEFT folder) as the new current version of `task`."""
    return upload_files(ApiClient(server, api_key, timeout_s, retries), task, artifact_path)
