"""`VllmCore`: vLLM's `AsyncLLM` running our prefix GPT-2 (`model.py`), its prefix table and KV cache.

A server has one core, started and shut down by its `VllmEngine`. The core is separate from the engine
because what it fixes at start (the model, its dtype, the table's row count, vLLM's batch width) is
all that is expensive: the engine above it (fair queue, row allocator, prefix tiers) is cheap to build.
Tests start one core per session and build a fresh `VllmEngine` over it for each app they make
(`VllmEngine(..., core=core)`): such an engine leaves the core running when it stops.

vLLM's engine-core client binds to the event loop it first runs on, so a core serves one event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modeling.models import LoadedModel
from server.engine.errors import EngineError
from server.limits import Limits
from server.vllm_backend.plugin import ARCHITECTURE

# Each table row is also a vocabulary entry that vLLM samples over (with logit -inf): the table is
# capped at this many rows whatever its byte budget, so sampling stays cheap.
MAX_PREFIX_ROWS = 16384
_VLLM_DTYPES: dict[torch.dtype, Literal["float32", "bfloat16", "float16"]] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass
class VllmOptions:
    """How vLLM runs (not limits: these tune vLLM itself)."""

    model_dir: str  # the HF model directory vLLM loads (the same one `loaded` came from)
    block_size: int = 32  # vLLM's KV block (CPU: a multiple of 32; only full blocks are shared)
    enforce_eager: bool = False  # skip vLLM's torch.compile (faster start, slower steps)
    max_num_batched_tokens: int | None = None  # vLLM's per-step token budget (None: its default)


def prefix_row_bytes(loaded: LoadedModel) -> int:
    """Bytes of one table row: one prefix position's k and v in every layer."""
    spec = loaded.spec
    return spec.num_layers * 2 * spec.num_heads * spec.head_dim * loaded.dtype.itemsize


def table_rows(loaded: LoadedModel, limits: Limits) -> int:
    """The prefix table's row count for `limits` (its byte budget, capped); refuses a table that
    cannot hold one prefix of `max_prefix_length`."""
    rows = min(limits.vllm_prefix_table_bytes // prefix_row_bytes(loaded), MAX_PREFIX_ROWS)
    if rows < limits.max_prefix_length:
        raise EngineError(
            f"vllm_prefix_table_bytes={limits.vllm_prefix_table_bytes} holds {rows} prefix "
            f"positions of this model, fewer than max_prefix_length={limits.max_prefix_length}"
        )
    return rows


class VllmCore:
    """See the module docstring. Each of `step_listeners` is called as (scheduler_stats,
    iteration_stats) after every vLLM engine step, either may be None (engines on this core add one)."""

    def __init__(
        self, llm: Any, loaded: LoadedModel, prefix_rows: int, max_num_seqs: int, model_dir: str
    ) -> None:
        self.llm = llm
        self.dtype = loaded.dtype
        self.text_vocab_size = loaded.spec.vocab_size  # virtual ids start here
        self.prefix_rows = prefix_rows
        self.max_num_seqs = max_num_seqs
        self.model_dir = model_dir
        self.step_listeners: list[Callable[[Any, Any], None]] = []

    @classmethod
    def start(cls, loaded: LoadedModel, limits: Limits, options: VllmOptions) -> VllmCore:
        """Start vLLM (its engine core process; tens of seconds: it compiles the model). Call it on
        the event loop the core will serve."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        rows = table_rows(loaded, limits)
        vocab = loaded.spec.vocab_size
        args = AsyncEngineArgs(
            model=options.model_dir,
            # We tokenize and detokenize (requests ask for no detokenization: the virtual ids have no
            # text); vLLM loads the tokenizer for structured output, whose grammars match token texts.
            skip_tokenizer_init=False,
            # One grammar library on both backends; requests bring EBNF compiled by us (params.py).
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"),
            dtype=_VLLM_DTYPES[loaded.dtype],
            max_model_len=loaded.spec.max_positions,
            max_num_seqs=limits.max_batch_size,
            max_num_batched_tokens=options.max_num_batched_tokens,
            block_size=options.block_size,
            enable_prefix_caching=True,
            enforce_eager=options.enforce_eager,
            seed=0,
            max_logprobs=20,
            worker_extension_cls="server.vllm_backend.worker.PrefixRowsExtension",
            logits_processors=["server.vllm_backend.typical:TypicalLogitsProcessor"],
            hf_overrides={
                "architectures": [ARCHITECTURE],
                "vocab_size": vocab + rows,
                "prefixserve_text_vocab_size": vocab,
                "prefixserve_prefix_rows": rows,
            },
            disable_log_stats=False,
        )
        core = cls(None, loaded, rows, limits.max_batch_size, options.model_dir)
        core.llm = AsyncLLM.from_engine_args(args, stat_loggers=[core._stat_logger])
        return core

    def check_serves(self, loaded: LoadedModel, limits: Limits) -> None:
        """Refuse an engine this core cannot serve (another dtype or vocabulary, longer prefixes)."""
        if loaded.dtype != self.dtype or loaded.spec.vocab_size != self.text_vocab_size:
            raise EngineError(
                f"this vLLM core serves {self.dtype} with {self.text_vocab_size} text tokens, "
                f"not {loaded.dtype} with {loaded.spec.vocab_size}"
            )
        if limits.max_prefix_length > self.prefix_rows:
            raise EngineError(
                f"max_prefix_length={limits.max_prefix_length} exceeds this vLLM core's prefix table "
                f"({self.prefix_rows} rows)"
            )

    def shutdown(self) -> None:
        """Stop vLLM's engine core; on the loop (it cancels its output handler task)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    def _stat_logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """vLLM stat logger factory: each step's scheduler stats reach `on_step`."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        core = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                for listener in list(core.step_listeners):
                    listener(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return Logger(vllm_config, engine_index)
