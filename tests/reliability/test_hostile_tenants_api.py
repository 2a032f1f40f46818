"""Against a real server process: one hostile tenant (acme) attacks through the API while another
(globex) keeps generating; the attack is the test.

Each attack must get clear 4xx answers (or a closed connection) and leave the server and the other
tenant unaffected: globex's generation latency stays within 2x of its quiet value measured just
before, and `/health` answers in under 100 ms at the median, both measured from their own process
while the attack runs.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefix_store.artifact import dump_artifact, new_artifact
from tests.reliability.conftest import (
    ACME,
    GLOBEX,
    ServerProcess,
    Victim,
    assert_victim_unaffected,
    quiet_generation_s,
    upload,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

RENDER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 8.0
WRITE_TIMEOUT_S = 2.0
# tenant_max_connections stays at its default (256): a tenant's share is half of the connections.
MAX_CONNECTIONS = 20
TENANT_SHARE = MAX_CONNECTIONS // 2
SERVER_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("hostile-tenants")
    template = work / "chat.jinja"
    template.write_text(SERVER_TEMPLATE)
    proc = ServerProcess(
        tiny_gpt2_dir,
        work,
        chat_template=str(template),
        chat_template_timeout_s=RENDER_TIMEOUT_S,
        chat_template_max_memory_bytes=128 << 20,
        timeout_request_body_s=BODY_TIMEOUT_S,
        min_request_body_bytes_per_s=1024,
        timeout_write_s=WRITE_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS,
        max_json_body_bytes=4 << 20,  # a 1 MiB /tokenize input reaches the route (and its own limit)
    )
    proc.start()
    yield proc
    proc.stop()


def chat_task(loaded, task: str, template: str) -> bytes:
    import torch

    spec = loaded.spec
    prefix = torch.zeros(spec.num_layers, 2, spec.num_heads, 2, spec.head_dim)
    return dump_artifact(
        new_artifact({"decoder": prefix}, spec, task=task, training={"chat_template": template})
    )


def base_model(client: httpx.Client) -> str:
    return str(client.get("/v1/models", headers=ACME).json()["data"][0]["id"])


def chat(client: httpx.Client, model: str, headers=ACME, **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    return client.post("/v1/chat/completions", json=body, headers=headers)


# Templates whose cost only a render can tell (their ranges depend on the messages).
LOOPS = "{% for i in range(messages|length * 100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLING = (
    "{% set ns = namespace(s='ab') %}{% for i in range(messages|length * 40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
)


def test_chat_templates_are_bounded_and_cost_only_their_tenant(server, loaded):
    with server.client(timeout=120) as client:
        # Refused at upload: what a static check can decide.
        literal = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
        for bad in (literal, "{% for %}"):
            r = upload(client, "bad-template", chat_task(loaded, "bad-template", bad))
            assert r.status_code == 422 and "chat_template" in r.json()["error"], r.text
        for task, template in (("loops", LOOPS), ("doubling", DOUBLING)):
            assert upload(client, task, chat_task(loaded, task, template)).status_code == 201
        assert chat(client, base_model(client)).status_code == 200  # the server's template; workers started

        quiet_s = quiet_generation_s(server.url)
        rss_before = server.rss_kib()
        victim = Victim(server.url).run(min_generations=1)
        statuses: list[int] = []
        started = time.monotonic()
        try:

            def attack(model: str) -> None:
                while time.monotonic() - started < 12:
                    r = chat(client, model)
                    statuses.append(r.status_code)
                    assert r.status_code in (422, 429), r.text
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                        time.sleep(0.2)

            with ThreadPoolExecutor(3) as pool:
                attacks = [pool.submit(attack, m) for m in ("loops", "loops", "doubling")]
                # The other tenant's chat requests are served meanwhile (it has a worker of its own).
                for _ in range(3):
                    r = chat(client, base_model(client), headers=GLOBEX)
                    assert r.status_code == 200, r.text
                for future in attacks:
                    future.result()
        finally:
            victim.stop()
        assert 422 in statuses, statuses
        r = chat(client, "loops")
        assert r.status_code in (422, 429), r.text
        if r.status_code == 422:
            assert "did not render within" in r.json()["error"]["message"] or "memory" in r.text
        assert server.rss_kib() - rss_before < 100 << 10  # the server never held a doubled string
        assert_victim_unaffected(victim, quiet_s)
        assert server.proc is not None and server.proc.poll() is None


def test_tokenize_is_admitted_and_bounded(server):
    big = "lorem ipsum dolor sit amet " * (40_000)  # ~1 MiB
    with server.client(timeout=120) as client:
        r = client.post("/tokenize", json={"inputs": big})  # no key: refused before its body
        assert r.status_code == 401
        quiet_s = quiet_generation_s(server.url)
        rss_before = server.rss_kib()
        victim = Victim(server.url).run(min_generations=1)
        try:
            started = time.monotonic()
            bodies = [json.dumps({"inputs": big}).encode(), json.dumps({"prompt": big}).encode()]
            headers = {**ACME, "content-type": "application/json"}
            with ThreadPoolExecutor(3) as pool:
                # Three 1 MiB inputs at a time, every half second for 4 s (paced: flat out, this
                # process's own sending would take the CPU of a 2-core machine from the victim).
                while time.monotonic() - started < 4:
                    time.sleep(0.5)
                    answers = list(
                        pool.map(
                            lambda body: client.post("/tokenize", content=body, headers=headers),
                            [bodies[0], bodies[1], bodies[0]],
                        )
                    )
                    for r in answers:  # refused from Content-Length: no JSON input that long can fit
                        assert r.status_code == 413, r.text[:300]
            # Under the body limit but over the character limit: 422 naming the numbers.
            over = "a" * 70_000
            r = client.post("/tokenize", json={"inputs": over}, headers=ACME)
            assert r.status_code == 422 and "characters" in r.text, r.text[:300]
        finally:
            victim.stop()
        assert server.rss_kib() - rss_before < 50 << 10
        assert_victim_unaffected(victim, quiet_s)
        ok = client.post("/tokenize", json={"inputs": "Hello world"}, headers=ACME)
        assert ok.status_code == 200 and [s["text"] for s in ok.json()] == ["Hello", " world"]
        too_many = client.post("/detokenize", json={"tokens": [1] * 5000}, headers=ACME)
        assert too_many.status_code == 422


def _trickler(url: str, path: str, headers: dict[str, str]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + b"{")
    return sock


def test_trickled_bodies_cannot_take_every_connection(server):
    quiet_s = quiet_generation_s(server.url)
    attackers: list[socket.socket] = []
    closed_at: dict[int, float] = {}

    def trickle() -> None:  # 4 bytes per second per connection; notes when the server closed each
        while time.monotonic() - started < BODY_TIMEOUT_S + 6 and len(closed_at) < len(attackers):
            for i, sock in enumerate(attackers):
                if i in closed_at:
                    continue
                try:
                    sock.sendall(b" ")
                    sock.setblocking(False)
                    try:
                        while chunk := sock.recv(65536):  # the 429 (or 503) answer, then end of stream
                            del chunk
                        closed_at[i] = time.monotonic() - started
                    except BlockingIOError:
                        pass
                    finally:
                        sock.setblocking(True)
                except OSError:
                    closed_at[i] = time.monotonic() - started
            time.sleep(0.25)

    victim = Victim(server.url).run(min_generations=1)  # running before the attack starts
    started = time.monotonic()
    for _ in range(MAX_CONNECTIONS + 6):  # one connection after another, as a slowloris opens them
        attackers.append(_trickler(server.url, "/v1/generate", ACME))
        time.sleep(0.05)
    attack = threading.Thread(target=trickle, daemon=True)
    attack.start()
    try:
        # Until the refused connections (429; uvicorn's 503 past the connection limit) are closed,
        # every request may get uvicorn's 503; from then on only the tenant's 10 admitted trickles
        # hold their slots, until their body deadline.
        time.sleep(3.0)
        victim.reset()
        attack.join(BODY_TIMEOUT_S + 30)
    finally:
        victim.stop()
        for sock in attackers:
            sock.close()
    # Every trickled connection was closed: past the tenant's bound at once (429), the others at the
    # body deadline; none lasted until the trickle would have finished (1000 s).
    assert len(closed_at) == len(attackers), (len(closed_at), len(attackers))
    assert max(closed_at.values()) < BODY_TIMEOUT_S + 6
    refused_early = [t for t in closed_at.values() if t < BODY_TIMEOUT_S]
    assert len(refused_early) >= len(attackers) - TENANT_SHARE, sorted(closed_at.values())
    assert_victim_unaffected(victim, quiet_s)  # globex never saw a 503


def test_a_client_that_never_reads_is_disconnected_and_its_bytes_dropped(server):
    text = "lorem ipsum dolor sit amet " * 2400  # ~65k characters (the limit): a ~1 MB /tokenize answer
    body = json.dumps({"inputs": text}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    head = (
        f"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {ACME['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    time.sleep(WRITE_TIMEOUT_S + 4)  # read nothing
    received = 0
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    with server.client() as client:
        whole = client.post("/tokenize", json={"inputs": text}, headers=ACME)
    assert whole.status_code == 200
    assert received < len(whole.content) / 2, (received, len(whole.content))


def test_lone_surrogates_and_refused_template_kwargs_are_422(server):
    with server.client() as client:
        echo = {"model": base_model(client), "prompt": "a\ud800b", "echo": True, "max_tokens": 2}
        r = client.post(
            "/v1/completions", content=json.dumps(echo), headers={**ACME, "content-type": "application/json"}
        )
        assert r.status_code == 422 and "surrogate" in r.text, r.text
        for message in (
            {"role": "user", "content": "\ud800"},
            {"role": "user", "content": [{"type": "text", "text": "x\udfff"}]},
        ):
            body = {"model": base_model(client), "messages": [message], "max_tokens": 2}
            r = client.post(
                "/v1/chat/completions",
                content=json.dumps(body),
                headers={**ACME, "content-type": "application/json"},
            )
            assert r.status_code == 422 and "surrogate" in r.text, r.text
        r = chat(client, base_model(client), chat_template_kwargs={"tools": [{"type": "function"}]})
        assert r.status_code == 422 and "tools" in r.json()["error"]["message"], r.text
        assert chat(client, base_model(client), chat_template_kwargs={"greeting": "hi"}).status_code == 200


def _openai_stream(url: str, path: str, body: dict, out: list, done: threading.Event) -> None:
    try:
        with (
            httpx.Client(base_url=url, timeout=120) as client,
            client.stream("POST", path, json=body, headers=ACME) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data:"):
                    out.append(line[5:].strip())
    except httpx.HTTPError as exc:  # the connection cut before [DONE]
        out.append(f"cut: {exc!r}")
    finally:
        done.set()


def test_openai_streams_cut_by_shutdown_never_say_stop(spawn_server, long_gpt2_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(SERVER_TEMPLATE)
    server = spawn_server(model_dir=long_gpt2_dir, shutdown_grace_s=0.5, chat_template=str(template))
    with server.client() as client:
        model = base_model(client)
    streams = {
        "/v1/completions": {"model": model, "prompt": "Hello", "max_tokens": 4000, "stream": True},
        "/v1/chat/completions": {
            "model": model,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4000,
            "stream": True,
        },
    }
    events: dict[str, list[str]] = {path: [] for path in streams}
    done = {path: threading.Event() for path in streams}
    for path, body in streams.items():
        threading.Thread(
            target=_openai_stream, args=(server.url, path, body, events[path], done[path]), daemon=True
        ).start()
    wait_until(lambda: all(len(e) >= 3 for e in events.values()), 120, "tokens on both streams")
    server.signal()  # SIGTERM: the 0.5 s grace is far shorter than 4000 tokens
    assert server.wait_exit(timeout=60) == 0, server.log_tail()
    for path in streams:
        assert done[path].wait(30), path
        chunks = [json.loads(e) for e in events[path] if e.startswith("{")]
        reasons = [c.get("finish_reason") for chunk in chunks for c in chunk.get("choices", [])]
        assert "stop" not in reasons and "length" not in reasons, (path, reasons[-3:])
        # The stream says why it ended: an in-band error (then [DONE]), or the connection was cut.
        last = events[path][-2:] if events[path][-1:] == ["[DONE]"] else events[path][-1:]
        assert "error" in last[0] or last[0].startswith("cut:"), (path, events[path][-3:])


def _raw(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _mixed_burst(port: int, requests: list[bytes]) -> list[tuple[int, float, bytes]]:
    """Every request at once, each on a connection opened beforehand; (status, seconds until the
    response head arrived, the head) in request order. Raw sockets keep the client's own work out."""
    import selectors

    socks = [socket.create_connection(("127.0.0.1", port), timeout=300) for _ in requests]
    answers: dict[int, tuple[int, float, bytes]] = {}
    try:
        with selectors.DefaultSelector() as selector:
            start = time.perf_counter()
            for i, (sock, request) in enumerate(zip(socks, requests, strict=True)):
                sock.sendall(request)
                selector.register(sock, selectors.EVENT_READ, i)
            received = [b""] * len(socks)
            while len(answers) < len(socks):
                events = selector.select(timeout=300)
                assert events, "the server stopped answering"
                for key, _ in events:
                    i = key.data
                    chunk = socks[i].recv(65536)
                    received[i] += chunk
                    if b"\r\n\r\n" in received[i] or not chunk:
                        head = received[i].split(b"\r\n\r\n", 1)[0]
                        answers[i] = (int(head.split(b" ", 2)[1]), time.perf_counter() - start, head)
                        selector.unregister(socks[i])
    finally:
        for sock in socks:
            sock.close()
    return [answers[i] for i in range(len(requests))]


