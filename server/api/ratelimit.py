"""Per-tenant limits on generation requests: requests per second and concurrent requests.

Two implementations of one small interface (`acquire(tenant) -> Lease`, `lease.release()`):

- `LocalLimiter`: in-process counters, for a single replica (no Redis configured).
- `RedisLimiter`: counters in Redis, so the limits hold across all replicas together.
  * rate: a fixed window per tenant, `INCR` + `EXPIRE` on `{prefix}:rl:rps:{tenant}:{window}`.
  * concurrency: a sorted set of leases per tenant, scored by their expiry. A replica that dies
    mid-request cannot leak a slot forever: its lease expires after `lease_ttl_s` and is swept by the
    next acquire. Both checks are single Lua scripts (atomic) and use the Redis server's clock, so
    replicas with skewed clocks agree.
  If Redis fails, the limiter falls back to the local counters for `breaker_s` seconds (per-replica
  limits) rather than refusing traffic or adding a timeout to every request: a Redis outage must not
  stop serving.

A request over a limit gets `RateLimited` (429 with Retry-After). This module may import redis (it
is the server edge) but never torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.api.errors import RateLimited

logger = logging.getLogger(__name__)

# What "Redis is down" looks like; anything else (a bug, an unexpected reply) must surface, not
# silently switch the limits to per-replica.
_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)

LEASE_TTL_S = 600.0  # longest a concurrency slot is held if its replica vanishes without releasing it


@dataclass(frozen=True)
class LimitConfig:
    """Per-tenant limits; 0 disables a limit. No defaults: built from `Limits` (tenant_*)."""

    max_concurrent: int
    rps: float

    @property
    def window_s(self) -> int:
        """Fixed-window length: 1 s, or longer for fractional rates (0.2 rps → 1 request per 5 s)."""
        return 1 if self.rps >= 1 else max(1, math.ceil(1 / self.rps))

    @property
    def per_window(self) -> int:
        return max(1, math.floor(self.rps * self.window_s))


class Lease:
    """One admitted request; `release()` frees its concurrency slot (idempotent)."""

    def __init__(self, on_release: Callable[[], Awaitable[None]] | None = None) -> None:
        self._on_release = on_release

    async def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            await callback()


class TenantLimiter(Protocol):
    async def acquire(self, tenant: str) -> Lease:
        """Admit one request of `tenant` or raise `RateLimited`."""
        ...

    async def close(self) -> None: ...


class NoLimiter:
    """No limits configured."""

    async def acquire(self, tenant: str) -> Lease:
        return Lease()

    async def close(self) -> None:
        return None


class LocalLimiter:
    """In-process limits (one replica). Safe within one event loop; no awaits between check and set."""

    def __init__(self, config: LimitConfig) -> None:
        self.config = config
        self._windows: dict[str, tuple[int, int]] = {}  # tenant -> (window index, count)
        self._running: dict[str, int] = {}

    async def acquire(self, tenant: str) -> Lease:
        cfg = self.config
        if cfg.rps > 0:
            now = time.time()
            window = int(now // cfg.window_s)
            index, count = self._windows.get(tenant, (window, 0))
            if index != window:
                count = 0
            if count >= cfg.per_window:
                retry = max(1, math.ceil((window + 1) * cfg.window_s - now))
                raise RateLimited(f"tenant request rate limit of {cfg.rps:g}/s exceeded", retry)
            self._windows[tenant] = (window, count + 1)
        if cfg.max_concurrent > 0:
            if self._running.get(tenant, 0) >= cfg.max_concurrent:
                raise RateLimited(f"tenant concurrency limit of {cfg.max_concurrent} requests reached", 1)
            self._running[tenant] = self._running.get(tenant, 0) + 1

            async def release() -> None:
                self._running[tenant] = max(0, self._running.get(tenant, 1) - 1)

            return Lease(release)
        return Lease()

    async def close(self) -> None:
        return None


# KEYS[1] = window counter. ARGV[1] = window length (s). Returns the count after this request.
_RPS_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) + 1) end
return n
"""

