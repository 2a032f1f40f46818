"""The real-server fixtures of tests/reliability, for CLI tests against a running server."""

from tests.reliability.conftest import spawn_server  # noqa: F401
