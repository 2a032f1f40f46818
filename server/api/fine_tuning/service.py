"""`FineTuning`: what the fine-tuning routes and this replica's background work share.

One per app (`create_app` builds it from the settings): the job store (`prefix_store.jobs`), the app's
state (the upload checks, the prefix store, the tokenizer, the limits, the metrics) and the background
loop (`publisher.run`). A serving replica validates job files and stores trained prefixes; it never
trains (the workers do, in their own processes).

Errors of the job store become API errors here (`api_errors`): an unknown or another tenant's id is
404, a change the job's state does not allow is 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any

from fastapi import Depends

from prefix_store.background import stop_tasks
from prefix_store.jobs import policy
from prefix_store.jobs.base import JobNotFound, JobStore
from prefix_store.jobs.factory import make_job_store
from prefix_store.jobs.model import Job, JobEvent
from server.api.deps import AppState, State
from server.api.errors import ApiError
from server.settings import Settings
from training.job_data import ModelShape

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """The job store's refusals as HTTP answers (module docstring)."""
    try:
        yield
    except JobNotFound as exc:
        raise ApiError(404, str(exc), "not_found") from None
    except policy.Conflict as exc:
        raise ApiError(409, str(exc), "conflict") from None


class FineTuning:
    """The fine-tuning side of one app (module docstring)."""

    def __init__(
        self, store: JobStore, state: AppState, poll_s: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.state = state
        self.poll_s = poll_s
        self.clock = clock
        # Who holds a job while this replica stores its prefix (a claim that lapses if the replica dies).
        self.replica = f"server:{socket.gethostname()}:{os.getpid()}"
        self.validating: set[str] = set()  # jobs whose files this replica is checking now
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(cls, settings: Settings, state: AppState) -> FineTuning:
        store = make_job_store(
            settings.redis_url,
            settings.fine_tuning_data_dir(),
            settings.redis_key_prefix,
            call_timeout_s=settings.limits.store_timeout_s,
        )
        return cls(store, state)

    @property
    def model_shape(self) -> ModelShape:
        spec = self.state.spec
        return ModelShape(spec.is_encoder_decoder, spec.max_positions)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts as the recipe tokenises (no special tokens); blocking: run it in a thread."""
        tokenizer = self.state.engine.tokenizer
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    async def event(
        self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        await self.store.add_event(
            job_id, JobEvent(created_at=int(self.clock()), level=level, message=message, data=data)
        )

    async def conclude(
        self,
        job_id: str,
        guard: Callable[[Job], None],
        change: Callable[[Job], None],
        message: str,
        level: str = "info",
    ) -> bool:
        """Apply `change` to the job if `guard` lets it (it raises `policy.Conflict` when the job has
        moved on: cancelled, taken by another replica), then record `message`; False if it did not."""

        def guarded(job: Job) -> None:
            guard(job)
            change(job)

        try:
            await self.store.update_job(job_id, guarded)
        except policy.Conflict:
            return False
        await self.event(job_id, message, level)
        return True

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run `work` in the background, held until done (and cancelled at close)."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await stop_tasks(list(self._tasks))
        await self.store.close()


def get_fine_tuning(state: State) -> FineTuning:
    service = state.fine_tuning
    assert isinstance(service, FineTuning)
    return service


Service = Annotated[FineTuning, Depends(get_fine_tuning)]


def attach(settings: Settings, state: AppState) -> FineTuning:
    """Build the app's `FineTuning` and hang it on its state (`create_app`)."""
    state.fine_tuning = FineTuning.from_settings(settings, state)
    return state.fine_tuning
