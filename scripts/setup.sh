#!/usr/bin/env bash
# Installs everything mq needs to build, run and test on Debian 12: compilers and Debian
# packages (gRPC, Protobuf, Abseil, RocksDB, prometheus-cpp, GoogleTest, ...) and the Python
# packages the tests use (torch for LibTorch, safetensors, ...). Idempotent: installs only what
# is missing, so re-running it is cheap.
set -euo pipefail

APT_PACKAGES=(
  cmake ninja-build g++ ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev librocksdb-dev prometheus-cpp-dev libcivetweb-dev civetweb nlohmann-json3-dev
  libgtest-dev libgmock-dev googletest clang libclang-rt-14-dev libpcre2-dev libgloo-dev libssl-dev
  prometheus yamllint python3-yaml python3-jsonschema curl
  golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev
)
PIP_PACKAGES=(
  "torch==2.11.0"
  "safetensors>=0.4"
  "numpy>=1.26"
  "pytest>=7"
  "jsonschema>=4"
  "kubernetes-validate>=1.27"
  "transformers==5.24.0"
  "compressed-tensors==0.20.0"
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  # The prometheus package is only needed for promtool; do not let it start a daemon.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
else
  echo "setup: Debian packages present"
fi

PYTHON="${PYTHON:-python3}"
pip_missing=()
for spec in "${PIP_PACKAGES[@]}"; do
  if ! "$PYTHON" - "$spec" <<'PY' 2>/dev/null; then
import re, sys
from importlib.metadata import version, PackageNotFoundError
name, op, want = re.match(r"([A-Za-z0-9_.-]+)(==|>=)?(.*)", sys.argv[1]).groups()
try:
    have = version(name).split("+")[0]
except PackageNotFoundError:
    sys.exit(1)
if op == "==":
    sys.exit(0 if have == want else 1)
num = lambda v: [int(x) for x in re.findall(r"\d+", v)[:3]]
sys.exit(0 if not op or num(have) >= num(want) else 1)
PY
    pip_missing+=("$spec")
  fi
done
if [ "${#pip_missing[@]}" -gt 0 ]; then
  echo "setup: installing Python packages: ${pip_missing[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check "${pip_missing[@]}"
else
  echo "setup: Python packages present"
fi