def test_overload_refusals_cost_what_health_costs(spawn_server):
    server = spawn_server(max_waiting=32, queue_timeout_s=300, tenant_max_connections=0)
    body = json.dumps({"inputs": "hello " * 400, "parameters": {"max_new_tokens": 32}}).encode()
    generate = _raw("POST", "/v1/generate", body, {**ACME, "Content-Type": "application/json"})
    health = _raw("GET", "/health")
    requests = [generate] * 300
    for i in range(0, 300, 10):  # /health calls spread through the same burst
        requests.insert(i + i // 10, health)
    answers = _mixed_burst(server.port, requests)
    health_s = [t for (status, t, _), r in zip(answers, requests, strict=True) if r is health]
    refused = [(t, head) for (status, t, head), r in zip(answers, requests, strict=True) if status == 429]
    statuses = {status for (status, _, _), r in zip(answers, requests, strict=True) if r is generate}
    assert statuses <= {200, 429} and 200 in statuses, statuses  # every accepted request finished
    assert {status for (status, _, _), r in zip(answers, requests, strict=True) if r is health} == {200}
    assert len(refused) >= 100 and all(b"retry-after" in head.lower() for _, head in refused)
    refused_p50 = statistics.median(t for t, _ in refused)
    assert refused_p50 <= 2 * statistics.median(health_s), (refused_p50, statistics.median(health_s))
