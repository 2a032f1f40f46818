"""A small pool of worker processes for work whose cost a tenant controls, each call with a hard deadline.

Chat templates (`chat_render`) and grammars for structured output (`grammar`) are inputs a tenant
wrote: rendering or compiling one can run for minutes or allocate gigabytes. Run in the server's
process it could hold the event loop (or a thread, which cannot be stopped) and the server's memory.
Here:

- each call runs in a worker process (`python -m <module>`, its main is `run_worker`) whose address
  space is capped (`memory_bytes` above its warm size) and that runs at a lower CPU priority;
- a call that is not done within `timeout_s` has its worker killed (and replaced);
- one tenant holds at most `workers - 1` workers at a time (all of them when there is one), counting
  a worker it got killed until the replacement is ready, so another tenant always finds a worker; a
  call beyond the tenant's share is refused ("tenant"), or with `tenant_waits` waits for the tenant's
  own calls to end;
- a caller waits at most `wait_s` for a free worker (and for its tenant's share).

Workers start on the first call (a server that never needs them never pays for them). Torch-free and
fastapi-free: the refusals are `WorkerError`s (the pool's `error` class) whose `reason` the caller
turns into a status: "timeout", "memory", "busy" (no worker free in time), "tenant" (the tenant
already holds its share) or "unavailable" (workers cannot start), or the worker's own reasons.

Protocol on stdin/stdout: frames of a 4-byte big-endian length and UTF-8 JSON. A pool with an `init`
payload sends it as the first frame; the worker then answers `{"ready": true}` and one reply per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct(">I")  # each message: this length, then that many bytes of JSON
WORKER_START_TIMEOUT_S = 120.0  # python + the worker's imports on a loaded machine
NICENESS = 10  # workers run below the server's own priority (the engine's steps come first)


class WorkerError(Exception):
    """A call refused or failed; `reason` says why (see the module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PoolLimits:
    workers: int
    timeout_s: float
    memory_bytes: int
    wait_s: float  # longest wait for a free worker


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, module: str, memory_bytes: int, init: dict[str, Any] | None, spawned: set[_Worker]
    ) -> _Worker:
        """Spawn a worker (added to `spawned` at once, so a pool closing meanwhile still reaps it) and
        wait for its `{"ready": true}`."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            str(memory_bytes),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        spawned.add(worker)
        try:
            if init is not None:
                await worker.send(init)
            ready = await asyncio.wait_for(worker.read(), WORKER_START_TIMEOUT_S)
        except BaseException:
            worker.kill()
            raise
        if not ready.get("ready"):
            worker.kill()
            raise RuntimeError(f"worker {module} did not start: {ready}")
        return worker

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(FRAME_HEADER.size)
        (length,) = FRAME_HEADER.unpack(header)
        return dict(json.loads(await self.proc.stdout.readexactly(length)))

    async def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        data = json.dumps(request).encode()
        self.proc.stdin.write(FRAME_HEADER.pack(len(data)) + data)
        await self.proc.stdin.drain()

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        await self.send(request)
        return await asyncio.wait_for(self.read(), timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class _Slot:
    """One of a tenant's held workers; freed once (by the call, or by the worker's replacement)."""

    def __init__(self, held: dict[str, int], tenant: str, freed: asyncio.Event) -> None:
        self._held = held
        self._tenant = tenant
        self._freed = freed
        self._released = False
        self.handed_over = False  # a replacement worker frees it when ready

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held[self._tenant] -= 1
        if not self._held[self._tenant]:
            del self._held[self._tenant]
        self._freed.set()


class WorkerPool:
    """`await call(tenant, request)`; `await close()` at shutdown. `what` names the work in messages
    ("chat template"), `verb` what a call does to it ("render")."""

    error: type[WorkerError] = WorkerError

    def __init__(
        self,
        limits: PoolLimits,
        module: str,
        what: str,
        verb: str,
        init: dict[str, Any] | None = None,
        tenant_waits: bool = False,
    ) -> None:
        self.limits = limits
        self.module = module
        self.what = what
        self.verb = verb
        self.init = init  # the first frame every worker gets (may be set until the first call)
        self.tenant_waits = tenant_waits
        self._slot_freed = asyncio.Event()
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._spawned: set[_Worker] = set()  # every process started and not yet reaped
        self._reapers: set[asyncio.Task[None]] = set()
        self._held: dict[str, int] = {}  # tenant -> workers it holds (calling, or being replaced)
        self._starting: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._last_start_error: str | None = None

    @property
    def tenant_share(self) -> int:
        return max(1, self.limits.workers - 1)

    async def call(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        """The worker's answer to `request`; `error` for the pool's refusals (see the module docstring)."""
        if self._closed:
            raise self.error("unavailable", "the server is shutting down")
        deadline = asyncio.get_running_loop().time() + self.limits.wait_s
        await self._wait_for_share(tenant, deadline)
        self._ensure_started()
        self._held[tenant] = self._held.get(tenant, 0) + 1
        slot = _Slot(self._held, tenant, self._slot_freed)
        try:
            worker = await self._take_worker(deadline)
            try:
                answer = await worker.call(request, self.limits.timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                self._replace(worker, slot)  # the slot is freed once the replacement is ready
                raise self.error(
                    "timeout", f"the {self.what} did not {self.verb} within {self.limits.timeout_s:g} s"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError):
                self._replace(worker, slot)
                raise self.error(
                    "memory", f"the {self.what} was stopped (it exceeded the worker's limits)"
                ) from None
            except BaseException:  # cancelled mid-call (the client went away): the worker's state is unknown
                self._replace(worker, slot)
                raise
            if answer.get("reason") == "memory":
                self._replace(worker, slot)  # it exits by itself after a MemoryError
            else:
                self._idle.put_nowait(worker)
            return answer
        finally:
            if not slot.handed_over:
                slot.release()

    async def _wait_for_share(self, tenant: str, deadline: float) -> None:
        while self._held.get(tenant, 0) >= self.tenant_share:
            if not self.tenant_waits:
                raise self.error(
                    "tenant",
                    f"this tenant already has {self.tenant_share} {self.what}(s) in progress at once",
                )
            self._slot_freed.clear()
            try:
                remaining = deadline - asyncio.get_running_loop().time()
                await asyncio.wait_for(self._slot_freed.wait(), max(remaining, 0.0))
            except (TimeoutError, asyncio.TimeoutError):
                raise self.error(
                    "busy", f"this tenant's earlier {self.what}s did not end within {self.limits.wait_s:g} s"
                ) from None

    async def _take_worker(self, deadline: float) -> _Worker:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if not self._workers and not self._starting:
                raise self.error("unavailable", f"{self.what} workers cannot start: {self._last_start_error}")
            try:
                worker = await asyncio.wait_for(self._idle.get(), max(remaining, 0.0))
            except (TimeoutError, asyncio.TimeoutError):
                raise self.error(
                    "busy", f"no {self.what} worker became free within {self.limits.wait_s:g} s"
                ) from None
            if worker.alive:
                return worker
            self._retire(worker)  # died while idle (killed from outside): replace it
            self._spawn(None)

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            for _ in range(self.limits.workers):
                self._spawn(None)

    def _replace(self, worker: _Worker, slot: _Slot) -> None:
        self._retire(worker)
        slot.handed_over = True
        self._spawn(slot)

    def _retire(self, worker: _Worker) -> None:
        """Kill `worker` and reap its process in the background (forgotten once it exited)."""
        worker.kill()
        self._workers.discard(worker)

        async def reap() -> None:
            with contextlib.suppress(Exception):
                await worker.proc.wait()
            self._spawned.discard(worker)

        self._reapers.add(task := asyncio.ensure_future(reap()))
        task.add_done_callback(self._reapers.discard)

    def _spawn(self, slot: _Slot | None) -> None:
        task = asyncio.ensure_future(self._start_one(slot))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self, slot: _Slot | None) -> None:
        try:
            worker = await _Worker.start(self.module, self.limits.memory_bytes, self.init, self._spawned)
        except Exception as exc:
            self._last_start_error = f"{type(exc).__name__}: {exc}"
            logger.error(f"{self.what} worker failed to start", extra={"error": self._last_start_error})
            return
        finally:
            if slot is not None:
                slot.release()
        if self._closed:
            worker.kill()
            return
        self._workers.add(worker)
        self._idle.put_nowait(worker)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)
        # Every process not reaped yet, starting ones too: reaped here, while the event loop still runs
        # (a transport collected after the loop closed would complain).
        await asyncio.gather(*self._reapers, return_exceptions=True)
        for worker in list(self._spawned):
            worker.kill()
            with contextlib.suppress(Exception):
                await worker.proc.wait()
        self._workers.clear()
        self._spawned.clear()


# ---- the worker side -------------------------------------------------------------------------------


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None  # the server closed the pipe: exit
    (length,) = FRAME_HEADER.unpack(header)
    return dict(json.loads(stream.read(length)))


def write_frame(stream: BinaryIO, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()  # ASCII: a lone surrogate travels escaped
    stream.write(FRAME_HEADER.pack(len(data)) + data)
    stream.flush()


def _virtual_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_worker(
    answer: Callable[[dict[str, Any]], dict[str, Any]],
    warm: Callable[[dict[str, Any] | None], None],
    takes_init: bool = False,
) -> None:
    """A worker's main: lower priority, read the init frame (`takes_init`), `warm(init)` (import and
    exercise everything before the cap, so the cap is for the request alone), cap the address space
    at argv[1] bytes above the warm size, then answer frames until stdin closes. A `"reason": "memory"`
    answer ends the worker (its heap may be fragmented near the cap; the pool starts a fresh one).
    stdout is kept for the frames only (anything the work prints goes to stderr)."""
    os.nice(NICENESS)  # first: even start-up (imports) yields to the server
    memory_bytes = int(sys.argv[1])
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the frames
    frames_in = sys.stdin.buffer
    warm(read_frame(frames_in) if takes_init else None)
    if memory_bytes > 0:
        cap = _virtual_bytes() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    write_frame(frames_out, {"ready": True})
    while (request := read_frame(frames_in)) is not None:
        reply = answer(request)
        write_frame(frames_out, reply)
        if reply.get("reason") == "memory":
            return
