"""OpenAI-compatible `POST /v1/completions` and `GET /v1/models`.

`model` selects the prefix: a task name of the caller's tenant, or the base model's id for none.
Errors here use OpenAI's body `{"error": {"message", "type", "param", "code"}}` (see
`server.api.errors.OPENAI_PATHS`): the `openai` client only puts the reason into its exception text
from that shape. `type` carries the same value as `error_type` elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request

from prefix_store.base import validate_name
from server.api.deps import Caller, State
from server.api.errors import describe_exception, error_responses
from server.api.generation import start_generation
from server.api.prefix_admin import list_all_tasks
from server.api.schemas import (
    GREEDY_TEMPERATURE_EPS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.api.sse import SSE_CONTENT, sse_data, sse_response
from server.engine.types import SamplingParams
from server.logging import current_request_id, engine_request_id

router = APIRouter(tags=["openai"])

MAX_LISTED_TASKS = 1000


def _finish_reason(reason: str | None) -> Literal["length", "stop"] | None:
    """Engine finish reasons → OpenAI's: "length", or "stop" (EOS or a stop sequence)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _sampling(body: CompletionRequest) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature = 0.0  # OpenAI: 0 is greedy; a denormal one would overflow the logits
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=body.max_tokens or 16,
        do_sample=temperature > 0,  # OpenAI: temperature 0 is greedy
        temperature=temperature if temperature > 0 else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={
        200: {"content": SSE_CONTENT},
        **error_responses(400, 401, 404, 413, 422, 429, 500, 503, openai=True),
    },
)
async def completions(request: Request, state: State, caller: Caller, body: CompletionRequest) -> Any:
    """A text completion; `stream: true` for OpenAI-style SSE chunks ending with `data: [DONE]`."""
    task = None if body.model == state.config.model_id else validate_name(body.model, "model (task)")
    prompt: str | list[int]
    if isinstance(body.prompt, str):
        prompt = body.prompt
    elif isinstance(body.prompt[0], str):
        prompt = str(body.prompt[0])  # a list of exactly one string (checked by the schema)
    else:
        prompt = [int(t) for t in body.prompt]
    generation = await start_generation(state, caller, task, prompt, _sampling(body), engine_request_id())
    completion_id = f"cmpl-{current_request_id()}"
    created = int(time.time())

    if not body.stream:
        result = await generation.collect_unless_disconnected(request.receive)
        return CompletionResponse(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[CompletionChoice(text=result.text, finish_reason=_finish_reason(result.finish_reason))],
            usage=Usage(
                prompt_tokens=result.num_prompt_tokens,
                completion_tokens=result.num_generated_tokens,
                total_tokens=result.num_prompt_tokens + result.num_generated_tokens,
            ),
        )

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for event in generation.events():
                chunk = CompletionResponse(
                    id=completion_id,
                    created=created,
                    model=body.model,
                    choices=[
                        CompletionChoice(text=event.text, finish_reason=_finish_reason(event.finish_reason))
                    ],
                )
                yield sse_data(chunk.model_dump(exclude={"usage"}))
        except Exception as exc:  # headers are sent: report in-band (OpenAI's nested shape, which the
            # openai client reads the message from), then end the stream
            _, message, error_type, _ = describe_exception(exc, "/v1/completions")
            yield sse_data({"error": {"message": message, "type": error_type}})
        yield sse_data("[DONE]")

    return sse_response(chunks())


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503, openai=True))
async def list_models(state: State, caller: Caller) -> ModelList:
    """The base model, then the caller's tasks (each usable as `model`)."""
    cards = [ModelCard(id=state.config.model_id, created=0, owned_by="prefixserve")]
    for item in await list_all_tasks(state, caller.tenant, MAX_LISTED_TASKS):
        cards.append(ModelCard(id=item.task, created=int(item.created_at), owned_by=caller.tenant))
    return ModelList(data=cards)
