"""Seeded benchmark workloads: which requests arrive, when, for which task, with what lengths.

A workload is generated once and handed to every runner, so all of them see *identical* inputs:
prompts are token-id lists (random ids from the vocabulary, never EOS), and every request asks for
exactly `max_new_tokens` tokens (runners must not stop at EOS; see `loadtest.runners`).

Two load shapes, as in `vllm bench serve`:
- **rate** (`request_rate` > 0): open loop, Poisson arrivals (exponential inter-arrival times with
  mean `1 / request_rate`), offsets precomputed here;
- **concurrency** (`concurrency` > 0, `request_rate` = 0): closed loop, `concurrency` clients each
  send the next request as soon as their previous one finishes. Arrival times then depend on the
  server, so `ClientPool` hands them out as the run goes.
With neither, every request arrives at t = 0 (concurrency = number of requests).

Task popularity is uniform, or Zipf with exponent `zipf_s` (task k has weight 1 / k^s), which is how
multi-task traffic usually looks: a few hot tasks and a long tail.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. Ranges are inclusive `(low, high)` and sampled uniformly."""

    num_requests: int = 64
    num_tasks: int = 16
    prompt_len: tuple[int, int] = (32, 128)
    output_len: tuple[int, int] = (16, 64)
    task_popularity: str = "uniform"  # "uniform" | "zipf"
    zipf_s: float = 1.1
    request_rate: float = 0.0  # requests/s; > 0: Poisson arrivals
    concurrency: int = 0  # > 0: closed loop with this many clients (when request_rate == 0)
    prefix_lengths: tuple[int, ...] = (10,)  # task k gets prefix_lengths[k % len]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_tasks < 1:
            raise ValueError("num_requests and num_tasks must be >= 1")
        for name in ("prompt_len", "output_len"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {(low, high)}")
        if self.task_popularity not in ("uniform", "zipf"):
            raise ValueError(f"task_popularity must be 'uniform' or 'zipf', got {self.task_popularity!r}")
        if self.request_rate < 0 or self.concurrency < 0:
            raise ValueError("request_rate and concurrency must be >= 0")
        if not self.prefix_lengths or min(self.prefix_lengths) < 1:
            raise ValueError("prefix_lengths needs at least one length >= 1")

    @property
    def effective_concurrency(self) -> int:
        """Clients in closed-loop mode (all requests at once when neither rate nor concurrency is set)."""
        return self.concurrency or self.num_requests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload. `arrival_s` is the offset from the run's start (rate mode only)."""

    index: int
    request_id: str
    task: str
    prompt_ids: list[int] = field(repr=False)
    max_new_tokens: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    tasks: list[str]  # all task names, whether or not a request uses them
    requests: list[RequestSpec]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)

    def prefix_length(self, task: str) -> int:
        lengths = self.spec.prefix_lengths
        return lengths[self.tasks.index(task) % len(lengths)]

    def summary(self) -> dict[str, Any]:
        used = sorted({r.task for r in self.requests})
        return {
            **self.spec.to_dict(),
            "num_tasks_used": len(used),
            "total_prompt_tokens": self.num_prompt_tokens,
            "total_output_tokens": self.num_output_tokens,
        }


def task_name(k: int) -> str:
    return f"task-{k:03d}"


def task_weights(num_tasks: int, popularity: str, zipf_s: float) -> list[float]:
    """Normalised popularity of tasks 0..K-1 (task 0 the most popular under Zipf)."""
    raw = (
        [1.0] * num_tasks if popularity == "uniform" else [1.0 / (k + 1) ** zipf_s for k in range(num_tasks)]
    )
    total = sum(raw)
    return [w / total for w in raw]


def make_workload(spec: WorkloadSpec, vocab_size: int, eos_token_id: int | None) -> Workload:
    """Generate the workload; the same spec and vocabulary always give the same requests."""
    rng = random.Random(spec.seed)
    tasks = [task_name(k) for k in range(spec.num_tasks)]
    weights = task_weights(spec.num_tasks, spec.task_popularity, spec.zipf_s)
    # Random ids below the vocabulary size, skipping EOS so no prompt ends a sequence by itself.
    allowed_high = vocab_size - 1
    requests: list[RequestSpec] = []
    clock = 0.0
    for i in range(spec.num_requests):
        task = rng.choices(tasks, weights=weights)[0]
        prompt_len = rng.randint(*spec.prompt_len)
        prompt = []
        while len(prompt) < prompt_len:
            tok = rng.randint(0, allowed_high)
            if tok != eos_token_id:
                prompt.append(tok)
        max_new = rng.randint(*spec.output_len)
        if spec.request_rate > 0:
            clock += rng.expovariate(spec.request_rate)
            arrival = clock
        else:
            arrival = 0.0
        requests.append(RequestSpec(i, f"req-{i:05d}", task, prompt, max_new, arrival))
    return Workload(spec=spec, tasks=tasks, requests=requests)


class ClientPool:
    """Hands out requests in workload order as they 'arrive', for runners that serve synchronously.

    Rate mode: request i arrives at its precomputed offset. Concurrency mode: C clients; a request
    arrives when a client is free (all C at t = 0, then each at its client's previous request's end),
    which `finish()` reports. Times are seconds from the run's start.
    """

    def __init__(self, workload: Workload) -> None:
        self._requests = workload.requests
        self._next = 0
        self._rate_mode = workload.spec.request_rate > 0
        clients = min(workload.spec.effective_concurrency, len(self._requests))
        self._free_at: list[float] = [0.0] * clients  # min-heap of client free times
        self.arrival_s: dict[str, float] = {}

    def _next_time(self) -> float | None:
        if self._next >= len(self._requests):
            return None
        if self._rate_mode:
            return self._requests[self._next].arrival_s
        return self._free_at[0] if self._free_at else None

    def next_arrival(self) -> float | None:
        """When the next not-yet-arrived request arrives (None: all arrived, or all clients busy)."""
        return self._next_time()

    def arrived(self, now: float) -> list[RequestSpec]:
        """Requests arriving at or before `now`, in order, each with its arrival time recorded."""
        out = []
        while (t := self._next_time()) is not None and t <= now:
            req = self._requests[self._next]
            if not self._rate_mode:
                heapq.heappop(self._free_at)
            self.arrival_s[req.request_id] = t
            out.append(req)
            self._next += 1
        return out

    def finish(self, end: float) -> None:
        """A request ended at `end`: its client sends the next one then (concurrency mode)."""
        if not self._rate_mode:
            heapq.heappush(self._free_at, end)
