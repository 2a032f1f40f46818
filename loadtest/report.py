"""Writing the results: `results.json` (stable keys), `report.md` (tables), PNG plots.

Keys of `results.json` (see docs/benchmarks.md): `workload`, `machine`, `command`, `results`
(runner -> metrics), `ratios`, `targets`, `scaling`, `flops`, and `bart` (its own `workload`,
`results`, `ratios`, `notes`) when the profile has a BART section, and `sections` (a list of the same
per-section keys plus `name`) when it has more comparisons (beside vLLM in fp32 and bf16).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loadtest.metrics import RunResult
from loadtest.structured_load import STRUCTURED_RUNNERS

RUNNER_ORDER = (
    "engine",
    "http",
    "no_prefix",
    "naive_peft",
    "static_batch",
    "transformers_cb",
    "engine_16_tasks",
    "vllm_bare",
    "server_vllm",
    "server_native",
)
# Each of these runners' output tokens/s over stock vLLM's on the bare model
# (`<runner>_vs_vllm_bare`).
VS_VLLM_BARE = ("server_vllm", "server_native", "http", "engine")
# Our goals: engine output tokens/s relative to each baseline.
TARGETS = {
    "engine_vs_naive": 5.0,
    "engine_vs_static": 1.5,
    "engine_vs_no_prefix": 0.9,
    "engine_vs_transformers_cb": 1.4,
    "engine_vs_16_tasks": 0.8,
}
_RATIO_BASE = {
    "engine_vs_naive": "naive_peft",
    "engine_vs_static": "static_batch",
    "engine_vs_no_prefix": "no_prefix",
    "engine_vs_transformers_cb": "transformers_cb",
    "engine_vs_16_tasks": "engine_16_tasks",
}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Engine output tokens/s over each baseline's (None when either runner did not run)."""
    engine = results.get("engine", {}).get("output_tok_s")
    out: dict[str, float | None] = {}
    for key, base in _RATIO_BASE.items():
        other = results.get(base, {}).get("output_tok_s")
        out[key] = engine / other if engine and other else None
    http = results.get("http", {}).get("output_tok_s")
    out["http_vs_engine"] = http / engine if http and engine else None
    for constrained, free in STRUCTURED_RUNNERS.items():  # structured output: schemas on half vs none
        mine, base = (results.get(n, {}).get("output_tok_s") for n in (constrained, free))
        if constrained in results or free in results:
            out[f"{constrained}_vs_{free}"] = mine / base if mine and base else None
    if "vllm_bare" in results:  # (a section whose vllm_bare failed shows its targets as not measured)
        bare = results["vllm_bare"].get("output_tok_s")
        for name in VS_VLLM_BARE:
            mine = results.get(name, {}).get("output_tok_s")
            out[f"{name}_vs_vllm_bare"] = mine / bare if mine and bare else None
    return out


def targets(
    ratio: dict[str, float | None], goals: dict[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """Each goal (default `TARGETS`) with its measured ratio and whether it was met (None: not measured)."""
    return {
        key: {
            "target": goal,
            "measured": ratio.get(key),
            "met": None if ratio.get(key) is None else ratio[key] >= goal,
        }  # type: ignore[operator]
        for key, goal in (TARGETS if goals is None else goals).items()
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    def clean(x: Any) -> Any:  # NaN/inf are not JSON
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(doc), indent=2, sort_keys=False) + "\n")


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value * scale:.{digits}f}"


