#!/usr/bin/env bash
# Sets up, builds and runs every test that needs no GPU (ctest label `gpu` is excluded; GPU
# tests also skip themselves on machines without one). Extra arguments go to ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
export MQ_REQUIRE_INTEROP=1
export MQ_REQUIRE_IMAGE=1
ctest --test-dir "${MQ_BUILD_DIR:-build}" --output-on-failure -LE gpu -j "$(nproc)" "$@"
