"""`RedisPrefixStore`: Redis as the shared source of truth for prefix artifacts.

Key layout (P = key_prefix, T = tenant, K = task; names are validated, so they never contain ':'):

    P:t:T:tasks                 sorted set of T's task names (all scores 0, ordered by name: pagination)
    P:t:T:task:K:seq            version counter (INCR); removed by delete (its value goes to P:t:T:deleted)
    P:t:T:task:K:current        the current version number
    P:t:T:task:K:versions       sorted set of committed versions (score = version)
    P:t:T:task:K:v:N:cas        the sha256 of version N's bytes: its blob is P:blob:<sha256>
    P:t:T:task:K:v:N:blob       (stores written before content addressing) the bytes of version N
    P:t:T:task:K:v:N:meta       JSON of `VersionInfo` for version N
    P:blob:<sha256>             artifact bytes, content-addressed: identical uploads are stored once
    P:blob:<sha256>:refs        how many versions (any task, any tenant) name that blob
    P:usage                     sorted set "T/K" -> requests served (warm start reads the top; delete drops K's)
    P:t:T:task:K:split          traffic split JSON {"<version>": percent} (absent = none)
    P:t:T:deleted               sorted set: deleted task names, score = the last version handed out
    P:t:T:deleted_floor         versions of names pushed out of P:t:T:deleted (over MAX_TOMBSTONES)
    P:changes                   pub/sub channel; message = JSON {"tenant", "task", "version"}

Versions are never reused, not even after delete: a task's counter starts again after max(its
tombstone, the floor). The tombstones are bounded per tenant, so deleted names cost no memory per name
ever used beyond `MAX_TOMBSTONES`.

Data the store did not write (garbage in `current`, `meta`, `split`, `seq`, or a blob whose bytes do
not match its recorded sha256) is `StoreCorrupt` for that task only: listings skip it (naming it in
`TaskPage.broken`), an upload of a new version repairs it (a garbage `seq` restarts after the highest
version still known, a garbage `split` is dropped), and delete removes it.

Every public call is bounded by `call_timeout_s` (retries included): a Redis that stops answering
(hung, SIGSTOPped, a half-open connection) costs a caller at most that long, then `StoreUnavailable`.

Every key is derived from the tenant passed to the call, so no call can reach another tenant's keys.

Publishing a version (`put`): INCR the counter (a script: see the tombstones above), SET the
content-addressed blob with a staging TTL unless it exists (a writer that dies here leaves nothing
behind for long; an identical blob is not sent again), then one Lua script that atomically persists the
blob and counts the reference, writes
its metadata, adds it to the versions set, moves "current", prunes versions beyond `keep_versions`
(never the current one; a pruned version's blob goes when its last reference does) and PUBLISHes
the change. With `min_replicas` > 0 every write script (put's commit, rollback, delete, split) is
followed by `WAIT` on the same connection: the call returns only once that many replicas have the
write, else it raises `StoreUnavailable` (the write may still stand: at least once, never an
acknowledged write lost with the master). A read
gets the pointer, then the metadata and blob reference of that version in one MULTI/EXEC, then the
blob (gone only if the version was pruned meanwhile); if a concurrent prune removed that version in
between, it reads the pointer again. So a reader never sees a pointer to a missing blob or a blob without
metadata, even while versions are being pruned. The scripts build version keys from their arguments, which is fine
on a single Redis (and its replicas / Sentinel) but not on Redis Cluster.

Pub/sub is fire-and-forget: a message published while a replica's listener is disconnected is lost.
So the listener, after every (re)subscribe, resyncs: it compares the version it last reported or
fetched for every task it knows with Redis and emits a `ChangeEvent` for each difference. A periodic
resync every `resync_interval_s` is the backstop for anything else (e.g. a half-open TCP connection).

Every connection error or timeout surfaces as `StoreUnavailable`; no raw redis exception escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prefix_store.background import stop_tasks
from prefix_store.base import (
    ChangeCallback,
    ChangeEvent,
    StoreCorrupt,
    StoredPrefix,
    StoreError,
    StoreUnavailable,
    TaskInfo,
    TaskNotFound,
    TaskPage,
    VersionInfo,
    VersionNotFound,
    check_stored_bytes,
    parse_stored_info,
    parse_stored_split,
    parse_stored_version,
    validate_name,
)
from prefix_store.redis_connect import RedisConnector
from prefix_store.traffic import split_to_json, validate_split
from prefix_store.usage import member as usage_member
from prefix_store.usage import redis_most_used, redis_record_uses

__all__ = ["RedisPrefixStore"]

logger = logging.getLogger(__name__)

# A staged blob (written, not yet committed) expires after this long, so a writer that crashes
# between SET and commit leaks nothing permanently. A commit later than this fails cleanly.
STAGING_TTL_S = 3600
MAX_BLOB_BYTES = 512 * 1024 * 1024  # Redis' string limit
MAX_PAGE_LIMIT = 1000
_MAX_VERSION = 10**18  # what `parse_stored_version` accepts
_RESYNC_CHUNK = 500  # keys per MGET when resyncing
_READ_ATTEMPTS = 5  # re-reads of the pointer when a concurrent prune removes what it named
MAX_TOMBSTONES = 1000  # deleted task names remembered per tenant; older ones fold into the floor

# KEYS: seq, current, versions, deleted, floor. ARGV: task. Returns {version, 1 if a garbage counter
# was restarted}. A new task (no counter) starts after its tombstone and the floor.
_NEXT_VERSION_LUA = """
local function num(v)
  if v and #v <= 18 and string.match(v, '^[0-9]+$') then return tonumber(v) end
  return nil
