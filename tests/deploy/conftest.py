"""The real-server fixtures of tests/reliability, for the end-to-end monitoring test."""

from tests.reliability.conftest import long_gpt2_dir, long_spec, spawn_server  # noqa: F401
