"""Traffic splits: a task's requests spread over several of its versions by weight (canary rollouts).

A split maps kept versions to integer percentages that sum to 100, e.g. `{3: 10, 2: 90}`. Both
stores keep it with the task's versions (changed atomically, never pointing at a pruned version:
weighted versions are not pruned), so every replica reads the same split, and `pick_version` is a
pure function of (split, tenant, task, key): every replica sends one key to the same version.

Buckets: sha256(tenant, task, key) gives a bucket in [0, 10000); versions own consecutive ranges
of buckets, newest first. Raising the newest version's weight (10% -> 50%) only moves keys from
older versions to it, never between older versions or back.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

MAX_SPLIT_VERSIONS = 4
NUM_BUCKETS = 10_000  # percent x 100
_VERSION_KEY_RE = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)
_MAX_VERSION = 10**18 - 1

Split = dict[int, int]  # version -> percent of requests


class InvalidSplit(ValueError):
    """Weights that are not a valid split (the message says why)."""


def parse_version_key(version: object) -> int:
    """A split's version key as a number: an int (not a bool) or its canonical decimal string, as
    `split_to_json` writes it ("12"; never "012", " 2", "1_0", "+3" or other scripts' digits such as
    "\u0661"), at most 18 digits. Anything else raises `InvalidSplit`."""
    if type(version) is int:
        v = version
    elif isinstance(version, str) and _VERSION_KEY_RE.fullmatch(version):
        v = int(version)
    else:
        raise InvalidSplit(f"version {str(version)[:24]!r} is not a version number (1, 2, ...)")
    if not 1 <= v <= _MAX_VERSION:
        raise InvalidSplit(f"version {v} is not a version number (1, 2, ...)")
    return v


def validate_split(weights: Mapping[Any, Any]) -> Split:
    """The split as {version: percent}, or `InvalidSplit`: 1-4 versions (`parse_version_key`),
    integer percents 1-100 summing to 100."""
    if not isinstance(weights, Mapping) or not 1 <= len(weights) <= MAX_SPLIT_VERSIONS:
        raise InvalidSplit(f"a split names 1-{MAX_SPLIT_VERSIONS} versions")
    split: Split = {}
    for version, percent in weights.items():
        v = parse_version_key(version)
        if type(percent) is not int or not 1 <= percent <= 100:
            raise InvalidSplit(f"version {version!r}: weights are integer percents 1-100 of versions >= 1")
        if v in split:
            raise InvalidSplit(f"version {v} is named twice")
        split[v] = percent
    if sum(split.values()) != 100:
        raise InvalidSplit(f"the percents sum to {sum(split.values())}, not 100")
    return split


def pick_version(split: Mapping[int, int], tenant: str, task: str, key: str) -> int:
    """The version `key` is served under `split` (deterministic; see the module docstring)."""
    digest = hashlib.sha256(f"{tenant}\x00{task}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    bucket = int.from_bytes(digest[:8], "big") % NUM_BUCKETS
    edge = 0
    for version in sorted(split, reverse=True):
        edge += split[version] * (NUM_BUCKETS // 100)
        if bucket < edge:
            return version
    return min(split)  # unreachable for a valid split (the percents sum to 100)


def primary_version(split: Mapping[int, int]) -> int:
    """The version with the largest weight (the older one on a tie): the split's "primary"; the
    others are its canaries. Used for a bounded metrics label."""
    return max(split, key=lambda v: (split[v], -v))


def split_to_json(split: Mapping[int, int]) -> dict[str, int]:
    """JSON object form (string keys), as both stores keep it."""
    return {str(v): p for v, p in sorted(split.items())}
