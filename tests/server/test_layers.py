"""The API layer really is torch-free at run time (the import contract checks the static graph)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_layer_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import server.api, server.api.app, server.settings, server.metrics, server.limits\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'peft') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the API layer loaded {out.stdout.strip()}"
