#!/usr/bin/env bash
# Builds the mq container image (deploy/image/Containerfile) from a built tree, with buildah and
# no container engine or registry: the base is a Debian 12 root filesystem made with debootstrap
# (cached, made once), on which go the Debian runtime packages of the libraries the binaries
# load (found with ldd and dpkg -S), the three binaries, and LibTorch with the CUDA libraries of
# the torch wheel the binaries were linked against. Prints the image's size and composition.
#
# usage: scripts/build-image.sh [--tag NAME:TAG] [--build-dir DIR] [--cache-dir DIR]
#                               [--refresh-base] [--keep-context]
#   --tag           image name (default: the chart's default image, deploy/helm/mq/values.yaml
#                   image.repository:image.tag, the tag defaulting to appVersion, i.e.
#                   localhost/mq:0.1.0; $MQ_IMAGE_TAG)
#   --build-dir     the CMake build directory holding server/mq-coordinator, worker/mq-worker and
#                   client/mq-client (default ./build; $MQ_BUILD_DIR)
#   --cache-dir     where the debootstrap base tarball is kept between builds
#                   (default /var/cache/mq-image; $MQ_IMAGE_CACHE)
#   --refresh-base  make the debootstrap base again (e.g. for newer Debian point releases)
#   --keep-context  keep the prepared build context and print its path
# Environment: MQ_DEBIAN_MIRROR (default http://deb.debian.org/debian), MQ_STORAGE_DRIVER
# (buildah's storage driver, default vfs: works everywhere, copies every layer).
#
# Needs root (debootstrap; buildah with chroot isolation) and buildah, debootstrap, patchelf
# (scripts/setup.sh installs them). Idempotent: the base is reused, and the image a rebuild
# replaces under the same tag is removed. About 2 min on 2 cores with the base cached; making the
# base adds about 1.5 min.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "build-image: error: $*" >&2; exit 2; }
note() { echo "build-image: $*"; }