# KEYS[1] = lease set. ARGV: lease id, limit, ttl. Returns 1 if admitted, 0 if full.
_LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""


class RedisLimiter:
    """Limits shared by all replicas through Redis; local fallback while Redis is unreachable."""

    def __init__(
        self,
        url: str,
        config: LimitConfig,
        key_prefix: str = "prefixserve",
        socket_timeout: float = 0.5,
        lease_ttl_s: float = LEASE_TTL_S,
        breaker_s: float = 5.0,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.config = config
        self._prefix = f"{key_prefix}:rl"
        self._lease_ttl_s = lease_ttl_s
        self._breaker_s = breaker_s
        self._broken_until = 0.0
        # Fail fast: a limiter that waits on a dead Redis would add its timeout to every request.
        self._redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._rps = self._redis.register_script(_RPS_LUA)
        self._lease = self._redis.register_script(_LEASE_LUA)
        self._fallback = LocalLimiter(config)
        self._releasing: set[asyncio.Future[None]] = set()  # releases of cancelled acquires, in flight

    async def acquire(self, tenant: str) -> Lease:
        if time.monotonic() < self._broken_until:
            return await self._fallback.acquire(tenant)
        try:
            return await self._acquire_redis(tenant)
        except RateLimited:
            raise
        except _REDIS_DOWN as exc:  # Redis unreachable or slow: fall back, don't fail
            self._broken_until = time.monotonic() + self._breaker_s
            logger.warning(
                "rate limiter: redis unavailable (%s); using per-replica limits", type(exc).__name__
            )
            return await self._fallback.acquire(tenant)

    async def _acquire_redis(self, tenant: str) -> Lease:
        cfg = self.config
        if cfg.rps > 0:
            now = time.time()
            window = int(now // cfg.window_s)
            count = int(await self._rps(keys=[f"{self._prefix}:rps:{tenant}:{window}"], args=[cfg.window_s]))
            if count > cfg.per_window:
                retry = max(1, math.ceil((window + 1) * cfg.window_s - now))
                raise RateLimited(f"tenant request rate limit of {cfg.rps:g}/s exceeded", retry)
        if cfg.max_concurrent <= 0:
            return Lease()
        key = f"{self._prefix}:conc:{tenant}"
        lease_id = uuid.uuid4().hex

        async def release() -> None:
            try:
                await self._redis.zrem(key, lease_id)
            except Exception as exc:  # the lease expires on its own after lease_ttl_s
                logger.warning("rate limiter: could not release a lease (%s)", type(exc).__name__)

        # Shielded: a caller cancelled while the script runs must not leave its lease in the set until
        # the TTL. The script runs to the end; if it admitted the request, the lease is released.
        call = asyncio.ensure_future(
            self._lease(keys=[key], args=[lease_id, cfg.max_concurrent, self._lease_ttl_s])
        )
        try:
            admitted = int(await asyncio.shield(call))
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._release_if_admitted(done, release))
            raise
        if not admitted:
            raise RateLimited(f"tenant concurrency limit of {cfg.max_concurrent} requests reached", 1)
        return Lease(release)

    def _release_if_admitted(self, call: asyncio.Future[int], release: Callable[[], Awaitable[None]]) -> None:
        """Done-callback of a lease script whose caller was cancelled: free the slot it took."""
        if call.cancelled() or call.exception() is not None or not int(call.result()):
            return
        task = asyncio.ensure_future(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await self._redis.aclose()


def make_limiter(config: LimitConfig, redis_url: str | None, key_prefix: str) -> TenantLimiter:
    """No limiter without limits; Redis-backed when Redis is configured; else in-process."""
    if config.max_concurrent <= 0 and config.rps <= 0:
        return NoLimiter()
    if redis_url:
        return RedisLimiter(redis_url, config, key_prefix)
    return LocalLimiter(config)
