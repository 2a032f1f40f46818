"""A Redis master, its replicas and three Sentinels as local processes (tests and the fleet load test).

`SentinelCluster(workdir).start()` runs, on free loopback ports, `redis-server` as master, `replicas`
`redis-server --replicaof` and three `redis-server --sentinel` (Debian's redis-server binary; the
redis-sentinel package only adds a service unit). Sentinels watch the master as `service` with quorum
2, `down-after-milliseconds` `down_after_ms` and a short failover timeout, so a killed master is
replaced within a few seconds. The master refuses writes unless a replica is connected
(`min-replicas-to-write 1`); with `WAIT` on every store write (`redis_min_replicas=1`) an
acknowledged write is on a replica before the client hears "ok".

`url` is the `redis+sentinel://` URL the server reads (`prefix_store.redis_connect`);
`kill_master()` SIGKILLs the current master (found by asking a sentinel) and `wait_for_failover()`
returns once the sentinels name a new one. `stop()` ends every process this object started.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from loadtest.process import ChildProcess, free_port

SENTINELS = 3
QUORUM = 2


def _command(port: int, *args: str, timeout_s: float = 1.0) -> bytes:
    """One inline command to a loopback Redis or Sentinel; the raw reply ("" on failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            s.settimeout(timeout_s)
            return s.recv(65536)
    except OSError:
        return b""


class SentinelCluster:
    """See the module docstring."""

    def __init__(
        self,
        workdir: Path,
        replicas: int = 1,
        service: str = "prefixserve",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not on PATH (apt-get install redis-server)")
        self.exe = exe
        self.workdir = workdir
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.data_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(SENTINELS)]
        self.servers: dict[int, ChildProcess] = {}
        self.sentinels: list[ChildProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    # ---- processes ------------------------------------------------------------------------
    def _server(self, port: int, replica_of: int | None) -> ChildProcess:
        data = self.workdir / f"redis-{port}"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            self.exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
            "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        return ChildProcess(args, data / "redis.log")

    def _sentinel(self, port: int) -> ChildProcess:
        conf = self.workdir / f"sentinel-{port}.conf"  # a sentinel rewrites its config: one file each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.data_ports[0]} {QUORUM}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return ChildProcess([self.exe, str(conf), "--sentinel"], self.workdir / f"sentinel-{port}.log")

    def start(self, timeout_s: float = 30.0) -> SentinelCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        master = self.data_ports[0]
        for port in self.data_ports:
            self.servers[port] = self._server(port, None if port == master else master).start()
        for port in self.data_ports:
            self.servers[port].wait_until(
                lambda p=port: _command(p, "PING").startswith(b"+PONG"), timeout_s, f"redis {port}"
            )  # type: ignore[misc]
        self.wait_until(
            lambda: self.connected_replicas(master) == len(self.data_ports) - 1, timeout_s, "replication"
        )
        for port in self.sentinel_ports:
            self.sentinels.append(self._sentinel(port).start())
        # Every sentinel knows the master and has found the other sentinels (so a quorum can form).
        self.wait_until(
            lambda: all(self.sentinel_info(p).get("sentinels", 0) == SENTINELS for p in self.sentinel_ports),
            timeout_s,
            "sentinels to find each other",
        )
        return self

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.stop(timeout_s=5)

    # ---- state ----------------------------------------------------------------------------
    @staticmethod
    def wait_until(ready, timeout_s: float, what: str, poll_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def sentinel_info(self, port: int) -> dict[str, int]:
        """`INFO sentinel`'s line for our master: {"sentinels": n, "slaves": n} (empty if unknown)."""
        reply = _command(port, "INFO", "sentinel").decode(errors="replace")
        for line in reply.splitlines():
            if line.startswith("master0:"):
                fields = dict(f.split("=", 1) for f in line.split(":", 1)[1].split(","))
                return {k: int(v) for k, v in fields.items() if k in ("sentinels", "slaves")}
        return {}

    def master_port(self) -> int | None:
        """The master's port as the sentinels name it now (the first sentinel that answers)."""
        for port in self.sentinel_ports:
            reply = _command(port, "SENTINEL", "get-master-addr-by-name", self.service).decode(
                errors="replace"
            )
            lines = [line for line in reply.splitlines() if line and line[0] not in "*$"]
            if len(lines) == 2 and lines[1].isdigit():
                return int(lines[1])
        return None

    def connected_replicas(self, port: int) -> int:
        reply = _command(port, "INFO", "replication").decode(errors="replace")
        for line in reply.splitlines():
            if line.startswith("connected_slaves:"):
                return int(line.split(":")[1])
        return -1

    def role(self, port: int) -> str:
        reply = _command(port, "ROLE").decode(errors="replace")
        return "master" if "master" in reply.splitlines()[1:2][0] else "replica" if reply else "down"

    # ---- faults ---------------------------------------------------------------------------
    def kill_master(self) -> int:
        """SIGKILL the current master (no shutdown, no final sync: a crash); returns its port."""
        port = self.master_port()
        assert port is not None, "no master known to the sentinels"
        process = self.servers[port]
        assert process.proc is not None
        process.proc.kill()
        process.proc.wait(timeout=10)
        process.stop()
        return port

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the sentinels name a master other than `old_port` and it accepts writes; its port."""
        self.wait_until(lambda: self.master_port() not in (None, old_port), timeout_s, "a new master")
        new = self.master_port()
        assert new is not None
        self.wait_until(
            lambda: _command(new, "ROLE").find(b"master") >= 0, timeout_s, "the new master's role"
        )
        return new

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start a killed server again (the sentinels reconfigure it as a replica of the new master)."""
        self.servers[port] = self._server(port, None).start()
        self.servers[port].wait_until(
            lambda: _command(port, "PING").startswith(b"+PONG"), timeout_s, f"redis {port}"
        )
