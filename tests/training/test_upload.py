"""The upload client against a real (stdlib) HTTP server: request shape and error reporting."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training.upload import UploadError, upload_artifact


class _Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (stdlib API)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Handler.seen.append(
            {
                "path": self.path,
                "auth": self.headers.get("Authorization", ""),
                "type": self.headers["Content-Type"],
                "body": body.decode("latin-1"),
            }
        )
        ok = self.headers.get("Authorization") == "Bearer good"
        status, answer = (
            (201, {"task": "t", "version": 1})
            if ok
            else (401, {"error": "bad key", "error_type": "authentication"})
        )
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_upload_sends_multipart_with_bearer_and_reports_errors(server: str, tmp_path: Path) -> None:
    art = tmp_path / "artifact.safetensors"
    art.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert upload_artifact(server, "t", art, "good") == {"task": "t", "version": 1}
    req = _Handler.seen[-1]
    assert req["path"] == "/v1/prefixes" and req["auth"] == "Bearer good"
    assert req["type"].startswith("multipart/form-data")
    assert 'name="task"' in req["body"] and 'name="artifact"; filename="artifact.safetensors"' in req["body"]
    with pytest.raises(UploadError) as exc:
        upload_artifact(server, "t", art, "bad")
    assert exc.value.status_code == 401 and exc.value.error_type == "authentication"
    assert "HTTP 401 (authentication): bad key" in str(exc.value)
