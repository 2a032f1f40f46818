"""FutureWarnings caused by our code are errors in the suite.

A deprecation warning that transformers raises for a kwarg we pass (`past_key_values`, removed in
transformers 5.40) is attributed to transformers' own module, so a plain `error::FutureWarning:<module>`
filter would not see it. Instead `warnings.warn` is wrapped: for a FutureWarning it walks the stack out
from the warning to the first frame of a package that could be the cause, and raises if that package
is ours. Frames of PEFT count as PEFT's: tests use PEFT (and HF `generate`) as the reference
implementation, and what PEFT passes to transformers is not ours to fix. Test modules are neither.
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import Any

OUR_PACKAGES = frozenset({"modeling", "prefix_store", "server", "training", "loadtest", "prefixserve"})
REFERENCE_PACKAGES = frozenset({"peft"})


class OurFutureWarning(AssertionError):
    """A FutureWarning raised on a call path that starts in our code."""


def responsible_package(frame: FrameType | None) -> str | None:
    """The first of our packages or a reference package met walking out from `frame`."""
    while frame is not None:
        top = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if top in OUR_PACKAGES or top in REFERENCE_PACKAGES:
            return top
        frame = frame.f_back
    return None


def install() -> None:
    """Wrap `warnings.warn` (idempotent); `uninstall` restores it."""
    if getattr(warnings.warn, "_ours", False):
        return
    original = warnings.warn

    def warn(message: Any, category: Any = None, stacklevel: int = 1, source: Any = None, **kw: Any) -> None:
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, FutureWarning) and responsible_package(sys._getframe(1)) in OUR_PACKAGES:
            raise OurFutureWarning(f"FutureWarning on a call path from our code: {message}")
        original(message, category, stacklevel + 1, source, **kw)

    warn._ours = True  # type: ignore[attr-defined]
    warn._original = original  # type: ignore[attr-defined]
    warnings.warn = warn  # type: ignore[assignment]


def uninstall() -> None:
    if getattr(warnings.warn, "_ours", False):
        warnings.warn = warnings.warn._original  # type: ignore[attr-defined]
