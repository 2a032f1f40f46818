"""Per-task request counts, kept by the store so that a (re)starting replica warms the most used tasks.

Both backends keep one count per (tenant, task): `record_uses({(tenant, task): n})` adds to them
(replicas send what they served every few seconds, not one write per request), and `most_used(limit)`
returns the tasks with the highest counts, most used first. Redis: one sorted set `P:usage` (member
"tenant/task", score = count; names never contain "/"), trimmed to `MAX_TRACKED_TASKS` members on
every write. Local store: `usage.json` in the store's root, written atomically.

Counts never decay: a task that was hot long ago keeps its place until others overtake it. Deleting a
task drops its count (Redis: in the delete script; local store: `LocalUsage.forget`), so names that
come and go (a tenant's CI making a task per run) leave no count behind and never crowd the live
tasks out of a warm start. A count a replica flushes just after the delete (uses it took before) can
bring a name back; the cap bounds those, and warming one fails harmlessly (unknown task).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefix_store.base import InvalidName, validate_name

__all__ = ["MAX_TRACKED_TASKS", "LocalUsage", "member", "redis_most_used", "redis_record_uses"]

logger = logging.getLogger(__name__)

MAX_TRACKED_TASKS = 10_000  # members kept, highest counts; far above any warm start's task count
MAX_LIST = 1000  # most tasks one `most_used` call returns


def member(tenant: str, task: str) -> str:
    return f"{validate_name(tenant, 'tenant')}/{validate_name(task, 'task')}"


def parse_member(raw: str | bytes) -> tuple[str, str] | None:
    """(tenant, task) of a stored member, or None for anything else (logged, skipped)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    tenant, _, task = text.partition("/")
    try:
        return validate_name(tenant, "tenant"), validate_name(task, "task")
    except InvalidName:
        logger.warning("prefix store usage: skipping malformed member %r", text[:100])
        return None


def check_limit(limit: int) -> None:
    if not 0 <= limit <= MAX_LIST:
        raise ValueError(f"limit must be 0-{MAX_LIST}, got {limit}")


async def redis_record_uses(client: Any, key: str, uses: dict[tuple[str, str], int]) -> None:
    """ZINCRBY each count into the sorted set `key` in one round trip, then trim it."""
    members = {member(tenant, task): n for (tenant, task), n in uses.items() if n > 0}
    if not members:
        return
    pipe = client.pipeline(transaction=False)
    for name, n in members.items():
        pipe.zincrby(key, n, name)
    pipe.zremrangebyrank(key, 0, -(MAX_TRACKED_TASKS + 1))  # drop the lowest beyond the cap
    await pipe.execute()


async def redis_most_used(client: Any, key: str, limit: int) -> list[tuple[str, str]]:
    check_limit(limit)
    if limit == 0:
        return []
    raw = await client.zrevrange(key, 0, limit - 1)
    return [parsed for parsed in map(parse_member, raw) if parsed is not None]


class LocalUsage:
    """The counts of a local directory store, in `{root}/usage.json` (one process writes it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("prefix store usage: ignoring unreadable %s (%s)", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, int | float)}

    def record(self, uses: dict[tuple[str, str], int], write: Any) -> None:
        """Add `uses`; `write(path, bytes)` writes atomically (the store's own helper)."""
        counts = self._read()
        for (tenant, task), n in uses.items():
            if n > 0:
                name = member(tenant, task)
                counts[name] = counts.get(name, 0) + n
        kept = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:MAX_TRACKED_TASKS])
        write(self.path, json.dumps(kept).encode())

    def forget(self, tenant: str, task: str, write: Any) -> None:
        """Drop a deleted task's count; the file is rewritten only when it held one."""
        counts = self._read()
        if counts.pop(member(tenant, task), None) is not None:
            write(self.path, json.dumps(counts).encode())

    def most_used(self, limit: int) -> list[tuple[str, str]]:
        check_limit(limit)
        ranked = sorted(self._read().items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return [parsed for parsed in (parse_member(name) for name, _ in ranked) if parsed is not None]