end
local raw = redis.call('GET', KEYS[1])
local garbage = raw and not num(raw)
if not raw or garbage then
  local start = num(redis.call('GET', KEYS[5])) or 0
  start = math.max(start, tonumber(redis.call('ZSCORE', KEYS[4], ARGV[1]) or '0') or 0)
  local top = redis.call('ZRANGE', KEYS[3], -1, -1)
  if top[1] then start = math.max(start, num(top[1]) or 0) end
  start = math.max(start, num(redis.call('GET', KEYS[2])) or 0)
  redis.call('SET', KEYS[1], string.format('%d', start))
end
redis.call('ZREM', KEYS[4], ARGV[1])
return {redis.call('INCR', KEYS[1]), garbage and 1 or 0}
"""

# Drops version `v` of the task at `base`: its metadata, its blob reference (the blob itself with the
# last reference), and the per-version blob of stores written before content addressing.
_DROP_VERSION_LUA = """
local function drop_version(base, v, blob_prefix)
  local vbase = base .. ':v:' .. v
  local sha = redis.call('GET', vbase .. ':cas')
  if sha then
    local blob = blob_prefix .. sha
    if redis.call('DECR', blob .. ':refs') <= 0 then redis.call('DEL', blob, blob .. ':refs') end
  end
  redis.call('DEL', vbase .. ':blob', vbase .. ':meta', vbase .. ':cas')
end
"""

# KEYS: tasks, current, versions. ARGV: task_base, version, meta_json, keep, task, channel, message,
# sha256, blob key prefix.
_COMMIT_LUA = (
    _DROP_VERSION_LUA
    + """
local base, v, keep = ARGV[1], ARGV[2], tonumber(ARGV[4])
local blob = ARGV[9] .. ARGV[8]
if redis.call('EXISTS', blob) == 0 then
  return redis.error_reply('STAGED staged blob ' .. blob .. ' is missing (expired before commit?)')
end
redis.call('PERSIST', blob)
redis.call('INCR', blob .. ':refs')
redis.call('SET', base .. ':v:' .. v .. ':cas', ARGV[8])
redis.call('SET', base .. ':v:' .. v .. ':meta', ARGV[3])
redis.call('ZADD', KEYS[3], v, v)
redis.call('SET', KEYS[2], v)
redis.call('ZADD', KEYS[1], 0, ARGV[5])
local n = redis.call('ZCARD', KEYS[3])
local function valid_split(t)  -- traffic.validate_split, on the stored JSON form
  if type(t) ~= 'table' then return false end
  local n, sum = 0, 0
  for k, p in pairs(t) do
    if type(k) ~= 'string' or #k > 18 or not string.match(k, '^[1-9][0-9]*$') then return false end
    if type(p) ~= 'number' or p ~= math.floor(p) or p < 1 or p > 100 then return false end
    n, sum = n + 1, sum + p
  end
  return n >= 1 and n <= 4 and sum == 100
end
local split = redis.call('GET', base .. ':split')
local weighted = {}
if split then
  local ok, decoded = pcall(cjson.decode, split)
  if ok and valid_split(decoded) then
    weighted = decoded
  else  -- garbage nobody can be served by: the new version replaces it
    redis.call('DEL', base .. ':split')
  end
end
if n > keep then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, n - keep - 1)) do
    if old ~= v and not weighted[old] then
      drop_version(base, old, ARGV[9])
      redis.call('ZREM', KEYS[3], old)
    end
  end
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return 1
"""
)

# KEYS: current, versions. ARGV: task_base. Returns {} or {current, meta...} (ascending versions).
_DESCRIBE_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {} end
local out = {cur}
for _, v in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local m = redis.call('GET', ARGV[1] .. ':v:' .. v .. ':meta')
  if m then table.insert(out, m) end
end
return out
"""

