"""Which engine serves a model: `PREFIXSERVE_ENGINE=auto|vllm|native`.

`auto` (the default) serves GPT-2 on vLLM where vLLM is installed and can run the model, and otherwise
on the native engine, with the reason in one log line (BART: vLLM has no BART of ours; vLLM's CPU
attention needs head_dim >= 32; a vLLM build for another device than the served one). `vllm` refuses
to start when vLLM cannot serve the model; `native` never uses vLLM.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from modeling.models import LoadedModel
from server.engine.errors import EngineError

# vLLM's CPU attention kernels need at least this head size.
MIN_CPU_HEAD_DIM = 32

Backend = Literal["vllm", "native"]


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def unsupported_reason(loaded: LoadedModel) -> str | None:
    """Why vLLM cannot serve `loaded` here, or None if it can."""
    spec = loaded.spec
    if spec.model_type != "gpt2":
        return f"the vLLM backend serves GPT-2 only, not {spec.model_type!r} (vLLM has no in-tree BART)"
    if not vllm_installed():
        return "vLLM is not installed (make install puts it in; VLLM_SPEC empty skips it)"
    from vllm.platforms import current_platform

    if current_platform.device_type != loaded.device.type:
        return (
            f"the installed vLLM build runs on {current_platform.device_type!r}, "
            f"the model is served on {loaded.device.type!r}"
        )
    if loaded.device.type == "cpu" and spec.head_dim < MIN_CPU_HEAD_DIM:
        return f"vLLM's CPU attention needs head_dim >= {MIN_CPU_HEAD_DIM}; the model has {spec.head_dim}"
    return None


def choose_backend(setting: str, loaded: LoadedModel) -> tuple[Backend, str | None]:
    """(backend, why not vLLM) for the `engine` setting. Raises `EngineError` for `vllm` when vLLM
    cannot serve the model."""
    if setting == "native":
        return "native", None
    reason = unsupported_reason(loaded)
    if reason is None:
        return "vllm", None
    if setting == "vllm":
        raise EngineError(f"PREFIXSERVE_ENGINE=vllm, but {reason}")
    return "native", reason


def bart_unsupported_reason(loaded: LoadedModel) -> str | None:
    """Why our vLLM BART (`bart_model.py`) cannot serve this BART, or None if it can; BART's own
    conditions, beside `unsupported_reason`'s general ones (vLLM installed, device, head_dim on CPU).

    Every prefix shape is served: any subset of the three kinds, each of any length up to
    `max_prefix_length` (docs/encoder-decoder.md, "On vLLM"). What can stop a model is only what our
    vLLM BART leaves out: a LM head not tied to the shared embedding, and a decoder head size vLLM's CPU
    attention kernels lack (the encoder's attention is ours and runs any head size).
    """
    config = loaded.model.config
    if not getattr(config, "tie_word_embeddings", True):
        return "our vLLM BART ties the LM head to the shared embedding; this model's config unties them"
    if loaded.device.type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if loaded.spec.head_dim not in sizes:
            return f"vLLM's CPU attention runs head sizes {sizes}; this BART's decoder has {loaded.spec.head_dim}"
    return None
