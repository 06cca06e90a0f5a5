#!/usr/bin/env bash
# Issue 6: one full-width DeepSeek-V3 MoE layer quantized through the real product
# (mq-coordinator + one mq-worker per GPU on CUDA + mq-client submit --wait), on the GPU machine
# (device tool; carry [".device"]).   command: bash bench/run_layer_quant_gpu.sh
#
# Steps: builds mq with CUDA (Release) into build-gpu; generates a one-layer FP8 checkpoint with
# the real layer dimensions (hidden 7168, MLA 128 heads, q/kv LoRA 1536/512, 256 routed experts
# of 2048 + 1 shared, top-8 of 8 groups keeping 4; vocab 8192: embed/lm_head are not on the
# quantized path) while the rest builds; writes a pre-tokenized JSONL calibration file of random
# ids; starts the coordinator and one worker per GPU; runs one job per entry of MQ_RUNS and
# samples GPU memory with nvidia-smi meanwhile. Idempotent on a warm machine: the build is
# incremental and a model generated with the same flags is reused.
#
# Knobs (environment):
#   MQ_RUNS       "GANG:SAMPLES[:METHOD] ..." jobs to run in order (default "1:64 N:64", N = GPU
#                 count; METHOD gptq (default), rtn, awq or awq-gptq)
#   MQ_SUBMIT_ARGS  extra mq-client submit flags for every job, e.g. --awq-tokens 16384
#   MQ_SEQLEN     tokens per calibration sequence (default 1024)
#   MQ_SEQS       sequences in the calibration file (default 160; a job of S samples evaluates
#                 on the 16 after its S, so S + 16 are needed for a held-out evaluation)
#   MQ_EXPERTS    routed experts of the generated layer (default 256)
#   MQ_LAYERS     MoE layers of the generated checkpoint (default 1; 11.75 GB each)
#   MQ_WORKER_ARGS  extra mq-worker flags, e.g. --overlap-writes=false,
#                 --overlap-transfers=false or --stage-next-layer=false
#   MQ_PROFILE_LAYERS  comma-separated layers to profile (mq-worker --profile-layers): per job
#                 and rank, $OUT/profiles/*.txt (stage wall vs device-busy seconds, top kernels)
#                 and the Chrome trace, gzipped
#   MQ_RESTART_WORKERS  set: start fresh worker processes before every job after the first, so
#                 every job's peak GPU and host memory is a clean one (no reserve held from an
#                 earlier job)
#   MQ_COLD       set: drop the checkpoint's files from the page cache before each job
#                 (fsync + posix_fadvise DONTNEED), so the job reads them from the disk
#   MQ_EPP        mq-worker --experts-per-pass (default auto, the worker's default: the plan
#                 chooses it for the GPU; the summary says what it chose)
#   MQ_DISPATCH   mq-worker --dispatch-tokens (default auto, the worker's default)
#   MQ_ALLOC_CONF PYTORCH_CUDA_ALLOC_CONF for the workers (default unset: mq-worker's own default)
#   MQ_TARGETS    routed-experts (default, the product's default) or all-linear
#   MQ_JOB_TIMEOUT  seconds per job before it is abandoned (default 420; also cut to what is
#                 left of MQ_DEADLINE, default 570 s after the start)
#   MQ_EXTRA_CMAKE_ARGS  e.g. -DMQ_ENABLE_NCCL=ON (gangs communicate through NCCL)
#   MQ_KEEP_OUTPUTS  set: keep each job's output directory (compare with bench/compare_outputs.py)
#   MQ_WORK       working directory for model, outputs, state (default /tmp/mq-layer)
# Results: $OUT/summary.txt (also printed), $OUT/results.json, $OUT/gpu.txt, $OUT/logs.tar.gz.
# Peak GPU memory is per job, but workers keep torch's allocator reserve between jobs: only a
# worker's first job gives a clean peak. A worker that dies is restarted before the next job.
# Peak host memory of each worker process (bench/proc_mem.py: /proc/<pid>/status every 0.2 s,
# VmHWM reset before each job) is printed next to the plan's host estimate: VmHWM (the resident
# set's peak: also the mapped checkpoint's pages and the libraries) and the peak of RssAnon +
# RssShmem (what the process allocated itself; the heap keeps freed memory between jobs, so
# again a worker's first job is the clean one).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-/tmp/mq-gpu-out}"
mkdir -p "$OUT"
source .device/env.sh
W="${MQ_WORK:-/tmp/mq-layer}"
LOG="$W/logs"
mkdir -p "$W" "$LOG"
NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
RUNS="${MQ_RUNS:-1:64 $NGPU:64}"
SEQLEN="${MQ_SEQLEN:-1024}"
EXPERTS="${MQ_EXPERTS:-256}"
LAYERS="${MQ_LAYERS:-1}"
EPP="${MQ_EPP:-auto}"
DISPATCH="${MQ_DISPATCH:-auto}"
TARGETS="${MQ_TARGETS:-routed-experts}"
JOB_TIMEOUT="${MQ_JOB_TIMEOUT:-420}"
B=build-gpu
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
DEADLINE=$(( T0 + ${MQ_DEADLINE:-570} ))  # stay inside the device tool's 10-minute command
finish() {  # pack logs; always runs
  (cd "$W" && tar czf "$OUT/logs.tar.gz" logs 2>/dev/null)
}
trap finish EXIT

nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  | tee "$OUT/gpu.txt"
nproc >> "$OUT/gpu.txt"; free -g >> "$OUT/gpu.txt"; df -h /tmp >> "$OUT/gpu.txt"

# --- build ------------------------------------------------------------------------------------
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DMQ_ENABLE_CUDA=ON -DMQ_BUILD_TESTS=OFF ${MQ_EXTRA_CMAKE_ARGS:-} \
  $MQ_DEVICE_CMAKE_ARGS > "$LOG/configure.log" 2>&1 || { tail -40 "$LOG/configure.log"; exit 1; }
cmake --build $B -j 16 --target mq-gen-model > "$LOG/build-gen.log" 2>&1 \
  || { grep -E "error" -A5 "$LOG/build-gen.log" | head -40; exit 1; }
stamp "mq-gen-model built"

# --- model (in the background while the service builds) --------------------------------------
GROUPS_=8; TOPKG=4
[ "$EXPERTS" -lt 64 ] && { GROUPS_=1; TOPKG=1; }
GEN_FLAGS="--layers $LAYERS --dense-layers 0 --experts $EXPERTS --experts-per-tok 8 --groups $GROUPS_
  --topk-groups $TOPKG --shared-experts 1 --hidden 7168 --moe-intermediate 2048 --heads 128
  --q-lora-rank 1536 --kv-lora-rank 512 --qk-nope-dim 128 --qk-rope-dim 64 --v-dim 128
  --vocab 8192 --shards 3 --seed 1"
GEN_FLAGS=$(echo $GEN_FLAGS)
M="$W/model"
GEN_PID=""
if [ "$(cat "$M/.flags" 2>/dev/null)" != "$GEN_FLAGS" ]; then
  rm -rf "$M"
  ( s=$(date +%s.%N); "$B/tests/tools/mq-gen-model" --output "$M" $GEN_FLAGS > "$LOG/gen.log" 2>&1 \
      && echo "$GEN_FLAGS" > "$M/.flags"; rc=$?
    echo "gen rc=$rc seconds=$(since "$s")" >> "$LOG/gen.log" ) &
  GEN_PID=$!
else
  echo "model reused (same flags)" > "$LOG/gen-reuse.log"
fi

