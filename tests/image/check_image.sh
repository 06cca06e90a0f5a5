#!/usr/bin/env bash
# The container image, built and run: scripts/build-image.sh builds it from the build tree under
# a test tag, then, inside it with `buildah run`:
#   - mq-coordinator, mq-worker and mq-client --help work,
#   - ldd resolves every library of the three binaries and of every shipped torch/CUDA library
#     (libcuda.so.1 alone may be missing: the NVIDIA container runtime mounts the host's),
#   - it runs as uid 10001 and holds no compiler; without the host's CUDA driver (the NVIDIA
#     container runtime mounts it) mq-worker --device cuda:0 says that it is missing,
#   - a CPU quantization job end to end: coordinator, worker and mq-client in the container on
#     loopback (--insecure), a generated 3-layer model (mq-gen-model, run outside the image) and
#     a generated input_ids calibration set; the job must SUCCEED and its output must match its
#     manifest (mq-client verify inside, and every file's size and sha256 checked from outside).
# Then removes its container and image (the cached debootstrap base stays).
#
# Run: bash tests/image/check_image.sh   (ctest -L image runs it too). Needs root, buildah,
# debootstrap and patchelf (scripts/setup.sh installs them); without them it is skipped (exit 77)
# unless MQ_REQUIRE_IMAGE=1 (scripts/test.sh sets it), then it fails.
# Environment: MQ_BUILD_DIR (default ./build), MQ_IMAGE_TEST_TAG (default localhost/mq:ctest),
# MQ_IMAGE_KEEP=1 keeps the image and the work directory.
set -euo pipefail

SRC="${MQ_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
BUILD_DIR="${MQ_BUILD_DIR:-$SRC/build}"
TAG="${MQ_IMAGE_TEST_TAG:-localhost/mq:ctest}"
export MQ_STORAGE_DRIVER="${MQ_STORAGE_DRIVER:-vfs}"
BUILDAH=(buildah --storage-driver "$MQ_STORAGE_DRIVER")

skip_or_fail() {
  if [[ "${MQ_REQUIRE_IMAGE:-}" != "" && "${MQ_REQUIRE_IMAGE}" != "0" ]]; then
    echo "ERROR: $* (MQ_REQUIRE_IMAGE is set)" >&2
    exit 1
  fi
  echo "SKIP: $* (set MQ_REQUIRE_IMAGE=1 to make this a failure)"
  exit 77
}
[[ "$(id -u)" -eq 0 ]] || skip_or_fail "building the image needs root"
for tool in buildah debootstrap patchelf; do
  command -v "$tool" >/dev/null || skip_or_fail "$tool is missing (scripts/setup.sh installs it)"
done
GEN_MODEL="$BUILD_DIR/tests/tools/mq-gen-model"
[[ -x "$GEN_MODEL" ]] || { echo "ERROR: $GEN_MODEL is missing (build the tree first)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/mq-image-test.XXXXXX")"
CTR=""
MNT=""
cleanup() {
  local rc=$?
  [[ -n "$MNT" ]] && "${BUILDAH[@]}" umount "$CTR" >/dev/null 2>&1 || true
  [[ -n "$CTR" ]] && "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
  if [[ "${MQ_IMAGE_KEEP:-0}" == "1" ]]; then
    echo "kept: image $TAG, work directory $WORK"
  else
    "${BUILDAH[@]}" rmi "$TAG" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT

t0=$SECONDS
lap() { echo "-- $1: $((SECONDS - t0)) s"; t0=$SECONDS; }

# ---------------------------------------------------------------- build
echo "== build"
"$SRC/scripts/build-image.sh" --build-dir "$BUILD_DIR" --tag "$TAG"
lap "base + image build"

CTR="$("${BUILDAH[@]}" from --pull-never --name "mq-image-test-$$" "$TAG")"
run() { "${BUILDAH[@]}" run --isolation chroot "$CTR" -- "$@"; }

# ---------------------------------------------------------------- binaries
echo "== --help"
for b in mq-coordinator mq-worker mq-client; do
  out="$(run "$b" --help 2>&1)" || { echo "$b --help failed: $out" >&2; exit 1; }
  grep -q "^usage: $b" <<<"$out" || { echo "$b --help printed no usage: $out" >&2; exit 1; }
  echo "  ok: $b --help"
done

echo "== shared libraries (ldd)"
run bash -c '
  set -euo pipefail
  bad=0
  checked=0
  for f in /usr/local/bin/mq-coordinator /usr/local/bin/mq-worker /usr/local/bin/mq-client \
           $(find /opt/torch -type f -name "*.so*"); do
    checked=$((checked + 1))
    out="$(ldd "$f" 2>&1)" || { echo "  ldd $f failed: $out"; bad=1; continue; }
    missing="$(grep "not found" <<<"$out" | grep -v "^\s*libcuda\.so\.1 =>" || true)"
    if [[ -n "$missing" ]]; then echo "  $f:"; echo "$missing"; bad=1; fi
  done
  # ldd writes line by line: grep -q on a pipe may exit first and fail ldd with SIGPIPE under
  # pipefail, so every check reads a captured output.
  cuda_users="$(for f in $(find /opt/torch -type f -name "*.so*"); do
    deps="$(ldd "$f" 2>&1 || true)"
    if grep -q "libcuda\.so\.1 => not found" <<<"$deps"; then basename "$f"; fi; done |
    tr "\n" " ")"
  echo "  $checked files; every library resolves; libcuda.so.1 (the host driver) is needed directly by: ${cuda_users:-none}"
  for b in mq-coordinator mq-worker mq-client; do
    deps="$(ldd "/usr/local/bin/$b" 2>&1)"
    if grep -q "=> /opt/torch/" <<<"$deps"; then
      grep -q "libtorch_cuda.so => /opt/torch/torch/lib/" <<<"$deps" || {
        echo "  $b: libtorch_cuda does not come from /opt/torch/torch/lib:"
        grep "torch" <<<"$deps" || true
        bad=1
      }
    fi
  done
  exit $bad'

