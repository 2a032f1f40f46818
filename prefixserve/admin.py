"""`prefixserve prefixes list|show|upload|delete|rollback`: manage a running server's prefixes.

A thin command line over `/v1/prefixes` using `training.upload.ApiClient`: the API key comes from
`$PREFIXSERVE_API_KEY` or a key file (`--api-key-file`, `$PREFIXSERVE_API_KEY_FILE`), never from the
command line; 429/503 are retried with backoff, honouring `Retry-After`. Output is a table for people or
JSON (`--output json`) for scripts. Exit status: 0 on success, 1 when the server refused, 2 on usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from training.upload import ApiClient, UploadError, resolve_api_key, upload_files

TABLE_COLUMNS = ("task", "version", "prefix_length", "num_parameters", "size_bytes", "source", "created_at")
MAX_PAGES = 10_000  # a server that keeps returning a cursor must not loop us forever


def common_options() -> argparse.ArgumentParser:
    """The options every admin command takes (server, key file, output, timeout, retries)."""
    # No abbreviations: `--api-key SECRET` must be refused, not read as `--api-key-file SECRET`.
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--server",
        default=None,
        help="server base URL (default: $PREFIXSERVE_SERVER, else http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--api-key-file",
        help="file holding the API key (default: $PREFIXSERVE_API_KEY, $PREFIXSERVE_API_KEY_FILE)",
    )
    common.add_argument("--output", "-o", choices=("table", "json"), default="table")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt")
    common.add_argument("--retries", type=int, default=5, help="retries on 429/503 (honouring Retry-After)")
    return common


def action_parser(
    prog: str, description: str, actions: dict[str, tuple[tuple[str, ...], str]]
) -> argparse.ArgumentParser:
    """A parser of `prog <action> [positionals] [common options]`; `actions`: action -> (positional
    arguments, help). A positional named `version` is an integer."""
    common = common_options()
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")
    for action, (positionals, help_text) in actions.items():
        sub_parser = sub.add_parser(action, parents=[common], allow_abbrev=False, help=help_text)
        for name in positionals:
            sub_parser.add_argument(name, type=int if name == "version" else str)
    return parser


def _parser() -> argparse.ArgumentParser:
    return action_parser(
        "prefixserve prefixes",
        "Manage a server's prefixes.",
        {
            "list": ((), "the tenant's tasks and their current versions"),
            "show": (("task",), "a task's current version and kept versions"),
            "upload": (("task", "path"), "upload an artifact (.safetensors) or a PEFT folder"),
            "delete": (("task",), "delete a task and all its versions"),
            "rollback": (("task", "version"), "make a kept earlier version current"),
        },
    )


def _list(client: ApiClient, _: argparse.Namespace) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _page in range(MAX_PAGES):
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.json("GET", "/v1/prefixes", params=params)
        items += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return items


ACTIONS: dict[str, Callable[[ApiClient, argparse.Namespace], Any]] = {
    "list": _list,
    "show": lambda c, a: c.json("GET", f"/v1/prefixes/{a.task}"),
    "upload": lambda c, a: upload_files(c, a.task, a.path),
    "delete": lambda c, a: c.json("DELETE", f"/v1/prefixes/{a.task}") or {"task": a.task, "deleted": True},
    "rollback": lambda c, a: c.json("POST", f"/v1/prefixes/{a.task}/rollback", json={"version": a.version}),
}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Rows as aligned text columns (only the columns present in some row)."""
    present = [c for c in columns if any(c in r for r in rows)]
    columns = present or (list(rows[0]) if rows else list(columns))
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def render(action: str, result: Any, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2)
    if action == "list":
        return table(result) if result else "(no prefixes)"
    if action == "show":
        current = f"{result['task']}: current version {result['current_version']}"
        return current + "\n" + table(result["versions"])
    return table([result])


def run(
    args: argparse.Namespace,
    actions: dict[str, Callable[[ApiClient, argparse.Namespace], Any]],
    show: Callable[[str, Any, str], str],
) -> int:
    """Run `args.action` against the server and print its result; the exit status."""
    environ = os.environ  # the edge: nothing below reads the environment
    try:
        client = ApiClient(
            args.server or environ.get("PREFIXSERVE_SERVER") or "http://127.0.0.1:8000",
            resolve_api_key(environ, args.api_key_file),
            timeout_s=args.timeout,
            retries=args.retries,
            on_retry=lambda message: print(f"prefixserve: {message}", file=sys.stderr),
        )
        result = actions[args.action](client, args)
    except (UploadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(show(args.action, result, args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_parser().parse_args(argv), ACTIONS, render)
