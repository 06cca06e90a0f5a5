#!/usr/bin/env bash
# GPU run for the batched GPTQ work (device tool; carry [".device"]): builds only the GPTQ
# targets with CUDA, runs their tests (gpu label), compute-sanitizer memcheck on the kernel test
# and mq-bench-gptq-batched. Logs under $OUT.   command: bash bench/run_gptq_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mq-gpu-out}"
mkdir -p "$OUT"
source .device/env.sh
# PCRE2 (worker/data) and Gloo's headers (worker/pipeline) travel in .device/ (prepare.sh with
# MQ_DEVICE_EXTRA_DEBS="grpc-proto libgloo-dev libpcre2-dev libpcre2-8-0"); env.sh points
# pkg-config and CMake at them.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQ_ENABLE_CUDA=ON \
  $MQ_DEVICE_CMAKE_ARGS > "$OUT/configure.log" 2>&1 || { tail -50 "$OUT/configure.log"; exit 1; }
KERNEL_TESTS="gptq_kernel_test gptq_gpu_test hessian_factor_test hessian_factor_gpu_test fp8_dequant_gpu_test
  grid_search_test grid_search_gpu_test pack_test pack_gpu_test"
cmake --build build-gpu -j 16 --target ${MQ_GPU_TARGETS:-$KERNEL_TESTS quant_test gptq_batched_test grid_kernel_test mq-bench-gptq-batched} \
  > "$OUT/build.log" 2>&1 || { grep -E "error" -A5 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
TESTS=""
for t in $KERNEL_TESTS; do TESTS="$TESTS build-gpu/tests/unit/kernels/$t"; done
TESTS="$TESTS $(ls build-gpu/tests/unit/worker/quant/*_test 2>/dev/null | tr '\n' ' ')"
for t in $TESTS; do
  [ -x "$t" ] || continue
  "$t" > "$OUT/$(basename $t).log" 2>&1; rc=$?
  echo "$(basename $t): rc=$rc"; grep -E "differ|GB/s|ms |PASSED|FAILED|Failure|Expected|Which is|actual" "$OUT/$(basename $t).log" | head -20
done
# compute-sanitizer memcheck on every kernel GPU test, one log each.
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for t in build-gpu/tests/unit/kernels/*_gpu_test; do
  [ -x "$CS" ] && [ -x "$t" ] || continue
  "$CS" --tool memcheck --error-exitcode 9 "$t" > "$OUT/sanitizer-$(basename $t).log" 2>&1
  echo "compute-sanitizer memcheck $(basename $t): rc=$? $(grep -E "ERROR SUMMARY" "$OUT/sanitizer-$(basename $t).log")"
done
if [ -x build-gpu/bench/mq-bench-gptq-batched ]; then
  timeout ${MQ_BENCH_TIMEOUT:-300} build-gpu/bench/mq-bench-gptq-batched --device cuda:0 --tokens 65536 \
    --experts ${MQ_BENCH_EXPERTS:-32} --iters 3 2>&1 | tee "$OUT/bench-gptq-batched.txt"
fi
