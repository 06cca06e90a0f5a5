#!/usr/bin/env bash
# Quality of GPU-only solve options on the trained model: the shipped DeepseekV3 of
# tests/data/ds3-trained (trained on text by scripts/train_test_model.py) quantized through the
# service on one CUDA worker, once per entry of MQ_QUALITY_RUNS, each job evaluated by the
# service against the original on held-out calibration sequences (KL, top-1 agreement,
# perplexity), and every output's int4 codes compared with the first one's.
# On the GPU machine (device tool; carry [".device"]):   command: bash bench/run_quality_gpu.sh
# Reuses build-gpu when bench/run_layer_quant_gpu.sh built it in the same call.
#
# Knobs (environment):
#   MQ_QUALITY_RUNS  "NAME:METHOD[:FLAG,FLAG...] ..." (default "gptq:gptq gptq-fp32:gptq:--tf32-update=false
#                    rtn:rtn"); flags go to mq-client submit
#   MQ_QUALITY_SAMPLES  calibration sequences of 256 tokens (default 128 of the 150; the
#                    evaluation takes 16 of the rest)
# Results: $OUT/quality.txt (also printed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mq-gpu-out}"
mkdir -p "$OUT"
source .device/env.sh
W=/tmp/mq-quality
rm -rf "$W"; mkdir -p "$W/logs"
B=build-gpu
RUNS="${MQ_QUALITY_RUNS:-gptq:gptq gptq-fp32:gptq:--tf32-update=false rtn:rtn}"
DATA=tests/data/ds3-trained

cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQ_ENABLE_CUDA=ON $MQ_DEVICE_CMAKE_ARGS \
  > "$W/logs/configure.log" 2>&1 || { tail -40 "$W/logs/configure.log"; exit 1; }
cmake --build $B -j 16 --target mq-coordinator mq-worker mq-client > "$W/logs/build.log" 2>&1 \
  || { grep -E "error" -A5 "$W/logs/build.log" | head -40; exit 1; }

COORD=$B/server/mq-coordinator; WORKER=$B/worker/mq-worker; CLIENT=$B/client/mq-client
export MQ_INSECURE=1
"$COORD" --listen 127.0.0.1:0 --data-dir "$W/state" --ready-file "$W/ready" --insecure \
  > "$W/logs/coordinator.log" 2>&1 &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 100); do [ -s "$W/ready" ] && break; sleep 0.2; done
ADDR=$(cat "$W/ready" 2>/dev/null)
[ -n "$ADDR" ] || { echo "coordinator did not start"; tail "$W/logs/coordinator.log"; exit 1; }
"$WORKER" --coordinator "$ADDR" --device cuda:0 --name gpu0 --scratch-dir "$W/scratch" \
  --poll-wait-ms 1000 --insecure > "$W/logs/worker.log" 2>&1 &
PIDS+=($!)

: > "$OUT/quality.txt"
FIRST=""
for run in $RUNS; do
  IFS=: read -r NAME METHOD FLAGS <<< "$run"
  O="$W/out-$NAME"
  "$CLIENT" --coordinator "$ADDR" submit --model "$DATA" --output "$O" \
    --dataset "$DATA/calibration.jsonl" --num-calibration-samples "${MQ_QUALITY_SAMPLES:-128}" \
    --max-sequence-length 256 --seed 1 --method "$METHOD" --max-attempts 1 ${FLAGS//,/ } --wait \
    > "$W/logs/submit-$NAME.log" 2>&1
  rc=$?
  JOB=$(head -1 "$W/logs/submit-$NAME.log" | awk '{print $1}')
  "$CLIENT" --coordinator "$ADDR" status "$JOB" --json > "$W/logs/job-$NAME.json" 2>&1
  python3 - "$W/logs/job-$NAME.json" "$NAME" "$rc" <<'EOF' | tee -a "$OUT/quality.txt"
import json, sys
path, name, rc = sys.argv[1:]
try:
    j = json.load(open(path)).get("job", {})
except ValueError:
    print(f"{name}: rc {rc}, no status: {open(path).read()[:300]}")
    sys.exit()
q = j.get("quality") or {}
f = lambda k: float(q.get(k, 0) or 0)
ratio = f("perplexity_candidate") / f("perplexity_reference") if f("perplexity_reference") else 0
print(f"{name}: rc {rc}, state {j.get('state')}, mean KL {f('kl_mean'):.5f}, KL p99 "
      f"{f('kl_p99'):.5f}, top-1 agreement {f('top1_agreement'):.4f}, perplexity "
      f"{f('perplexity_candidate'):.4f} (original {f('perplexity_reference'):.4f}, ratio "
      f"{ratio:.5f}), {q.get('source', q.get('not_measured', ''))}")
EOF
  if [ -z "$FIRST" ]; then
    FIRST=$NAME
  elif [ -d "$O" ] && [ -d "$W/out-$FIRST" ]; then
    echo "  codes against $FIRST: $(python3 bench/compare_outputs.py "$W/out-$FIRST" "$O" | tail -1)" \
      | tee -a "$OUT/quality.txt"
  fi
done
grep -h -E "ERROR|WARN|what\(\)" "$W/logs/worker.log" | cut -c1-300 | head -10
