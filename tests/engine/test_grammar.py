"""Structured output in the native engine: per-row token masks in the shared batch, sampling options on
constrained rows, the JSON fixes of the grammar worker, and the compiler's cache, single flight and
per-tenant worker share. Random-weight tiny GPT-2: only the constraint makes an answer valid."""

from __future__ import annotations

import asyncio
import json
import re
import time

from server.engine.errors import InvalidConstraint
from server.engine.grammar import GrammarCompiler, RowGrammar, allowed_tokens
from server.engine.observer import EngineObserver
from server.engine.types import GenerationRequest, SamplingParams, StructuredOutput
from server.limits import Limits
from tests.engine.conftest import collect

DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
TEAM_SCHEMA = {
    "type": "object",
    "properties": {"team": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}},
    "required": ["team", "ok"],
}


class Counts(EngineObserver):
    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.compiles: list[str] = []

    def on_grammar_cache(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def on_grammar_compile(self, seconds: float, outcome: str) -> None:
        self.compiles.append(outcome)


def _request(rid: str, prompt: str, task: str | None, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(rid, prompt, params, task=task)


async def test_constrained_and_free_rows_of_several_tasks_share_each_forward_pass(make_engine, store):
    async with make_engine(store, max_batch_size=8, queue_timeout_s=120) as engine:
        steps: list[set[str]] = []
        engine.debug_logits_hook = lambda ids, logits: steps.append(set(ids))
        json_params = SamplingParams(
            max_new_tokens=120, structured=StructuredOutput("json", json.dumps(TEAM_SCHEMA))
        )
        date_params = SamplingParams(max_new_tokens=40, structured=StructuredOutput("regex", DATE))
        await collect(engine, _request("warm-json", "x", None, json_params))  # compiled before the batch
        await collect(engine, _request("warm-date", "x", None, date_params))
        requests = [
            _request("free-1", "Once upon", "task-1", SamplingParams(max_new_tokens=30, ignore_eos=True)),
            _request("free-5", "The weather", "task-5", SamplingParams(max_new_tokens=30, ignore_eos=True)),
            _request("json-10", "Ticket:", "task-10", json_params),
            _request("date-200", "Due on", "task-200", date_params),
        ]
        events = await asyncio.gather(*(collect(engine, r) for r in requests))
        json.loads(events[2][-1].generated_text)
        assert re.fullmatch(DATE, events[3][-1].generated_text)
        assert events[2][-1].finish_reason == events[3][-1].finish_reason == "eos_token"
        # One model pass per step for all four rows (four tasks, two constrained, two free).
        assert any(step >= {r.request_id for r in requests} for step in steps)


async def test_sampled_constrained_rows_are_seeded_and_max_new_tokens_cuts(make_engine):
    async with make_engine(queue_timeout_s=120) as engine:
        date = StructuredOutput("regex", DATE)

        def sampled(seed: int, max_new_tokens: int = 40) -> SamplingParams:
            return SamplingParams(
                max_new_tokens=max_new_tokens, do_sample=True, temperature=1.3, top_k=50, top_p=0.9,
                seed=seed, top_n_tokens=3, structured=date,
            )  # fmt: skip

        runs = await asyncio.gather(
            *(collect(engine, _request(f"s{i}", "Due", None, sampled(s))) for i, s in enumerate((1, 1, 2)))
        )
        texts = [run[-1].generated_text for run in runs]
        assert all(re.fullmatch(DATE, t) for t in texts), texts
        assert texts[0] == texts[1]  # the same seed: the same answer
        # Logprobs are the model's own: the reported alternatives need not be allowed tokens.
        assert all(len(e.top_tokens) == 3 for e in runs[0] if e.token_id is not None)
        cut = await collect(engine, _request("cut", "Due", None, sampled(1, max_new_tokens=2)))
        assert cut[-1].finish_reason == "length" and cut[-1].num_generated_tokens == 2
        assert texts[0].startswith(cut[-1].generated_text)


async def test_json_answers_have_no_raw_control_characters_and_bounded_whitespace(tiny):
    """xgrammar 0.2.8 lets length-bounded strings take raw control characters (invalid JSON); the
    worker's patched grammar does not, and whitespace runs stay within the bound."""
    grammars = GrammarCompiler(tiny.tokenizer, 50257, 50256, Limits(queue_timeout_s=120))
    try:
        compiled = await grammars.prepare("t", StructuredOutput("json", json.dumps(TEAM_SCHEMA)))
        row = RowGrammar(compiled)
        for token in tiny.tokenizer.encode('{"team": "ab'):
            row.accept(token)
        allowed = allowed_tokens([row], 50257, tiny.model.device)[0]
        controls = [188 + b for b in range(32)]  # GPT-2's byte tokens: byte b < 32 is token 188 + b
        assert [tiny.tokenizer.decode([t]) for t in controls] == [chr(b) for b in range(32)]
        assert not allowed[controls].any()  # not one raw control character inside the string
        assert allowed[tiny.tokenizer.encode("c")[0]]  # ordinary characters are
        # Whitespace after a value: at most 8 characters in a row, then "," or "}" must come.
        row = RowGrammar(compiled)
        for token in tiny.tokenizer.encode('{"team": "ab"') + tiny.tokenizer.encode(" ") * 7:
            row.accept(token)
        space, comma = tiny.tokenizer.encode(" ")[0], tiny.tokenizer.encode(",")[0]
        assert allowed_tokens([row], 50257, tiny.model.device)[0][space]
        row.accept(space)
        after_eight = allowed_tokens([row], 50257, tiny.model.device)[0]
        assert (
            not after_eight[space] and not after_eight[tiny.tokenizer.encode("\n")[0]] and after_eight[comma]
        )
        # A whitespace pattern takes the place of every whitespace run.
        pattern = StructuredOutput("json", json.dumps(TEAM_SCHEMA), whitespace_pattern="[ ]?")
        row = RowGrammar(await grammars.prepare("t", pattern))
        row.accept(tiny.tokenizer.encode("{")[0])
        after_brace = allowed_tokens([row], 50257, tiny.model.device)[0]
        assert after_brace[tiny.tokenizer.encode(" ")[0]] and not after_brace[tiny.tokenizer.encode("\n")[0]]
    finally:
        await grammars.close()


async def test_compiles_are_cached_single_flight_and_a_tenant_cannot_take_every_worker(tiny):
    counts = Counts()
    limits = Limits(grammar_workers=2, grammar_compile_timeout_s=3, queue_timeout_s=120)
    grammars = GrammarCompiler(tiny.tokenizer, 50257, 50256, limits, counts)
    try:
        regex = StructuredOutput("regex", DATE)
        first, second = await asyncio.gather(grammars.prepare("a", regex), grammars.prepare("a", regex))
        assert first is second and counts.compiles == ["ok"]  # one compile for both
        assert (await grammars.prepare("b", regex)) is first and counts.hits == 1
        # Tenant "a" compiles something slow (60,000 enum values, beyond the 3 s bound); tenant "b"
        # gets the other worker meanwhile; "a"'s second constraint waits for its own first.
        slow = StructuredOutput("json", json.dumps({"enum": [f"v{i}" for i in range(60_000)]}))
        slow_task = asyncio.ensure_future(grammars.prepare("a", slow))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        other = await grammars.prepare("b", StructuredOutput("choice", choices=("x", "y")))
        assert other.ebnf and not slow_task.done()
        assert time.monotonic() - started < 3
        try:
            await slow_task
            raise AssertionError("the slow compile was not bounded")
        except InvalidConstraint as exc:  # the deadline, or the memory cap where a fast CPU gets there first
            assert "did not compile within 3 s" in str(exc) or "needed more memory" in str(exc), exc
        assert counts.compiles.count("timeout") + counts.compiles.count("memory") == 1
    finally:
        await grammars.close()
