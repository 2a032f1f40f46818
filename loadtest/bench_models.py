"""The benchmark's models: random-weight preset directories written once, and the text vocabulary bound.

Shared by `loadtest.bench` and `loadtest.profiling` (which `bench` runs), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from modeling.models import make_model_dir

GPT2_TEXT_VOCAB = 50257  # real-text token ids (BART's extra specials sit above)


def ensure_model(preset: str, models_dir: Path, overrides: tuple[tuple[str, float], ...] = ()) -> Path:
    """The preset's random-weight model directory, written once (same preset and overrides, same weights)."""
    path = models_dir / (preset + "".join(f"-{k}{v}" for k, v in overrides))
    if not (path / "config.json").exists():
        print(f"[bench] writing {preset} {dict(overrides)} model to {path}", flush=True)
        make_model_dir(preset, path, seed=0, **dict(overrides))
    return path
