"""Every configurable limit of the server, in one object: the only place their defaults are written.

`Settings` (the environment) builds one `Limits` (`Settings.limits`) once, at the edge; `server.main`
hands that same object to the engine (`EngineConfig.limits`), the API (`create_app`) and, through
them, to the prefix cache and the model runners. No other class carries its own default for any of
these numbers, so what one layer accepts another cannot refuse: an upload that passes
`max_prefix_length` is loadable by the engine (prefixes live in their own tensors, any length).

Torch-free and import-free on purpose: the API layer and the engine both read it. `Limits` satisfies
`prefix_store.artifact.ArtifactLimits` (the artifact checks read `max_artifact_bytes` and
`max_prefix_length` from it directly).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Configurable limits (env names: `PREFIXSERVE_<FIELD>`; README "Configuration")."""

    # --- HTTP ----------------------------------------------------------------------------------
    max_body_bytes: int = 64 << 20  # larger request bodies get 413
    shutdown_grace_s: float = 30.0  # on SIGTERM, how long in-flight generations may finish
    # issue 13: what one HTTP client may send (server.api.admission, server.http_protocol)
    max_json_body_bytes: int = 1 << 20  # body limit of every route but uploads (capped by max_body_bytes)
    max_prompt_chars: int | None = None  # longer prompts: 422 before tokenising; None: derived from the model
    max_prompts_per_request: int = 64  # prompts in one /v1/completions request (a list); more: 422
    timeout_keep_alive_s: int = 5  # idle keep-alive connections are closed
    timeout_request_header_s: float = 10.0  # request line + headers must arrive within this (slowloris)
    max_connections: int = 1000  # open connections beyond this get 503 (uvicorn limit_concurrency)
    max_request_header_bytes: int = 16384  # request line + headers beyond this get 400 (h11)
    # issue 24: what one hostile tenant may cost (server.http_protocol, server.engine.chat_render)
    timeout_request_body_s: float = 30.0  # a body must arrive within this plus its bytes at the rate below
    min_request_body_bytes_per_s: int = 16384  # (a slower body's connection is closed)
    timeout_refused_body_s: float = 1.0  # the same, shorter grace for the rest of a body refused unread
    tenant_max_connections: int = 256  # requests in flight per tenant, counted before the body: 429
    timeout_write_s: float = 30.0  # a response the client reads none of for this long: connection closed
    max_tokenize_chars: int | None = None  # /tokenize input; None: the prompt limit (max_prompt_chars)
    chat_template_workers: int = 2  # render processes; a tenant holds at most all but one (the one, if 1)
    chat_template_timeout_s: float = 2.0  # a render still running then is killed: 422
    chat_template_max_memory_bytes: int = 256 << 20  # a render's memory (worker address space): 422
    # structured output (server.engine.grammar): grammars compile in worker processes, bounded per request
    grammar_workers: int = 2  # compile processes; a tenant holds at most all but one (the one, if 1)
    grammar_compile_timeout_s: float = 5.0  # a compile still running then is killed: 400
    grammar_compile_max_memory_bytes: int = 512 << 20  # a compile's memory (worker address space): 400
    grammar_cache_bytes: int = 256 << 20  # compiled grammars kept (LRU), per engine
    # --- uploads (and every later load of what was uploaded) -----------------------------------
    max_artifact_bytes: int = 64 << 20  # per uploaded file; also the engine's limit on stored blobs
    keep_versions: int = 5  # versions kept per task; older ones are pruned on upload (never the current)
    max_prefix_length: int = 512  # longest prefix accepted (per kind)
    # every prefix store call (Redis: all its commands and retries) answers or fails (503) within this
    store_timeout_s: float = 5.0
    # --- engine --------------------------------------------------------------------------------
    max_batch_size: int = 32  # rows of one step (running requests)
    max_waiting: int = 256  # queue bound; beyond it requests get 429
    tenant_max_waiting: int = 0  # queued requests per tenant (an API key's max_waiting wins); 0 = global only
    queue_timeout_s: float = 30.0  # longest wait in the queue before a clear error
    max_prefill_tokens: int = 256  # prompt tokens computed per step (GPT-2: chunked prefill)
    kv_budget_tokens: int | None = None  # KV positions reserved by running requests; None: batch x positions
    kv_budget_bytes: int | None = None  # GPT-2's paged KV pool; None: kv_budget_tokens' worth (issue 15)
    # GPT-2's static decode path (CUDA graphs, or torch.compile): the device arena that holds decoding
    # rows' prefixes at fixed addresses (positions; its bytes count in the KV budget), and how many
    # decode buckets are captured as CUDA graphs (beyond it, buckets run the static step eagerly)
    static_prefix_arena_tokens: int = 2048
    max_cuda_graphs: int = 64
    device_prefix_cache_bytes: int = 256 << 20
    # The vLLM backend (issue 23): its prefix table (rows of prefix K/V inside vLLM's model; an LRU over
    # prefixes no request uses), and how many admitted requests may wait in vLLM's own queue beyond
    # the batch (0: our fair queue decides every admission; vLLM serves its own queue FCFS)
    vllm_prefix_table_bytes: int = 128 << 20
    vllm_max_queued: int = 0
    host_prefix_cache_bytes: int = 1 << 30
    # Warm start: before readiness, load the most used tasks (store's request counts) into the tiers,
    # at most this many and for at most this long (0 tasks: start cold)
    warm_start_tasks: int = 64
    warm_start_timeout_s: float = 60.0
    # --- tenants (0 = off) ---------------------------------------------------------------------
    tenant_max_concurrent: int = 0
    tenant_rps: float = 0.0
    tenant_upload_rps: float = 0.0  # prefix uploads per second per tenant
    tenant_max_tasks: int = 1000  # tasks per tenant (issue 13): a new task beyond it gets 429
    tenant_max_stored_bytes: int = 8 << 30  # artifact bytes per tenant, all kept versions: 413
    max_training_metadata_bytes: int = 16 << 10  # JSON of an artifact's `training` metadata: 422


DEFAULT_LIMITS = Limits()
