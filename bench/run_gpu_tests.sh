#!/usr/bin/env bash
# Builds the tests labelled `gpu` (Release, CUDA kernels) into build-gpu and runs them, on the GPU
# machine (device tool; carry [".device"]).   command: bash bench/run_gpu_tests.sh
# Only the gpu tests' targets are built, so the service's libraries are shared with
# bench/run_layer_quant_gpu.sh in the same call (give that MQ_EXTRA_CMAKE_ARGS=-DMQ_BUILD_TESTS=ON
# so the cache is not reconfigured). Logs: $OUT/gpu-tests.log (and the configure or build log when
# that step fails); exit status: ctest's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mq-gpu-out}"
mkdir -p "$OUT"
source .device/env.sh
B=build-gpu
T0=$(date +%s)
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQ_ENABLE_CUDA=ON -DMQ_BUILD_TESTS=ON \
  ${MQ_EXTRA_CMAKE_ARGS:-} $MQ_DEVICE_CMAKE_ARGS > "$OUT/gpu-tests-configure.log" 2>&1 \
  || { tail -40 "$OUT/gpu-tests-configure.log"; exit 1; }
mapfile -t TARGETS < <(ctest --test-dir $B -N -L gpu | sed -n 's/^ *Test *#[0-9]*: //p')
[ "${#TARGETS[@]}" -gt 0 ] || { echo "no gpu-labelled tests configured"; exit 1; }
cmake --build $B -j 16 --target "${TARGETS[@]}" > "$OUT/gpu-tests-build.log" 2>&1 \
  || { grep -E "error" -A5 "$OUT/gpu-tests-build.log" | head -60; exit 1; }
echo "[$(( $(date +%s) - T0 ))s] built ${#TARGETS[@]} gpu tests: ${TARGETS[*]}"
# The device tool brings back at most 8 files from $OUT: the configure and build logs only
# matter when those steps fail, so they go once both succeeded.
rm -f "$OUT/gpu-tests-configure.log" "$OUT/gpu-tests-build.log"
ctest --test-dir $B -L gpu --output-on-failure --timeout 300 > "$OUT/gpu-tests.log" 2>&1
rc=$?
grep -E "Test +#|tests passed|tests failed|Failed|FAILED" "$OUT/gpu-tests.log" | head -40
echo "[$(( $(date +%s) - T0 ))s] ctest rc=$rc"
exit $rc
