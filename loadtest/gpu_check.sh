#!/usr/bin/env bash
# The device check for a session that is lent the GPU machine (see docs/benchmarks.md, "On the GPU
# machine"): runs the GPU tests and the GPU benchmark profile, writes at most 8 files under $OUT.
#   device run: carry [".whl"], command "bash loadtest/gpu_check.sh", timeout_s 580
set -uo pipefail
OUT=${OUT:-/tmp/prefixserve-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  # Pure-Python packages the machine's image lacks or has in other versions (transformers 5.24, ...).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
} > "$OUT/versions.txt" 2>&1
# the GPU tests include torch.compile (Triton builds kernels) and CUDA graph capture: give them 300 s
timeout 300 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/test-gpu.log" 2>&1
echo "test-gpu exit $?" >> "$OUT/test-gpu.log"
# The http runner needs the server's packages; run the in-process runners when they are missing.
runners=engine,no_prefix,naive_peft,static_batch,transformers_cb
python3 -c "import fastapi, uvicorn, pydantic_settings, redis, multipart" 2>/dev/null && runners=$runners,http
timeout 240 python3 -m prefixserve bench --profile gpu --runners "$runners" --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
rm -f "$OUT"/bench/*.log "$OUT"/bench/*cprofile*  # keep within the 8 files that come back
ls -R "$OUT"
