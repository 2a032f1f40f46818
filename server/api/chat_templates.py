"""Chat templates as the API uses them: which template applies, rendering it in the worker pool
(`server.engine.chat_render`: deadline, memory cap, never in this process), the check made at upload,
and what each refusal is as an HTTP answer.

A template is a tenant's code, so its rendering is that tenant's work: the chat route takes the
tenant's rate-limit lease (concurrency, rate) before rendering, and admission has already checked the
queue before the body was read. A render that runs out of time, memory or prompt length is the
request's fault: 422 naming the bound. No free worker within the queue timeout, or a tenant that
already holds its share of the workers: 429 with Retry-After.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.deps import AppState
from server.api.errors import ApiError
from server.api.prefix_admin import store_call
from server.engine.chat_render import ChatRenderError

# Keys of `chat_template_kwargs` that are not template variables but `apply_chat_template`'s own
# parameters (or features documented as refused): a 422, never passed on.
REFUSED_TEMPLATE_KWARGS = {
    "tools": "tool calling is not supported",
    "documents": "documents (RAG templates) are not supported",
    "chat_template": "per-request templates are not accepted",
    "messages": "messages come from the request's `messages`",
    "conversation": "messages come from the request's `messages`",
    "add_generation_prompt": "set it as a request field",
    "continue_final_message": "set it as a request field",
    "tokenize": "not a template variable",
    "return_dict": "not a template variable",
    "return_assistant_tokens_mask": "not a template variable",
}

_STATUS = {
    "template": (400, "invalid_request_error"),
    "timeout": (422, "validation"),
    "memory": (422, "validation"),
    "output": (422, "validation"),
    "busy": (429, "overloaded"),
    "tenant": (429, "rate_limited"),
    "unavailable": (503, "unavailable"),
}


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    refused = [key for key in (kwargs or {}) if key in REFUSED_TEMPLATE_KWARGS]
    if refused:
        reasons = "; ".join(f"{key}: {REFUSED_TEMPLATE_KWARGS[key]}" for key in refused)
        raise ApiError(
            422, f"chat_template_kwargs may not set {', '.join(refused)} ({reasons})", "validation"
        )
    return dict(kwargs or {})


async def chat_template(state: AppState, tenant: str, task: str | None) -> str:
    """The task's template, else the server's; 400 when there is none."""
    if task is not None:
        with store_call(state, "describe"):
            info = await state.store.describe(tenant, task)
        training = info.current.metadata.get("training") or {}
        if isinstance(training, dict) and isinstance(training.get("chat_template"), str):
            return str(training["chat_template"])
    if state.config.chat_template is None:
        raise ApiError(
            400,
            "this model has no chat template: set PREFIXSERVE_CHAT_TEMPLATE to a Jinja template file, or "
            "store `chat_template` in the task's artifact metadata; or use /v1/completions",
            "invalid_request_error",
        )
    return state.config.chat_template


def _special_tokens(state: AppState) -> dict[str, Any]:
    """`bos_token`, `eos_token`... as `apply_chat_template` gives them to the template (plain JSON)."""
    tokens = getattr(state.engine.tokenizer, "special_tokens_map", None) or {}
    return dict(json.loads(json.dumps(tokens, default=str)))


def _refusal(exc: ChatRenderError) -> ApiError:
    status, error_type = _STATUS.get(exc.reason, (400, "invalid_request_error"))
    if exc.reason == "template":
        return ApiError(status, f"the chat template failed on these messages: {exc}", error_type)
    retry_after = 1 if status in (429, 503) else None
    return ApiError(status, f"chat template refused: {exc}", error_type, retry_after=retry_after)


async def render(
    state: AppState,
    tenant: str,
    template: str,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> str:
    """`messages` -> prompt text, exactly as transformers' `apply_chat_template(tokenize=False)`
    renders it, within the render bounds (see the module docstring)."""
    try:
        return await state.chat_renderer.render(
            tenant,
            template,
            messages,
            {**_special_tokens(state), **kwargs},  # kwargs win, as in apply_chat_template
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            max_chars=state.max_prompt_chars,
        )
    except ChatRenderError as exc:
        raise _refusal(exc) from None


async def check_uploaded_template(state: AppState, tenant: str, metadata: dict[str, Any]) -> None:
    """At upload: a `chat_template` in the training metadata must compile and must not loop over
    literal ranges beyond the static bound (422 otherwise; what only a render can tell is bounded then)."""
    training = metadata.get("training") or {}
    template = training.get("chat_template") if isinstance(training, dict) else None
    if template is None:
        return
    if not isinstance(template, str):
        raise ApiError(422, "training metadata `chat_template` must be a string", "validation")
    try:
        await state.chat_renderer.check(tenant, template)
    except ChatRenderError as exc:
        if exc.reason != "template":
            raise _refusal(exc) from None
        raise ApiError(422, f"the artifact's chat_template is refused: {exc}", "validation") from None
