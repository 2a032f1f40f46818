"""`VllmCore`: vLLM's `AsyncLLM` running our prefix GPT-2 (`model.py`) or BART (`bart_model.py`), its
prefix table and KV cache.

A server has one core, started and shut down by its `VllmEngine`. The core is separate from the engine
because what it fixes at start (the model, its dtype, the table's row count, vLLM's batch width) is
all that is expensive: the engine above it (fair queue, row allocator, prefix tiers) is cheap to build.
Tests start one core per session and build a fresh `VllmEngine` over it for each app they make
(`VllmEngine(..., core=core)`): such an engine leaves the core running when it stops.

vLLM's engine-core client binds to the event loop it first runs on, so a core serves one event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch

from modeling.models import LoadedModel
from server.engine.errors import EngineError
from server.limits import Limits
from server.vllm_backend.cpu_threads import omp_threads_bind
from server.vllm_backend.plugin import ARCHITECTURE, BART_ARCHITECTURE

logger = logging.getLogger(__name__)

GiB = 1 << 30
CPU_BLOCK_SIZE = 32  # vLLM's CPU attention kernels want a multiple of 32; only full blocks are shared
# Tokens of KV cache beyond the sequences it must hold: vLLM keeps a block of its pool for itself and
# counts in whole blocks (seen: a cache of exactly one 4,096-token sequence held 4,064).
KV_HEADROOM_TOKENS = 4 * 128
_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# Each table row is also a vocabulary entry that vLLM samples over (with logit -inf): the table is
# capped at this many rows whatever its byte budget, so sampling stays cheap.
MAX_PREFIX_ROWS = 16384
_VLLM_DTYPES: dict[torch.dtype, Literal["float32", "bfloat16", "float16"]] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_ARCHITECTURES = {"gpt2": ARCHITECTURE, "bart": BART_ARCHITECTURE}
# BART: vLLM's own default step budget on CPU, raised where one encoder item (a full source plus the
# longest cross prefix) would not fit in a step (vLLM neither chunks nor splits an encoder input).
_BART_MIN_BATCHED_TOKENS = 4096


@dataclass
class VllmOptions:
    """How vLLM runs (not limits: these tune vLLM itself; `server.main` fills them from the settings)."""

    model_dir: str  # the HF model directory vLLM loads (the same one `loaded` came from)
    block_size: int | None = None  # vLLM's KV block; None: 32 on CPU (its kernels' multiple), vLLM's on CUDA
    enforce_eager: bool = False  # no torch.compile, no CUDA graphs (faster start, slower steps)
    max_num_batched_tokens: int | None = None  # vLLM's per-step token budget (None: its default)
    cuda_graph_mode: str = "auto"  # vLLM's cudagraph_mode on CUDA ("auto": vLLM's default)
    cpu_threads: str = "auto"  # cores for vLLM's CPU threads (`cpu_threads.omp_threads_bind`)
    gpu_memory_utilization: float | None = None  # CUDA: vLLM sizes its KV cache from it when set
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def check(self) -> None:
        """Refuse what the prefix table cannot follow yet (raises `EngineError` with the reason)."""
        if self.tensor_parallel_size > 1:
            raise EngineError(
                f"PREFIXSERVE_VLLM_TENSOR_PARALLEL_SIZE={self.tensor_parallel_size}: the vLLM backend runs "
                "one rank only (vLLM would shard each layer's keys and values by heads, and the prefix "
                "table is not sharded with them); serve a larger model on one device, or several "
                "replicas behind a router"
            )
        if self.data_parallel_size > 1:
            raise EngineError(
                f"PREFIXSERVE_VLLM_DATA_PARALLEL_SIZE={self.data_parallel_size}: the vLLM backend runs one "
                "engine (prefix rows are written to one engine core); run one replica per device behind "
                "a router instead (every replica serves every task)"
            )


def prefix_row_bytes(loaded: LoadedModel) -> int:
    """Bytes of one table row: one prefix position's k and v in every layer (BART: of each kind, the
    encoder's, the decoder's and the cross-attention's)."""
    spec = loaded.spec
    vectors = 2 * spec.num_layers
    if spec.is_encoder_decoder:
        vectors += 2 * spec.num_layers + 2 * spec.num_encoder_layers
    return vectors * spec.num_heads * spec.head_dim * loaded.dtype.itemsize


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of one token's keys and values in every decoder layer (what vLLM's KV cache holds per
    token; an encoder-decoder model's cross-attention keys and values count as much again)."""
    spec = loaded.spec
    per_layer = 2 * spec.num_heads * spec.head_dim * loaded.dtype.itemsize
    return spec.num_layers * per_layer * (2 if spec.is_encoder_decoder else 1)


def max_model_len(loaded: LoadedModel, limits: Limits) -> int:
    """The longest sequence vLLM serves: prefix + prompt + new tokens."""
    positions = loaded.spec.max_positions
    return positions if limits.vllm_max_model_len is None else min(limits.vllm_max_model_len, positions)


def kv_cache_bytes(loaded: LoadedModel, limits: Limits) -> int:
    """vLLM's KV cache: the limit, or room for `max_batch_size` sequences of `max_model_len` tokens
    (every row of a full batch at the longest length; vLLM's prefix cache reuses what is free). Refuses
    a cache that cannot hold one sequence of `max_model_len` (vLLM would refuse it later, less clearly)."""
    per_token = kv_bytes_per_token(loaded)
    length = max_model_len(loaded, limits)
    least = (length + KV_HEADROOM_TOKENS) * per_token
    size = (
        limits.vllm_kv_cache_bytes
        or limits.max_batch_size * length * per_token + KV_HEADROOM_TOKENS * per_token
    )
    if size < least:
        raise EngineError(
            f"PREFIXSERVE_VLLM_KV_CACHE_BYTES={size} holds {size // per_token} tokens of this model, fewer "
            f"than one sequence of {length} (PREFIXSERVE_VLLM_MAX_MODEL_LEN) and vLLM's spare blocks: "
            f"raise it to at least {least}"
        )
    return size


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