echo "== user and contents"
uid="$(run id -u)"
[[ "$uid" == "10001" ]] || { echo "the image runs as uid $uid, not 10001" >&2; exit 1; }
compilers="$(run bash -c 'for c in cc gcc g++ c++ clang ld; do command -v $c || true; done')"
[[ -z "$compilers" ]] || { echo "the image holds compilers/linkers: $compilers" >&2; exit 1; }
echo "  ok: uid 10001, no compiler"
# The image carries no CUDA driver: without the NVIDIA runtime's mount, --device cuda:0 says so.
out="$(run mq-worker --coordinator 127.0.0.1:1 --insecure --device cuda:0 2>&1 || true)"
grep -q "no CUDA driver on this machine (libcuda.so.1" <<<"$out" \
  || { echo "mq-worker --device cuda:0 without a driver printed: $out" >&2; exit 1; }
echo "  ok: $(grep -m1 "no CUDA driver" <<<"$out")"
lap "checks"

# ---------------------------------------------------------------- a job
echo "== a CPU job in the image"
mkdir -p "$WORK/job"
"$GEN_MODEL" --output "$WORK/job/model" --layers 3 --dense-layers 1 --experts 8 \
  --experts-per-tok 2 --groups 2 --topk-groups 1 --hidden 128 --intermediate 192 \
  --moe-intermediate 128 --heads 2 --vocab 384 --seed 7 >/dev/null
python3 - "$WORK/job/calibration.jsonl" <<'PY'
import json, random, sys
rng = random.Random(3)
with open(sys.argv[1], "w") as f:
    for _ in range(24):
        f.write(json.dumps({"input_ids": [rng.randrange(384) for _ in range(32)]}) + "\n")
PY
cp "$SRC/tests/image/job_in_image.sh" "$WORK/job/"
"${BUILDAH[@]}" copy --chown 10001:10001 "$CTR" "$WORK/job" /home/mq/job >/dev/null
if ! run bash /home/mq/job/job_in_image.sh; then
  echo "the job in the image failed" >&2
  exit 1
fi

# The output, read from outside the container, against its manifest.
MNT="$("${BUILDAH[@]}" mount "$CTR")"
python3 - "$MNT/scratch/out" <<'PY'
import hashlib, json, os, sys
out = sys.argv[1]
m = json.load(open(os.path.join(out, "manifest.json")))
assert m["files"], "the manifest lists no files"
for f in m["files"]:
    path = os.path.join(out, f["name"])
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    assert os.path.getsize(path) == f["size"], (f["name"], os.path.getsize(path), f["size"])
    assert h.hexdigest() == f["sha256"], (f["name"], h.hexdigest(), f["sha256"])
print(f"  ok: {len(m['files'])} files match manifest.json (size and sha256, checked outside)")
PY
lap "job"

echo "== image composition (du of the image's root filesystem)"
size_of() { du -sb "$@" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
total=$(size_of "$MNT")
torch=$(size_of "$MNT/opt/torch")
parts=("/opt/torch/torch/lib" "$MNT"/opt/torch/nvidia/*/lib)
for p in "${parts[@]}" /usr/local/bin; do
  p="${p#"$MNT"}"
  printf '  %-32s %8s\n' "$p" "$(numfmt --to=iec --suffix=B "$(size_of "$MNT$p")")"
done
bin=$(size_of "$MNT/usr/local/bin")
printf '  %-32s %8s\n' "the rest (Debian 12 + packages)" "$(numfmt --to=iec --suffix=B $((total - torch - bin)))"
printf '  %-32s %8s\n' "total" "$(numfmt --to=iec --suffix=B "$total")"
echo "image_checks: PASS"
