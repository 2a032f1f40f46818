"""OpenAI-compatible `POST /v1/completions` and vLLM's `GET /v1/models`, plus what chat shares.

`model` selects the prefix: a task name of the caller's tenant, or the base model's id for none.
Errors here use OpenAI's body `{"error": {"message", "type", "param", "code"}}` (see
`server.api.errors.OPENAI_PATHS`): the `openai` client only puts the reason into its exception text
from that shape. `type` carries the same value as `error_type` elsewhere.

`n` and `best_of` run one engine request per sequence, all with the task's prefix and the same
prompt, side by side in the batch; with a seed, sequence i uses seed + i (else each draws its own).
`best_of` keeps the `n` with the highest cumulative logprob, as OpenAI and vLLM do.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request

from prefix_store.base import validate_name
from server.api.deps import Caller, State
from server.api.errors import describe_exception, error_responses
from server.api.generation import (
    Completed,
    Generation,
    collect_all_unless_disconnected,
    interleave,
    sequence_ids,
    start_generations,
)
from server.api.openai_schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    _Sampling,
)
from server.api.prefix_admin import list_all_tasks
from server.api.schemas import GREEDY_TEMPERATURE_EPS
from server.api.sse import SSE_CONTENT, sse_data, sse_response
from server.api.tokens import check_fields, token_text
from server.engine.types import SamplingParams, StreamEvent
from server.logging import current_request_id

router = APIRouter(tags=["openai"])

MAX_LISTED_TASKS = 1000
OPENAI_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 503, openai=True)


def finish_reason(reason: str | None) -> Literal["length", "stop"] | None:
    """Engine finish reasons -> OpenAI's: "length", or "stop" (EOS or a stop sequence)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def model_task(state: State, model: str) -> str | None:
    """The task `model` names (None: the base model itself)."""
    return None if model == state.config.model_id else validate_name(model, "model (task)")