# The default name is the chart's default image: values.yaml image.repository, and image.tag or,
# when that is empty, Chart.yaml appVersion.
CHART="$SRC/deploy/helm/mq"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")"
chart_image() {  # chart_image KEY: image.KEY from values.yaml, quotes removed
  awk -v key="$1" '/^image:/ { f = 1; next } f && /^[^ #]/ { exit }
    f && $1 == key ":" { v = $2; gsub(/"/, "", v); print v; exit }' "$CHART/values.yaml"
}
chart_repository="$(chart_image repository)"
chart_tag="$(chart_image tag)"
TAG="${MQ_IMAGE_TAG:-${chart_repository:-localhost/mq}:${chart_tag:-${app_version:-latest}}}"
BUILD_DIR="${MQ_BUILD_DIR:-$SRC/build}"
CACHE_DIR="${MQ_IMAGE_CACHE:-/var/cache/mq-image}"
MIRROR="${MQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STORAGE_DRIVER="${MQ_STORAGE_DRIVER:-vfs}"
SUITE=bookworm
refresh_base=0
keep_context=0
ARGS=("$@")

while (($#)); do
  case "$1" in
    --tag) [[ $# -ge 2 && -n "$2" ]] || die "--tag needs a value (NAME:TAG)"; TAG="$2"; shift 2 ;;
    --build-dir) [[ $# -ge 2 ]] || die "--build-dir needs a value"; BUILD_DIR="$2"; shift 2 ;;
    --cache-dir) [[ $# -ge 2 ]] || die "--cache-dir needs a value"; CACHE_DIR="$2"; shift 2 ;;
    --refresh-base) refresh_base=1; shift ;;
    --keep-context) keep_context=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# ---------------------------------------------------------------- preconditions
[[ "$(id -u)" -eq 0 ]] || die "must run as root (debootstrap and buildah's chroot isolation need it); try: sudo $0 ${ARGS[*]}"
missing=()
for tool in buildah debootstrap patchelf strip ldd dpkg; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (scripts/setup.sh installs them)"
[[ -d "$BUILD_DIR" ]] || die "build directory '$BUILD_DIR' does not exist (build first: scripts/build.sh, or pass --build-dir / MQ_BUILD_DIR)"
BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"
BINARIES=(server/mq-coordinator worker/mq-worker client/mq-client)
for b in "${BINARIES[@]}"; do
  [[ -x "$BUILD_DIR/$b" ]] || die "'$BUILD_DIR/$b' is missing or not executable: '$BUILD_DIR' is not a finished mq build (run scripts/build.sh)"
done
[[ "$TAG" == *:* ]] || TAG="$TAG:latest"

BUILDAH=(buildah --storage-driver "$STORAGE_DRIVER")

# ldd FILE...: prints "FILE<TAB>SONAME<TAB>PATH" for every library, PATH "not found" if unresolved.
resolved_libs() {
  local f
  for f in "$@"; do
    ldd "$f" 2>/dev/null | awk -v f="$f" '
      $2 == "=>" && $3 == "not" { print f "\t" $1 "\tnot found"; next }
      $2 == "=>" && $3 ~ /^\// { print f "\t" $1 "\t" $3 }'
  done
}

# ---------------------------------------------------------------- torch
# The torch the worker really loads: where ldd resolves libtorch.so from the binary's RUNPATH.
torch_lib="$(resolved_libs "$BUILD_DIR/worker/mq-worker" | awk -F'\t' '$2 == "libtorch.so" { print $3 }')"
[[ -n "$torch_lib" && "$torch_lib" != "not found" ]] \
  || die "ldd cannot resolve libtorch.so for $BUILD_DIR/worker/mq-worker (is the torch wheel it was built with still installed?)"
TORCH_LIB_DIR="$(cd "$(dirname "$torch_lib")" && pwd -P)"   # .../site-packages/torch/lib
SITE_DIR="$(dirname "$(dirname "$TORCH_LIB_DIR")")"          # .../site-packages
torch_version="$(sed -n 's/^__version__ = .\([^"'\'']*\).*/\1/p' "$SITE_DIR/torch/version.py" 2>/dev/null || true)"
note "torch ${torch_version:-?} from $SITE_DIR"

# The nvidia/*/lib directories libtorch_cuda's RPATH names ($ORIGIN/../../nvidia/<pkg>/lib);
# none for a CPU-only torch wheel.
nvidia_dirs=()
if [[ -f "$TORCH_LIB_DIR/libtorch_cuda.so" ]]; then
  rpath="$(readelf -d "$TORCH_LIB_DIR/libtorch_cuda.so" | sed -n 's/.*(R[UN]*PATH).*\[\(.*\)\]/\1/p')"
  IFS=: read -r -a entries <<<"$rpath"
  for e in "${entries[@]}"; do
    if [[ "$e" =~ ^\$ORIGIN/\.\./\.\./(nvidia/[^/]+/lib)$ ]]; then
      [[ -d "$SITE_DIR/${BASH_REMATCH[1]}" ]] || die "libtorch_cuda's RPATH names $SITE_DIR/${BASH_REMATCH[1]}, which is missing (nvidia-* wheels not installed?)"
      nvidia_dirs+=("${BASH_REMATCH[1]}")
    fi
  done
fi

# ---------------------------------------------------------------- base
# A Debian minbase root filesystem as a tarball, without /dev, docs, man pages and locales
# (dpkg excludes them in the image too, as Debian's slim images do), apt caches emptied.
BASE_TAR="$CACHE_DIR/debian-$SUITE-minbase.tar"
make_base() {
  local root="$CACHE_DIR/rootfs.tmp"
  # A debootstrap killed earlier may have left /proc or /sys mounted in its target.
  findmnt -rn -o TARGET | grep -F "$root/" | sort -r | xargs -r umount 2>/dev/null || true
  rm -rf "$root"
  note "making the Debian $SUITE base with debootstrap from $MIRROR (about 1-2 min)"
  if ! debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
    die "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"
  fi
  local sec_mirror="${MQ_DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}"
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $sec_mirror $SUITE-security main
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/mq-image-excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
    "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/dev/* "$root"/proc/* "$root"/sys/*
  tar --numeric-owner --xattrs -C "$root" -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$root"
}
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock"
flock 9   # one base made at a time; concurrent builds wait here
if ((refresh_base)) || [[ ! -s "$BASE_TAR" ]]; then
  make_base
else
  note "reusing the Debian $SUITE base $BASE_TAR (made $(date -r "$BASE_TAR" +%F); --refresh-base makes it again)"
fi

# ---------------------------------------------------------------- context
CTX="$(mktemp -d "${TMPDIR:-/var/tmp}/mq-image-context.XXXXXX")"
cleanup() {
  if ((keep_context)); then note "build context kept at $CTX"; else rm -rf "$CTX"; fi
}
trap cleanup EXIT

# Hard links where the context shares a file system with the sources (nothing in the context is
# modified in place), copies otherwise.
link_or_copy() {
  mkdir -p "$(dirname "$2")"
  cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}
link_or_copy "$BASE_TAR" "$CTX/base.tar"
cp "$SRC/deploy/image/Containerfile" "$CTX/Containerfile"

IMAGE_TORCH=/opt/torch
mkdir -p "$CTX/opt/torch/torch"
link_or_copy "$TORCH_LIB_DIR" "$CTX/opt/torch/torch/lib"
# libtorch_python needs libpython and serves only Python; libshm_windows is empty on Linux.
rm -rf "$CTX/opt/torch/torch/lib/libtorch_python.so" "$CTX/opt/torch/torch/lib/libshm_windows"
for d in "${nvidia_dirs[@]}"; do
  link_or_copy "$SITE_DIR/$d" "$CTX/opt/torch/$d"
done
# Left out: static archives; libraries nothing in torch loads (no reference to them in
# torch/lib): the BLAS and FFTW drop-ins, multi-GPU cuSOLVER, nvrtc's .alt build; and optional
# plugins whose own dependencies are not Debian runtime libraries mq needs: NVSHMEM's MPI,
# OpenSHMEM and PMIx bootstraps and UCX and libfabric transports (NVSHMEM then uses its default
# bootstrap and the InfiniBand/verbs transports, which stay), and cuFile's RDMA plugin
# (librdmacm; GPUDirect Storage is not used).
find "$CTX/opt/torch" \( -name '*.a' -o -name 'libnvblas.so*' -o -name 'libcufftw.so*' \
  -o -name 'libcusolverMg.so*' -o -name 'libnvrtc*.alt.so*' \
  -o -name 'nvshmem_bootstrap_mpi.so*' -o -name 'nvshmem_bootstrap_shmem.so*' \
  -o -name 'nvshmem_bootstrap_pmix.so*' -o -name 'nvshmem_transport_ucx.so*' \
  -o -name 'nvshmem_transport_libfabric.so*' -o -name 'libcufile_rdma.so*' \) -delete
find "$CTX/opt/torch" -name __pycache__ -prune -exec rm -rf {} +
find "$CTX/opt/torch" -name '__init__.py' -delete

mkdir -p "$CTX/bin"
for b in "${BINARIES[@]}"; do
  out="$CTX/bin/$(basename "$b")"
  cp "$BUILD_DIR/$b" "$out"
  strip --strip-debug "$out"
  # The build's RUNPATH names the build machine's torch; the image's is /opt/torch/torch/lib.
  if readelf -d "$out" | grep -q 'NEEDED.*\[libtorch'; then
    patchelf --set-rpath "$IMAGE_TORCH/torch/lib" "$out"
  elif readelf -d "$out" | grep -q 'R[UN]*PATH'; then
    patchelf --remove-rpath "$out"
  fi
done

# ---------------------------------------------------------------- runtime packages
# Every library the binaries and the shipped torch libraries load, resolved on this machine;
# those outside the torch tree are Debian's, and dpkg -S names their packages.
mapfile -t shipped < <(find "$CTX/opt/torch" -type f -name '*.so*')
sys_libs="$(
  { resolved_libs "${BINARIES[@]/#/$BUILD_DIR/}"; resolved_libs "${shipped[@]}"; } |
    awk -F'\t' '$3 ~ /^\// { print $3 }' | grep -v -e "^$SITE_DIR/" -e "^$CTX/" | sort -u
)"
# Every shipped library must resolve here, in the image's layout, before anything is built
# (libcuda.so.1 excepted: the host's driver, mounted by the NVIDIA container runtime).
unresolved="$(resolved_libs "${shipped[@]}" | awk -F'\t' '$3 == "not found" && $2 != "libcuda.so.1"')"
[[ -z "$unresolved" ]] || die "shipped torch/CUDA libraries with unresolved dependencies (leave the
plugin out or add its Debian package):
$(sed "s|$CTX||" <<<"$unresolved")"
packages=()
unowned=()
while IFS= read -r lib; do
  [[ -n "$lib" ]] || continue
  pkg=""
  real="$(readlink -f "$lib")"
  for p in "$lib" "$real" "/usr$lib" "/usr$real" "${lib#/usr}" "${real#/usr}"; do
    pkg="$(dpkg -S "$p" 2>/dev/null | head -n1 | cut -d: -f1)" && [[ -n "$pkg" ]] && break
  done
  if [[ -n "$pkg" ]]; then packages+=("$pkg"); else unowned+=("$lib"); fi
done <<<"$sys_libs"
((${#unowned[@]} == 0)) || die "no Debian package owns these libraries the binaries load: ${unowned[*]}"
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
note "Debian runtime packages (${#packages[@]}): ${packages[*]}"

# ---------------------------------------------------------------- build
# The commit the binaries were built from, as well as it can be known: the HEAD of the build
# directory's source tree now (read only; a build older than that HEAD is not detected).
build_src="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null || true)"
revision="$(git -C "${build_src:-$SRC}" rev-parse HEAD 2>/dev/null || echo unknown)"
old_id="$("${BUILDAH[@]}" images --noheading --format '{{.ID}}' "$TAG" 2>/dev/null | head -n1 || true)"
note "building $TAG (buildah $STORAGE_DRIVER storage, chroot isolation)"
start=$SECONDS
"${BUILDAH[@]}" bud --isolation chroot --layers=false --pull-never -q \
  --build-arg RUNTIME_PACKAGES="${packages[*]}" \
  --label "org.opencontainers.image.title=mq" \
  --label "org.opencontainers.image.version=$app_version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "mq.torch.version=${torch_version:-unknown}" \
  -f "$CTX/Containerfile" -t "$TAG" "$CTX" >/dev/null
new_id="$("${BUILDAH[@]}" images --noheading --format '{{.ID}}' "$TAG" | head -n1)"
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then
  "${BUILDAH[@]}" rmi "$old_id" >/dev/null 2>&1 || note "the image $TAG replaced ($old_id) is still in use; not removed"
fi

# ---------------------------------------------------------------- size
human() { numfmt --to=iec --suffix=B --format='%.1f' "$1"; }
size="$("${BUILDAH[@]}" images --noheading --format '{{.Size}}' "$TAG" | head -n1)"
du_b() { du -sb "$@" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
torch_b="$(du_b "$CTX/opt/torch/torch/lib")"
bin_b="$(du_b "$CTX/bin")"
echo
note "built $TAG (image $new_id) in $((SECONDS - start)) s; size $size"
echo "  composition (uncompressed):"
printf '    %-34s %8s\n' "mq binaries" "$(human "$bin_b")"
printf '    %-34s %8s\n' "LibTorch (torch/lib)" "$(human "$torch_b")"
for d in "${nvidia_dirs[@]}"; do
  printf '    %-34s %8s\n' "CUDA libraries ($d)" "$(human "$(du_b "$CTX/opt/torch/$d")")"
done
size_b="$(numfmt --from=si "$(tr -d ' B' <<<"$size")" 2>/dev/null || echo 0)"
rest_b=$((size_b - torch_b - bin_b))
for d in "${nvidia_dirs[@]}"; do rest_b=$((rest_b - $(du_b "$CTX/opt/torch/$d"))); done
if ((rest_b > 0)); then  # buildah's size has 3 significant digits: the rest is approximate
  printf '    %-34s %8s\n' "Debian 12 + runtime pkgs (about)" "$(human "$rest_b")"
fi
