"""`python tests/reliability/crashing_server.py`: `server.main` whose model runner fails every decode step.

Fault injection for the engine-crash test: the first request that reaches a decode step kills the engine
loop, and the process must report it on /ready and exit non-zero instead of hanging.
"""

from __future__ import annotations

import sys
from typing import Any

from server.engine import gpt2_runner


def _broken_decode(self: Any, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected fault: the device was lost")


gpt2_runner.GPT2Runner.decode = _broken_decode  # type: ignore[method-assign]

if __name__ == "__main__":
    from server.main import main

    sys.exit(main())