# KEYS: tasks. ARGV: tenant_base, lex_min, count. Returns {name1, current1, meta1, name2, ...} ('' for
# a missing key: no current = no task; a current without its meta = corrupt).
_LIST_LUA = """
local out = {}
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[2], '+', 'BYLEX', 'LIMIT', 0, ARGV[3])) do
  local b = ARGV[1] .. ':task:' .. name
  local cur = redis.call('GET', b .. ':current')
  local m = false
  if cur then m = redis.call('GET', b .. ':v:' .. cur .. ':meta') end
  table.insert(out, name)
  table.insert(out, cur or '')
  table.insert(out, m or '')
end
return out
"""

# KEYS: current, versions. ARGV: task_base, version, channel, message. Returns {0} no task,
# {1} no version, {2, meta}.
_ROLLBACK_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return {1} end
local m = redis.call('GET', ARGV[1] .. ':v:' .. ARGV[2] .. ':meta')
if not m then return {1} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('DEL', ARGV[1] .. ':split')
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {2, m}
"""

# KEYS: current, versions, split. ARGV: split_json ('' = end the split), channel, message, versions...
# Returns {0} no task, {1, v} version v not kept, {2} done. (canary traffic splits)
_SPLIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
for i = 4, #ARGV do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then return {1, ARGV[i]} end
end
if ARGV[1] == '' then redis.call('DEL', KEYS[3]) else redis.call('SET', KEYS[3], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {2}
"""