# Calibration: MQ_SEQS sequences of SEQLEN random ids < 8192 (a job takes its first SAMPLES after
# the deterministic shuffle; the evaluation, on by default, the next 16 of that order, so a job of
# up to MQ_SEQS - 16 samples is evaluated on held-out sequences).
python3 - "$W/calibration.jsonl" "$SEQLEN" "${MQ_SEQS:-160}" <<'EOF'
import json, random, sys
rng = random.Random(1234)
with open(sys.argv[1], "w") as f:
    for _ in range(int(sys.argv[3])):
        f.write(json.dumps({"input_ids": [rng.randrange(8192) for _ in range(int(sys.argv[2]))]}) + "\n")
EOF

cmake --build $B -j 15 --target mq-coordinator mq-worker mq-client > "$LOG/build.log" 2>&1 \
  || { grep -E "error" -A5 "$LOG/build.log" | head -60; exit 1; }
stamp "service built"
if [ -n "$GEN_PID" ]; then wait $GEN_PID; fi
cat "$LOG/gen.log" 2>/dev/null
[ -e "$M/.flags" ] || { echo "model generation failed"; exit 1; }
du -sh "$M"; stamp "model ready"

# --- service ----------------------------------------------------------------------------------
COORD=$B/server/mq-coordinator; WORKER=$B/worker/mq-worker; CLIENT=$B/client/mq-client
rm -rf "$W/state" "$W/ready"
# One machine, loopback only: plaintext without authentication (--insecure).
export MQ_INSECURE=1
"$COORD" --listen 127.0.0.1:0 --data-dir "$W/state" --ready-file "$W/ready" --insecure \
  > "$LOG/coordinator.log" 2>&1 &
