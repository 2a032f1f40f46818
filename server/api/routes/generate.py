"""Native and TGI-compatible generation: `/v1/generate`, `/v1/generate_stream`, and TGI's
`/generate`, `/generate_stream` and `/` (the route the `text-generation` client posts to: `stream`
in the body picks a stream, and a non-streamed answer is a one-element list)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from prefix_store.base import validate_name
from server.api.deps import Caller, State
from server.api.errors import describe_exception, error_responses
from server.api.generation import Generation, start_generation, token_info
from server.api.schemas import (
    GREEDY_TEMPERATURE_EPS,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.api.sse import SSE_CONTENT, sse_data, sse_response
from server.api.version import __version__
from server.engine.types import SamplingParams
from server.logging import engine_request_id

router = APIRouter(tags=["generate"])

_ERRORS = error_responses(400, 401, 404, 413, 422, 424, 429, 503)
_SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: one `StreamResponse` JSON per token; the last carries "
        "`generated_text` and `details`.",
        "content": SSE_CONTENT,
    }
}


def sampling_params(p: GenerateParameters) -> SamplingParams:
    """TGI parameters → engine parameters (None means the engine's "off" value)."""
    near_greedy = p.temperature is not None and p.temperature < GREEDY_TEMPERATURE_EPS
    return SamplingParams(
        max_new_tokens=p.max_new_tokens,
        do_sample=p.do_sample and not near_greedy,
        temperature=p.temperature if p.temperature is not None and not near_greedy else 1.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        seed=p.seed,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
    )


def resolve_task(body: GenerateRequest) -> str | None:
    """`task`, else TGI/LoRAX's `parameters.adapter_id`; validated (422 for a bad name)."""
    task = body.task if body.task is not None else body.parameters.adapter_id
    return None if task is None else validate_name(task, "task")


async def _start(state: State, caller: Caller, body: GenerateRequest) -> Generation:
    return await start_generation(
        state,
        caller,
        resolve_task(body),
        body.inputs,
        sampling_params(body.parameters),
        engine_request_id(),
    )


async def _generate(
    request: Request, state: State, caller: Caller, body: GenerateRequest
) -> GenerateResponse:
    generation = await _start(state, caller, body)
    result = await generation.collect_unless_disconnected(request.receive)
    text = body.inputs + result.text if body.parameters.return_full_text else result.text
    details = None
    if body.parameters.details:
        details = Details(
            finish_reason=result.finish_reason,  # type: ignore[arg-type]
            generated_tokens=result.num_generated_tokens,
            seed=result.seed,
            prefix_version=result.prefix_version,
            tokens=[Token(**vars(t)) for t in result.tokens],
        )
    return GenerateResponse(generated_text=text, details=details)


async def _stream(state: State, caller: Caller, body: GenerateRequest) -> StreamingResponse:
    generation = await _start(state, caller, body)
    prefix = body.inputs if body.parameters.return_full_text else ""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in generation.events():
                if event.token_id is None:
                    continue  # a final event without a token only happens on abort (raised below)
                final = event.finish_reason is not None
                message = StreamResponse(
                    token=Token(**vars(token_info(event))),
                    generated_text=prefix + (event.generated_text or "") if final else None,
                    details=StreamDetails(
                        finish_reason=event.finish_reason,  # type: ignore[arg-type]
                        generated_tokens=event.num_generated_tokens,
                        seed=event.seed,
                        prefix_version=event.prefix_version,
                    )
                    if final
                    else None,
                )
                yield sse_data(message.model_dump())
        except Exception as exc:  # headers are sent: report in-band, TGI style
            _, message_text, error_type, _ = describe_exception(exc)
            yield sse_data({"error": message_text, "error_type": error_type})

    return sse_response(events())


@router.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(request: Request, state: State, caller: Caller, body: GenerateRequest) -> GenerateResponse:
    """Generate text for `inputs` with the prefix of `task` (null: the bare base model)."""
    return await _generate(request, state, caller, body)


@router.post("/v1/generate_stream", responses={**_SSE_DOC, **_ERRORS}, response_class=StreamingResponse)
async def generate_stream(state: State, caller: Caller, body: GenerateRequest) -> StreamingResponse:
    """Like `/v1/generate`, streamed as server-sent events (TGI's stream format)."""
    return await _stream(state, caller, body)


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def tgi_generate(
    request: Request, state: State, caller: Caller, body: GenerateRequest
) -> GenerateResponse:
    """TGI's route; the task is `parameters.adapter_id` (LoRAX style) or `task`."""
    return await _generate(request, state, caller, body)


@router.post("/generate_stream", responses={**_SSE_DOC, **_ERRORS}, response_class=StreamingResponse)
async def tgi_generate_stream(state: State, caller: Caller, body: GenerateRequest) -> StreamingResponse:
    """TGI's streaming route."""
    return await _stream(state, caller, body)


@router.post(
    "/",
    response_model=list[GenerateResponse],
    responses={
        200: {
            "description": "`[GenerateResponse]` (stream false) or server-sent events (stream true).",
            "content": SSE_CONTENT,
        },
        **_ERRORS,
    },
)
async def tgi_compat(request: Request, state: State, caller: Caller, body: GenerateRequest) -> Any:
    """TGI's compat route (what `text_generation.Client` posts to)."""
    if body.stream:
        return await _stream(state, caller, body)
    result = await _generate(request, state, caller, body)
    return JSONResponse([result.model_dump()])


@router.get("/info", response_model=InfoResponse)
async def info(state: State) -> InfoResponse:
    """TGI's server info (no authentication, nothing tenant-specific)."""
    return InfoResponse(
        model_id=state.config.model_id,
        model_dtype=state.config.model_dtype,
        model_device_type=state.config.device_type,
        model_type=state.spec.model_type,
        max_total_tokens=state.spec.max_positions,
        max_input_tokens=state.spec.max_positions - 1,
        max_concurrent_requests=state.config.limits.max_batch_size,
        version=__version__,
    )
