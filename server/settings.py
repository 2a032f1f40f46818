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
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from prefix_store.base import InvalidName, validate_name
from prefix_store.jobs.factory import default_data_dir
from server.limits import NATIVE_ONLY, Limits

Role = Literal["generate", "manage"]


class ApiKeyEntry(BaseModel):
    """What one API key grants: the tenant it acts as and its role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    # "generate": generate and list models/prefixes; "manage": also upload, delete and roll back prefixes.
    role: Role = "generate"
    # The tenant's share of the batch under contention (relative to other tenants' weights;
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


# Which engine backend reads a setting (the rest: both); limits say it in their declaration.
_NATIVE: JsonDict = {"engine": NATIVE_ONLY}
_VLLM: JsonDict = {"engine": "vllm"}


class _SettingsBase(BaseSettings):
    """The settings that are not limits (env prefix `PREFIXSERVE_`); `Settings` adds one per limit."""

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

    # --- the engine backend, and our engine's own machinery --------------------------------------
    engine: Literal["auto", "vllm", "native"] = Field(
        default="auto",
        description="auto: vLLM for GPT-2 where it is installed and can run the model, else native; "
        "vllm: vLLM or refuse to start; native: our engine.",
    )
    kv_block_size: int = Field(
        default=16, ge=1, le=1024, description="Tokens per KV block (GPT-2).", json_schema_extra=_NATIVE
    )
    cuda_graphs: bool = Field(
        default=True,
        description="Decode steps replayed as CUDA graphs per batch bucket (CUDA only; on|off).",
        json_schema_extra=_NATIVE,
    )
    torch_compile: bool = Field(
        default=False,
        description="torch.compile the decode step's block output (GPT-2; on|off).",
        json_schema_extra=_NATIVE,
    )

    # --- how vLLM runs (the vLLM backend; its memory is the limit `vllm_kv_cache_bytes`) ---------
    vllm_enforce_eager: bool = Field(
        default=False,
        description="vLLM backend: no torch.compile and no CUDA graphs (faster start, slower steps).",
        json_schema_extra=_VLLM,
    )
    vllm_cuda_graph_mode: Literal[
        "auto", "none", "piecewise", "full", "full_decode_only", "full_and_piecewise"
    ] = Field(
        default="auto",
        description="vLLM backend on CUDA: vLLM's cudagraph_mode (auto: vLLM's default for the model).",
        json_schema_extra=_VLLM,
    )
    vllm_block_size: int | None = Field(
        default=None,
        ge=1,
        description="vLLM backend: tokens per KV block (unset: 32 on CPU, vLLM's default on CUDA).",
        json_schema_extra=_VLLM,
    )
    vllm_cpu_threads: str = Field(
        default="auto",
        pattern=r"^(auto|vllm|none|\d+(-\d+)?(,\d+(-\d+)?)*)$",
        description="vLLM backend on CPU: the cores vLLM's threads are bound to. auto: every core this "
        "process may use (CPU affinity, capped by a cgroup CPU quota); vllm: vLLM's own binding; or a "
        "list like 0-3,8. An explicit VLLM_CPU_OMP_THREADS_BIND wins.",
        json_schema_extra=_VLLM,
    )
    vllm_gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="vLLM backend on CUDA: the fraction of GPU memory vLLM may take, its KV cache sized "
        "from it (unset: the KV cache is vllm_kv_cache_bytes).",
        json_schema_extra=_VLLM,
    )
    vllm_tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="vLLM backend: tensor-parallel ranks (1 only, for now).",
        json_schema_extra=_VLLM,
    )
    vllm_data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="vLLM backend: data-parallel engines (1 only, for now).",
        json_schema_extra=_VLLM,
    )

    # --- tenants ---------------------------------------------------------------------------------
    api_keys_file: Path | None = Field(
        default=None, description='JSON file: {"<key>": {"tenant": "acme", "role": "generate"|"manage"}}'
    )
    api_keys: str | None = Field(default=None, description="The same JSON as api_keys_file, inline.")

    # --- fair scheduling across tenants ----------------------------------------------------------
    fair_scheduling: bool = Field(
        default=True, description="Weighted fair admission across tenants; false: one FCFS queue."
    )

    # --- fine-tuning jobs (their limits: server.limits.Limits) ----------------------------------
    fine_tuning_dir: Path | None = Field(
        default=None,
        description="Training files and job work (checkpoints, trained artifacts); unset: "
        "{local_store_dir}/.fine-tuning. In a fleet: a volume every replica and worker mounts.",
    )
    train_workers: int | None = Field(
        default=None, ge=0, le=16,
        description="Training worker processes `prefixserve serve` starts beside itself; unset: 1 "
        "without Redis, 0 with it (a fleet runs `prefixserve train-worker` as its own Deployment).",
    )  # fmt: skip
    training_lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A job whose worker has not renewed its claim for this long is re-queued.",
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

    # --- metrics for routers (vLLM names) ---------------------------------------------------------
    metrics_adapter_names: Literal["off", "task", "tenant_task"] = Field(
        default="off",
        description="Task names in vllm:lora_requests_info (InferencePool affinity): off | task | tenant_task.",
    )

    # --- API compatibility ---------------------------------------------------------------------
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
        """The one `Limits` object: same-named fields, built once, handed down by `server.main`."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def ignored_by(self, backend: str) -> list[str]:
        """The environment names of the settings given explicitly (env, .env, arguments) that only the
        other engine backend reads: what a server on `backend` tells the operator it ignores."""
        return [
            f"PREFIXSERVE_{name.upper()}"
            for name, info in type(self).model_fields.items()
            if name in self.model_fields_set and _engine_of(info) not in (None, backend)
        ]

    def fine_tuning_data_dir(self) -> Path:
        """Where training files and job work live (`fine_tuning_dir`, else beside the local store)."""
        return self.fine_tuning_dir or default_data_dir(self.local_store_dir)

    def embedded_train_workers(self) -> int:
        """Worker processes `prefixserve serve` starts (`train_workers`; unset: 1 without Redis)."""
        if self.train_workers is not None:
            return self.train_workers
        return 0 if self.redis_url else 1

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
        if self.api_keys is not None:  # set but empty ("") fails closed too
            keys.update(
                _require_keys(_parse_keys(self.api_keys, "PREFIXSERVE_API_KEYS"), "PREFIXSERVE_API_KEYS")
            )
        return keys

    def tenant_weights(self) -> tuple[dict[str, float], dict[str, int]]:
        """Per-tenant fair-queue weights and queue bounds from the API keys.

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


def _engine_of(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    return extra.get("engine") if isinstance(extra, dict) else None  # type: ignore[return-value]


def _limit_settings() -> dict[str, Any]:
    """One setting per `Limits` field: its type, default, bounds and description as declared there."""
    types = get_type_hints(Limits)
    fields: dict[str, Any] = {}
    for declared in dataclasses.fields(Limits):
        meta = dict(declared.metadata)
        doc, engine = meta.pop("doc"), meta.pop("engine")
        extra = None if engine is None else {"engine": engine}
        fields[declared.name] = (
            types[declared.name],
            Field(default=declared.default, description=doc, json_schema_extra=extra, **meta),
        )
    return fields


if TYPE_CHECKING:  # the limits' settings are read through `Settings.limits`

    class Settings(_SettingsBase):
        pass

else:
    Settings = create_model("Settings", __base__=_SettingsBase, __module__=__name__, **_limit_settings())
    Settings.__doc__ = (
        "All server settings (env prefix `PREFIXSERVE_`): `_SettingsBase` and one per limit in "
        '`server.limits.Limits`. README "Configuration" has the table.'
    )
