"""Per-tenant upload quotas: number of tasks and stored artifact bytes (the upload rate is
`AppState.upload_limiter`, `tenant_upload_rps`).

Checked by the upload route after validation and before the store is written, so one tenant cannot
fill the shared store for everyone and a refused upload changes nothing. Usage is read from the store on each upload
(the tenant's task list; with a byte quota also each task's kept versions): uploads are rare next to
generations, and the store stays the one source of truth. Two uploads racing past the check at the
same moment can exceed a quota by one upload; the next one is refused.
"""

from __future__ import annotations

from prefix_store.base import StoreCorrupt, TaskNotFound
from server.api.deps import AppState
from server.api.errors import ApiError
from server.api.prefix_admin import list_all_tasks, store_call


class QuotaExceeded(ApiError):
    """A tenant is at one of its quotas; waiting does not help, deleting tasks or versions does."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code, message, "quota_exceeded")


async def check_capacity(state: AppState, tenant: str, task: str, new_bytes: int) -> None:
    """Refuse a new version of `task` (`new_bytes` long) that would put `tenant` over a quota."""
    limits = state.config.limits
    max_tasks, max_bytes = limits.tenant_max_tasks, limits.tenant_max_stored_bytes
    if max_tasks <= 0 and max_bytes <= 0:
        return
    # One more than the cap is enough to know the cap is reached.
    wanted = max_tasks + 1 if max_bytes <= 0 else 1 << 30
    tasks, broken = await list_all_tasks(state, tenant, wanted)
    names = {info.task for info in tasks} | set(broken)  # a corrupt task still holds its place
    if max_tasks > 0 and task not in names and len(names) >= max_tasks:
        raise QuotaExceeded(
            429, f"tenant has {len(names)} tasks, the quota is {max_tasks}: delete a task to upload a new one"
        )
    if max_bytes > 0:
        stored = 0
        with store_call(state, "describe"):
            for name in names:
                try:
                    info = await state.store.describe(tenant, name)
                except TaskNotFound:  # deleted since it was listed
                    continue
                except StoreCorrupt:  # logged; its size is unknown, and the upload that repairs it
                    continue  # (or its deletion) must not be refused for it
                stored += sum(v.size_bytes for v in info.versions)
        if stored + new_bytes > max_bytes:
            raise QuotaExceeded(
                413,
                f"tenant stores {stored} artifact bytes; {new_bytes} more would exceed the quota of "
                f"{max_bytes}: delete tasks to make room",
            )
