#!/usr/bin/env bash
# Runs inside the mq image (tests/image/check_image.sh copies it to /home/mq/job with the model
# and the calibration set): a coordinator and a CPU worker on loopback, a quantization job
# submitted with mq-client --wait, its output checked with mq-client verify. Prints the logs if
# anything fails.
set -euo pipefail

JOB=/home/mq/job
cd "$JOB"
pids=()
finish() {
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if ((rc != 0)); then
    for log in coordinator.log worker.log; do
      echo "---- $log (last 40 lines)"
      tail -n 40 "$JOB/$log" 2>/dev/null || true
    done
  fi
  exit $rc
}
trap finish EXIT

mq-coordinator --listen 127.0.0.1:0 --data-dir /var/lib/mq --ready-file "$JOB/ready" \
  --insecure --lease-ms 5000 --heartbeat-interval-ms 500 >coordinator.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do [[ -s ready ]] && break; sleep 0.1; done
[[ -s ready ]] || { echo "the coordinator did not become ready in 30 s"; exit 1; }
addr="$(cat ready)"
echo "  coordinator ready at $addr"

mq-worker --coordinator "$addr" --insecure --name image-w1 --scratch-dir /scratch/w1 \
  --poll-wait-ms 1000 >worker.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  mq-client --coordinator "$addr" --insecure workers 2>/dev/null | grep -q image-w1 && break
  sleep 0.1
done

start=$SECONDS
mq-client --coordinator "$addr" --insecure submit --model "$JOB/model" --output /scratch/out \
  --dataset "$JOB/calibration.jsonl" --num-calibration-samples 24 --max-sequence-length 32 \
  --scale-search minmax --seed 5 --wait >submit.out
job="$(awk '{ print $1; exit }' submit.out)"
state="$(mq-client --coordinator "$addr" --insecure status "$job" --json |
  sed -n 's/.*"state": *"\(JOB_STATE_[A-Z]*\)".*/\1/p' | head -n1)"
[[ "$state" == "JOB_STATE_SUCCEEDED" ]] || { echo "job $job is $state"; exit 1; }
echo "  ok: job $job SUCCEEDED in $((SECONDS - start)) s"
echo -n "  ok: "
mq-client verify /scratch/out
