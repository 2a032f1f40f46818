"""Every configurable limit of the server, in one object: the only place each is declared.

A limit is declared once, here: its default, its bounds (`ge`/`gt`/`le`) and its one-line meaning.
`server.settings.Settings` derives a setting from each (env `PREFIXSERVE_<FIELD>`, validated against
those bounds) and builds one `Limits` from them (`Settings.limits`); `server.main` hands that same
object to the engine (`EngineConfig.limits`), the API (`create_app`) and, through them, to the prefix
cache and the model runners. No other class carries its own default for any of these numbers, so what
one layer accepts another cannot refuse: an upload that passes `max_prefix_length` is loadable by the
engine (prefixes live in their own tensors, any length).

Torch-free and import-free on purpose: the API layer and the engine both read it. `Limits` satisfies
`prefix_store.artifact.ArtifactLimits` (the artifact checks read `max_artifact_bytes` and
`max_prefix_length` from it directly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Which backend reads a limit (`limit(..., engine=...)`): a server on the other one names, at start,
# those it was given and ignores.
NATIVE_ONLY = "native"


def limit(default: Any, doc: str, *, engine: str | None = None, **bounds: float) -> Any:
    """A limit's declaration: its default, its meaning (the setting's description) and its bounds
    (pydantic's `ge`, `gt`, `le`, checked when the setting is read)."""
    return field(default=default, metadata={"doc": doc, "engine": engine, **bounds})


@dataclass(frozen=True)
class Limits:
    """Configurable limits (env names: `PREFIXSERVE_<FIELD>`; README "Configuration")."""

    # --- HTTP: what one client may send (server.api.admission, server.http_protocol) -------------
    max_body_bytes: int = limit(64 << 20, "Request bodies above this get 413.", ge=1024)
    shutdown_grace_s: float = limit(
        30.0, "On SIGTERM, how long in-flight generations may take to finish.", ge=0
    )
    max_json_body_bytes: int = limit(
        1 << 20, "Body limit of every route but uploads (capped by max_body_bytes); 413 beyond it.", ge=1024
    )
    max_prompt_chars: int | None = limit(
        None, "Longer prompts get 422 before tokenisation; unset: positions x longest token's bytes.", ge=1
    )
    max_prompts_per_request: int = limit(
        64, "Prompts in one /v1/completions request (a list); more: 422.", ge=1
    )
    timeout_keep_alive_s: int = limit(5, "Idle keep-alive connections are closed.", ge=1)
    timeout_request_header_s: float = limit(
        10.0, "A connection without complete request headers by then is closed (slowloris).", gt=0
    )
    max_connections: int = limit(
        1000, "Open connections beyond this get 503 (uvicorn limit_concurrency).", ge=1
    )
    max_request_header_bytes: int = limit(16384, "Request line + headers beyond this get 400 (h11).", ge=1024)
    # --- HTTP: what one hostile tenant may cost (server.http_protocol, server.engine.chat_render) --
    timeout_request_body_s: float = limit(
        30.0, "A request body must arrive within this plus its size at min_request_body_bytes_per_s.", gt=0
    )
    min_request_body_bytes_per_s: int = limit(16384, "Slower request bodies are cut off.", ge=1)
    timeout_refused_body_s: float = limit(
        1.0, "After a refusal sent before the body was read, the rest must come this soon (+ rate).", gt=0
    )
    tenant_max_connections: int = limit(
        256,
        "Requests in flight per tenant, counted before the body is read (429); never more than half of "
        "max_connections (0: that half alone).",
        ge=0,
    )
    timeout_write_s: float = limit(
        30.0, "A response the client reads nothing of for this long: the connection is closed.", gt=0
    )
    max_tokenize_chars: int | None = limit(
        None, "/tokenize inputs longer than this get 422; unset: the prompt limit.", ge=1
    )
    chat_template_workers: int = limit(
        2, "Processes that render chat templates; a tenant holds at most all but one.", ge=1
    )
    chat_template_timeout_s: float = limit(
        2.0, "A chat template render still running then is killed: 422.", gt=0
    )
    chat_template_max_memory_bytes: int = limit(
        256 << 20, "Memory one chat template render may use (worker address space): 422 beyond.", ge=16 << 20
    )
    # --- structured output (server.engine.grammar): grammars compile in worker processes ----------
    grammar_workers: int = limit(
        2, "Grammar compile processes; a tenant holds at most all but one (the one, if 1).", ge=1
    )
    grammar_compile_timeout_s: float = limit(
        5.0, "A structured-output constraint still compiling then is refused (400).", gt=0
    )
    grammar_compile_max_memory_bytes: int = limit(
        512 << 20, "Memory one grammar compile may use (worker address space): 400 beyond.", ge=16 << 20
    )
    grammar_cache_bytes: int = limit(256 << 20, "Compiled grammars kept (LRU), per engine.", ge=0)
    # --- uploads (and every later load of what was uploaded) -----------------------------------
    max_artifact_bytes: int = limit(
        64 << 20, "Per uploaded file; also the engine's limit on stored blobs.", ge=1024
    )
    keep_versions: int = limit(
        5, "Versions kept per task; older ones are pruned on upload (never the current).", ge=1
    )
    max_prefix_length: int = limit(512, "Longest prefix accepted (per kind).", ge=1)
    store_timeout_s: float = limit(
        5.0, "Deadline of each prefix store call (Redis: all its commands and retries); past it 503.", gt=0
    )
    # --- engine --------------------------------------------------------------------------------
    max_batch_size: int = limit(32, "Rows of one step (running requests).", ge=1)
    max_waiting: int = limit(
        256, "Queue bound (beyond the batch's free rows); beyond it requests get 429.", ge=0
    )
    tenant_max_waiting: int = limit(
        0, "Queued requests per tenant (an API key's max_waiting wins); 0 = the global bound only.", ge=0
    )
    queue_timeout_s: float = limit(30.0, "Longest wait in the queue before a clear error.", gt=0)
    max_prefill_tokens: int = limit(
        256, "Prompt tokens computed per step (chunked on GPT-2); lower = shorter decode stalls.",
        engine=NATIVE_ONLY, ge=1,
    )  # fmt: skip
    kv_budget_tokens: int | None = limit(
        None, "KV positions reserved by running requests; unset: batch x positions.", engine=NATIVE_ONLY, ge=1
    )
    kv_budget_bytes: int | None = limit(
        None, "GPT-2's paged KV pool (rows' own tokens); unset: kv_budget_tokens' worth.",
        engine=NATIVE_ONLY, ge=1,
    )  # fmt: skip
    # GPT-2's static decode path (CUDA graphs, or torch.compile): the device arena that holds decoding
    # rows' prefixes at fixed addresses (its bytes count in the KV budget), and how many decode buckets
    # are captured as CUDA graphs (beyond it, buckets run the static step eagerly)
    static_prefix_arena_tokens: int = limit(
        2048, "Prefix positions of the static decode path's arena (GPT-2; counted in the KV budget).",
        engine=NATIVE_ONLY, ge=1,
    )  # fmt: skip
    max_cuda_graphs: int = limit(
        64, "Decode buckets captured as CUDA graphs (GPT-2).", engine=NATIVE_ONLY, ge=0
    )
    device_prefix_cache_bytes: int = limit(
        256 << 20, "Prefix cache on the device (LRU).", engine=NATIVE_ONLY, ge=0
    )
    host_prefix_cache_bytes: int = limit(1 << 30, "Prefix cache in host memory (LRU).", ge=0)
    # The vLLM backend: its prefix table (rows of prefix K/V inside vLLM's model; an LRU over prefixes
    # no request uses), how many admitted requests may wait in vLLM's own queue beyond the batch (0:
    # our fair queue decides every admission; vLLM serves its own queue FCFS), its KV cache (sized by
    # us, so a start never depends on how much of the machine's memory happens to be free), and the
    # longest sequence it serves.
    vllm_prefix_table_bytes: int = limit(
        128 << 20, "vLLM backend: the prefix table inside vLLM's model (LRU over prefixes not in use).",
        engine="vllm", ge=1,
    )  # fmt: skip
    vllm_max_queued: int = limit(
        0,
        "vLLM backend: admitted requests waiting in vLLM's own queue beyond the batch.",
        engine="vllm",
        ge=0,
    )
    vllm_kv_cache_bytes: int | None = limit(
        None, "vLLM backend: its KV cache (host memory on CPU, GPU memory on CUDA); unset: "
        "max_batch_size sequences of vllm_max_model_len tokens.", engine="vllm", ge=1,
    )  # fmt: skip
    vllm_max_model_len: int | None = limit(
        None, "vLLM backend: longest sequence (prefix + prompt + new tokens); unset: the model's positions.",
        engine="vllm", ge=1,
    )  # fmt: skip
    # Warm start: before readiness, load the most used tasks (store's request counts) into the tiers,
    # at most this many and for at most this long (0 tasks: start cold)
    warm_start_tasks: int = limit(
        64, "Most used tasks loaded into the prefix cache before readiness (0: start cold).", ge=0, le=1000
    )
    warm_start_timeout_s: float = limit(60.0, "Longest warm start; then ready anyway.", ge=0)
    # --- tenants (0 = off) ---------------------------------------------------------------------
    tenant_max_concurrent: int = limit(0, "Concurrent requests per tenant; 0 = unlimited.", ge=0)
    tenant_rps: float = limit(0.0, "Requests/second per tenant; 0 = unlimited.", ge=0)
    tenant_upload_rps: float = limit(
        0.0, "Prefix uploads/second per tenant (0.1 = one per 10 s); 0 = unlimited.", ge=0
    )
    tenant_max_tasks: int = limit(1000, "Tasks per tenant; 0 = unlimited (429 beyond).", ge=0)
    tenant_max_stored_bytes: int = limit(
        8 << 30, "Artifact bytes per tenant, all kept versions; 0 = unlimited (413 beyond).", ge=0
    )
    max_training_metadata_bytes: int = limit(
        16 << 10, "JSON size of an artifact's `training` metadata (422 beyond).", ge=0
    )
    # --- fine-tuning jobs (server.api.fine_tuning, training.worker) ------------------------------
    max_training_file_bytes: int = limit(32 << 20, "One uploaded training file (413 beyond).", ge=1)
    tenant_max_training_files: int = limit(100, "Training files per tenant (429 beyond); 0 = off.", ge=0)
    max_training_tokens_per_job: int = limit(
        20_000_000, "Training tokens x epochs of one job; beyond it the job fails while validating.", ge=1
    )
    tenant_max_running_jobs: int = limit(
        1, "A tenant's jobs training at once; more wait in the queue. 0 = off.", ge=0
    )
    tenant_max_queued_jobs: int = limit(
        10, "A tenant's jobs validating, queued or paused (429 beyond); 0 = off.", ge=0
    )


DEFAULT_LIMITS = Limits()
