#!/usr/bin/env bash
# The device check for a session that is lent the GPU machine (docs/benchmarks.md, "On the GPU
# machine"). At most 7 minutes in all (TOTAL_S), in steps that each have their own timeout (a hang in
# one does not eat the rest; a step's timeout is cut to the time left), each writing one JSON file
# into $OUT as soon as it ends (6 files, no folders):
#   00-env.json             GPU, driver, package versions; writes the model directory (gpt2-medium)
#   01-decode-anatomy.json  native engine decode steps: CUDA-event times per step kind, graph replays
#   02-gpu-tests.json       pytest -m gpu tests/gpu: outcome per test
#   03-bench-c64.json       our server (vLLM backend, and native engine) vs vllm_bare, concurrency 64
#   04-bench-c256.json      the same at concurrency 256
#   05-summary.json         every step's exit status and seconds
# Each step file holds {step, rc, timed_out, seconds, log_tail, result}: `result` is the step's own
# JSON (null when it wrote none: see log_tail), `rc` 124/137 a timeout, -1 a step skipped (no time).
#   device run: carry [".whl"], command "bash loadtest/gpu_check.sh", timeout_s 480
# GPU_CHECK_RUNNERS overrides the bench runners (default vllm_bare,server_vllm,server_native: stock vLLM,
# our server on vLLM as a default start runs it, and on our engine); GPU_CHECK_PRESET the anatomy's model (default
# gpt2-medium, the gpu-vllm profile's; tests use tiny-gpt2).
set -uo pipefail
OUT=${OUT:-/tmp/prefixserve-gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/prefixserve-gpu-check.XXXXXX)  # logs, models, bench folders: not returned
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-420}
PRESET=${GPU_CHECK_PRESET:-gpt2-medium}
KILL_AFTER_S=5
STARTED=$(date +%s)
STEPS=()

if compgen -G ".whl/*.whl" >/dev/null; then
  # Pure-Python packages the machine's image lacks or has in other versions (transformers 5.24, ...).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi

# Writes a step's JSON: step_json NAME RC SECONDS LOG RESULT_JSON
cat >"$WORK/step_json.py" <<'EOF'
import json, sys
from pathlib import Path
name, rc, seconds, log, result, out = sys.argv[1:]
text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
try:
    parsed = json.loads(Path(result).read_text()) if Path(result).is_file() else None
except ValueError as exc:
    parsed = {"unreadable": str(exc)}
doc = {"step": name, "rc": int(rc), "timed_out": int(rc) in (124, 137), "seconds": int(seconds),
       "log_tail": "\n".join(text.splitlines()[-60:]), "result": parsed}
Path(out).write_text(json.dumps(doc, indent=1) + "\n")
EOF

# step NAME TIMEOUT_S RESULT_JSON -- COMMAND...: run COMMAND under `timeout` (cut to the time left),
# then write $OUT/NAME.json from its exit status, its output's tail and RESULT_JSON if it wrote one.
step() {
  local name=$1 limit=$2 result=$3
  shift 4
  local log="$WORK/$name.log" t0 rc left
  t0=$(date +%s)
  left=$((TOTAL_S - (t0 - STARTED) - KILL_AFTER_S - 5))  # 5 s for the summary
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "skipped: $((t0 - STARTED)) s of $TOTAL_S s used" >"$log"
    rc=-1
  else
    timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" >"$log" 2>&1
    rc=$?
  fi
  local seconds=$(($(date +%s) - t0))
  STEPS+=("$name:$rc:$seconds")
  "$PY" "$WORK/step_json.py" "$name" "$rc" "$seconds" "$log" "$result" "$OUT/$name.json"
  echo "[gpu_check] $name: exit $rc after $seconds s (limit $limit s)" >&2
}

MODELS="$WORK/models"  # random-weight model directories, written once, shared by the steps below

# 00: what runs where, and the model directory the later steps share
cat >"$WORK/env.py" <<'EOF'
import importlib, json, subprocess, sys
from pathlib import Path
doc = {"python": sys.version.split()[0]}
for name in ("torch", "transformers", "peft", "vllm", "fastapi", "uvicorn"):
    try:
        doc[name] = importlib.import_module(name).__version__
    except Exception as exc:  # not installed, or broken: the bench steps say so again
        doc[name] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
import torch
doc["cuda"] = torch.version.cuda
doc["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
try:
    doc["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    doc["nvidia_smi"] = f"unavailable: {exc}"
Path(sys.argv[1]).write_text(json.dumps(doc, indent=1))
from loadtest.bench_models import ensure_model
doc["model_dir"] = str(ensure_model(sys.argv[3], Path(sys.argv[2])))
Path(sys.argv[1]).write_text(json.dumps(doc, indent=1))
EOF
step 00-env 60 "$WORK/env.json" -- "$PY" "$WORK/env.py" "$WORK/env.json" "$MODELS" "$PRESET"

# 01: decode-step anatomy of the native engine
step 01-decode-anatomy 60 "$WORK/anatomy.json" -- "$PY" -m loadtest.decode_anatomy \
  --preset "$PRESET" --dtype bfloat16 --batch 64 --tasks 16 --new-tokens 64 \
  --models-dir "$MODELS" --out "$WORK/anatomy.json"

# 02: the GPU tests (torch.compile and CUDA graph capture inside), then one entry per test
cat >"$WORK/junit_json.py" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
cases = []
if Path(sys.argv[1]).is_file():
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        cases.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message[:500]})
Path(sys.argv[2]).write_text(json.dumps({"tests": cases}, indent=1))
EOF
run_gpu_tests() {
  "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml="$WORK/junit.xml"
  local rc=$?
  "$PY" "$WORK/junit_json.py" "$WORK/junit.xml" "$WORK/tests.json"
  return $rc
}
export -f run_gpu_tests
export PY WORK
step 02-gpu-tests 105 "$WORK/tests.json" -- bash -c run_gpu_tests

# 03, 04: our server on each backend vs stock vLLM on the bare model, the same HTTP client path
# (profile gpu-vllm: gpt2-medium shape, bf16, 16 tasks with prefixes of 5-20, 64-128 new tokens)
runners=${GPU_CHECK_RUNNERS:-vllm_bare,server_vllm,server_native}
if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings, redis, multipart" 2>/dev/null; then
  runners=${runners//server_native/engine}  # no server packages here: the in-process engine instead
  runners=${runners//,server_vllm/}
fi
for c in 64 256; do
  name=$([ "$c" -eq 64 ] && echo 03-bench-c64 || echo 04-bench-c256)
  step "$name" 100 "$WORK/bench-c$c/results.json" -- "$PY" -m prefixserve bench \
    --profile gpu-vllm --runners "$runners" --concurrency "$c" --num-requests 256 --no-scaling \
    --models-dir "$MODELS" --out "$WORK/bench-c$c"
done

# 05: the summary
cat >"$WORK/summary.py" <<'EOF'
import json, sys
from pathlib import Path
out, total, *steps = sys.argv[1:]
rows = [dict(zip(("step", "rc", "seconds"), s.rsplit(":", 2))) for s in steps]
doc = {"total_seconds": int(total),
       "steps": [{"step": r["step"], "rc": int(r["rc"]), "seconds": int(r["seconds"])} for r in rows]}
Path(out).write_text(json.dumps(doc, indent=1) + "\n")
EOF
"$PY" "$WORK/summary.py" "$OUT/05-summary.json" "$(($(date +%s) - STARTED))" "${STEPS[@]}"
ls -l "$OUT"