def _memory_args(loaded: LoadedModel, limits: Limits, options: VllmOptions) -> dict[str, Any]:
    """vLLM's memory arguments. Its KV cache is ours to size (`kv_cache_bytes`): without it vLLM's CPU
    build reserves `gpu_memory_utilization` (0.92) of the machine's RAM and refuses to start when less
    is free. On CUDA an explicit `gpu_memory_utilization` lets vLLM size it instead. An explicit
    `VLLM_CPU_KVCACHE_SPACE` in the environment overrides both inside vLLM (its own legacy switch)."""
    if options.gpu_memory_utilization is not None and loaded.device.type != "cpu":
        return {"gpu_memory_utilization": options.gpu_memory_utilization}
    size = kv_cache_bytes(loaded, limits)
    if loaded.device.type == "cpu" and not _env(_KV_SPACE_ENV):
        free = psutil.virtual_memory().available
        if size > free:
            raise EngineError(
                f"vLLM's KV cache needs {size / GiB:.2f} GiB of host memory and {free / GiB:.2f} GiB is free: "
                "lower PREFIXSERVE_VLLM_KV_CACHE_BYTES (or MAX_BATCH_SIZE / VLLM_MAX_MODEL_LEN)"
            )
    return {"kv_cache_memory_bytes": size}


def _describe_memory(loaded: LoadedModel, memory: dict[str, Any]) -> str:
    if _env(_KV_SPACE_ENV) and loaded.device.type == "cpu":
        return f"KV cache {_env(_KV_SPACE_ENV)} GiB ({_KV_SPACE_ENV} from the environment)"
    if "kv_cache_memory_bytes" in memory:
        size = memory["kv_cache_memory_bytes"]
        tokens = size // kv_bytes_per_token(loaded)
        return f"KV cache reserved {size / GiB:.2f} GiB ({tokens} tokens)"
    return f"KV cache sized by vLLM from gpu_memory_utilization={memory['gpu_memory_utilization']}"


def _env(name: str) -> str | None:
    """vLLM's own switches, read where we hand vLLM its settings (nowhere else reads them)."""
    return os.environ.get(name) or None


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """`name=value` while vLLM starts its processes (None: leave it as it is)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


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

        options.check()
        rows = table_rows(loaded, limits)
        spec = loaded.spec
        vocab = spec.vocab_size
        on_cpu = loaded.device.type == "cpu"
        memory = _memory_args(loaded, limits, options)
        extra = dict(memory)
        if options.cuda_graph_mode != "auto" and not on_cpu:
            from vllm.config import CompilationConfig
            from vllm.config.compilation import CUDAGraphMode

            mode = CUDAGraphMode[options.cuda_graph_mode.upper()]
            extra["compilation_config"] = CompilationConfig(cudagraph_mode=mode)
        overrides: dict[str, Any] = {}
        max_batched_tokens = options.max_num_batched_tokens
        if spec.is_encoder_decoder:
            overrides["prefixserve_max_prefix_length"] = limits.max_prefix_length
            encoder_item = spec.max_positions + limits.max_prefix_length
            max_batched_tokens = max(max_batched_tokens or _BART_MIN_BATCHED_TOKENS, encoder_item)
        args = AsyncEngineArgs(
            model=options.model_dir,
            # We tokenize and detokenize (requests ask for no detokenization: the virtual ids have no
            # text); vLLM loads the tokenizer for structured output, whose grammars match token texts.
            skip_tokenizer_init=False,
            # One grammar library on both backends; requests bring EBNF compiled by us (params.py).
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"),
            dtype=_VLLM_DTYPES[loaded.dtype],
            max_model_len=max_model_len(loaded, limits),
            max_num_seqs=limits.max_batch_size,
            max_num_batched_tokens=max_batched_tokens,
            block_size=options.block_size or (CPU_BLOCK_SIZE if on_cpu else None),
            # vLLM has no prefix caching for encoder-decoder models (it turns it off itself).
            enable_prefix_caching=not spec.is_encoder_decoder,
            enforce_eager=options.enforce_eager,
            seed=0,
            max_logprobs=20,
            worker_extension_cls="server.vllm_backend.worker.PrefixRowsExtension",
            logits_processors=["server.vllm_backend.typical:TypicalLogitsProcessor"],
            hf_overrides={
                "architectures": [_ARCHITECTURES[spec.model_type]],
                "vocab_size": vocab + rows,
                "prefixserve_text_vocab_size": vocab,
                "prefixserve_prefix_rows": rows,
                **overrides,
            },
            disable_log_stats=False,
            **extra,  # memory, and the CUDA graph mode when one is asked for
        )
        core = cls(None, loaded, rows, limits.max_batch_size, options.model_dir)
        bind, threads = (None, "") if not on_cpu else omp_threads_bind(options.cpu_threads, _env(_BIND_ENV))
        logger.info(
            "vLLM: %s; %s",
            _describe_memory(loaded, memory),
            f"CPU threads bound to {threads}" if on_cpu else f"device {loaded.device}",
        )
        # vLLM's engine core process reads the binding from its environment when it starts.
        with _environment(_BIND_ENV, bind):
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
