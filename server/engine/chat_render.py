"""Chat templates rendered in a small pool of worker processes, each render with a hard deadline.

A template is code a tenant uploaded; `worker_pool.WorkerPool` runs it where it cannot hold the
server: each render in a worker process (`server.engine.chat_render_worker`) whose address space is
capped (`chat_template_max_memory_bytes` above its warm size), killed after `chat_template_timeout_s`,
one tenant holding at most all but one of the workers. A rendered prompt longer than the caller's bound
(the model's prompt limit) is refused too.

Torch-free and fastapi-free: the API layer drives it; the refusals are `ChatRenderError`s whose
`reason` the API turns into a status ("template": the template failed on these inputs, "output": too
long a prompt, and the pool's reasons).
"""

from __future__ import annotations

from typing import Any

from server.engine.worker_pool import PoolLimits, WorkerError, WorkerPool

WORKER_MODULE = "server.engine.chat_render_worker"  # run, never imported here (it imports transformers)
# A template whose loops over literal ranges run more often than this is refused at upload.
STATIC_MAX_ITERATIONS = 1_000_000

RenderLimits = PoolLimits


class ChatRenderError(WorkerError):
    """A render refused or failed (see the module docstring for `reason`)."""


class ChatRenderPool(WorkerPool):
    """`await render(tenant, ...)` / `await check(template)`; `await close()` at shutdown."""

    error = ChatRenderError

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(limits, WORKER_MODULE, "chat template", "render")

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
        answer = await self.call(tenant, request)
        if "text" not in answer:
            raise ChatRenderError(str(answer.get("reason", "template")), str(answer.get("error")))
        return str(answer["text"])

    async def check(self, tenant: str, template: str) -> None:
        """Compile `template` (syntax and tags) in a worker; `ChatRenderError` ("template") if it
        does not compile."""
        answer = await self.call(
            tenant, {"check": True, "template": template, "max_iterations": STATIC_MAX_ITERATIONS}
        )
        if not answer.get("ok"):
            raise ChatRenderError(str(answer.get("reason", "template")), str(answer.get("error")))
