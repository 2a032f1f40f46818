"""The multi-replica load test (`loadtest.fleet`) with its assertions. Marker `fleet` (minutes of
three server processes, HAProxy and a Sentinel failover): `pytest -m fleet tests/loadtest/test_fleet.py`
or `make test-fleet`; its report is committed in docs/bench/fleet-cpu-report.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtest import fleet

pytestmark = pytest.mark.fleet


@pytest.mark.timeout(1800)
def test_fleet_survives_a_replica_restart_and_a_redis_failover(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy not on PATH: apt-get install haproxy (.ci/run installs it)")
    result = fleet.run(tmp_path, tiny_gpt2_dir)
    print(fleet.report_markdown(result, "pytest -m fleet tests/loadtest/test_fleet.py"))
    # Nothing failed for good: a killed replica and a Redis failover cost at most retries.
    for kind in ("generations", "uploads"):
        assert result[kind]["failed"] == 0, result[kind]
        assert result[kind]["ok"] > 0, result[kind]
    # The warm-started replica's first requests for the most used tasks read nothing from the store;
    # the cold one's each read their task's blob.
    cold, warm = result["restart_cold"], result["restart_warm"]
    assert cold["request_store_reads"] == fleet.WARM_TASKS and cold["warm_store_reads"] == 0
    assert warm["request_store_reads"] == 0 and warm["warm_store_reads"] == fleet.WARM_TASKS
    # Every replica read what it served from the store, no more than its share many times over.
    assert all(v > 0 for v in result["store_bytes_read"].values()), result["store_bytes_read"]
