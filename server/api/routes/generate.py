"""Native and TGI-compatible generation: `/v1/generate`, `/v1/generate_stream`, and TGI's
`/generate`, `/generate_stream` and `/` (the route the `text-generation` client posts to: `stream`
in the body picks a stream, and a non-streamed answer is a one-element list)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from prefix_store.base import validate_name
from server.api.deps import Caller, State
from server.api.errors import ApiError, describe_exception, error_responses
from server.api.generation import (
    Completed,
    TokenInfo,
    collect_all_unless_disconnected,
    interleave,
    sequence_ids,
    start_generations,
    token_info,
)
from server.api.schemas import (
    GREEDY_TEMPERATURE_EPS,
    AlternativeToken,
    BestOfSequence,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.api.sse import SSE_CONTENT, sse_data, sse_response
from server.api.structured import tgi_constraint
from server.api.tokens import check_fields, prefix_positions, token_text, truncate_prompt
from server.api.version import __version__
from server.engine.types import SamplingParams

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
    """TGI/LoRAX parameters -> engine parameters (None means the engine's "off" value)."""
    near_greedy = p.temperature is not None and p.temperature < GREEDY_TEMPERATURE_EPS
    best_of = (p.best_of or 1) > 1  # sampling is checked by the schema
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or 20,
        do_sample=(p.do_sample or best_of) and not near_greedy,
        temperature=p.temperature if p.temperature is not None and not near_greedy else 1.0,
        top_k=p.top_k or 0,
        top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        top_n_tokens=p.num_alternatives,
        prompt_logprobs=p.decoder_input_details,
        seed=p.seed,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos or p.ignore_eos_token,
        structured=tgi_constraint(p),
    )


def resolve_task(body: GenerateRequest) -> str | None:
    """`task`, else TGI/LoRAX's `parameters.adapter_id`; validated (422 for a bad name)."""
    task = body.task if body.task is not None else body.parameters.adapter_id
    return None if task is None else validate_name(task, "task")


def _tokens(
    state: State, infos: list[TokenInfo], p: GenerateParameters
) -> tuple[list[Token], list[list[Token]]]:
    """Generated tokens (with LoRAX's `alternative_tokens`) and TGI's `top_tokens` per position."""
    tokens: list[Token] = []
    top: list[list[Token]] = []
    for info in infos:
        alternatives = [(i, lp, token_text(state, i)) for i, lp in info.top]
        tokens.append(
            Token(
                id=info.id,
                text=info.text,
                logprob=info.logprob,
                special=info.special,
                alternative_tokens=[AlternativeToken(id=i, text=t, logprob=lp) for i, lp, t in alternatives][
                    : p.return_k_alternatives or 0
                ]
                or None,
            )
        )
        top.append(
            [
                Token(id=i, text=t, logprob=lp, special=False, alternative_tokens=None)
                for i, lp, t in alternatives
            ][: p.top_n_tokens or 0]
        )
    return tokens, top


def _prefill(state: State, result: Completed) -> list[InputToken]:
    if result.prompt_token_ids is None or result.prompt_logprobs is None:
        return []
    return [
        InputToken(id=i, text=token_text(state, i), logprob=lp)
        for i, lp in zip(result.prompt_token_ids, result.prompt_logprobs, strict=True)
    ]


def _details(state: State, result: Completed, p: GenerateParameters) -> Details:
    tokens, top = _tokens(state, result.tokens, p)
    return Details(
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        prompt_tokens=result.num_prompt_tokens,
        generated_tokens=result.num_generated_tokens,
        seed=result.seed,
        prefix_version=result.prefix_version,
        prefill=_prefill(state, result),
        tokens=tokens,
        top_tokens=top if p.top_n_tokens else None,
        best_of_sequences=None,
    )


async def _start(state: State, caller: Caller, body: GenerateRequest, route: str) -> list[Any]:
    check_fields(body, route, strict=route.startswith("/v1/"))
    p = body.parameters
    params = sampling_params(p)
    count = p.best_of or 1
    runs = [SamplingParams(**{**vars(params), "stop": list(params.stop)}) for _ in range(count)]
    prompt = await truncate_prompt(state, body.inputs, p.truncate)
    generations = await start_generations(
        state, caller, resolve_task(body), [prompt] * count, runs, sequence_ids(count)
    )
    state.metrics.observe_request_n(count)
    return generations