def results_table(results: dict[str, dict[str, Any]]) -> str:
    header = (
        "| runner | out tok/s | req/s | TTFT p50 / p90 / p99 (s) | TPOT p50 (ms) | ITL p50 / p99 (ms) "
        "| e2e p50 / p90 / p99 (s) | goodput (req/s) | peak RSS (GiB) | peak KV / prefix (MiB) "
        "| FLOP/s (G) | of peak | server CPU-s / 1k tok |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for name in [n for n in RUNNER_ORDER if n in results] + [n for n in results if n not in RUNNER_ORDER]:
        r = results[name]
        rows.append(
            f"| {name} | {_fmt(r['output_tok_s'], digits=1)} | {_fmt(r['requests_s'])} "
            f"| {_fmt(r['ttft_p50_s'])} / {_fmt(r['ttft_p90_s'])} / {_fmt(r['ttft_p99_s'])} "
            f"| {_fmt(r['tpot_p50_s'], 1000, 0)} | {_fmt(r['itl_p50_s'], 1000, 0)} / {_fmt(r['itl_p99_s'], 1000, 0)} "
            f"| {_fmt(r['e2e_p50_s'])} / {_fmt(r['e2e_p90_s'])} / {_fmt(r['e2e_p99_s'])} "
            f"| {_fmt(r['goodput_req_s'])} | {_fmt(r['peak_rss_bytes'], 1 / 2**30)} "
            f"| {_fmt(r.get('peak_kv_bytes'), 1 / 2**20, 1)} / {_fmt(r.get('peak_prefix_bytes'), 1 / 2**20, 1)} "
            f"| {_fmt(r.get('model_flop_s'), 1e-9, 1)} | {_fmt(r.get('fraction_of_peak'), 100, 1)}% "
            f"| {_fmt(r.get('server_cpu_s_per_1k_tokens'), digits=1)} |"
        )
    return "\n".join(rows)


def ratio_lines(ratio: dict[str, float | None], checks: dict[str, dict[str, Any]] | None = None) -> str:
    """The targets (`checks`, default: the engine targets) with verdicts, then the other measured ratios
    beside vLLM and HTTP's overhead."""
    lines = []
    checks = targets(ratio) if checks is None else checks
    for key, check in checks.items():
        verdict = {True: "met", False: "**missed**", None: "not measured"}[check["met"]]
        lines.append(f"- `{key}` = {_fmt(check['measured'])}× (target ≥ {check['target']}×): {verdict}")
    for name in VS_VLLM_BARE:
        key = f"{name}_vs_vllm_bare"
        if key not in checks and ratio.get(key) is not None:
            lines.append(f"- `{key}` = {_fmt(ratio[key])}× (output tokens/s over stock vLLM's, bare model)")
    if ratio.get("http_vs_engine") is not None:
        lines.append(f"- `http_vs_engine` = {_fmt(ratio['http_vs_engine'])}× (HTTP + SSE overhead)")
    return "\n".join(lines)


def markdown_report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    parts = [
        f"# prefixserve benchmark — profile `{doc['profile']}`",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}, "
        f"load average at start {m.get('load_average_at_start')}  ",
        f"Matmul peak: {_fmt(doc['flops']['matmul_peak_flop_s'], 1e-9, 1)} GFLOP/s "
        f"({doc['flops']['matmul_dtype']}, {doc['flops']['matmul_size']}²)  ",
        f"SLO for goodput: TTFT ≤ {doc['slo']['ttft_s']} s and TPOT ≤ {doc['slo']['tpot_s']} s",
        *_section_lines({**doc, "notes": []}),  # the main section (its notes go under "Notes")
    ]
    if doc.get("scaling"):
        parts += [
            "",
            "### Engine throughput vs concurrency",
            "",
            "| concurrency | requests | out tok/s | TTFT p50 (s) | TPOT p50 (ms) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in doc["scaling"]:
            parts.append(
                f"| {p['concurrency']} | {p['num_requests']} | {_fmt(p['output_tok_s'], digits=1)} "
                f"| {_fmt(p['ttft_p50_s'])} | {_fmt(p['tpot_p50_s'], 1000, 0)} |"
            )
    for section in doc.get("sections", []):
        parts += _section_lines(section)
    bart = doc.get("bart")
    if bart:
        parts += _section_lines(bart)
    if doc.get("notes"):
        parts += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    parts += ["", "Plots: `throughput_vs_concurrency.png`, `latency_cdf.png`."]
    return "\n".join(parts) + "\n"


def _section_lines(part: dict[str, Any]) -> list[str]:
    """One comparison (the main one, a `sections` entry, or `bart`): heading, workload, table, ratios, notes."""
    w = part["workload"]
    name = f"`{part['name']}`: " if part.get("name") else ""
    return [
        "",
        f"## {name}{part['model']} — {w['num_requests']} requests over {w['num_tasks']} tasks",
        "",
        _workload_line(w),
        "",
        results_table(part["results"]),
        "",
        ratio_lines(part["ratios"], part.get("targets")),
        *(f"- {note}" for note in part.get("notes", [])),
    ]


def _workload_line(w: dict[str, Any]) -> str:
    load = (
        f"Poisson arrivals at {w['request_rate']} req/s"
        if w["request_rate"] > 0
        else f"closed loop, concurrency {w['concurrency'] or w['num_requests']}"
    )
    return (
        f"Prompts {w['prompt_len'][0]}-{w['prompt_len'][1]} tokens, outputs {w['output_len'][0]}-{w['output_len'][1]} "
        f"tokens (exactly, EOS ignored), {w['task_popularity']} task popularity, prefix lengths "
        f"{list(w['prefix_lengths'])}, {load}; {w['total_prompt_tokens']} prompt and {w['total_output_tokens']} "
        f"output tokens in all."
    )


def plot_scaling(path: Path, scaling: list[dict[str, Any]], references: dict[str, float], title: str) -> None:
    """Engine output tokens/s vs concurrency (log2 x), with horizontal lines for reference runners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if scaling:
        xs = [p["concurrency"] for p in scaling]
        ax.plot(xs, [p["output_tok_s"] for p in scaling], marker="o", label="engine (continuous batching)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    for i, (name, value) in enumerate(references.items()):
        ax.axhline(value, linestyle="--", linewidth=1.2, color=f"C{i + 1}", label=name)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when there was no sweep and no reference
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_cdf(path: Path, runs: dict[str, RunResult], title: str) -> None:
    """Empirical CDFs of TTFT and e2e latency, one line per runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        ok = [r for r in run.records if r.ok]
        for ax, values in ((ax1, sorted(r.ttft for r in ok)), (ax2, sorted(r.e2e for r in ok))):
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=name)
    for ax, label in ((ax1, "time to first token (s)"), (ax2, "end-to-end latency (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