COORD_PID=$!
for _ in $(seq 100); do [ -s "$W/ready" ] && break; sleep 0.2; done
ADDR=$(cat "$W/ready" 2>/dev/null)
[ -n "$ADDR" ] || { echo "coordinator did not start"; tail "$LOG/coordinator.log"; exit 1; }
# Unset: mq-worker's default allocator settings (expandable segments, page-locked memory made by
# registering pages on 16 threads). MQ_ALLOC_CONF= (set, empty) runs torch's own defaults.
if [ -n "${MQ_ALLOC_CONF+x}" ]; then export PYTORCH_CUDA_ALLOC_CONF="$MQ_ALLOC_CONF"; else unset PYTORCH_CUDA_ALLOC_CONF; fi
WORKER_PIDS=()
STARTS=0
[ -z "${MQ_PROFILE_LAYERS:-}" ] || mkdir -p "$OUT/profiles"
start_worker() {  # start_worker GPU: (re)starts that GPU's worker
  local i=$1
  STARTS=$((STARTS + 1))
  "$WORKER" --coordinator "$ADDR" --device cuda:$i --name gpu$i-$STARTS --scratch-dir "$W/scratch$i" \
    --experts-per-pass "$EPP" --dispatch-tokens "$DISPATCH" --poll-wait-ms 1000 --insecure ${MQ_WORKER_ARGS:-} \
    ${MQ_PROFILE_LAYERS:+--profile-layers "$MQ_PROFILE_LAYERS" --profile-dir "$OUT/profiles"} \
    >> "$LOG/worker$i.log" 2>&1 &
  WORKER_PIDS[$i]=$!
}
for i in $(seq 0 $((NGPU - 1))); do start_worker $i; done
cleanup() {
  for p in "${WORKER_PIDS[@]}" $COORD_PID ${SMI_PID:-} ${MEM_PID:-}; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  finish
}
trap cleanup EXIT
# "IDLE LIVE": workers idle, and workers not yet declared dead. A stopped worker stays idle to
# the coordinator until its lease runs out (10 s), and a job submitted meanwhile may be handed to
# it: after a restart the bench waits until only the new workers are left.
idle() { "$CLIENT" --coordinator "$ADDR" workers --json 2>/dev/null | python3 -c '
import json,sys; ws = json.load(sys.stdin).get("workers", [])
print(sum(w["state"] == "WORKER_STATE_IDLE" for w in ws), sum(w["state"] != "WORKER_STATE_DEAD" for w in ws))'; }
for _ in $(seq 150); do [ "$(idle)" = "$NGPU $NGPU" ] && break; sleep 0.2; done
stamp "$(idle) of $NGPU workers idle and live at $ADDR"

# --- jobs -------------------------------------------------------------------------------------
echo "[]" > "$W/results.json"
for run in $RUNS; do
  K=${run%%:*}; rest=${run#*:}; S=${rest%%:*}; METHOD=gptq
  [ "$rest" != "$S" ] && METHOD=${rest#*:}
  restarted=0
  if [ -n "${MQ_RESTART_WORKERS:-}" ] && [ -n "${RUN_NO:-}" ]; then
    for i in $(seq 0 $((NGPU - 1))); do kill "${WORKER_PIDS[$i]}" 2>/dev/null; done
    for i in $(seq 0 $((NGPU - 1))); do wait "${WORKER_PIDS[$i]}" 2>/dev/null; done
  fi
  for i in $(seq 0 $((NGPU - 1))); do
    kill -0 "${WORKER_PIDS[$i]}" 2>/dev/null || { start_worker $i; restarted=1; }
  done
  if [ $restarted = 1 ]; then
    for _ in $(seq 150); do [ "$(idle)" = "$NGPU $NGPU" ] && break; sleep 0.2; done
    stamp "workers restarted: $(idle) of $NGPU idle and live"
  fi
  [ "$K" -le "$NGPU" ] || { echo "skip gang $K: only $NGPU GPUs"; continue; }
  RUN_NO=$(( ${RUN_NO:-0} + 1 ))
  tag="r${RUN_NO}-k${K}-s${S}-${METHOD}"  # the run number keeps repeated runs' logs apart
  O="$W/out-$tag"; rm -rf "$O"
  left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "skip $tag: ${left}s left before the deadline"; continue; }
  tmo=$(( left < JOB_TIMEOUT ? left : JOB_TIMEOUT ))
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 \
    > "$LOG/gpumem-$tag.csv" 2>/dev/null &
  SMI_PID=$!
  # Host memory of the workers: peaks reset, then sampled until the job ends.
  python3 bench/proc_mem.py reset "${WORKER_PIDS[@]}"
  : > "$LOG/hostmem-$tag.txt"
  python3 bench/proc_mem.py sample "$LOG/hostmem-$tag.txt" "${WORKER_PIDS[@]}" &
  MEM_PID=$!
  if [ -n "${MQ_COLD:-}" ]; then
    python3 - "$M" <<'EOF'
import os, sys
for name in sorted(os.listdir(sys.argv[1])):
    fd = os.open(os.path.join(sys.argv[1], name), os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
EOF
    stamp "job $tag: checkpoint dropped from the page cache"
  fi
  stamp "job $tag: submit"
  t0=$(date +%s.%N)
  "$CLIENT" --coordinator "$ADDR" submit --model "$M" --output "$O" \
    --dataset "$W/calibration.jsonl" --num-calibration-samples "$S" \
    --max-sequence-length "$SEQLEN" --gang-size "$K" --targets "$TARGETS" --max-attempts 1 \
    --method "$METHOD" ${MQ_SUBMIT_ARGS:-} --wait \
    > "$LOG/submit-$tag.log" 2>&1 &
  CPID=$!
  rc=""
  # Watchdog: the deadline, and workers that die (the coordinator would only requeue the job).
  while kill -0 $CPID 2>/dev/null; do
    if [ "$(date +%s)" -ge "$(( ${t0%.*} + tmo ))" ]; then rc=124; fi
    for p in "${WORKER_PIDS[@]}"; do kill -0 "$p" 2>/dev/null || rc=${rc:-137}; done
    if [ -n "$rc" ]; then
      [ "$rc" = 137 ] && echo "a worker process died during job $tag (see its log)"
      kill $CPID 2>/dev/null; wait $CPID 2>/dev/null
      break
    fi
    sleep 1
  done
  if [ -z "$rc" ]; then wait $CPID; rc=$?; fi
  wall=$(since "$t0")
  kill $SMI_PID 2>/dev/null; wait $SMI_PID 2>/dev/null; SMI_PID=""
  kill $MEM_PID 2>/dev/null; wait $MEM_PID 2>/dev/null; MEM_PID=""
  python3 bench/proc_mem.py sample --once "$LOG/hostmem-$tag.txt" "${WORKER_PIDS[@]}"  # VmHWM
  python3 bench/proc_mem.py summary "$LOG/hostmem-$tag.txt" > "$LOG/hostmem-$tag.json"
  # Worker index by pid, for the summary.
  for i in "${!WORKER_PIDS[@]}"; do echo "${WORKER_PIDS[$i]} $i"; done > "$LOG/workers-$tag.txt"
  cat "$LOG/submit-$tag.log"
  JOB=$(head -1 "$LOG/submit-$tag.log" | awk '{print $1}')
  "$CLIENT" --coordinator "$ADDR" status "$JOB" --json > "$LOG/job-$tag.json" 2>&1
  stamp "job $tag: rc=$rc wall=${wall}s"
  python3 - "$W/results.json" "$LOG/job-$tag.json" "$LOG/gpumem-$tag.csv" "$tag" "$K" "$S" \
    "$SEQLEN" "$wall" "$rc" "$(du -sb "$O" 2>/dev/null | cut -f1)" "$LOG/hostmem-$tag.json" \
    "$LOG/workers-$tag.txt" <<'EOF'
import json, sys
(res_path, job_path, mem_path, tag, K, S, seqlen, wall, rc, out_bytes, host_path,
 workers_path) = sys.argv[1:]
try:
    job = json.load(open(job_path))
except Exception as e:
    job = {"error": f"{e}: {open(job_path).read()[:400]}"}
peak = {}
for line in open(mem_path):
    try:
        i, m = [int(x) for x in line.split(",")]
        peak[i] = max(peak.get(i, 0), m)
    except ValueError:
        pass
r = {"tag": tag, "gang": int(K), "samples": int(S), "seqlen": int(seqlen),
     "wall_submit_to_end_s": float(wall), "client_rc": int(rc),
     "peak_gpu_mib": peak, "output_bytes": int(out_bytes or 0)}
j = job.get("job", {})
r["state"] = j.get("state"); r["message"] = j.get("message")
r["manifest_sha256"] = j.get("manifest_sha256")
r["last_layer"] = j.get("progress", {}).get("last_layer")
r["layers"] = [{"layer": l.get("layer"), "committed_at_ms": l.get("committed_at_ms"),
                "reports": [{"rank": p.get("rank"), "stats": p.get("stats")} for p in l.get("reports", [])]}
               for l in job.get("layers", [])]
r["events"] = [(e.get("time_ms"), e.get("kind"), e.get("message", "")[:160]) for e in job.get("events", [])]
r["created_at_ms"] = j.get("created_at_ms"); r["finished_at_ms"] = j.get("finished_at_ms")
r["quality"] = j.get("quality")
est = j.get("plan", {}).get("estimate", {})
r["plan_gpu_bytes"] = est.get("gpu_bytes_per_rank")
r["plan_host_bytes"] = est.get("host_bytes_per_rank")
r["plan_settings"] = {k: est.get(k) for k in (
    "experts_per_pass", "dispatch_tokens", "experts_per_pass_chosen", "dispatch_tokens_chosen",
    "expert_passes", "dispatch_rounds", "device_memory_bytes")}
try:  # peak host memory by worker index (bench/proc_mem.py summary)
    index = dict(line.split() for line in open(workers_path) if line.strip())
    r["peak_host"] = {index.get(pid, pid): v for pid, v in json.load(open(host_path)).items()}
except (OSError, ValueError) as e:
    r["peak_host"] = {"error": str(e)}
all_r = json.load(open(res_path)); all_r.append(r)
json.dump(all_r, open(res_path, "w"), indent=1)
EOF
  [ -n "${MQ_KEEP_OUTPUTS:-}" ] || rm -rf "$O"  # packed outputs (~6 GB) are not needed afterwards
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "job $tag: rc=$rc (124 deadline, 137 worker died): cancelling it"
    "$CLIENT" --coordinator "$ADDR" cancel "$JOB" > /dev/null 2>&1
    [ "$rc" = 124 ] && break
  fi
done
cp "$W/results.json" "$OUT/results.json"
if [ -n "${MQ_PROFILE_LAYERS:-}" ]; then
  gzip -f "$OUT"/profiles/*.json 2>/dev/null
  for f in "$OUT"/profiles/*.txt; do [ -f "$f" ] && { echo "== $f"; head -40 "$f"; }; done
fi
grep -H -E "what\(\)|terminate called|ERROR|WARN|out of memory|failed" "$LOG"/worker*.log | cut -c1-400 | head -30

# --- summary ----------------------------------------------------------------------------------
python3 - "$W/results.json" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
runs = json.load(open(sys.argv[1]))
f = lambda x: float(x or 0)
for r in runs:
    ev = r["events"]
    t_sub = int(r["created_at_ms"] or 0)
    print(f"== {r['tag']}: gang {r['gang']}, {r['samples']}x{r['seqlen']} tokens, state {r['state']}, "
          f"client rc {r['client_rc']}, submit->end {r['wall_submit_to_end_s']:.1f} s, "
          f"output {r['output_bytes']/1e9:.2f} GB, peak GPU MiB {r['peak_gpu_mib']}, "
          f"manifest {(r.get('manifest_sha256') or '')[:16]}")
    if r["message"]:
        print("   message:", r["message"][:300])
    plan_gpu = f(r.get("plan_gpu_bytes")) / 2**30
    peak = max([int(v) for v in (r["peak_gpu_mib"] or {}).values()] or [0]) / 1024
    if plan_gpu and peak:
        print(f"   GPU memory: planned {plan_gpu:.2f} GiB per rank, nvidia-smi peak {peak:.2f} GiB "
              f"({100 * (plan_gpu - peak) / peak:+.1f}%)")
    # torch's allocator per step and rank (LayerStats.device_peak_*): bytes in tensors, bytes held
    # from the driver, allocations retried after releasing its cache (the card was full).
    steps = []
    for layer in r.get("layers") or []:
        for rep in layer.get("reports") or []:
            st = rep.get("stats") or {}
            if f(st.get("device_peak_reserved_bytes")):
                steps.append((layer.get("layer"), rep.get("rank", 0),
                              f(st.get("device_peak_allocated_bytes")) / 2**30,
                              f(st.get("device_peak_reserved_bytes")) / 2**30,
                              int(st.get("device_alloc_retries") or 0)))
    if steps:
        top = max(s[2] for s in steps)
        print("   torch allocator, layer/rank: peak in tensors / held, retries: " + "; ".join(
            f"L{l}/r{k} {a:.2f}/{h:.2f} GiB, {n}" for l, k, a, h, n in steps) +
            (f"; planned {plan_gpu:.2f} GiB vs peak in tensors {top:.2f} GiB "
             f"({100 * (plan_gpu - top) / top:+.1f}%)" if plan_gpu and top else ""))
    ps = r.get("plan_settings") or {}
    if ps.get("expert_passes"):
        how = lambda chosen: "chosen by the plan" if chosen else "given"
        print(f"   settings: experts per pass {ps.get('experts_per_pass') or 'all'} "
              f"({ps.get('expert_passes')} passes, {how(ps.get('experts_per_pass_chosen'))}), "
              f"dispatch tokens {ps.get('dispatch_tokens') or 'all'} ({ps.get('dispatch_rounds')} "
              f"rounds, {how(ps.get('dispatch_tokens_chosen'))}) for "
              f"{f(ps.get('device_memory_bytes')) / 2**30:.2f} GiB")
    plan_host = f(r.get("plan_host_bytes")) / 2**30
    for worker, h in sorted((r.get("peak_host") or {}).items()):
        if not isinstance(h, dict):
            continue
        hwm, own, mapped = (h.get(k, 0) / 2**30 for k in ("vm_hwm", "anon_shmem", "file_at_anon_peak"))
        vs = lambda x: f" ({100 * (plan_host - x) / x:+.1f}%)" if plan_host and x else ""
        print(f"   host memory, worker {worker}: planned {plan_host:.2f} GiB per rank, peak RSS "
              f"(VmHWM) {hwm:.2f} GiB{vs(hwm)}; peak anonymous + shared {own:.2f} GiB{vs(own)} "
              f"with {mapped:.2f} GiB file-backed then ({h.get('samples', 0)} samples)")
    for t, kind, msg in ev:
        print(f"   +{(int(t) - t_sub)/1000:7.1f}s {kind:18s} {msg}")
    q = r.get("quality") or {}
    if q:
        # Quantization: from the quantize attempt's start to the output's finalization.
        starts = [int(t) for t, kind, msg in ev if kind == "assigned" and "steps" in msg]
        fin = [int(t) for t, kind, msg in ev if kind == "finalized"]
        quant = (fin[-1] - starts[0]) / 1000 if starts and fin else 0
        secs = f(q.get("seconds"))
        print(f"   evaluation: {secs:.1f} s = {100 * secs / quant if quant else 0:.1f}% of the "
              f"quantization ({quant:.1f} s from the quantize assignment to the finalized output); "
              f"KL mean {f(q.get('kl_mean')):.4g} p99 {f(q.get('kl_p99')):.4g}, top-1 "
              f"{f(q.get('top1_agreement')):.4f}, ppl {f(q.get('perplexity_reference')):.4g} -> "
              f"{f(q.get('perplexity_candidate')):.4g}; {q.get('source') or q.get('not_measured')}")
    for l in r["layers"]:
        print(f"   layer {l['layer']} committed at +{(int(l['committed_at_ms'] or 0) - t_sub)/1000:.1f}s")
        print("   rank  load  fwd   hess  solve  prop  write  sum    tok min/med/max  linears fb  mean_rel_err  rounds/passes  exch")
        for p in sorted(l["reports"], key=lambda p: p["rank"] or 0):
            s = p["stats"] or {}
            st = [f(s.get(k)) for k in ("load_seconds", "forward_seconds", "hessian_seconds",
                                        "solve_seconds", "propagate_seconds", "write_seconds")]
            print(f"   {p['rank'] or 0:4d} " + " ".join(f"{x:5.1f}" for x in st) + f" {sum(st):6.1f}"
                  f"  {s.get('expert_tokens_min')}/{s.get('expert_tokens_median')}/{s.get('expert_tokens_max')}"
                  f"  {s.get('quantized_linears')} {s.get('fallbacks')} {f(s.get('mean_relative_error')):.3e}"
                  f"  {s.get('dispatch_rounds')}/{s.get('expert_passes')}  {f(s.get('exchange_seconds')):.2f}")
            for m in s.get("awq", []):
                print(f"        awq {m['smooth']}: {m.get('mappings', 1)} mapping(s), "
                      f"{m.get('identity_chosen', 0)} kept s=1, alpha {f(m.get('alpha')):.2f}, "
                      f"loss {f(m.get('loss_identity')):.4g} -> {f(m.get('loss_chosen')):.4g}, "
                      f"rows {m.get('rows')}, routing changed {m.get('routing_changed_tokens', 0)}"
                      f"/{m.get('routing_tokens', 0)}")
EOF
stamp "done"
