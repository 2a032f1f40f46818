"""API keys → tenant and role.

Keys come from `Settings.resolve_api_keys()` (file and/or env). A request presents one as
`Authorization: Bearer <key>` (what the OpenAI and TGI clients send). Each presented key is compared
with *every* configured key in constant time (`secrets.compare_digest` on SHA-256 digests, so the
comparison does not even depend on key length), and the loop never exits early: response time does
not tell how close a guess was or which key matched.

Without configured keys the server runs single-tenant: every request is tenant "default" with all
roles (a warning is logged at start-up).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Literal

from server.settings import ApiKeyEntry

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
Role = Literal["generate", "manage"]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose tasks the request may touch, and what it may do."""

    tenant: str
    role: Role
    # The fair-queue class of this caller's requests (the key's default or `X-Priority`)
    # and the key pinning it to one version of a traffic-split task (`X-Route-Key`; None: request id).
    priority: str = "interactive"
    route_key: str | None = None

    @property
    def can_manage(self) -> bool:
        return self.role == "manage"


class AuthError(Exception):
    """No or an unknown API key (→ 401)."""


class Authenticator:
    """Resolves an `Authorization` header to a `Principal`."""

    def __init__(self, keys: dict[str, ApiKeyEntry]) -> None:
        self._entries: list[tuple[bytes, Principal]] = [
            (_digest(key), Principal(entry.tenant, entry.role, entry.priority)) for key, entry in keys.items()
        ]
        self.tenants: frozenset[str] = frozenset(p.tenant for _, p in self._entries) or frozenset(
            {DEFAULT_TENANT}
        )

    @property
    def single_tenant(self) -> bool:
        return not self._entries

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller's principal, or `AuthError` for a missing/malformed/unknown key."""
        if self.single_tenant:
            return Principal(DEFAULT_TENANT, "manage")
        if not authorization:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self._entries:  # no early exit: constant time over all keys
            if secrets.compare_digest(presented, digest):
                found = principal
        if found is None:
            raise AuthError("invalid API key")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
