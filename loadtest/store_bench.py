"""Prefix store benchmark: cold-load time of a gpt2-medium-sized prefix from Redis, and the cost of
10,000 registered tasks (list/describe latency, Redis memory, client RSS).

    .venv/bin/python -m loadtest.store_bench [--redis-url redis://127.0.0.1:6379/0] [--num-tasks 10000]

Prints one JSON object on stdout, then a Markdown table. Uses a unique key prefix and deletes its
keys afterwards, so it is safe against a shared Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import safetensors.torch
import torch
from redis.asyncio import Redis

from prefix_store.redis_store import RedisPrefixStore

# gpt2-medium: 24 layers, 16 heads, head_dim 64; a prefix of L=10 virtual tokens, key and value.
GPT2_MEDIUM_PREFIX_SHAPE = (24, 2, 16, 10, 64)  # [num_layers, 2, H, L, D]


def prefix_bytes(shape: tuple[int, ...], seed: int = 0) -> bytes:
    """A safetensors file like an exported prefix artifact (built directly, without artifact.py)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {"prefix.decoder": torch.randn(shape, generator=gen, dtype=torch.float32)}
    return safetensors.torch.save(tensors, metadata={"format": "pt", "bench": "store_bench"})


def rss_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def timed(fn: Callable[[], Awaitable[Any]], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - start)
    return out


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


async def bench_cold_load(store: RedisPrefixStore, device: torch.device, repeats: int) -> dict[str, Any]:
    data = prefix_bytes(GPT2_MEDIUM_PREFIX_SHAPE)
    await store.put("bench", "gpt2-medium", data, {"shape": list(GPT2_MEDIUM_PREFIX_SHAPE)})
    get_s, load_s, to_s, total_s = [], [], [], []
    for _ in range(repeats + 1):  # the first round warms up CUDA / allocator; not counted
        t0 = time.perf_counter()
        stored = await store.get("bench", "gpt2-medium")
        t1 = time.perf_counter()
        tensors = safetensors.torch.load(stored.data)
        t2 = time.perf_counter()
        kv = tensors["prefix.decoder"].to(device)  # [24, 2, 16, 10, 64]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t3 = time.perf_counter()
        assert kv.shape == GPT2_MEDIUM_PREFIX_SHAPE
        get_s.append(t1 - t0)
        load_s.append(t2 - t1)
        to_s.append(t3 - t2)
        total_s.append(t3 - t0)
    return {
        "blob_bytes": len(data),
        "device": str(device),
        "repeats": repeats,
        "get_ms_median": ms(get_s[1:]),
        "deserialize_ms_median": ms(load_s[1:]),
        "to_device_ms_median": ms(to_s[1:]),
        "total_ms_median": ms(total_s[1:]),
        "total_ms_max": round(max(total_s[1:]) * 1e3, 3),
    }


async def bench_many_tasks(
    store: RedisPrefixStore, admin: Redis, num_tasks: int, repeats: int, concurrency: int
) -> dict[str, Any]:
    small = prefix_bytes((1, 2, 1, 2, 4))  # a tiny but valid safetensors file
    mem_before = int((await admin.info("memory"))["used_memory"])
    rss_before = rss_bytes()
    names = [f"task-{i:05d}" for i in range(num_tasks)]
    sem = asyncio.Semaphore(concurrency)

    async def register(name: str) -> None:
        async with sem:
            await store.put("tenant-many", name, small, {"owner": "bench"})

    start = time.perf_counter()
    await asyncio.gather(*(register(n) for n in names))
    register_s = time.perf_counter() - start
    mem_after = int((await admin.info("memory"))["used_memory"])

    middle = names[num_tasks // 2 - 1]
    first_page = await timed(lambda: store.list_tasks("tenant-many", limit=100), repeats)
    middle_page = await timed(lambda: store.list_tasks("tenant-many", cursor=middle, limit=100), repeats)
    describe = await timed(lambda: store.describe("tenant-many", names[num_tasks // 2]), repeats)
    current = await timed(lambda: store.current_version("tenant-many", names[-1]), repeats)
    page = await store.list_tasks("tenant-many", cursor=middle, limit=100)
    assert (
        len(page.items) == min(100, num_tasks - num_tasks // 2)
        and page.items[0].task == names[num_tasks // 2]
    )
    return {
        "num_tasks": num_tasks,
        "blob_bytes": len(small),
        "register_s": round(register_s, 3),
        "register_per_s": round(num_tasks / register_s, 1),
        "list_first_page_ms_median": ms(first_page),
        "list_middle_page_ms_median": ms(middle_page),
        "describe_ms_median": ms(describe),
        "current_version_ms_median": ms(current),
        "redis_used_memory_delta_bytes": mem_after - mem_before,
        "redis_bytes_per_task": round((mem_after - mem_before) / num_tasks, 1),
        "client_rss_bytes": rss_bytes(),
        "client_rss_delta_bytes": rss_bytes() - rss_before,
    }


async def cleanup(admin: Redis, key_prefix: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    async for key in admin.scan_iter(match=f"{key_prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await admin.unlink(*batch)
            batch = []
    if batch:
        deleted += await admin.unlink(*batch)
    return deleted


def markdown(result: dict[str, Any]) -> str:
    c, m = result["cold_load"], result["many_tasks"]
    rows = [
        ("cold load, gpt2-medium prefix", f"{c['blob_bytes'] / 1e6:.2f} MB -> {c['device']}"),
        ("  get (Redis)", f"{c['get_ms_median']} ms"),
        ("  safetensors load (bytes -> tensors)", f"{c['deserialize_ms_median']} ms"),
        ("  .to(device)", f"{c['to_device_ms_median']} ms"),
        ("  total (median / max)", f"{c['total_ms_median']} / {c['total_ms_max']} ms"),
        (f"register {m['num_tasks']} tasks", f"{m['register_s']} s ({m['register_per_s']}/s)"),
        ("list_tasks first page (100)", f"{m['list_first_page_ms_median']} ms"),
        ("list_tasks middle page (100)", f"{m['list_middle_page_ms_median']} ms"),
        ("describe", f"{m['describe_ms_median']} ms"),
        ("current_version", f"{m['current_version_ms_median']} ms"),
        (
            "Redis used_memory delta",
            f"{m['redis_used_memory_delta_bytes'] / 1e6:.2f} MB ({m['redis_bytes_per_task']} B/task)",
        ),
        ("client RSS", f"{m['client_rss_bytes'] / 1e6:.1f} MB"),
    ]
    lines = [f"| measurement | value (median of {c['repeats']}) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    key_prefix = f"bench-{uuid.uuid4().hex[:12]}"
    admin = Redis.from_url(args.redis_url, socket_timeout=10.0)
    store = RedisPrefixStore(args.redis_url, key_prefix=key_prefix, socket_timeout=10.0)
    try:
        cold = await bench_cold_load(store, device, args.repeats)
        many = await bench_many_tasks(store, admin, args.num_tasks, args.repeats, args.concurrency)
    finally:
        await store.close()
        await cleanup(admin, key_prefix)
        await admin.aclose()
    server = await _server_info(args.redis_url)
    return {
        "redis_url": args.redis_url,
        "redis_version": server,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cold_load": cold,
        "many_tasks": many,
    }


async def _server_info(url: str) -> str:
    client = Redis.from_url(url, socket_timeout=10.0)
    try:
        return str((await client.info("server"))["redis_version"])
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--num-tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64, help="puts in flight while registering")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    args = parser.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    print()
    print(markdown(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
