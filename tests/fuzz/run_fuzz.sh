#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors header parser (safetensors_header_fuzz.cc,
# compiled with clang++ -fsanitize=fuzzer,address,undefined directly against the parser's
# sources) and runs it for a bounded time on a seeded corpus. Exits non-zero on any crash,
# sanitizer report, leak, timeout or out-of-memory input, printing the reproducer's path.
#
# usage: run_fuzz.sh SOURCE_DIR WORK_DIR [SECONDS]
#   SOURCE_DIR  the mq checkout;  WORK_DIR  where the binary, corpus and artifacts go
#   SECONDS     fuzzing time (default $MQ_FUZZ_SECONDS or 60)
# Environment: CXX_FUZZ picks the compiler (default: clang++, then clang++-14..19).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 SOURCE_DIR WORK_DIR [SECONDS]" >&2
  exit 2
fi
src=$(cd "$1" && pwd)
work=$2
seconds=${3:-${MQ_FUZZ_SECONDS:-60}}
mkdir -p "$work"
work=$(cd "$work" && pwd)

setup_hint() {
  echo "run_fuzz.sh: $1" >&2
  echo "run_fuzz.sh: run scripts/setup.sh (it installs the Debian packages clang and" \
    "libclang-rt-14-dev that provide clang++ and the libFuzzer runtime)" >&2
  exit 1
}

# --- compiler and fuzzer runtime ----------------------------------------------------------
cxx=${CXX_FUZZ:-}
if [ -z "$cxx" ]; then
  for candidate in clang++ clang++-14 clang++-15 clang++-16 clang++-17 clang++-18 clang++-19; do
    if command -v "$candidate" > /dev/null 2>&1; then
      cxx=$candidate
      break
    fi
  done
fi
[ -n "$cxx" ] || setup_hint "clang++ not found"
command -v "$cxx" > /dev/null 2>&1 || setup_hint "CXX_FUZZ=$cxx not found"

