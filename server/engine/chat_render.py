"""Chat templates rendered in a small pool of worker processes, each render with a hard deadline.

A template is code a tenant uploaded. Rendered in the server's process it could hold the event loop
(or a thread, which cannot be stopped) and the server's memory for as long as it likes. Here:

- each render runs in a worker process (`server.engine.chat_render_worker`) whose address space is
  capped (`chat_template_max_memory_bytes` above its warm size) and that runs at a lower CPU priority;
- a render that is not done within `chat_template_timeout_s` has its worker killed (and replaced);
- a rendered prompt longer than the caller's bound (the model's prompt limit) is refused;
- one tenant holds at most `workers - 1` workers at a time (all of them when there is one), counting
  a worker it got killed until the replacement is ready, so another tenant always finds a worker;
- a caller waits at most `wait_s` for a free worker.

Workers start on the first render (a server that never renders chat templates never pays for them).
Torch-free and fastapi-free: the API layer drives it; the refusals are `ChatRenderError`s whose
`reason` the API turns into a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

WORKER_MODULE = "server.engine.chat_render_worker"  # run, never imported here (it imports transformers)
FRAME_HEADER = struct.Struct(">I")  # each message: this length, then that many bytes of JSON
WORKER_START_TIMEOUT_S = 120.0  # python + transformers' chat-template module on a loaded machine
# A template whose loops over literal ranges run more often than this is refused at upload.
STATIC_MAX_ITERATIONS = 1_000_000


class ChatRenderError(Exception):
    """A render refused or failed. `reason`: "template" (the template failed on these inputs),
    "timeout", "memory", "output" (too long a prompt), "busy" (no worker free in time), "tenant"
    (the tenant already holds its share of the workers) or "unavailable" (workers cannot start)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RenderLimits:
    workers: int
    timeout_s: float
    memory_bytes: int
    wait_s: float  # longest wait for a free worker


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, memory_bytes: int) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            WORKER_MODULE,
            str(memory_bytes),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        try:
            ready = await asyncio.wait_for(worker.read(), WORKER_START_TIMEOUT_S)
        except BaseException:
            worker.kill()
            raise
        if not ready.get("ready"):
            worker.kill()
            raise RuntimeError(f"chat render worker did not start: {ready}")
        return worker

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(FRAME_HEADER.size)
        (length,) = FRAME_HEADER.unpack(header)
        return dict(json.loads(await self.proc.stdout.readexactly(length)))

    async def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        data = json.dumps(request).encode()
        self.proc.stdin.write(FRAME_HEADER.pack(len(data)) + data)
        await self.proc.stdin.drain()
        return await asyncio.wait_for(self.read(), timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class _Slot:
    """One of a tenant's held workers; freed once (by the render, or by the worker's replacement)."""

    def __init__(self, held: dict[str, int], tenant: str) -> None:
        self._held = held
        self._tenant = tenant
        self._released = False
        self.handed_over = False  # a replacement worker frees it when ready

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held[self._tenant] -= 1
        if not self._held[self._tenant]:
            del self._held[self._tenant]


class ChatRenderPool:
    """`await render(tenant, ...)` / `await check(template)`; `await close()` at shutdown."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._held: dict[str, int] = {}  # tenant -> workers it holds (rendering, or being replaced)
        self._starting: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._last_start_error: str | None = None

    @property
    def tenant_share(self) -> int:
        return max(1, self.limits.workers - 1)

    async def render(
        self,
        tenant: str,
        template: str,
        messages: list[dict[str, Any]],
        variables: dict[str, Any],
        add_generation_prompt: bool,
        continue_final_message: bool,
        max_chars: int,
    ) -> str:
        request = {
            "template": template,
            "messages": messages,
            "variables": variables,
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "max_chars": max_chars,
        }
        answer = await self._run(tenant, request)
        if "text" not in answer:
            raise ChatRenderError(str(answer.get("reason", "template")), str(answer.get("error")))
        return str(answer["text"])

    async def check(self, tenant: str, template: str) -> None:
        """Compile `template` (syntax and tags) in a worker; `ChatRenderError` ("template") if it
        does not compile."""
        answer = await self._run(
            tenant, {"check": True, "template": template, "max_iterations": STATIC_MAX_ITERATIONS}
        )
        if not answer.get("ok"):
            raise ChatRenderError(str(answer.get("reason", "template")), str(answer.get("error")))

    async def _run(self, tenant: str, request: dict[str, Any]) -> dict[str, Any]:
        if self._closed:
            raise ChatRenderError("unavailable", "the server is shutting down")
        if self._held.get(tenant, 0) >= self.tenant_share:
            raise ChatRenderError(
                "tenant", f"this tenant already renders {self.tenant_share} chat template(s) at once"
            )
        self._ensure_started()
        self._held[tenant] = self._held.get(tenant, 0) + 1
        slot = _Slot(self._held, tenant)
        try:
            worker = await self._take_worker()
            try:
                answer = await worker.call(request, self.limits.timeout_s)
            except (TimeoutError, asyncio.TimeoutError):
                self._replace(worker, slot)  # the slot is freed once the replacement is ready
                raise ChatRenderError(
                    "timeout", f"the chat template did not render within {self.limits.timeout_s:g} s"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError):
                self._replace(worker, slot)
                raise ChatRenderError(
                    "memory", "the chat template's rendering was stopped (it exceeded the worker's limits)"
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

    async def _take_worker(self) -> _Worker:
        deadline = asyncio.get_running_loop().time() + self.limits.wait_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if not self._workers and not self._starting:
                raise ChatRenderError(
                    "unavailable", f"chat template workers cannot start: {self._last_start_error}"
                )
            try:
                worker = await asyncio.wait_for(self._idle.get(), max(remaining, 0.0))
            except (TimeoutError, asyncio.TimeoutError):
                raise ChatRenderError(
                    "busy", f"no chat template worker became free within {self.limits.wait_s:g} s"
                ) from None
            if worker.alive:
                return worker
            self._workers.discard(worker)  # died while idle (killed from outside): replace it
            self._spawn(None)

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            for _ in range(self.limits.workers):
                self._spawn(None)

    def _replace(self, worker: _Worker, slot: _Slot) -> None:
        worker.kill()
        self._workers.discard(worker)
        slot.handed_over = True
        self._spawn(slot)

    def _spawn(self, slot: _Slot | None) -> None:
        task = asyncio.ensure_future(self._start_one(slot))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_one(self, slot: _Slot | None) -> None:
        try:
            worker = await _Worker.start(self.limits.memory_bytes)
        except Exception as exc:
            self._last_start_error = f"{type(exc).__name__}: {exc}"
            logger.error("chat render worker failed to start", extra={"error": self._last_start_error})
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
        for worker in self._workers:
            worker.kill()
            with contextlib.suppress(Exception):
                await worker.proc.wait()
        self._workers.clear()
