"""bench/proc_mem.py (the GPU benches' host memory sampler) on a fake /proc and on this
process."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "proc_mem.py"

STATUS = """Name:\tmq-worker
Umask:\t0022
State:\tS (sleeping)
VmPeak:\t 9000000 kB
VmHWM:\t {hwm} kB
VmRSS:\t {rss} kB
RssAnon:\t {anon} kB
RssFile:\t {file} kB
RssShmem:\t {shmem} kB
Threads:\t12
"""


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, check=True).stdout


def write_status(proc, pid, **kb):
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "status").write_text(STATUS.format(**kb))


def test_samples_and_summarizes_a_fake_proc(tmp_path):
    proc, out = tmp_path / "proc", tmp_path / "mem.txt"
    write_status(proc, 41, hwm=5000, rss=4000, anon=3000, file=900, shmem=100)
    write_status(proc, 42, hwm=100, rss=100, anon=50, file=50, shmem=0)
    run("--proc", proc, "sample", "--once", out, 41, 42, 43)  # 43 does not exist
    write_status(proc, 41, hwm=9000, rss=2000, anon=1000, file=1000, shmem=0)
    run("--proc", proc, "sample", "--once", out, 41, 42)
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and lines[0].split()[1:] == ["41", "4000", "3000", "900", "100", "5000"]
    peaks = json.loads(run("summary", out))
    assert peaks["41"] == {"vm_hwm": 9000 * 1024, "vm_rss": 4000 * 1024,
                           "anon_shmem": 3100 * 1024, "file_at_anon_peak": 900 * 1024,
                           "samples": 2}
    assert peaks["42"]["samples"] == 2 and peaks["42"]["anon_shmem"] == 50 * 1024


def test_sampling_ends_when_the_processes_have_exited(tmp_path):
    proc, out = tmp_path / "proc", tmp_path / "mem.txt"
    write_status(proc, 7, hwm=1, rss=1, anon=1, file=0, shmem=0)
    sampler = subprocess.Popen([sys.executable, str(SCRIPT), "--proc", str(proc), "sample",
                                "--interval", "0.05", str(out), "7"])
    (proc / "7" / "status").unlink()  # the process is gone: the sampler stops by itself
    assert sampler.wait(timeout=30) == 0


def test_reads_and_resets_a_real_process(tmp_path):
    out = tmp_path / "mem.txt"
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(64 << 20); "
                              "b[::4096] = b'x' * len(b[::4096]); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        for _ in range(100):  # until the child has touched its 64 MiB
            run("sample", "--once", out, child.pid)
            if json.loads(run("summary", out))[str(child.pid)]["anon_shmem"] > 64 << 20:
                break
        peak = json.loads(run("summary", out))[str(child.pid)]
        assert peak["anon_shmem"] > 64 << 20 and peak["vm_hwm"] >= peak["vm_rss"]
        run("reset", child.pid)  # allowed for one's own process; a failure is only reported
    finally:
        child.stdin.close()
        child.wait(timeout=30)
