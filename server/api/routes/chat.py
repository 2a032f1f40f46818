"""OpenAI `POST /v1/chat/completions` (streaming too) for models without a chat template of their own.

GPT-2 and BART have no chat format, so `messages` are rendered with a Jinja chat template: the task's
own (`chat_template` in its artifact's training metadata), else the server's (`PREFIXSERVE_CHAT_TEMPLATE`,
a file, vLLM's `--chat-template` convention). It is rendered as transformers' `apply_chat_template`
renders it (sandboxed Jinja, `bos_token`/`eos_token`, `add_generation_prompt`), so a template behaves
here as it does in transformers and vLLM, but in a worker process with a deadline and a memory cap
(`server.api.chat_templates`). With neither configured the answer is 400 saying so, as vLLM does.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from server.api.chat_templates import chat_template, check_template_kwargs, render
from server.api.deps import AppState, Caller, State
from server.api.generation import Completed, TokenInfo, collect_all_unless_disconnected
from server.api.openai_schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.api.routes.openai import (
    OPENAI_ERRORS,
    best,
    finish_reason,
    model_task,
    sampling,
    start_sequences,
    stream_chunks,
    usage,
)
from server.api.sse import SSE_CONTENT, sse_response
from server.api.tokens import check_fields, token_text
from server.engine.types import StreamEvent
from server.logging import current_request_id

router = APIRouter(tags=["openai"])


def _logprobs(state: AppState, tokens: list[TokenInfo], top_n: int) -> ChatLogprobs:
    content = []
    for t in tokens:
        alternatives = [(token_text(state, i), lp) for i, lp in t.top[:top_n]]
        content.append(
            TokenLogprob(
                token=t.text,
                logprob=t.logprob if t.logprob is not None else 0.0,
                bytes=list(t.text.encode()),
                top_logprobs=[
                    TopLogprob(token=s, logprob=lp, bytes=list(s.encode())) for s, lp in alternatives
                ],
            )
        )
    return ChatLogprobs(content=content)


def _event_token(event: StreamEvent) -> list[TokenInfo]:
    if event.token_id is None:
        return []
    return [TokenInfo(event.token_id, event.text, event.token_logprob, False, list(event.top_tokens))]


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": SSE_CONTENT}, **OPENAI_ERRORS},
)
async def chat_completions(
    request: Request, state: State, caller: Caller, body: ChatCompletionRequest
) -> Any:
    """A chat completion; `stream: true` for `chat.completion.chunk` SSE events ending with [DONE]."""
    check_fields(body, "/v1/chat/completions", strict=False)
    task = model_task(state, body.model)
    kwargs = check_template_kwargs(body.chat_template_kwargs)
    # The parameters first: a refused one (a constraint that cannot be served...) costs no render.
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    max_tokens = body.max_completion_tokens or body.max_tokens or state.spec.max_positions
    n = body.n or 1
    params = sampling(body, max_tokens, top_n, False, bool(body.logprobs))
    if body.max_completion_tokens is None and body.max_tokens is None:
        params.max_new_tokens = 16  # vLLM fills the context; a bounded default keeps GPT-2 sensible
    template = await chat_template(state, caller.tenant, task)
    lease = await state.limiter.acquire(caller.tenant)  # rendering is the tenant's work: counted first
    try:
        messages = [m.template_data() for m in body.messages]
        prompt = await render(
            state,
            caller.tenant,
            template,
            messages,
            kwargs,
            body.add_generation_prompt,
            body.continue_final_message,
        )
    except BaseException:
        await lease.release()
        raise
    generations = await start_sequences(state, caller, task, prompt, params, n, lease)
    chat_id = f"chatcmpl-{current_request_id()}"
    created = int(time.time())

    if not body.stream:
        results: list[Completed] = best(
            await collect_all_unless_disconnected(generations, request.receive), n
        )
        return ChatCompletionResponse(
            id=chat_id,
            created=created,
            model=body.model,
            choices=[
                ChatChoice(
                    index=i,
                    message=ChatMessageOut(content=r.text),
                    logprobs=_logprobs(state, r.tokens, top_n) if body.logprobs else None,
                    finish_reason=finish_reason(r.finish_reason),
                )
                for i, r in enumerate(results)
            ],
            usage=usage(results),
        )

    def response(choices: list[ChatChunkChoice], use: Usage | None = None) -> dict[str, Any]:
        out = ChatCompletionChunk(id=chat_id, created=created, model=body.model, choices=choices, usage=use)
        return out.model_dump(exclude={"usage"} if use is None else set())

    def head(i: int) -> dict[str, Any]:
        return response([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])

    def chunk(i: int, event: StreamEvent) -> dict[str, Any]:
        logprobs = _logprobs(state, _event_token(event), top_n) if body.logprobs else None
        choice = ChatChunkChoice(
            index=i,
            delta=ChatDelta(content=event.text),
            logprobs=logprobs,
            finish_reason=finish_reason(event.finish_reason),
        )
        return response([choice])

    def usage_chunk(use: Usage) -> dict[str, Any]:
        return response([], use)

    return sse_response(stream_chunks(generations, body, chunk, head, usage_chunk, "/v1/chat/completions"))
