"""OpenAI-compatible `POST /v1/completions` and vLLM's `GET /v1/models`, plus what chat shares.

`model` selects the prefix: a task name of the caller's tenant, or the base model's id for none.
Errors here use OpenAI's body `{"error": {"message", "type", "param", "code"}}` (see
`server.api.errors.OPENAI_PATHS`): the `openai` client only puts the reason into its exception text
from that shape. `type` carries the same value as `error_type` elsewhere.

`n` and `best_of` run one engine request per sequence, all with the task's prefix and the same
prompt, side by side in the batch; with a seed, sequence i uses seed + i (else each draws its own).
`best_of` keeps the `n` with the highest cumulative logprob, as OpenAI and vLLM do.

Completions take several prompts in one request (a list of strings or of token-id lists), as OpenAI
and vLLM do: each prompt gets its `n` choices, choice `index` = prompt index x n + i, usage is summed
over the prompts (each counted once). `max_tokens: 0` with `echo` scores the prompt and generates
nothing (legacy OpenAI and vLLM): the engine runs the prompt's one prefill step, the generated token is
dropped. With `echo` and `logprobs: N` every prompt position after the first carries the N most likely
tokens too (vLLM's prompt logprobs), which is what an evaluation harness compares a continuation with.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request

from prefix_store.base import validate_name
from server.api.deps import Caller, State
from server.api.errors import ApiError, describe_exception, error_responses
from server.api.generation import (
    ABORTED,
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
from server.api.ratelimit import Lease
from server.api.schemas import GREEDY_TEMPERATURE_EPS, valid_unicode
from server.api.sse import SSE_CONTENT, openai_sse_data, sse_response
from server.api.structured import openai_constraint
from server.api.tokens import check_fields, token_text
from server.engine.errors import InvalidRequest
from server.engine.types import SamplingParams, StreamEvent
from server.logging import current_request_id

router = APIRouter(tags=["openai"])

MAX_LISTED_TASKS = 1000
OPENAI_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 503, openai=True)


def finish_reason(reason: str | None) -> Literal["length", "stop"] | None:
    """Engine finish reasons -> OpenAI's: "length", or "stop" (EOS or a stop sequence). A sequence the
    engine cancelled or failed did not finish: null (its stream's error event follows), never "stop"."""
    if reason is None or reason in ABORTED:
        return None
    return "length" if reason == "length" else "stop"


def model_task(state: State, model: str) -> str | None:
    """The task `model` names (None: the base model itself)."""
    return None if model == state.config.model_id else validate_name(model, "model (task)")


def sampling(
    body: _Sampling, max_tokens: int, top_n: int, prompt_logprobs: bool, token_logprobs: bool
) -> SamplingParams:
    """OpenAI (+ vLLM) request fields -> engine parameters. `token_logprobs`: the response reports or
    ranks by each token's logprob (else the engine may skip computing them)."""
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
        token_logprobs=token_logprobs,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
        structured=openai_constraint(body),
    )


async def start_sequences(
    state: State,
    caller: Caller,
    task: str | None,
    prompt: str | list[int],
    params: SamplingParams,
    count: int,
    lease: Lease | None = None,
) -> list[Generation]:
    """`count` engine requests for one prompt; with a seed, sequence i uses seed + i. `lease`: the
    tenant's rate-limit lease if the route already holds one (the first sequence's)."""
    return await start_prompts(state, caller, task, [prompt], params, count, lease)


async def start_prompts(
    state: State,
    caller: Caller,
    task: str | None,
    prompts: list[str | list[int]],
    params: SamplingParams,
    count: int,
    lease: Lease | None = None,
) -> list[Generation]:
    """`count` engine requests per prompt, prompt by prompt (generation j: prompt j // count, sequence
    j % count); with a seed, sequence i of every prompt uses seed + i (as vLLM seeds each prompt).
    `lease`: the tenant's rate-limit lease if the route already holds one (the first generation's)."""
    runs = [
        dataclasses.replace(
            params, seed=None if params.seed is None else (params.seed + i) % 2**63, stop=list(params.stop)
        )
        for _ in prompts
        for i in range(count)
    ]
    each = [prompt for prompt in prompts for _ in range(count)]
    generations = await start_generations(state, caller, task, each, runs, sequence_ids(len(runs)), lease)
    for _ in prompts:
        state.metrics.observe_request_n(count)
    return generations


def best(results: list[Completed], n: int) -> list[Completed]:
    """The `n` results with the highest cumulative logprob (all of them, in order, when n == len)."""
    if n >= len(results):
        return results
    return sorted(results, key=lambda r: r.cumulative_logprob, reverse=True)[:n]


def usage(results: list[Completed]) -> Usage:
    """The prompt counted once (it is one prompt), completions summed over the sequences."""
    return prompts_usage([results])


