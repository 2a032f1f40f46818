"""Constrained and free rows share a batch (and a forward pass) without touching each other: a free
request's greedy tokens (fp32) are the same with constrained requests of other tasks beside it as
without them, on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.api.conftest import artifact_bytes
from tests.api.structured_cases import CHOICES, DATE_REGEX, TICKET_SCHEMA, check_case

FREE = [("a", "Once upon a time"), ("b", "The weather today"), ("c", "In 1999 we")]
CONSTRAINED = [
    ("a", {"json": TICKET_SCHEMA}, "json"),
    ("b", {"regex": DATE_REGEX}, "regex"),
    ("c", {"choice": CHOICES}, "choice"),
]


def _steps_over(api: Any, rows: int) -> float:
    """Engine steps so far that ran more than `rows` rows."""
    registry = api.metrics.registry
    count = registry.get_sample_value("prefixserve_batch_size_count") or 0.0
    return count - (registry.get_sample_value("prefixserve_batch_size_bucket", {"le": f"{rows:.1f}"}) or 0.0)


async def test_constrained_requests_leave_free_batch_mates_unchanged(make_api, loaded):
    api = await make_api()
    for seed, task in enumerate("abc"):
        assert (await api.upload(task, artifact_bytes(loaded.spec, 20 + seed))).status_code == 201

    async def free(task: str, prompt: str) -> tuple[str, list[int]]:
        r = await api.generate(prompt, task=task, max_new_tokens=24, ignore_eos=True)
        assert r.status_code == 200, r.text
        return r.json()["generated_text"], [t["id"] for t in r.json()["details"]["tokens"]]

    async def constrained(task: str, structured: dict[str, Any], kind: str) -> None:
        r = await api.generate("Answer:", task=task, max_new_tokens=150, structured_outputs=structured)
        assert r.status_code == 200, r.text
        check_case(kind, r.json()["generated_text"])

    for case in CONSTRAINED:  # compiled now: in the mixed round every request reaches the engine at once
        await constrained(*case)
    alone = await asyncio.gather(*(free(*f) for f in FREE))
    before = _steps_over(api, 4)
    mixed = await asyncio.gather(*(free(*f) for f in FREE), *(constrained(*c) for c in CONSTRAINED))
    assert list(mixed[: len(FREE)]) == list(alone)
    # They did share steps: some step ran more than 4 rows (3 free + constrained ones).
    assert _steps_over(api, 4) > before
