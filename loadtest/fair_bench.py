"""Two tenants, one flooding: time to first token and token shares with fair scheduling on and off.

    python -m loadtest.fair_bench --out docs/bench/fair-two-tenant   # writes .md and .json

One run starts the real server (`python -m server.main`, a random-weight tiny GPT-2, local store)
twice, with `PREFIXSERVE_FAIR_SCHEDULING=true` and `=false`, and drives the same workload over
loopback HTTP (`POST /v1/generate_stream`, `ignore_eos` so output lengths are exact):
- idle: tenant B alone, a few short requests (B's idle TTFT);
- flood: tenant A sends `flood` long requests at once (far over 10x B's rate), and once they are
  queued B sends `trickle` short requests, one every `trickle_interval_s` (open loop).
Reported per tenant: TTFT p50/p99, 429s, and the share of tokens generated while B was active.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from loadtest.machine import machine_info
from loadtest.metrics import percentile
from loadtest.runners.http_runner import ServerProcess
from modeling.models import make_model_dir

KEYS = {
    "bench-tenant-a-key": {"tenant": "a", "role": "generate"},
    "bench-tenant-b-key": {"tenant": "b", "role": "generate"},
}
AUTH = {t: {"Authorization": f"Bearer bench-tenant-{t}-key"} for t in "ab"}


@dataclass
class Config:
    flood: int = 24  # A's requests, all at once
    flood_tokens: int = 24
    trickle: int = 5  # B's requests, one at a time
    trickle_tokens: int = 4
    trickle_interval_s: int = 3  # B sends one request every this many seconds
    max_batch_size: int = 4
    max_waiting: int = 256


@dataclass
class Sample:
    tenant: str
    sent: float
    status: int = 0
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent


async def stream(client: httpx.AsyncClient, tenant: str, max_new_tokens: int) -> Sample:
    body = {
        "inputs": "The quick brown fox",
        "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True},
    }
    sample = Sample(tenant, time.monotonic())
    async with client.stream("POST", "/v1/generate_stream", json=body, headers=AUTH[tenant]) as r:
        sample.status = r.status_code
        if r.status_code == 200:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    sample.token_times.append(time.monotonic())
        else:
            await r.aread()
    return sample


async def scenario(url: str, cfg: Config) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=cfg.flood + 16, max_keepalive_connections=cfg.flood + 16)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        idle = [await stream(client, "b", cfg.trickle_tokens) for _ in range(3)]
        flood = [asyncio.create_task(stream(client, "a", cfg.flood_tokens)) for _ in range(cfg.flood)]
        await asyncio.sleep(1.0)  # A's burst is queued before B starts
        sent = []
        for _ in range(cfg.trickle):  # open loop: B's rate does not depend on how it is served
            sent.append(asyncio.create_task(stream(client, "b", cfg.trickle_tokens)))
            await asyncio.sleep(cfg.trickle_interval_s)
        trickle = await asyncio.gather(*sent)
        a = await asyncio.gather(*flood)
    start = trickle[0].sent
    end = max((s.token_times[-1] for s in trickle if s.token_times), default=time.monotonic())
    tokens = {
        t: sum(start <= x <= end for s in group for x in s.token_times)
        for t, group in (("a", a), ("b", trickle))
    }
    total = max(1, sum(tokens.values()))
    out: dict[str, Any] = {"b_idle_ttft_p50_s": statistics.median(s.ttft for s in idle)}
    for tenant, group in (("a", a), ("b", trickle)):
        ok = [s.ttft for s in group if s.status == 200 and s.token_times]
        out[tenant] = {
            "requests": len(group),
            "http_429": sum(s.status == 429 for s in group),
            "ttft_p50_s": percentile(ok, 50),
            "ttft_p99_s": percentile(ok, 99),
            "token_share_while_b_active": tokens[tenant] / total,
        }
    return out


def run_mode(model_dir: Path, work: Path, cfg: Config, fair: bool) -> dict[str, Any]:
    server = ServerProcess(
        str(model_dir),
        cfg.max_batch_size,
        "cpu",
        "float32",
        cfg.max_waiting,
        work / f"server-fair-{fair}.log",
        extra_env={
            "PREFIXSERVE_API_KEYS": json.dumps(KEYS),
            "PREFIXSERVE_FAIR_SCHEDULING": str(fair).lower(),
        },
    )
    try:
        server.wait_ready()
        return asyncio.run(scenario(server.base_url, cfg))
    finally:
        server.stop()


def report(results: dict[str, Any], cfg: Config, machine: dict[str, Any], seconds: float) -> str:
    lines = [
        "# Two tenants, one flooding: fair scheduling on vs off",
        "",
        f"`python -m loadtest.fair_bench` on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores), "
        f"load average {machine.get('load_average_at_start', '?')} at the start, {seconds:.0f} s. Real server "
        f"(tiny GPT-2, random weights, CPU, max_batch_size {cfg.max_batch_size}); A sends {cfg.flood} requests "
        f"of {cfg.flood_tokens} tokens at once, then B sends {cfg.trickle} requests of {cfg.trickle_tokens} "
        f"tokens, one every {cfg.trickle_interval_s} s. Equal weights.",
        "",
        "| scheduling | tenant | TTFT p50 (s) | TTFT p99 (s) | 429s | token share while B active |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode, res in results.items():
        for tenant in "ab":
            r = res[tenant]
            lines.append(
                f"| {mode} | {tenant.upper()} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['http_429']} | "
                f"{r['token_share_while_b_active']:.1%} |"
            )
    lines += [""] + [
        f"B's idle TTFT p50 ({mode} run): {res['b_idle_ttft_p50_s']:.3f} s" for mode, res in results.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fair_bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("fair-two-tenant"), help="writes OUT.md and OUT.json"
    )
    for name, value in asdict(Config()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    machine = machine_info(torch.device("cpu"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefixserve-fair-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir("tiny-gpt2", work / "model", seed=0)
        results = {
            "fair": run_mode(model_dir, work, cfg, True),
            "fcfs": run_mode(model_dir, work, cfg, False),
        }
    seconds = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"config": asdict(cfg), "machine": machine, "results": results}, indent=2)
    )
    text = report(results, cfg, machine, seconds)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