def prompts_usage(groups: list[list[Completed]], generated: bool = True) -> Usage:
    """Each prompt counted once (a group holds one prompt's sequences), completions summed over every
    sequence of every prompt (none when `generated` is False: max_tokens 0)."""
    prompt = sum(group[0].num_prompt_tokens for group in groups)
    completion = sum(r.num_generated_tokens for group in groups for r in group) if generated else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class UsageCounter:
    """Running usage of a stream: each prompt once, the generated tokens of every sequence.
    `prompt_of[i]` is the prompt of sequence i (default: all one prompt); `generated` False counts no
    completion tokens (max_tokens 0)."""

    def __init__(self, count: int, prompt_of: list[int] | None = None, generated: bool = True) -> None:
        self.prompt_of = prompt_of if prompt_of is not None else [0] * count
        self.prompt = [0] * (max(self.prompt_of, default=0) + 1)
        self.generated = [0] * count
        self.count_generated = generated

    def add(self, index: int, event: StreamEvent) -> Usage:
        self.prompt[self.prompt_of[index]] = event.num_prompt_tokens
        if self.count_generated:
            self.generated[index] = event.num_generated_tokens
        prompt, completion = sum(self.prompt), sum(self.generated)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def stream_chunks(
    generations: list[Generation],
    body: _Sampling,
    chunk: Callable[[int, StreamEvent], dict[str, Any] | None],
    head: Callable[[int], dict[str, Any] | None],
    usage_chunk: Callable[[Usage], dict[str, Any]],
    path: str,
    counter: UsageCounter | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI SSE: `head(i)` once per sequence (chat's role, completions' echo), `chunk(i, event)` per
    token (None: nothing to send for it), usage per chunk (vLLM's continuous_usage_stats) or in a last
    chunk (include_usage), [DONE]. `counter` counts the usage (default: one prompt)."""
    options = body.stream_options
    continuous = bool(options and options.continuous_usage_stats)
    final_usage = bool(options and options.include_usage)

    async def run() -> AsyncIterator[bytes]:
        usage_counter = counter or UsageCounter(len(generations))
        last: Usage | None = None
        try:
            for i in range(len(generations)):
                first = head(i)
                if first is not None:
                    yield openai_sse_data(first)
            async for index, event in interleave(generations):
                data = chunk(index, event)
                last = usage_counter.add(index, event)
                if data is None:
                    continue
                if continuous:
                    data["usage"] = last.model_dump()
                yield openai_sse_data(data)
            if final_usage and last is not None:
                yield openai_sse_data(usage_chunk(last))
        except Exception as exc:  # headers are sent: report in-band (OpenAI's nested shape, which the
            # openai client reads the message from), then end the stream
            _, message, error_type, _ = describe_exception(exc, path)
            yield openai_sse_data({"error": {"message": message, "type": error_type}})
        yield openai_sse_data("[DONE]")

    return run()


def _prompt_logprobs(
    state: State,
    token_ids: list[int],
    logprobs: list[float | None],
    top_tokens: list[list[tuple[int, float]]] | None,
    top_n: int,
    out: CompletionLogprobs,
) -> int:
    """Append the echoed prompt's tokens to `out`: text, logprob, alternatives (the token itself and the
    `top_n` most likely, as vLLM reports them; none at the first position) and offsets. Returns the
    prompt's text length."""
    offset = 0
    for position, (token, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
        text = token_text(state, token)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        if logprob is None:
            out.top_logprobs.append(None)
        else:
            top = top_tokens[position][:top_n] if top_tokens is not None else []
            out.top_logprobs.append(_alternatives(state, token, logprob, top))
        out.text_offset.append(offset)
        offset += len(text)
    return offset


def _alternatives(state: State, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's `top_logprobs` entry: the most likely tokens, best first, plus the chosen token itself
    (so up to N + 1 entries: "the API will always return the logprob of the sampled token")."""
    out = {token_text(state, t): lp for t, lp in top}
    out.setdefault(token_text(state, token), logprob)
    return out


def _completion_logprobs(
    state: State, result: Completed, echo_offset: int, top_n: int, generated: bool = True
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: token texts, their logprobs, top alternatives and text offsets (the
    prompt's tokens first when echoed, the first of them without a logprob; no generated tokens when
    `generated` is False: max_tokens 0)."""
    out = CompletionLogprobs()
    offset = 0
    if result.prompt_token_ids is not None and result.prompt_logprobs is not None:
        offset = _prompt_logprobs(
            state, result.prompt_token_ids, result.prompt_logprobs, result.prompt_top_tokens, top_n, out
        )
    offset = max(offset, echo_offset)
    for info in result.tokens if generated else []:
        out.tokens.append(info.text)
        out.token_logprobs.append(info.logprob)
        if info.logprob is None:
            out.top_logprobs.append(None)
        else:
            out.top_logprobs.append(_alternatives(state, info.id, info.logprob, info.top[:top_n]))
        out.text_offset.append(offset)
        offset += len(info.text)
    return out


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": SSE_CONTENT}, **OPENAI_ERRORS},
)
async def completions(request: Request, state: State, caller: Caller, body: CompletionRequest) -> Any:
    """A text completion (or one per prompt); `stream: true` for OpenAI-style SSE chunks ending with
    `data: [DONE]`."""
    check_fields(body, "/v1/completions", strict=False)
    task = model_task(state, body.model)
    prompts = body.prompts()
    most = state.config.limits.max_prompts_per_request
    if len(prompts) > most:
        raise InvalidRequest(
            f"{len(prompts)} prompts in one request; at most {most} (PREFIXSERVE_MAX_PROMPTS_PER_REQUEST)"
        )
    for prompt in prompts:
        if isinstance(prompt, str):
            try:
                valid_unicode(prompt, "prompt")  # echoed into the response: must be encodable
            except ValueError as exc:
                raise ApiError(422, str(exc), "validation") from None
    echo_only = body.max_tokens == 0  # the schema allows 0 only with echo
    top_n = body.logprobs or 0
    max_tokens = 16 if body.max_tokens is None else max(body.max_tokens, 1)  # 0: one prefill step
    n = body.n or 1
    count = max(n, body.best_of or n)
    reads_logprobs = body.logprobs is not None or count > n  # best_of ranks by cumulative logprob
    params = sampling(body, max_tokens, top_n, bool(body.echo) and body.logprobs is not None, reads_logprobs)
    echoes = await anyio.to_thread.run_sync(_echo_texts, state, prompts) if body.echo else [""] * len(prompts)
    generations = await start_prompts(state, caller, task, prompts, params, count)
    completion_id = f"cmpl-{current_request_id()}"
    created = int(time.time())

    def reason(engine_reason: str | None) -> Literal["length", "stop"] | None:
        if echo_only and engine_reason is not None and engine_reason not in ABORTED:
            return "length"  # max_tokens (0) reached before anything was generated
        return finish_reason(engine_reason)

    def logprobs_of(result: Completed, echo: str) -> CompletionLogprobs | None:
        if body.logprobs is None:
            return None
        return _completion_logprobs(state, result, len(echo), top_n, generated=not echo_only)

    if not body.stream:
        results = await collect_all_unless_disconnected(generations, request.receive)
        groups = [best(results[k * count : (k + 1) * count], n) for k in range(len(prompts))]
        choices = [
            CompletionChoice(
                index=k * n + i,
                text=echoes[k] + ("" if echo_only else r.text),
                finish_reason=reason(r.finish_reason),
                logprobs=logprobs_of(r, echoes[k]),
            )
            for k, group in enumerate(groups)
            for i, r in enumerate(group)
        ]
        return CompletionResponse(
            id=completion_id,
            created=created,
            model=body.model,
            choices=choices,
            usage=prompts_usage(groups, generated=not echo_only),
        )

    # Streamed: best_of == n (the schema), so generation j is choice j, of prompt j // n.
    def response(choices: list[CompletionChoice], use: Usage | None = None) -> dict[str, Any]:
        out = CompletionResponse(
            id=completion_id, created=created, model=body.model, choices=choices, usage=use
        )
        return out.model_dump(exclude={"usage"} if use is None else set())

    def head(i: int) -> dict[str, Any] | None:
        """The echoed prompt (and its logprobs when asked), first in each choice's stream."""
        echo = echoes[i // n]
        if not echo:
            return None
        logprobs = None
        first = generations[i].first_event
        if (
            body.logprobs is not None
            and first.prompt_token_ids is not None
            and first.prompt_logprobs is not None
        ):
            logprobs = CompletionLogprobs()
            _prompt_logprobs(
                state, first.prompt_token_ids, first.prompt_logprobs, first.prompt_top_tokens, top_n, logprobs
            )
        return response([CompletionChoice(index=i, text=echo, logprobs=logprobs)])

    offsets = [len(echoes[j // n]) for j in range(len(generations))]  # each choice's text so far

    def chunk(i: int, event: StreamEvent) -> dict[str, Any] | None:
        if echo_only:  # nothing generated: only the end of the choice is sent
            if event.finish_reason is None:
                return None
            return response([CompletionChoice(index=i, text="", finish_reason=reason(event.finish_reason))])
        logprobs = None
        if body.logprobs is not None and event.token_id is not None:
            top = None
            if event.token_logprob is not None:
                top = _alternatives(state, event.token_id, event.token_logprob, event.top_tokens[:top_n])
            logprobs = CompletionLogprobs(
                tokens=[event.text], token_logprobs=[event.token_logprob], top_logprobs=[top],
                text_offset=[offsets[i]],
            )  # fmt: skip
        offsets[i] += len(event.text)
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

    counter = UsageCounter(len(generations), [j // count for j in range(len(generations))], not echo_only)
    return sse_response(
        stream_chunks(generations, body, chunk, head, usage_chunk, "/v1/completions", counter)
    )


def _echo_texts(state: State, prompts: list[str | list[int]]) -> list[str]:
    """Each prompt's text as echoed (token ids decoded); in a worker thread, like tokenising."""
    return [p if isinstance(p, str) else str(state.engine.tokenizer.decode(p)) for p in prompts]


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
