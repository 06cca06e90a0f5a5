#!/usr/bin/env python3
"""Host memory of processes from /proc/<pid>/status, for the GPU benches.

  proc_mem.py reset PID...             resets each process's peak resident set (VmHWM) by
                                       writing 5 to /proc/PID/clear_refs (own processes only)
  proc_mem.py sample OUT PID...        appends one line per process every --interval seconds
                                       until every process has exited or this one is killed:
                                       "time pid VmRSS RssAnon RssFile RssShmem VmHWM" (kB)
  proc_mem.py sample --once OUT PID... one line per process, then exits
  proc_mem.py summary OUT              JSON by pid: peak VmHWM and VmRSS, the peak of
                                       RssAnon + RssShmem (what the process itself holds) and
                                       RssFile at that sample (mapped files: the checkpoint's
                                       pages, the libraries), all in bytes, and the sample count

--proc DIR reads DIR/<pid>/status instead of /proc (tests).
"""
import argparse
import json
import os
import sys
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def read_status(proc, pid):
    """The FIELDS of proc/pid/status in kB, or None when the process is gone."""
    try:
        with open(os.path.join(proc, str(pid), "status")) as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                values[key] = int(parts[0])
    return [values.get(k, 0) for k in FIELDS]


def sample(args):
    with open(args.out, "a") as out:
        while True:
            alive = 0
            now = time.time()
            for pid in args.pids:
                v = read_status(args.proc, pid)
                if v is None:
                    continue
                alive += 1
                out.write(f"{now:.3f} {pid} " + " ".join(str(x) for x in v) + "\n")
            out.flush()
            if args.once or alive == 0:
                return 0
            time.sleep(args.interval)


def summary(args):
    peaks = {}
    with open(args.out) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2 + len(FIELDS):
                continue
            try:
                pid = int(parts[1])
                rss, anon, file_, shmem, hwm = (int(x) * 1024 for x in parts[2:])
            except ValueError:
                continue
            p = peaks.setdefault(pid, {"vm_hwm": 0, "vm_rss": 0, "anon_shmem": 0,
                                       "file_at_anon_peak": 0, "samples": 0})
            p["samples"] += 1
            p["vm_hwm"] = max(p["vm_hwm"], hwm)
            p["vm_rss"] = max(p["vm_rss"], rss)
            if anon + shmem >= p["anon_shmem"]:
                p["anon_shmem"] = anon + shmem
                p["file_at_anon_peak"] = file_
    json.dump({str(k): v for k, v in sorted(peaks.items())}, sys.stdout)
    print()
    return 0


def reset(args):
    for pid in args.pids:
        try:
            with open(os.path.join(args.proc, str(pid), "clear_refs"), "w") as f:
                f.write("5")
        except OSError as e:
            print(f"proc_mem.py: cannot reset the peak of {pid}: {e}", file=sys.stderr)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proc", default="/proc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--once", action="store_true")
    s.add_argument("--interval", type=float, default=0.2)
    s.add_argument("out")
    s.add_argument("pids", nargs="+", type=int)
    m = sub.add_parser("summary")
    m.add_argument("out")
    r = sub.add_parser("reset")
    r.add_argument("pids", nargs="+", type=int)
    args = ap.parse_args()
    return {"sample": sample, "summary": summary, "reset": reset}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