def sampling(body: _Sampling, max_tokens: int, top_n: int, prompt_logprobs: bool) -> SamplingParams:
    """OpenAI (+ vLLM) request fields -> engine parameters."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_TEMPERATURE_EPS:
        temperature = 0.0  # OpenAI: 0 is greedy; a denormal one would overflow the logits
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=max(body.top_k or 0, 0),
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        top_n_tokens=top_n,
        prompt_logprobs=prompt_logprobs,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
    )


async def start_sequences(
    state: State,
    caller: Caller,
    task: str | None,
    prompt: str | list[int],
    params: SamplingParams,
    count: int,
) -> list[Generation]:
    """`count` engine requests for one prompt; with a seed, sequence i uses seed + i."""
    runs = [
        dataclasses.replace(
            params, seed=None if params.seed is None else (params.seed + i) % 2**63, stop=list(params.stop)
        )
        for i in range(count)
    ]
    return await start_generations(state, caller, task, prompt, runs, sequence_ids(count))


def best(results: list[Completed], n: int) -> list[Completed]:
    """The `n` results with the highest cumulative logprob (all of them, in order, when n == len)."""
    if n >= len(results):
        return results
    return sorted(results, key=lambda r: r.cumulative_logprob, reverse=True)[:n]


def usage(results: list[Completed]) -> Usage:
    """The prompt counted once (it is one prompt), completions summed over the sequences."""
    prompt = results[0].num_prompt_tokens
    completion = sum(r.num_generated_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class UsageCounter:
    """Running usage of a stream (prompt once, generated tokens of every sequence)."""

    def __init__(self, count: int) -> None:
        self.prompt = 0
        self.generated = [0] * count

    def add(self, index: int, event: StreamEvent) -> Usage:
        self.prompt = event.num_prompt_tokens
        self.generated[index] = event.num_generated_tokens
        completion = sum(self.generated)
        return Usage(
            prompt_tokens=self.prompt, completion_tokens=completion, total_tokens=self.prompt + completion
        )


def stream_chunks(
    generations: list[Generation],
    body: _Sampling,
    chunk: Callable[[int, StreamEvent], dict[str, Any]],
    head: Callable[[int], dict[str, Any] | None],
    usage_chunk: Callable[[Usage], dict[str, Any]],
    path: str,
) -> AsyncIterator[bytes]:
    """OpenAI SSE: `head(i)` once per sequence (chat's role, completions' echo), `chunk(i, event)` per
    token, usage per chunk (vLLM's continuous_usage_stats) or in a last chunk (include_usage), [DONE]."""
    options = body.stream_options
    continuous = bool(options and options.continuous_usage_stats)
    final_usage = bool(options and options.include_usage)

    async def run() -> AsyncIterator[bytes]:
        counter = UsageCounter(len(generations))
        last: Usage | None = None
        try:
            for i in range(len(generations)):
                first = head(i)
                if first is not None:
                    yield sse_data(first)
            async for index, event in interleave(generations):
                data = chunk(index, event)
                last = counter.add(index, event)
                if continuous:
                    data["usage"] = last.model_dump()
                yield sse_data(data)
            if final_usage and last is not None:
                yield sse_data(usage_chunk(last))
        except Exception as exc:  # headers are sent: report in-band (OpenAI's nested shape, which the
            # openai client reads the message from), then end the stream
            _, message, error_type, _ = describe_exception(exc, path)
            yield sse_data({"error": {"message": message, "type": error_type}})
        yield sse_data("[DONE]")

    return run()


def _completion_logprobs(state: State, result: Completed, echo_offset: int, top_n: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: token texts, their logprobs, top alternatives and text offsets (the
    prompt's tokens first when echoed; the first prompt token has no logprob)."""
    out = CompletionLogprobs()
    offset = 0
    if result.prompt_token_ids is not None and result.prompt_logprobs is not None:
        for token, logprob in zip(result.prompt_token_ids, result.prompt_logprobs, strict=True):
            text = token_text(state, token)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(None if logprob is None else {text: logprob})
            out.text_offset.append(offset)
            offset += len(text)
    offset = max(offset, echo_offset)
    for info in result.tokens:
        out.tokens.append(info.text)
        out.token_logprobs.append(info.logprob)
        out.top_logprobs.append({token_text(state, i): lp for i, lp in info.top[:top_n]} if top_n else None)
        out.text_offset.append(offset)
        offset += len(info.text)
    return out


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": SSE_CONTENT}, **OPENAI_ERRORS},
)
async def completions(request: Request, state: State, caller: Caller, body: CompletionRequest) -> Any:
    """A text completion; `stream: true` for OpenAI-style SSE chunks ending with `data: [DONE]`."""
    check_fields(body, "/v1/completions", strict=False)
    task = model_task(state, body.model)
    prompt: str | list[int]
    if isinstance(body.prompt, str):
        prompt = body.prompt
    elif isinstance(body.prompt[0], str):
        prompt = str(body.prompt[0])  # a list of exactly one string (checked by the schema)
    else:
        prompt = [int(t) for t in body.prompt]
    prompt_text = prompt if isinstance(prompt, str) else str(state.engine.tokenizer.decode(prompt))
    echo = prefix = prompt_text if body.echo else ""
    top_n = body.logprobs or 0
    params = sampling(body, body.max_tokens or 16, top_n, bool(body.echo) and body.logprobs is not None)
    n = body.n or 1
    generations = await start_sequences(state, caller, task, prompt, params, max(n, body.best_of or n))
    completion_id = f"cmpl-{current_request_id()}"
    created = int(time.time())

    if not body.stream:
        results = best(await collect_all_unless_disconnected(generations, request.receive), n)
        choices = [
            CompletionChoice(
                index=i,
                text=prefix + r.text,
                finish_reason=finish_reason(r.finish_reason),
                logprobs=None if body.logprobs is None else _completion_logprobs(state, r, len(echo), top_n),
            )
            for i, r in enumerate(results)
        ]
        return CompletionResponse(
            id=completion_id, created=created, model=body.model, choices=choices, usage=usage(results)
        )

    def response(choices: list[CompletionChoice], use: Usage | None = None) -> dict[str, Any]:
        out = CompletionResponse(
            id=completion_id, created=created, model=body.model, choices=choices, usage=use
        )
        return out.model_dump(exclude={"usage"} if use is None else set())

    def head(i: int) -> dict[str, Any] | None:
        return response([CompletionChoice(index=i, text=echo)]) if echo else None

    def chunk(i: int, event: StreamEvent) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None and event.token_id is not None:
            top = {token_text(state, t): lp for t, lp in event.top_tokens[:top_n]} if top_n else None
            logprobs = CompletionLogprobs(
                tokens=[event.text], token_logprobs=[event.token_logprob], top_logprobs=[top]
            )
        return response(
            [
                CompletionChoice(
                    index=i,
                    text=event.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(event.finish_reason),
                )
            ]
        )

    def usage_chunk(use: Usage) -> dict[str, Any]:
        return response([], use)

    return sse_response(stream_chunks(generations, body, chunk, head, usage_chunk, "/v1/completions"))


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503, openai=True))
async def list_models(state: State, caller: Caller) -> ModelList:
    """The base model, then the caller's tasks listed as vLLM lists LoRA adapters: `parent` is the base
    model, `max_model_len` the positions left once the task's prefix is in place."""
    model_id, positions = state.config.model_id, state.spec.max_positions
    cards = [
        ModelCard(id=model_id, created=0, owned_by="prefixserve", root=model_id, max_model_len=positions)
    ]
    decoder_only = state.spec.kind == "decoder-only"
    items, _broken = await list_all_tasks(state, caller.tenant, MAX_LISTED_TASKS)  # broken: logged
    for item in items:
        taken = int((item.metadata.get("prefix_lengths") or {}).get("decoder", 0)) if decoder_only else 0
        cards.append(
            ModelCard(
                id=item.task,
                created=int(item.created_at),
                owned_by=caller.tenant,
                root=item.task,
                parent=model_id,
                max_model_len=positions - taken,
            )
        )
    return ModelList(data=cards)
