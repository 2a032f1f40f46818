"""Server configuration: one pydantic-settings class, read once at the edge (`server.main`).

Every field can be set from the environment with the `PREFIXSERVE_` prefix (`PREFIXSERVE_PORT=9000`)
or from a `.env` file in the working directory. Nothing else in the server reads the environment:
`server.main` builds a `Settings`, and the app, the engine config and the rate limiter get plain
values from it. Limits (sizes, counts, timeouts) take their defaults from `server.limits.Limits`, the
one place they are written, and reach the rest of the server as that one object (`Settings.limits`).
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from prefix_store.base import InvalidName, validate_name
from server.limits import DEFAULT_LIMITS as _L
from server.limits import Limits

Role = Literal["generate", "manage"]


class ApiKeyEntry(BaseModel):
    """What one API key grants: the tenant it acts as and its role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    # "generate": generate and list models/prefixes; "manage": also upload, delete and roll back prefixes.
    role: Role = "generate"
    # Issue 18: the tenant's share of the batch under contention (relative to other tenants' weights;
    # every key of a tenant must agree), the class of its requests unless they send `X-Priority`, and
    # its own queue bound (None: `tenant_max_waiting`).
    weight: float = Field(default=1.0, gt=0, le=1000)
    priority: Literal["interactive", "batch"] = "interactive"
    max_waiting: int | None = Field(default=None, ge=0)

    @field_validator("tenant")
    @classmethod
    def _valid_tenant(cls, value: str) -> str:
        # Tenants become store keys and path components: the same rule as task names.
        try:
            return validate_name(value, "tenant")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None


# Settings of our engine's own machinery. The vLLM backend has no use for them: vLLM chunks prompts,
# sizes and pages its KV cache (VLLM_CPU_KVCACHE_SPACE on CPU) and captures its graphs itself, and its
# device tier is the prefix table (`vllm_prefix_table_bytes`).
NATIVE_ENGINE_ONLY = (
    "max_prefill_tokens",
    "kv_budget_tokens",
    "kv_budget_bytes",
    "kv_block_size",
    "static_prefix_arena_tokens",
    "max_cuda_graphs",
    "cuda_graphs",
    "torch_compile",
    "device_prefix_cache_bytes",
)


