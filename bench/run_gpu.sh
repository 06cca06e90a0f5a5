#!/usr/bin/env bash
# Runs on the GPU machine (device tool): builds mq with CUDA kernels and LibTorch CUDA, runs the
# `gpu` tests and the benchmarks, and leaves logs under $OUT. See ../shared/device/README.md.
#   carry: [".device"]   command: bash bench/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mq-gpu-out}"
mkdir -p "$OUT"
source .device/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQ_ENABLE_CUDA=ON \
  $MQ_DEVICE_CMAKE_ARGS > "$OUT/configure.log" 2>&1 || { tail -50 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j 16 --target ${MQ_GPU_TARGETS:-mq-bench-layer-forward deepseek_v3_gpu_test fp8_dequant_gpu_test} > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A5 "$OUT/build.log" | head -80; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
ctest --test-dir build-gpu -L gpu --output-on-failure > "$OUT/ctest-gpu.log" 2>&1
echo "ctest -L gpu: rc=$?"; grep -E "tests passed|Passed|Failed|Skipped|\*\*\*" "$OUT/ctest-gpu.log" | tail -20
if command -v compute-sanitizer >/dev/null || [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for t in build-gpu/tests/unit/kernels/*gpu_test; do
    [ -x "$t" ] && "$CS" --tool memcheck --error-exitcode 9 "$t" > "$OUT/sanitizer-$(basename $t).log" 2>&1
    echo "compute-sanitizer $(basename $t): rc=$?"
  done
fi
if [ -x build-gpu/bench/mq-bench-layer-forward ]; then
  build-gpu/bench/mq-bench-layer-forward --device cuda:0 --shapes "${MQ_BENCH_SHAPES:-8x1024,2x4096}" \
    --iters 5 2>&1 | tee "$OUT/bench-layer-forward.txt"
fi
if [ -x build-gpu/tests/unit/worker/quant/quant_test ]; then
  build-gpu/tests/unit/worker/quant/quant_test > "$OUT/quant_test.log" 2>&1
  echo "quant_test (CUDA cases included): rc=$?"; grep -E "PASSED|FAILED|SKIPPED" "$OUT/quant_test.log" | tail -5
fi
if [ -x build-gpu/bench/mq-bench-gptq ]; then
  build-gpu/bench/mq-bench-gptq --device cuda:0 --tokens 65536 --iters 3 2>&1 | tee "$OUT/bench-gptq.txt"
fi
