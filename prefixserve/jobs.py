"""`prefixserve jobs list|show|events|cancel`: a running server's fine-tuning jobs, from the command line.

The same client, key handling, retries and output as `prefixserve prefixes` (`prefixserve.admin`):
the key from `$PREFIXSERVE_API_KEY` or a key file, a table for people or `-o json` for scripts, exit
status 0 on success and 1 when the server refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from prefixserve.admin import MAX_PAGES, action_parser, run, table
from training.upload import ApiClient

JOB_COLUMNS = ("id", "status", "model", "fine_tuned_model", "trained_tokens", "created_at", "finished_at")
EVENT_COLUMNS = ("created_at", "level", "message")


def _parser() -> argparse.ArgumentParser:
    return action_parser(
        "prefixserve jobs",
        "A server's fine-tuning jobs (OpenAI's /v1/fine_tuning/jobs).",
        {
            "list": ((), "the tenant's jobs, newest first"),
            "show": (("job",), "one job: status, hyperparameters, error, the task it made"),
            "events": (("job",), "a job's events, newest first"),
            "cancel": (("job",), "cancel a job (its worker stops; nothing is stored)"),
        },
    )


def _all(client: ApiClient, path: str) -> list[dict[str, Any]]:
    """Every item of an OpenAI cursor listing, following `has_more` / `after`."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    for _page in range(MAX_PAGES):
        page = client.json("GET", path, params=params)
        items += page["data"]
        if not page.get("has_more") or not page["data"]:
            break
        params["after"] = page["data"][-1]["id"]
    return items


ACTIONS: dict[str, Callable[[ApiClient, argparse.Namespace], Any]] = {
    "list": lambda c, a: _all(c, "/v1/fine_tuning/jobs"),
    "show": lambda c, a: c.json("GET", f"/v1/fine_tuning/jobs/{a.job}"),
    "events": lambda c, a: _all(c, f"/v1/fine_tuning/jobs/{a.job}/events"),
    "cancel": lambda c, a: c.json("POST", f"/v1/fine_tuning/jobs/{a.job}/cancel"),
}


def render(action: str, result: Any, output: str) -> str:
    if output == "json":
        import json

        return json.dumps(result, indent=2)
    if action == "list":
        return table(result, JOB_COLUMNS) if result else "(no jobs)"
    if action == "events":
        return table(result, EVENT_COLUMNS) if result else "(no events)"
    lines = [table([result], JOB_COLUMNS)]
    if result.get("error"):
        error = result["error"]
        lines.append(
            f"error: {error['code']}: {error['message']}"
            + (f" (param {error['param']})" if error.get("param") else "")
        )
    hyper = (result.get("method") or {}).get("supervised", {}).get("hyperparameters") or result.get(
        "hyperparameters"
    )
    if hyper:
        lines.append("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in hyper.items() if v is not None))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv), ACTIONS, render)
