#!/usr/bin/env bash
# Sets up and builds mq, then runs it end to end on this machine: a local coordinator and two
# CPU workers, a small generated DeepseekV3 FP8 checkpoint, an inspection through the service,
# and a GPTQ job on a gang of two workers whose output is checked (manifest hashes) and loaded
# by transformers. Everything lives under ./demo-out (removed first).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh

BIN="${MQ_BUILD_DIR:-build}"
DEMO="$PWD/demo-out"
rm -rf "$DEMO"
mkdir -p "$DEMO"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== generating a small DeepseekV3 FP8 checkpoint and pre-tokenized calibration data"
"$BIN/tests/tools/mq-gen-model" --output "$DEMO/model" --format fp8 --layers 4 --dense-layers 1 \
  --experts 16 --experts-per-tok 4 --groups 4 --topk-groups 2 --hidden 256 --intermediate 256 \
  --moe-intermediate 128 --vocab 512 --mtp 1 --seed 1
python3 - "$DEMO/calibration.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"input_ids": [rng.randrange(512) for _ in range(64)]}) + "\n")
PY

echo "== starting mq-coordinator and two CPU mq-workers"
echo "   INSECURE, for this demo on one machine only: plaintext gRPC on 127.0.0.1 and no"
echo "   authentication (--insecure); README 'Secure deployment' runs it with TLS and tokens"
"$BIN/server/mq-coordinator" --listen 127.0.0.1:0 --data-dir "$DEMO/state" --insecure \
  --ready-file "$DEMO/coordinator.addr" 2>"$DEMO/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$DEMO/coordinator.addr" ] && break; sleep 0.1; done
export MQ_COORDINATOR MQ_INSECURE=1
MQ_COORDINATOR="$(cat "$DEMO/coordinator.addr")"
for w in 1 2; do
  "$BIN/worker/mq-worker" --device cpu --name "demo-worker-$w" --scratch-dir "$DEMO/scratch-$w" \
    --insecure 2>"$DEMO/worker-$w.log" &
  pids+=($!)
done
CLIENT="$BIN/client/mq-client"
for _ in $(seq 100); do [ "$("$CLIENT" workers | grep -c IDLE)" -ge 2 ] && break; sleep 0.1; done
"$CLIENT" workers

echo "== mq-client inspect (gang of 2 workers, MTP included)"
"$CLIENT" inspect "$DEMO/model" --gang-size 2 --include-mtp --layers

echo "== mq-client submit --wait: GPTQ W4A16 on a gang of 2 workers"
"$CLIENT" submit --model "$DEMO/model" --output "$DEMO/quantized" --method gptq \
  --dataset "$DEMO/calibration.jsonl" --num-calibration-samples 64 --max-sequence-length 64 \
  --gang-size 2 --wait
job="$("$CLIENT" list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["job_id"])')"
"$CLIENT" status "$job"

echo "== checking the output: manifest hashes, and transformers loads and runs it"
PYTHONPATH=tests/integration python3 - "$DEMO/quantized" <<'PY'
import sys
from quantize_env import check_output_dir, run_in_transformers
out = sys.argv[1]
m = check_output_dir(out)
print(f"manifest: {len(m['files'])} files, every SHA-256 matches, no stray files")
print("\n".join(run_in_transformers(out)))
PY
echo "== demo finished: quantized end to end through the service (logs in $DEMO)"