async def _generate(
    request: Request, state: State, caller: Caller, body: GenerateRequest, route: str
) -> GenerateResponse:
    generations = await _start(state, caller, body, route)
    results = await collect_all_unless_disconnected(generations, request.receive)
    # best_of: the candidate with the highest cumulative logprob wins; the others are best_of_sequences.
    ranked = sorted(results, key=lambda r: r.cumulative_logprob, reverse=True)
    best, others = ranked[0], ranked[1:]
    p = body.parameters
    prefix = body.inputs if p.return_full_text else ""
    details = None
    if p.details:
        details = _details(state, best, p)
        if others:
            details.best_of_sequences = [
                BestOfSequence(
                    generated_text=prefix + r.text,
                    **_details(state, r, p).model_dump(
                        include={
                            "finish_reason",
                            "generated_tokens",
                            "seed",
                            "prefill",
                            "tokens",
                            "top_tokens",
                        }
                    ),
                )
                for r in others
            ]
    return GenerateResponse(generated_text=prefix + best.text, details=details)


async def _stream(state: State, caller: Caller, body: GenerateRequest, route: str) -> StreamingResponse:
    generations = await _start(state, caller, body, route)
    p = body.parameters
    prefix = body.inputs if p.return_full_text else ""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for _, event in interleave(generations):
                if event.token_id is None:
                    continue  # a final event without a token only happens on abort (raised below)
                final = event.finish_reason is not None
                (token,), (top,) = _tokens(state, [token_info(event)], p)
                message = StreamResponse(
                    token=token,
                    top_tokens=top if p.top_n_tokens else None,
                    generated_text=prefix + (event.generated_text or "") if final else None,
                    details=StreamDetails(
                        finish_reason=event.finish_reason,  # type: ignore[arg-type]
                        prompt_tokens=event.num_prompt_tokens,
                        generated_tokens=event.num_generated_tokens,
                        seed=event.seed,
                        prefix_version=event.prefix_version,
                    )
                    if final
                    else None,
                )
                yield sse_data(message.model_dump(exclude_none=False))
        except Exception as exc:  # headers are sent: report in-band, TGI style
            _, message_text, error_type, _ = describe_exception(exc)
            yield sse_data({"error": message_text, "error_type": error_type})

    return sse_response(events())


@router.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(request: Request, state: State, caller: Caller, body: GenerateRequest) -> GenerateResponse:
    """Generate text for `inputs` with the prefix of `task` (null: the bare base model)."""
    return await _generate(request, state, caller, body, "/v1/generate")


@router.post("/v1/generate_stream", responses={**_SSE_DOC, **_ERRORS}, response_class=StreamingResponse)
async def generate_stream(state: State, caller: Caller, body: GenerateRequest) -> StreamingResponse:
    """Like `/v1/generate`, streamed as server-sent events (TGI's stream format)."""
    return await _stream(state, caller, body, "/v1/generate_stream")


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def tgi_generate(
    request: Request, state: State, caller: Caller, body: GenerateRequest
) -> GenerateResponse:
    """TGI's route; the task is `parameters.adapter_id` (LoRAX style) or `task`."""
    return await _generate(request, state, caller, body, "/generate")


@router.post("/generate_stream", responses={**_SSE_DOC, **_ERRORS}, response_class=StreamingResponse)
async def tgi_generate_stream(state: State, caller: Caller, body: GenerateRequest) -> StreamingResponse:
    """TGI's streaming route."""
    return await _stream(state, caller, body, "/generate_stream")


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
        return await _stream(state, caller, body, "/")
    result = await _generate(request, state, caller, body, "/")
    return JSONResponse([result.model_dump()])


@router.get("/info", response_model=InfoResponse, responses=error_responses(401, 404, 422, 503))
async def info(
    request: Request,
    state: State,
    adapter_id: Annotated[
        str | None, Query(max_length=64, description="A task: limits net of its prefix.")
    ] = None,
) -> InfoResponse:
    """TGI's server info. Without `adapter_id` no key is needed; with it (a key is then required) the
    token limits are the task's: its prefix takes positions from every request."""
    taken = 0
    if adapter_id is not None:
        try:
            principal = state.auth.authenticate(request.headers.get("authorization"))
        except Exception as exc:
            raise ApiError(401, str(exc), "unauthorized", headers={"WWW-Authenticate": "Bearer"}) from None
        taken = await prefix_positions(state, principal.tenant, adapter_id)
    total = state.spec.max_positions - taken
    return InfoResponse(
        model_id=state.config.model_id,
        model_dtype=state.config.model_dtype,
        model_device_type=state.config.device_type,
        model_type=state.spec.model_type,
        max_total_tokens=total,
        max_input_tokens=total - 1,
        max_concurrent_requests=state.config.limits.max_batch_size,
        version=__version__,
    )