class Settings(BaseSettings):
    """All server settings (env prefix `PREFIXSERVE_`). See README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="PREFIXSERVE_", env_file=".env", extra="ignore")

    # --- model -------------------------------------------------------------------------------
    model: str | None = Field(
        default=None, description="Local HF model directory (or cached HF id) to serve; required to serve."
    )
    served_model_name: str | None = Field(
        default=None, description="Model id in /v1/models and `model` of completions; default: dir name."
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    # --- HTTP --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(
        default=_L.max_body_bytes, ge=1024, description="Request bodies above this get 413."
    )
    shutdown_grace_s: float = Field(
        default=_L.shutdown_grace_s,
        ge=0,
        description="On SIGTERM, how long in-flight generations may take to finish.",
    )

    # --- prefix store --------------------------------------------------------------------------
    redis_url: str | None = Field(default=None, description="Redis URL; unset: a local directory store.")
    local_store_dir: Path = Path("./prefix-store")
    redis_key_prefix: str = "prefixserve"
    redis_min_replicas: int = Field(
        default=0, ge=0,
        description="Replicas that must have a prefix write (WAIT) before it is acknowledged; 0: the master's reply.",
    )  # fmt: skip
    redis_replication_timeout_s: float = Field(
        default=2.0, gt=0, description="How long a write waits for redis_min_replicas before 503."
    )
    store_served_dtype: bool = Field(
        default=True,
        description="Store uploads in a wider dtype than the model serves (float32 on a bfloat16 server) "
        "in the served dtype: half the bytes, the same served values.",
    )
    keep_versions: int = Field(default=_L.keep_versions, ge=1)
    max_artifact_bytes: int = Field(default=_L.max_artifact_bytes, ge=1024)
    max_prefix_length: int = Field(default=_L.max_prefix_length, ge=1)
    store_timeout_s: float = Field(
        default=_L.store_timeout_s,
        gt=0,
        description="Deadline of each prefix store call (Redis: retries included); past it 503.",
    )

    # --- engine --------------------------------------------------------------------------------
    max_batch_size: int = Field(default=_L.max_batch_size, ge=1)
    max_waiting: int = Field(
        default=_L.max_waiting, ge=0, description="Queue bound; beyond it requests get 429."
    )
    queue_timeout_s: float = Field(default=_L.queue_timeout_s, gt=0)
    max_prefill_tokens: int = Field(
        default=_L.max_prefill_tokens,
        ge=1,
        description="Prompt tokens computed per step (chunked on GPT-2); lower = shorter decode stalls.",
    )
    kv_budget_tokens: int | None = Field(
        default=_L.kv_budget_tokens,
        ge=1,
        description="KV positions reserved by running requests; unset: batch x positions.",
    )
    device_prefix_cache_bytes: int = Field(
        default=_L.device_prefix_cache_bytes, ge=0, description="Prefix cache on the device."
    )
    host_prefix_cache_bytes: int = Field(
        default=_L.host_prefix_cache_bytes, ge=0, description="Prefix cache in host memory."
    )
    warm_start_tasks: int = Field(
        default=_L.warm_start_tasks, ge=0, le=1000,
        description="Most used tasks loaded into the prefix cache before readiness (0: start cold).",
    )  # fmt: skip
    warm_start_timeout_s: float = Field(
        default=_L.warm_start_timeout_s, ge=0, description="Longest warm start; then ready anyway."
    )
    # issue 15 (engine v2): the GPT-2 paged KV pool in bytes (a limit, in `Limits`) and its block size.
    kv_budget_bytes: int | None = Field(
        default=_L.kv_budget_bytes,
        ge=1,
        description="Paged KV pool (rows' own tokens); unset: kv_budget_tokens (or batch x positions) of tokens.",
    )
    kv_block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV block (GPT-2).")
    static_prefix_arena_tokens: int = Field(
        default=_L.static_prefix_arena_tokens,
        ge=1,
        description="Prefix positions of the static decode path's arena (GPT-2; counted in the KV budget).",
    )
    max_cuda_graphs: int = Field(
        default=_L.max_cuda_graphs, ge=0, description="Decode buckets captured as CUDA graphs (GPT-2)."
    )
    cuda_graphs: bool = Field(
        default=True, description="Decode steps replayed as CUDA graphs per batch bucket (CUDA only; on|off)."
    )
    torch_compile: bool = Field(
        default=False, description="torch.compile the decode step's block output (GPT-2; on|off)."
    )

    # --- issue 23: the engine backend ----------------------------------------------------------
    engine: Literal["auto", "vllm", "native"] = Field(
        default="auto",
        description="auto: vLLM for GPT-2 where it is installed and can run the model, else native; "
        "vllm: vLLM or refuse to start; native: our engine.",
    )
    vllm_prefix_table_bytes: int = Field(
        default=_L.vllm_prefix_table_bytes,
        ge=1,
        description="vLLM backend: the prefix table inside vLLM's model (LRU over prefixes not in use).",
    )
    vllm_max_queued: int = Field(
        default=_L.vllm_max_queued,
        ge=0,
        description="vLLM backend: admitted requests waiting in vLLM's own queue beyond the batch.",
    )
    vllm_enforce_eager: bool = Field(
        default=False, description="vLLM backend: skip vLLM's torch.compile (faster start, slower steps)."
    )

    # --- tenants and limits --------------------------------------------------------------------
    api_keys_file: Path | None = Field(
        default=None, description='JSON file: {"<key>": {"tenant": "acme", "role": "generate"|"manage"}}'
    )
    api_keys: str | None = Field(default=None, description="The same JSON as api_keys_file, inline.")
    tenant_max_concurrent: int = Field(
        default=_L.tenant_max_concurrent, ge=0, description="Per tenant; 0 = unlimited."
    )
    tenant_rps: float = Field(
        default=_L.tenant_rps, ge=0, description="Requests/second per tenant; 0 = unlimited."
    )

    # --- issue 13: hostile HTTP clients (defaults in server.limits.Limits) -------------------
    max_json_body_bytes: int = Field(
        default=_L.max_json_body_bytes,
        ge=1024,
        description="Body limit of every route but uploads (those: max_body_bytes); 413 beyond it.",
    )
    max_prompt_chars: int | None = Field(
        default=_L.max_prompt_chars,
        ge=1,
        description="Longer prompts get 422 before tokenisation; unset: positions x longest token's bytes.",
    )
    max_prompts_per_request: int = Field(
        default=_L.max_prompts_per_request,
        ge=1,
        description="Prompts in one /v1/completions request (a list of them); more get 422.",
    )
    timeout_keep_alive_s: int = Field(
        default=_L.timeout_keep_alive_s, ge=1, description="Idle keep-alive connections are closed."
    )
    timeout_request_header_s: float = Field(
        default=_L.timeout_request_header_s,
        gt=0,
        description="A connection without complete request headers by then is closed (slowloris).",
    )
    max_connections: int = Field(
        default=_L.max_connections, ge=1, description="Connections beyond this get 503 (limit_concurrency)."
    )
    max_request_header_bytes: int = Field(
        default=_L.max_request_header_bytes, ge=1024, description="Request line + headers beyond: 400."
    )
    # --- issue 24: hostile tenants (defaults in server.limits.Limits) ----------------------------
    timeout_request_body_s: float = Field(
        default=_L.timeout_request_body_s,
        gt=0,
        description="A request body must arrive within this plus its size at MIN_REQUEST_BODY_BYTES_PER_S.",
    )
    min_request_body_bytes_per_s: int = Field(
        default=_L.min_request_body_bytes_per_s, ge=1, description="Slower request bodies are cut off."
    )
    timeout_refused_body_s: float = Field(
        default=_L.timeout_refused_body_s,
        gt=0,
        description="After a refusal sent before the body was read, the rest must come this soon (+ rate).",
    )
    tenant_max_connections: int = Field(
        default=_L.tenant_max_connections,
        ge=0,
        description="Requests in flight per tenant, checked before the body is read (429); 0 = unlimited.",
    )
    timeout_write_s: float = Field(
        default=_L.timeout_write_s,
        gt=0,
        description="A response the client reads nothing of for this long: the connection is closed.",
    )
    max_tokenize_chars: int | None = Field(
        default=_L.max_tokenize_chars,
        ge=1,
        description="/tokenize inputs longer than this get 422; unset: the prompt limit.",
    )
    chat_template_workers: int = Field(
        default=_L.chat_template_workers, ge=1, description="Processes that render chat templates."
    )
    chat_template_timeout_s: float = Field(
        default=_L.chat_template_timeout_s, gt=0, description="A longer chat template render gets 422."
    )
    chat_template_max_memory_bytes: int = Field(
        default=_L.chat_template_max_memory_bytes,
        ge=16 << 20,
        description="Memory one chat template render may use; beyond it the request gets 422.",
    )
    grammar_workers: int = Field(
        default=_L.grammar_workers, ge=1, description="Processes that compile structured-output grammars."
    )
    grammar_compile_timeout_s: float = Field(
        default=_L.grammar_compile_timeout_s, gt=0, description="A longer grammar compile gets 400."
    )
    grammar_compile_max_memory_bytes: int = Field(
        default=_L.grammar_compile_max_memory_bytes,
        ge=16 << 20,
        description="Memory one grammar compile may use (worker address space); beyond it 400.",
    )
    grammar_cache_bytes: int = Field(
        default=_L.grammar_cache_bytes, ge=0, description="Compiled grammars kept (LRU), per engine."
    )

    # --- issue 18: fair scheduling across tenants ----------------------------------------------
    fair_scheduling: bool = Field(
        default=True, description="Weighted fair admission across tenants; false: one FCFS queue."
    )
    tenant_max_waiting: int = Field(
        default=_L.tenant_max_waiting,
        ge=0,
        description="Queued requests per tenant (a key's max_waiting wins); 0 = global only.",
    )

    # --- upload quotas (issue 13); the upload rate is tenant_upload_rps ------------------------
    tenant_max_tasks: int = Field(
        default=_L.tenant_max_tasks, ge=0, description="Tasks per tenant; 0 = unlimited (429 beyond)."
    )
    tenant_max_stored_bytes: int = Field(
        default=_L.tenant_max_stored_bytes,
        ge=0,
        description="Artifact bytes per tenant, all kept versions; 0 = unlimited (413 beyond).",
    )
    max_training_metadata_bytes: int = Field(
        default=_L.max_training_metadata_bytes,
        ge=0,
        description="JSON size of an artifact's `training` metadata (422 beyond).",
    )

    # --- observability ------------------------------------------------------------------------
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # NoDecode: our validator parses the env value (JSON list or comma list) instead of pydantic-settings.
    metrics_task_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Tasks that get their own metrics label (JSON list or comma list)."
    )
    metrics_top_tasks: int = Field(
        default=0,
        ge=0,
        description="Without an allow-list: the first N busy tasks get labels (0: none; /metrics is public).",
    )

    # --- issue 16: metrics for routers (vLLM names), per-tenant upload rate (admin CLI) ---------
    metrics_adapter_names: Literal["off", "task", "tenant_task"] = Field(
        default="off",
        description="Task names in vllm:lora_requests_info (InferencePool affinity): off | task | tenant_task.",
    )
    tenant_upload_rps: float = Field(
        default=_L.tenant_upload_rps,
        ge=0,
        description="Prefix uploads/second per tenant (0.1 = one per 10 s); 0 = unlimited.",
    )

    # --- API compatibility (issue 16, clients) --------------------------------------------------
    chat_template: Path | None = Field(
        default=None,
        description="Jinja chat template file for /v1/chat/completions (vLLM's --chat-template); "
        "a task's artifact metadata `chat_template` wins.",
    )

    @field_validator("metrics_task_labels", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # pydantic-settings decodes JSON for list fields from the env; also accept "a,b,c".
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @cached_property
    def limits(self) -> Limits:
        """The one `Limits` object (issue 14): same-named fields, built once, handed down by `server.main`."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def native_engine_only_set(self) -> list[str]:
        """The environment names of the `NATIVE_ENGINE_ONLY` settings given explicitly (env, .env,
        arguments): what a server on the vLLM backend tells the operator it ignores."""
        return [f"PREFIXSERVE_{name.upper()}" for name in NATIVE_ENGINE_ONLY if name in self.model_fields_set]

    def read_chat_template(self) -> str | None:
        """The chat template's text (read once at start-up; an unreadable file is a config error)."""
        if self.chat_template is None:
            return None
        try:
            return self.chat_template.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"PREFIXSERVE_CHAT_TEMPLATE {self.chat_template}: {exc}") from None

    def resolve_api_keys(self) -> dict[str, ApiKeyEntry]:
        """The configured keys (file, then inline; inline wins on a duplicate key); {} = single-tenant.

        Single-tenant only when neither source is set: a source that is set but holds no keys raises
        (fail closed; an empty or broken Secret must not turn authentication off).
        Raises `ValueError` naming the source and the problem for unreadable or malformed JSON.
        """
        keys: dict[str, ApiKeyEntry] = {}
        if self.api_keys_file is not None:
            source = f"PREFIXSERVE_API_KEYS_FILE ({self.api_keys_file})"
            try:
                text = self.api_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"PREFIXSERVE_API_KEYS_FILE {self.api_keys_file}: {exc}") from None
            keys.update(_require_keys(_parse_keys(text, source), source))
        if self.api_keys is not None:  # set but empty ("") fails closed too (issue 13)
            keys.update(
                _require_keys(_parse_keys(self.api_keys, "PREFIXSERVE_API_KEYS"), "PREFIXSERVE_API_KEYS")
            )
        return keys

    def tenant_weights(self) -> tuple[dict[str, float], dict[str, int]]:
        """Per-tenant fair-queue weights and queue bounds from the API keys (issue 18).

        Raises `ValueError` when two keys of one tenant disagree: a tenant has one share.
        """
        weights: dict[str, float] = {}
        bounds: dict[str, int] = {}
        for entry in self.resolve_api_keys().values():
            for table, value in ((weights, entry.weight), (bounds, entry.max_waiting)):
                if value is None:
                    continue
                if table.setdefault(entry.tenant, value) != value:  # type: ignore[arg-type]
                    raise ValueError(
                        f"tenant {entry.tenant!r}: its API keys set different weights/max_waiting"
                    )
        return weights, bounds


def _require_keys(keys: dict[str, ApiKeyEntry], source: str) -> dict[str, ApiKeyEntry]:
    if not keys:
        raise ValueError(f"{source}: is set but holds no API keys; refusing to run without authentication")
    return keys


def _parse_keys(text: str, source: str) -> dict[str, ApiKeyEntry]:
    if not text.strip():
        return {}  # set but blank: `_require_keys` refuses it with a clear message
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f'{source}: expected an object {{"<key>": {{"tenant": ..., "role": ...}}}}')
    keys: dict[str, ApiKeyEntry] = {}
    for key, entry in raw.items():
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"{source}: API keys must be strings of at least 8 characters")
        try:
            keys[key] = ApiKeyEntry.model_validate(entry)
        except ValidationError as exc:
            # Never echo the key itself into logs: name the tenant/position instead.
            detail = "; ".join(e["msg"] for e in exc.errors())
            raise ValueError(f"{source}: entry #{len(keys) + 1}: {detail}") from None
    return keys
