"""`python tests/reliability/crashing_server.py`: `server.main` whose model runner fails every decode step.

Fault injection for the engine-crash test: the first request that reaches a decode step kills the engine
loop, and the process must report it on /ready and exit non-zero instead of hanging.
"""

from __future__ import annotations

import sys
from typing import Any

from server.engine import gpt2_runner

_real_step = gpt2_runner.GPT2Runner.step


def _broken_step(self: Any, decode_tokens: dict[str, int], items: list[Any]) -> Any:
    if decode_tokens:  # every step that decodes running rows fails (the engine's one runner entry point)
        raise RuntimeError("injected fault: the device was lost")
    return _real_step(self, decode_tokens, items)


gpt2_runner.GPT2Runner.step = _broken_step  # type: ignore[method-assign]

if __name__ == "__main__":
    from server.main import main

    sys.exit(main())
