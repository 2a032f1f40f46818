"""A load generator from the vLLM / Kubernetes ecosystem (GuideLLM, as its users run it) against a real
server: streaming completions at a low constant rate for a few seconds (six requests, 2/s). Every request it completed
must have exactly the output tokens it asked for (`ignore_eos`), counted from the SSE chunks, and it
must report time to first token and inter-token latency (which it measures from those chunks)."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

from tests.api.conftest import ACME, artifact_bytes, serve_http
from tests.api.test_eval_harness import tool_env

PROMPT_TOKENS, OUTPUT_TOKENS, REQUESTS = 16, 8, 6
KEY = "acme-manage-key"


async def test_guidellm_reports_exact_output_tokens_ttft_and_itl(make_api, loaded, tiny_gpt2_dir, tmp_path):
    api = await make_api(start=False)
    out = tmp_path / "benchmarks.json"
    async with serve_http(api) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            files = {
                "artifact": ("p.safetensors", artifact_bytes(loaded.spec, 7), "application/octet-stream")
            }
            r = await client.post("/v1/prefixes", data={"task": "poems"}, files=files, headers=ACME)
            assert r.status_code == 201, r.text
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guidellm", "run",
            "--backend", f"kind=openai_http,target={url},model=poems,request_format=/v1/completions,api_key={KEY}",
            "--profile", "kind=constant,rate=2",
            # 6 requests at 2/s: about 3 s of arrivals; each one runs to its end (a time limit would cut
            # the last ones off on a loaded machine), within a generous time limit.
            "--constraint", f"kind=max_requests,count={REQUESTS}",
            "--constraint", "kind=max_duration,seconds=120",
            "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
            "--tokenizer", f"kind=huggingface_auto,model={tiny_gpt2_dir}",
            "--output", f"kind=json,path={out}",
            "--disable-console-interactive",
            env=tool_env(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    log = output.decode(errors="replace")[-4000:]
    assert proc.returncode == 0, log

    (benchmark,) = json.loads(out.read_text())["benchmarks"]
    requests = benchmark["requests"]
    assert requests["errored"] == [], [r.get("info", {}).get("error") or r for r in requests["errored"]][:2]
    done = requests["successful"]
    assert len(done) == REQUESTS, log
    for request in done:
        body = json.loads(request["request_args"])["body"]
        assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == OUTPUT_TOKENS
        assert request["output_metrics"]["text_tokens"] == OUTPUT_TOKENS
        assert request["input_metrics"]["text_tokens"] == PROMPT_TOKENS
        # Streamed token by token (a chunk may hold back a token that ends inside a character): what
        # TTFT and ITL are measured from.
        assert 1 < request["info"]["timings"]["token_iterations"] <= OUTPUT_TOKENS
    metrics = benchmark["metrics"]
    ttft, itl = (
        metrics["time_to_first_token_ms"]["successful"],
        metrics["inter_token_latency_ms"]["successful"],
    )
    assert ttft["count"] == len(done) and ttft["mean"] > 0
    assert itl["count"] == len(done) * (OUTPUT_TOKENS - 1) and itl["mean"] > 0  # one gap between chunks
    assert metrics["output_token_count"]["successful"]["total_sum"] == OUTPUT_TOKENS * len(done)
