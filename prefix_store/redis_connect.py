"""Redis clients from a URL: a single Redis (`redis://`, `rediss://`) or a Sentinel-managed master.

Sentinel URL (no standard exists; this follows the form several clients use):

    redis+sentinel://[[user]:password@]host1:26379[,host2:26379,...]/service_name[/db][?sentinel_password=...]
    rediss+sentinel://...   TLS to the data nodes (not to the sentinels)

The password (and user) in the URL are the data nodes' (`requirepass` / ACL); the sentinels' own
password, if they have one, is the `sentinel_password` query parameter. The client asks the
sentinels for the current master of `service_name` on every new connection (redis-py's
`SentinelConnectionPool`); after a failover a connection to the demoted master answers READONLY,
which redis-py turns into a disconnect, so the next attempt finds the new master. Between the
master's death and the promotion (`down-after-milliseconds` + election) every call fails with a
connection error, which the store maps to `StoreUnavailable` (HTTP 503 + Retry-After).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

__all__ = ["RedisConnector", "SentinelAddress", "parse_sentinel_url"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False


def parse_sentinel_url(url: str) -> SentinelAddress | None:
    """The Sentinel address in `url`, or None when `url` is a plain Redis URL. Raises ValueError on a
    malformed Sentinel URL (names the problem, never the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit("redis://" + rest)
    auth, _, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if auth:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for host_port in filter(None, hosts.split(",")):
        host, colon, port = host_port.rpartition(":")  # IPv6 literals are not supported: use names
        if not colon:
            host, port = host_port, str(DEFAULT_SENTINEL_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {host_port!r} is not host:port")
        sentinels.append((host, int(port)))
    if not sentinels:
        raise ValueError("a redis+sentinel:// URL needs at least one sentinel host:port")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a redis+sentinel:// URL's path is /service_name or /service_name/db")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"database {path[1]!r} is not a number")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown redis+sentinel:// URL parameter(s): {sorted(unknown)}")
    return SentinelAddress(
        sentinels=tuple(sentinels),
        service_name=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
        ssl=scheme == "rediss+sentinel",
    )


@dataclass
class RedisConnector:
    """Makes the store's clients for one URL; `aclose()` also closes the sentinel connections."""

    url: str
    _sentinels: list[Sentinel] = field(default_factory=list)

    @property
    def uses_sentinel(self) -> bool:
        return parse_sentinel_url(self.url) is not None

    def client(self, **kwargs: Any) -> Redis:
        """A client of the (current) master; `kwargs` as for `Redis` (timeouts, retry, client_name)."""
        address = parse_sentinel_url(self.url)
        if address is None:
            return Redis.from_url(self.url, **kwargs)
        timeouts = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
        sentinel_kwargs: dict[str, Any] = dict(timeouts)
        if address.sentinel_password is not None:
            sentinel_kwargs["password"] = address.sentinel_password
        sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs, **timeouts)
        self._sentinels.append(sentinel)
        return sentinel.master_for(
            address.service_name,
            redis_class=Redis,
            db=address.db,
            username=address.username,
            password=address.password,
            ssl=address.ssl,
            **kwargs,
        )

    async def aclose(self) -> None:
        for sentinel in self._sentinels:
            with contextlib.suppress(Exception):
                await sentinel.aclose()
        self._sentinels.clear()