sanitize=(-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
probe_src="$work/probe_fuzzer.cc"
printf '%s\n' '#include <cstddef>' '#include <cstdint>' \
  'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }' > "$probe_src"
if ! "$cxx" "${sanitize[@]}" "$probe_src" -o "$work/probe_fuzzer" > "$work/probe.log" 2>&1; then
  cat "$work/probe.log" >&2
  setup_hint "$cxx cannot link -fsanitize=fuzzer,address,undefined (libclang_rt fuzzer/asan/ubsan runtime missing)"
fi

# --- abseil link flags --------------------------------------------------------------------
absl_modules=(absl_status absl_statusor absl_strings absl_str_format)
if command -v pkg-config > /dev/null 2>&1 && pkg-config --exists "${absl_modules[@]}"; then
  read -r -a absl_libs <<< "$(pkg-config --libs "${absl_modules[@]}")"
  read -r -a absl_cflags <<< "$(pkg-config --cflags "${absl_modules[@]}")"
else
  # No pkg-config data: link every abseil shared library the system has.
  absl_cflags=()
  absl_libs=()
  for lib in /usr/lib/*/libabsl_*.so /usr/lib/libabsl_*.so /usr/local/lib/libabsl_*.so; do
    [ -e "$lib" ] && absl_libs+=("$lib")
  done
  [ ${#absl_libs[@]} -gt 0 ] || setup_hint "abseil libraries not found (Debian package libabsl-dev)"
fi

# --- build (skipped when the binary is newer than every input) -----------------------------
sources=(
  "$src/tests/fuzz/safetensors_header_fuzz.cc"
  "$src/worker/model/safetensors.cc"
  "$src/worker/model/dtype.cc"
  "$src/worker/model/json_util.cc"
)
inputs=("${sources[@]}" "$src/worker/model/safetensors.h" "$src/worker/model/dtype.h"
  "$src/worker/model/json_util.h" "$0")
bin="$work/safetensors_header_fuzz"
rebuild=0
[ -x "$bin" ] || rebuild=1
for f in "${inputs[@]}"; do
  [ "$f" -nt "$bin" ] && rebuild=1
done
if [ $rebuild = 1 ]; then
  echo "run_fuzz.sh: building $bin with $cxx"
  # ${absl_cflags[@]+...}: expands to nothing (not an unbound-variable error) when empty.
  "$cxx" -std=c++20 -O1 -g -fno-omit-frame-pointer "${sanitize[@]}" -I"$src" \
    ${absl_cflags[@]+"${absl_cflags[@]}"} "${sources[@]}" -o "$bin.tmp" "${absl_libs[@]}"
  mv "$bin.tmp" "$bin"
fi

# --- seed corpus: whole files (8-byte little-endian length + header + data) ------------------
corpus="$work/corpus"
artifacts="$work/artifacts"
rm -rf "$corpus" "$artifacts"
mkdir -p "$corpus" "$artifacts"
export LC_ALL=C  # ${#header} counts bytes

le64() {
  local n=$1 i
  for i in 0 1 2 3 4 5 6 7; do
    printf "\\$(printf '%03o' $(((n >> (8 * i)) & 255)))"
  done
}
# seed NAME HEADER DATA_BYTES [DECLARED_LENGTH]
seed() {
  local name=$1 header=$2 data=$3 declared=${4:-${#2}}
  {
    le64 "$declared"
    printf '%s' "$header"
    head -c "$data" /dev/zero
  } > "$corpus/$name"
}
t() { printf '"%s":{"dtype":"%s","shape":%s,"data_offsets":[%s,%s]}' "$@"; }
seed empty '{}' 0
seed null_metadata '{"__metadata__":null}' 0
seed bf16 "{\"__metadata__\":{\"format\":\"pt\"},$(t a BF16 '[2,3]' 0 12)}" 12
seed fp8_scale "{$(t w F8_E4M3 '[3,130]' 0 390),$(t w_scale_inv F32 '[1,2]' 390 398)}" 398
seed padded "{$(t x I64 '[]' 0 8)}      " 8
seed sub_byte "{$(t f F4 '[4]' 0 2),$(t g F6_E2M3 '[4]' 2 5),$(t b BOOL '[1]' 5 6)}" 6
seed empty_tensor "{$(t e F16 '[0,5]' 0 0),$(t s U8 '[1]' 0 1)}" 1
seed unknown_field "{\"a\":{\"x\":[1,{\"y\":[]}],\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}" 1
seed unicode "{$(t 'caf\u00e9\ud83d\ude00' I8 '[1]' 0 1)}" 1
seed dup_key "{$(t a U8 '[1]' 0 1),$(t a U8 '[1]' 0 1)}" 1
seed overlap "{$(t a U8 '[2]' 0 2),$(t b U8 '[2]' 1 3)}" 3
seed hole "{$(t a U8 '[1]' 0 1),$(t b U8 '[1]' 2 3)}" 3
seed huge_shape "{$(t a U64 '[18446744073709551615,2]' 0 16)}" 16
seed negative "{$(t a U8 '[-1]' 0 1)}" 1
seed float_dim "{$(t a U8 '[1.5e3]' 0 1)}" 1
seed bad_metadata '{"__metadata__":{"format":7}}' 0
seed too_long '{}' 0 100000001
seed past_end '{}' 0 1000
seed not_object '[]' 0

# --- run ---------------------------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
echo "run_fuzz.sh: fuzzing for ${seconds}s ($(ls "$corpus" | wc -l) seeds)"
status=0
"$bin" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=4096 \
  -dict="$src/tests/fuzz/safetensors_header.dict" -artifact_prefix="$artifacts/" \
  -print_final_stats=1 "$corpus" > "$work/fuzz.log" 2>&1 || status=$?
grep -v -e "# Uses:" -e "dictionary. ######" "$work/fuzz.log" | tail -n 25
if [ $status -ne 0 ] || [ -n "$(ls -A "$artifacts")" ]; then
  echo "run_fuzz.sh: FAILED (exit $status); reproducers in $artifacts:" >&2
  ls -l "$artifacts" >&2
  echo "run_fuzz.sh: reproduce with: $bin $artifacts/<file>" >&2
  exit 1
fi
echo "run_fuzz.sh: no crash in ${seconds}s; corpus grew to $(ls "$corpus" | wc -l) inputs"
