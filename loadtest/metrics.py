"""Per-request records and the serving metrics computed from them (vLLM `bench serve` definitions).

Every runner returns one `RequestRecord` per request, with times in seconds from the run's start:

    arrival       when the client sent it (rate mode: its Poisson offset; closed loop: when its client
                  was free)
    token_times   when each output token reached the client; token_times[0] is the first token
    end           when the request finished (its last token)

From those:
- TTFT = first token - arrival (includes queueing: a request waiting behind others pays for it);
- TPOT = (end - first token) / (n_out - 1), per request, for requests with n_out > 1;
- ITL  = every gap between consecutive tokens of a request, pooled over requests;
- e2e  = end - arrival;
- throughput = output tokens / wall time, where wall time runs from t = 0 to the last end;
- goodput = requests meeting the SLO (TTFT <= ttft_s and TPOT <= tpot_s) per second of wall time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from loadtest.workload import RequestSpec


@dataclass
class RequestRecord:
    """What one request looked like from the client's side (seconds from the run's start)."""

    request_id: str
    task: str | None
    arrival: float
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    num_prompt_tokens: int = 0
    num_requested_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, req: RequestSpec, task: str | None, arrival: float, **outcome: Any) -> RequestRecord:
        """The record of workload request `req` (served as `task`), arrived at `arrival`."""
        return cls(
            request_id=req.request_id,
            task=task,
            arrival=arrival,
            num_prompt_tokens=len(req.prompt_ids),
            num_requested_tokens=req.max_new_tokens,
            **outcome,
        )

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.end - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def e2e(self) -> float:
        return self.end - self.arrival

    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass
class RunResult:
    """A runner's output: its records plus what only the runner knows (memory, tokens it computed)."""

    runner: str
    records: list[RequestRecord]
    wall_s: float
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    # Tokens the model actually computed (static batching pads and over-generates; that is real work
    # but not useful output). None: same as the useful tokens.
    computed_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SLO:
    """A request is 'good' when its TTFT and TPOT are both within these bounds."""

    ttft_s: float = 2.0
    tpot_s: float = 0.5

    def met_by(self, rec: RequestRecord) -> bool:
        if not rec.ok or rec.ttft > self.ttft_s:
            return False
        tpot = rec.tpot
        return tpot is None or tpot <= self.tpot_s


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(result: RunResult, slo: SLO) -> dict[str, Any]:
    """The stable per-runner metrics (see the module docstring for definitions)."""
    ok = [r for r in result.records if r.ok]
    wall = result.wall_s if result.wall_s > 0 else float("nan")
    ttfts = [r.ttft for r in ok]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [g for r in ok for g in r.inter_token_latencies()]
    e2es = [r.e2e for r in ok]
    out_tokens = sum(r.num_output_tokens for r in ok)
    good = sum(1 for r in ok if slo.met_by(r))
    short = sum(1 for r in ok if r.num_output_tokens < r.num_requested_tokens)
    return {
        "num_requests": len(result.records),
        "num_completed": len(ok),
        "num_errors": len(result.records) - len(ok),
        "num_short_outputs": short,  # stopped before max_new_tokens (EOS): fewer tokens, counted honestly
        "wall_s": result.wall_s,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.num_prompt_tokens for r in ok),
        "output_tok_s": out_tokens / wall,
        "requests_s": len(ok) / wall,
        "ttft_mean_s": mean(ttfts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_mean_s": mean(tpots),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p90_s": percentile(tpots, 90),
        "tpot_p99_s": percentile(tpots, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p90_s": percentile(itls, 90),
        "itl_p99_s": percentile(itls, 99),
        "e2e_p50_s": percentile(e2es, 50),
        "e2e_p90_s": percentile(e2es, 90),
        "e2e_p99_s": percentile(e2es, 99),
        "goodput_req_s": good / wall,
        "slo_attainment": good / len(result.records) if result.records else None,
        # Tokens the model computed, padding and over-generation included (static batching); None: as useful.
        "computed_tokens": result.computed_tokens,
        "peak_rss_bytes": result.peak_rss_bytes,
        "peak_device_bytes": result.peak_device_bytes,
        **result.extra,
        # CPU the server's process tree spent per 1,000 output tokens (HTTP runners; None: not measured)
        "server_cpu_s_per_1k_tokens": (
            1000 * result.extra["server_cpu_s"] / out_tokens
            if result.extra.get("server_cpu_s") is not None and out_tokens
            else None
        ),
    }