# KEYS: tasks, current, versions, seq, deleted, floor, usage. ARGV: task_base, task, channel, message,
# max_tombstones, blob key prefix, usage member. Returns 0 no task, 1 done. The counter's value moves
# to the tenant's tombstones; the task's use count goes.
_DELETE_LUA = (
    _DROP_VERSION_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local function num(v)
  if v and #v <= 18 and string.match(v, '^[0-9]+$') then return tonumber(v) end
  return 0
end
local last = math.max(num(redis.call('GET', KEYS[4])), num(redis.call('GET', KEYS[2])))
for _, v in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  last = math.max(last, num(v))
  drop_version(ARGV[1], v, ARGV[6])
end
last = math.max(last, tonumber(redis.call('ZSCORE', KEYS[5], ARGV[2]) or '0') or 0)
redis.call('ZADD', KEYS[5], last, ARGV[2])
local n = redis.call('ZCARD', KEYS[5])
if n > tonumber(ARGV[5]) then
  local floor = num(redis.call('GET', KEYS[6]))
  local popped = redis.call('ZPOPMIN', KEYS[5], n - tonumber(ARGV[5]))
  for i = 2, #popped, 2 do floor = math.max(floor, tonumber(popped[i])) end
  redis.call('SET', KEYS[6], string.format('%d', floor))
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], ARGV[1] .. ':split')
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[7])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _deadline(op: str) -> Callable[[Callable[_P, Awaitable[_T]]], Callable[_P, Coroutine[Any, Any, _T]]]:
    """Bound a public store call (all its commands and retries) by the store's `call_timeout_s`:
    past it the caller gets `StoreUnavailable` instead of waiting on a Redis that does not answer."""

    def wrap(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
        @functools.wraps(method)
        async def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            store = args[0]
            assert isinstance(store, RedisPrefixStore)
            try:
                async with asyncio.timeout(store.call_timeout_s):
                    return await method(*args, **kwargs)
            except TimeoutError:
                raise StoreUnavailable(
                    f"prefix store unavailable: redis at {store._url} did not answer {op} within "
                    f"{store.call_timeout_s:g} s"
                ) from None

        return bounded

    return wrap


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparseable redis url>"


class RedisPrefixStore:
    """`PrefixStore` on Redis, shared by every server replica. See the module docstring for the layout.

    Args:
        url: e.g. "redis://host:6379/0" (rediss:// for TLS; credentials in the URL).
        key_prefix: namespace of every key and of the change channel; one per deployment.
        keep_versions: versions kept per task (older ones are pruned on put; the current never is).
        socket_timeout: seconds for connecting and for each reply; a dead server fails fast.
        retries: retries of a failed command (exponential backoff with jitter) before
            `StoreUnavailable`.
        resync_interval_s: period of the backstop resync of known tasks' versions.
        reconnect_backoff_s: (first, max) delay between listener reconnect attempts.
        call_timeout_s: deadline of each public call, retries included (`StoreUnavailable` past it).
        min_replicas: replicas that must have a write before it is acknowledged (`WAIT`); 0: the
            master's reply is enough (a failover may lose the last writes).
        replication_timeout_s: how long a write waits for them before `StoreUnavailable`.

    `url` may also name a Sentinel-managed master: `redis+sentinel://host:26379,.../service`
    (`prefix_store.redis_connect`).
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = "prefixserve",
        keep_versions: int = 5,
        socket_timeout: float = 2.0,
        retries: int = 3,
        resync_interval_s: float = 5.0,
        reconnect_backoff_s: tuple[float, float] = (0.2, 2.0),
        call_timeout_s: float = 5.0,
        min_replicas: int = 0,
        replication_timeout_s: float = 2.0,
    ) -> None:
        if not key_prefix or any(c.isspace() for c in key_prefix):
            raise ValueError(f"key_prefix must be non-empty without whitespace, got {key_prefix!r}")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        if not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be > 0, got {call_timeout_s}")
        self.call_timeout_s = call_timeout_s
        if min_replicas < 0 or replication_timeout_s <= 0:
            raise ValueError("min_replicas must be >= 0 and replication_timeout_s > 0")
        self._min_replicas, self._replication_timeout_s = min_replicas, replication_timeout_s
        self._connector = RedisConnector(url)
        self.blob_reads = 0  # blobs read from Redis by `get` (per process: the fan-out of an upload)
        self.blob_read_bytes = 0
        self._url = _redact(url)
        self._prefix = key_prefix
        self._keep_versions = keep_versions
        self._socket_timeout = socket_timeout
        self._resync_interval_s = resync_interval_s
        self._reconnect_backoff_s = reconnect_backoff_s
        self._channel = f"{key_prefix}:changes"
        # Distinguishes this replica's connections in CLIENT LIST (ops can see who is listening).
        self.instance_id = uuid.uuid4().hex[:12]
        # redis-py's defaults for timeouts and retries have changed across versions: set them all.
        self._redis: Redis = self._connector.client(
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
            client_name=f"{key_prefix}:store:{self.instance_id}",
        )
        # The listener's connection must not reconnect silently inside redis-py: we need to see
        # every disconnect to resync afterwards, so it gets no retries and we reconnect ourselves.
        self._listener_redis: Redis = self._connector.client(
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=max(1, int(resync_interval_s)),
            client_name=self.listener_client_name,
        )
        self._commit = self._redis.register_script(_COMMIT_LUA)
        self._describe = self._redis.register_script(_DESCRIBE_LUA)
        self._list = self._redis.register_script(_LIST_LUA)
        self._rollback = self._redis.register_script(_ROLLBACK_LUA)
        self._delete = self._redis.register_script(_DELETE_LUA)
        self._split = self._redis.register_script(_SPLIT_LUA)
        self._next_version = self._redis.register_script(_NEXT_VERSION_LUA)

        self._callbacks: list[ChangeCallback] = []
        # (tenant, task) -> the version subscribers were last told about, or that was last fetched
        # as current. Resync compares this with Redis.
        self._seen: dict[tuple[str, str], int] = {}
        self._seen_splits: dict[tuple[str, str], bytes | str | None] = {}  # last split read per task
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.num_reconnects = 0  # listener re-subscriptions after a lost connection (for tests/metrics)

    # ---- keys -------------------------------------------------------------------------------

    @property
    def listener_client_name(self) -> str:
        """CLIENT SETNAME of this instance's pub/sub connection."""
        return f"{self._prefix}:listener:{self.instance_id}"

    @property
    def is_listening(self) -> bool:
        """True while the change listener is subscribed (and has resynced since it last connected)."""
        return self._subscribed.is_set()

    def _tenant_base(self, tenant: str) -> str:
        return f"{self._prefix}:t:{validate_name(tenant, 'tenant')}"

    def _task_base(self, tenant: str, task: str) -> str:
        return f"{self._tenant_base(tenant)}:task:{validate_name(task, 'task')}"

    @property
    def _blob_prefix(self) -> str:
        return f"{self._prefix}:blob:"

    @staticmethod
    def _message(tenant: str, task: str, version: int | None) -> str:
        return json.dumps({"tenant": tenant, "task": task, "version": version})

    @contextlib.contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """Map redis exceptions to `StoreError`s that name the operation."""
        if self._closed:
            raise StoreUnavailable(f"prefix store {op}: the store is closed")
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, asyncio.TimeoutError) as e:
            # ConnectionError covers refused/reset and BusyLoadingError; ReadOnlyError a failover.
            raise StoreUnavailable(
                f"prefix store unavailable: redis at {self._url} failed during {op} ({type(e).__name__}: {e})"
            ) from e
        except RedisError as e:
            if any(code in str(e) for code in ("NOREPLICAS", "MASTERDOWN")):  # min-replicas-to-write
                raise StoreUnavailable(f"prefix store unavailable during {op}: {e}") from e
            raise StoreError(f"prefix store {op}: redis error: {e}") from e

    # ---- writes -----------------------------------------------------------------------------

    async def _replicated(self, op: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a write script; with `min_replicas`, then `WAIT` for them on the same connection (WAIT
        counts replicas that reached this connection's last write; anything written before it, such as
        a staged blob on another connection, is earlier in the one replication stream). Too few in
        `replication_timeout_s`: `StoreUnavailable` (the write may still stand: at least once)."""
        if not self._min_replicas:
            return await script(keys=keys, args=args)
        pipe = self._redis.pipeline(transaction=False)
        await script(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", self._min_replicas, int(self._replication_timeout_s * 1000))
        result, acked = await pipe.execute()
        if int(acked) < self._min_replicas:
            raise StoreUnavailable(
                f"prefix store {op}: reached {int(acked)} of {self._min_replicas} replica(s) in "
                f"{self._replication_timeout_s}s; it may still take effect"
            )
        return result

    @_deadline("put")
    async def put(self, tenant: str, task: str, data: bytes, metadata: dict[str, Any]) -> VersionInfo:
        """Store `data` as a new version and make it current (see the module docstring for how)."""
        base = self._task_base(tenant, task)
        data = bytes(data)
        if len(data) > MAX_BLOB_BYTES:
            raise ValueError(f"artifact is {len(data)} bytes; Redis strings are limited to {MAX_BLOB_BYTES}")
        try:  # round-trip so the caller's dict can't alias ours, and non-JSON fails here, not later
            metadata = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
        sha256 = hashlib.sha256(data).hexdigest()
        blob = self._blob_prefix + sha256
        with self._errors("put"):
            version = await self._new_version(tenant, task)
            info = VersionInfo(tenant, task, version, sha256, len(data), time.time(), metadata)
            for attempt in range(2):
                if attempt or not await self._redis.exists(blob):  # identical bytes: not sent again
                    await self._redis.set(blob, data, ex=STAGING_TTL_S, nx=True)
                try:
                    await self._replicated(
                        "put",
                        self._commit,
                        keys=[f"{self._tenant_base(tenant)}:tasks", f"{base}:current", f"{base}:versions"],
                        args=[
                            base,
                            str(version),
                            json.dumps(info.to_json_dict()),
                            self._keep_versions,
                            task,
                            self._channel,
                            self._message(tenant, task, version),
                            sha256,
                            self._blob_prefix,
                        ],
                    )
                except RedisError as e:
                    if "STAGED" in str(e) and not attempt:
                        continue  # the blob's last other reference went between EXISTS and commit
                    raise
                break
        logger.info("stored prefix %s/%s v%d (%d bytes)", tenant, task, version, len(data))
        return info

    async def _new_version(self, tenant: str, task: str) -> int:
        """The next version number of the task (see the module docstring: tombstones)."""
        base, tenant_base = self._task_base(tenant, task), self._tenant_base(tenant)
        version, restarted = await self._next_version(
            keys=[
                f"{base}:seq",
                f"{base}:current",
                f"{base}:versions",
                f"{tenant_base}:deleted",
                f"{tenant_base}:deleted_floor",
            ],
            args=[task],
        )
        if restarted:
            logger.error(
                "prefix store data corrupt: %s:seq was not a number; restarted at v%d", base, version
            )
        return int(version)

    @_deadline("rollback")
    async def rollback(self, tenant: str, task: str, version: int) -> VersionInfo:
        """Make `version` (still kept) current again and notify subscribers."""
        base = self._task_base(tenant, task)
        version = int(version)
        if version < 1:
            raise VersionNotFound(f"{tenant}/{task} has no version {version}")
        with self._errors("rollback"):
            res = await self._replicated(
                "rollback",
                self._rollback,
                keys=[f"{base}:current", f"{base}:versions"],
                args=[base, str(version), self._channel, self._message(tenant, task, version)],
            )
        if res[0] == 0:
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        if res[0] == 1:
            raise VersionNotFound(f"{tenant}/{task} has no version {version} (never created or pruned)")
        logger.info("rolled back prefix %s/%s to v%d", tenant, task, version)
        return parse_stored_info(res[1], f"{base}:v:{version}:meta")

    @_deadline("delete")
    async def delete(self, tenant: str, task: str) -> None:
        """Delete the task and all its versions and notify subscribers (version None)."""
        base, tenant_base = self._task_base(tenant, task), self._tenant_base(tenant)
        with self._errors("delete"):
            done = await self._replicated(
                "delete",
                self._delete,
                keys=[
                    f"{tenant_base}:tasks",
                    f"{base}:current",
                    f"{base}:versions",
                    f"{base}:seq",
                    f"{tenant_base}:deleted",
                    f"{tenant_base}:deleted_floor",
                    f"{self._prefix}:usage",
                ],
                args=[
                    base,
                    task,
                    self._channel,
                    self._message(tenant, task, None),
                    MAX_TOMBSTONES,
                    self._blob_prefix,
                    usage_member(tenant, task),
                ],
            )
        if not done:
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        logger.info("deleted prefix %s/%s", tenant, task)

    @_deadline("set_split")
    async def set_split(self, tenant: str, task: str, split: dict[int, int]) -> None:
        """Set (or with `{}` end) the task's traffic split atomically with the check that every
        weighted version is kept; notifies subscribers."""
        base = self._task_base(tenant, task)
        split = validate_split(split) if split else {}
        current = await self.current_version(tenant, task)
        with self._errors("set_split"):
            res = await self._replicated(
                "set_split",
                self._split,
                keys=[f"{base}:current", f"{base}:versions", f"{base}:split"],
                args=[
                    json.dumps(split_to_json(split)) if split else "",
                    self._channel,
                    self._message(tenant, task, current),
                    *[str(v) for v in sorted(split)],
                ],
            )
        if res[0] == 0:
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        if res[0] == 1:
            raise VersionNotFound(f"{tenant}/{task} has no version {int(res[1])} (never created or pruned)")
        logger.info("traffic split of %s/%s set to %s", tenant, task, split or "none")

    @_deadline("get_split")
    async def get_split(self, tenant: str, task: str) -> dict[int, int]:
        """The task's traffic split ({} when none)."""
        base = self._task_base(tenant, task)
        with self._errors("get_split"):
            raw = await self._redis.get(f"{base}:split")
        if raw is not None or (tenant, task) in self._seen:  # not for unknown names: bounded memory
            self._seen_splits[(tenant, task)] = raw  # what subscribers now know; resync compares with it
        return {} if raw is None else parse_stored_split(raw, f"{base}:split")

    # ---- reads ------------------------------------------------------------------------------

    @_deadline("get")
    async def get(self, tenant: str, task: str, version: int | None = None) -> StoredPrefix:
        """The current version's (or `version`'s) info and bytes; metadata and blob read atomically."""
        base = self._task_base(tenant, task)
        with self._errors("get"):
            for _ in range(_READ_ATTEMPTS):
                wanted = version
                if wanted is None:
                    raw = await self._redis.get(f"{base}:current")
                    if raw is None:
                        raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
                    wanted = parse_stored_version(raw, f"{base}:current")
                # One MULTI/EXEC: metadata and blob come from the same instant (a prune deletes
                # both in one script). Not a Lua script: copying a blob through Lua costs 2x a GET.
                pipe = self._redis.pipeline(transaction=True)
                pipe.get(f"{base}:current")
                pipe.get(f"{base}:v:{wanted}:meta")
                pipe.get(f"{base}:v:{wanted}:cas")
                pipe.get(f"{base}:v:{wanted}:blob")  # written before content addressing
                current, meta, sha, data = await pipe.execute()
                if current is None:
                    raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
                if sha is not None:  # None only if the version was pruned since the transaction
                    data = await self._redis.get(self._blob_prefix + sha.decode())
                if meta is not None and data is not None:
                    self.blob_reads += 1
                    self.blob_read_bytes += len(data)
                    break
                if version is not None:
                    raise VersionNotFound(
                        f"{tenant}/{task} has no version {version} (never created or pruned)"
                    )
                if parse_stored_version(current, f"{base}:current") == wanted:  # not a prune: not ours
                    logger.error("prefix store data corrupt: %s:current names v%d, which is missing",
                                 base, wanted)  # fmt: skip
                    raise StoreCorrupt("prefix store data is corrupt (see the server log)")
                # The version we read as current was pruned before the transaction ran: read again.
            else:
                raise StoreError(f"{tenant}/{task}: current version kept changing; gave up reading")
        info = parse_stored_info(meta, f"{base}:v:{wanted}:meta")
        check_stored_bytes(info, data, f"{base}:v:{wanted}:blob")
        if version is None:
            # The caller now holds this version: a resync need not report it again.
            self._seen[(tenant, task)] = info.version
        return StoredPrefix(info=info, data=data)

    @_deadline("current_version")
    async def current_version(self, tenant: str, task: str) -> int | None:
        """The current version number, or None if the tenant has no such task."""
        base = self._task_base(tenant, task)
        with self._errors("current_version"):
            raw = await self._redis.get(f"{base}:current")
        return None if raw is None else parse_stored_version(raw, f"{base}:current")

    @_deadline("describe")
    async def describe(self, tenant: str, task: str) -> TaskInfo:
        """The current version and every kept version, ascending (an older version whose metadata is
        garbage is logged and left out; a garbage current one is `StoreCorrupt`)."""
        base = self._task_base(tenant, task)
        with self._errors("describe"):
            res = await self._describe(keys=[f"{base}:current", f"{base}:versions"], args=[base])
        if not res:
            raise TaskNotFound(f"tenant {tenant!r} has no task {task!r}")
        current = parse_stored_version(res[0], f"{base}:current")
        versions = []
        for meta in res[1:]:
            with contextlib.suppress(StoreCorrupt):  # logged
                versions.append(parse_stored_info(meta, f"{base}:v:*:meta"))
        by_version = {v.version: v for v in versions}
        if current not in by_version:  # commit/prune never drop the current version: not ours
            logger.error(
                "prefix store data corrupt: %s:current names v%d, which has no metadata", base, current
            )
            raise StoreCorrupt("prefix store data is corrupt (see the server log)")
        split = await self.get_split(tenant, task)
        return TaskInfo(current=by_version[current], versions=versions, split=split)

    @_deadline("list_tasks")
    async def list_tasks(self, tenant: str, cursor: str | None = None, limit: int = 100) -> TaskPage:
        """One page of the tenant's tasks (current version each) in name order, after `cursor`."""
        tenant_base = self._tenant_base(tenant)
        if not 1 <= limit <= MAX_PAGE_LIMIT:
            raise ValueError(f"limit must be 1-{MAX_PAGE_LIMIT}, got {limit}")
        lex_min = "-" if cursor is None else "(" + validate_name(cursor, "cursor")
        with self._errors("list_tasks"):
            # One extra name tells us whether there is a next page.
            res = await self._list(keys=[f"{tenant_base}:tasks"], args=[tenant_base, lex_min, limit + 1])
        names = [res[i].decode() for i in range(0, len(res), 3)]
        items: list[VersionInfo] = []
        broken: list[str] = []
        for i, name in enumerate(names[:limit]):
            current, meta = res[3 * i + 1], res[3 * i + 2]
            if not current:
                continue  # listed but no task (cannot happen: delete removes both in one script)
            base = f"{tenant_base}:task:{name}"
            try:
                version = parse_stored_version(current, f"{base}:current")
                if not meta:
                    logger.error("prefix store data corrupt: %s:current names v%d, which has no metadata",
                                 base, version)  # fmt: skip
                    raise StoreCorrupt("prefix store data is corrupt (see the server log)")
                items.append(parse_stored_info(meta, f"{base}:v:{version}:meta"))
            except StoreCorrupt:  # logged; this task alone is left out
                broken.append(name)
        next_cursor = names[limit - 1] if len(names) > limit else None
        return TaskPage(items=items, next_cursor=next_cursor, broken=broken)

    # ---- usage counts (warm starts) ----------------------------------------------------------

    @_deadline("record_uses")
    async def record_uses(self, uses: dict[tuple[str, str], int]) -> None:
        """Add to the per-task request counts (`prefix_store.usage`), one round trip."""
        with self._errors("record_uses"):
            await redis_record_uses(self._redis, f"{self._prefix}:usage", uses)

    @_deadline("most_used")
    async def most_used(self, limit: int) -> list[tuple[str, str]]:
        """The tasks with the highest request counts, most used first."""
        with self._errors("most_used"):
            return await redis_most_used(self._redis, f"{self._prefix}:usage", limit)

    # ---- change notifications ---------------------------------------------------------------

    def subscribe(self, callback: ChangeCallback) -> None:
        """Call `callback(event)` for every change seen (own and other replicas' changes alike)."""
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Start the change listener and the periodic resync.

        Waits (up to about `socket_timeout`) for the first subscription so that changes made right
        after `start()` are seen, but never fails: with Redis down the listener keeps retrying.
        """
        if self._tasks or self._closed:
            return
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name=f"prefix-store-listener-{self.instance_id}"),
            asyncio.create_task(self._resync_forever(), name=f"prefix-store-resync-{self.instance_id}"),
        ]
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=self._socket_timeout + 1.0)
        except asyncio.TimeoutError:
            logger.warning("prefix store: change listener not subscribed yet (redis at %s down?)", self._url)

    async def close(self) -> None:
        """Stop the listener and the resync task and close all connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._tasks, self._socket_timeout + 2.0)
        self._tasks = []
        for client in (self._listener_redis, self._redis):
            with contextlib.suppress(Exception):
                await client.aclose()
        await self._connector.aclose()

    async def resync(self) -> list[ChangeEvent]:
        """Compare the versions known to subscribers with Redis; emit and return the differences."""
        snapshot = list(self._seen.items())
        events: list[ChangeEvent] = []
        for start in range(0, len(snapshot), _RESYNC_CHUNK):
            chunk = snapshot[start : start + _RESYNC_CHUNK]
            with self._errors("resync"):
                raw = await self._redis.mget([f"{self._task_base(t, k)}:current" for (t, k), _ in chunk])
            for ((tenant, task), old), cur in zip(chunk, raw, strict=True):
                try:
                    new = None if cur is None else parse_stored_version(cur, f"{tenant}/{task} current")
                except StoreCorrupt:
                    continue  # logged; readers of this task get 503s until it is repaired
                # Skip if a notification updated this task while we were reading (ours is older).
                if new != old and self._seen.get((tenant, task)) == old:
                    event = ChangeEvent(tenant, task, new)
                    events.append(event)
                    await self._emit(event)
        events += await self._resync_splits()
        if events:
            logger.info("prefix store resync: %d task(s) changed while unobserved", len(events))
        return events

    async def _resync_splits(self) -> list[ChangeEvent]:
        """A traffic split changed while the listener was away (the split is not part of
        `current`): report the task as changed, so subscribers re-read its split."""
        known = {**dict.fromkeys(self._seen), **self._seen_splits}  # tasks that exist, or had a split
        snapshot = list(known.items())
        events: list[ChangeEvent] = []
        for start in range(0, len(snapshot), _RESYNC_CHUNK):
            chunk = snapshot[start : start + _RESYNC_CHUNK]
            bases = [self._task_base(t, k) for (t, k), _ in chunk]
            with self._errors("resync"):
                raw = await self._redis.mget([f"{b}:split" for b in bases] + [f"{b}:current" for b in bases])
            for ((tenant, task), old), new, cur in zip(
                chunk, raw[: len(chunk)], raw[len(chunk) :], strict=True
            ):
                if new != old and self._seen_splits.get((tenant, task)) == old and (new or old):
                    self._seen_splits[(tenant, task)] = new
                    try:
                        version = (
                            None if cur is None else parse_stored_version(cur, f"{tenant}/{task} current")
                        )
                    except StoreCorrupt:
                        continue  # logged; readers of this task get 503s until it is repaired
                    event = ChangeEvent(tenant, task, version)
                    events.append(event)
                    await self._emit(event)
        return events

    async def _emit(self, event: ChangeEvent) -> None:
        """Record what subscribers are told, then tell them. Callback errors are logged."""
        key = (event.tenant, event.task)
        if event.version is None:
            self._seen.pop(key, None)
            self._seen_splits.pop(key, None)  # a deleted task has no split to watch
        else:
            self._seen[key] = event.version
        for cb in list(self._callbacks):
            try:
                res = cb(event)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                logger.exception("prefix store change callback %r failed for %s", cb, event)

    async def _on_message(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
            version = obj["version"]
            # Anyone who can PUBLISH on the channel can send anything: a message is only a hint (the
            # prefix cache re-reads the store), and a version must look like one we could have made.
            if version is not None and not (type(version) is int and 1 <= version <= _MAX_VERSION):
                raise ValueError(f"version {str(version)[:20]!r} is not a version number")
            event = ChangeEvent(
                validate_name(obj["tenant"], "tenant"), validate_name(obj["task"], "task"), version
            )
        except (ValueError, KeyError, TypeError, RecursionError, StoreError) as e:
            logger.warning("prefix store: ignoring malformed change message %r: %s", data[:200], e)
            return
        await self._emit(event)

    def _backoff(self, failures: int) -> float:
        first, cap = self._reconnect_backoff_s
        delay = min(cap, first * 2 ** (failures - 1))
        return delay / 2 + random.random() * delay / 2  # "equal jitter": never near zero

    async def _listen_forever(self) -> None:
        """Subscribe, resync, forward messages; on any failure back off, reconnect and repeat."""
        failures = 0
        while not self._closed:
            pubsub: PubSub | None = None
            try:
                pubsub = self._listener_redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._channel)
                if failures:
                    self.num_reconnects += 1
                    logger.info("prefix store: change listener reconnected to %s", self._url)
                # Subscribed first, then resync: a change after this point arrives as a message,
                # one before it (while we were away) is found by the resync.
                await self.resync()
                self._subscribed.set()
                failures = 0
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        await self._on_message(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._subscribed.clear()
                failures += 1
                log = logger.warning if failures == 1 else logger.debug
                log("prefix store: change listener lost redis at %s (%s: %s)", self._url, type(e).__name__, e)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            if not self._closed:
                await asyncio.sleep(self._backoff(failures))

    async def _resync_forever(self) -> None:
        """Backstop: resync periodically even when the listener thinks it is connected."""
        while not self._closed:
            await asyncio.sleep(self._resync_interval_s)
            try:
                await self.resync()
            except StoreError as e:
                logger.debug("prefix store: periodic resync failed: %s", e)
