"""Coordinator storage faults with real processes: the state store's data dir is a small tmpfs
that a junk file fills while a quantization job runs. Changes are refused with UNAVAILABLE
naming the cause and health turns NOT_SERVING; once the junk is gone the coordinator serves
again by itself. A restart on the full disk exits with one clear line (never a RocksDB
assertion); once room is made it starts, and the job finishes with nothing lost."""
import os
import subprocess
import time

import pytest

from mq_cluster import COORDINATOR, wait_until
from quantize_env import check_output_dir, make_model, submit_args

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storefaults")
    model, dataset, _ = make_model(tmp, layers=4)
    return {"model": model, "dataset": dataset}


@pytest.fixture
def small_disk(tmp_path, cluster):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount: {res.stderr.strip()}); this test needs "
                    "root or CAP_SYS_ADMIN")
    yield mnt
    cluster.close()  # stop the coordinator before its data dir goes away
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk):
    """Writes a junk file until the device is full."""
    junk = disk / "junk"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            while True:
                try:
                    if os.write(fd, block) < size:
                        break
                except OSError:
                    break
    finally:
        os.close(fd)
    return junk


def health(cluster):
    r = cluster.client("health", timeout=10)
    return "SERVING" if r.returncode == 0 else r.stderr.strip()


def test_full_data_dir_stops_changes_then_serves_again(cluster, env, small_disk, tmp_path):
    # The coordinator refuses changes while the device has less than --store-reserve-mb free,
    # before RocksDB itself runs out of room (RocksDB can abort on a full device). A reserve of
    # 0 does not make RocksDB fail at once: it writes into its preallocated WAL file until that
    # is full, then fails in a flush.
    reserve_mb = 4
    cluster.data_dir = small_disk / "state"
    cluster.coordinator_args = ["--store-reserve-mb", str(reserve_mb)]
    cluster.start_coordinator()
    cluster.start_worker("w1", env={"MQ_FAULT_STEP_DELAY_MS": "1500"})
    out = tmp_path / "out"
    res = cluster.client(*submit_args(env["model"], out, env["dataset"]), check=True)
    job_id = res.stdout.strip()
    cluster.wait_job(job_id, "JOB_STATE_RUNNING", timeout=120)

    # Disk full: a change is refused with UNAVAILABLE naming the cause, health NOT_SERVING.
    junk = fill(small_disk)
    res = cluster.client(*submit_args(env["model"], tmp_path / "out2", env["dataset"]))
    assert res.returncode == 1, res.stdout
    assert "unavailable" in res.stderr and "state store write failed" in res.stderr, res.stderr
    assert "No space left on device" in res.stderr, res.stderr
    assert "not serving until it can write" in res.stderr, res.stderr
    wait_until(lambda: "not serving" in health(cluster), 5, "health NOT_SERVING")
    res = cluster.client("cancel", job_id)
    assert res.returncode == 1 and "state store write failed" in res.stderr, res.stderr
    # Reads are still answered; the job is not failed by the outage.
    assert cluster.job_state(job_id) == "JOB_STATE_RUNNING"
    time.sleep(3)  # longer than a layer: the worker's reports wait (UNAVAILABLE, retried)
    assert health(cluster) != "SERVING"

    # Room again: the coordinator serves again by itself.
    junk.unlink()
    wait_until(lambda: health(cluster) == "SERVING", 10, "health SERVING again")
    res = cluster.client(*submit_args(env["model"], tmp_path / "out3", env["dataset"]))
    assert res.returncode == 0, res.stderr
    cluster.client("cancel", res.stdout.strip(), check=True)

    # Full again, then a restart on the full disk: one clear line and a non-zero exit.
    junk = fill(small_disk)
    wait_until(lambda: "not serving" in health(cluster), 5, "health NOT_SERVING (noticed)")
    cluster.coordinator.stop()
    assert cluster.coordinator.proc.returncode == 0, cluster.coordinator.output()[-2000:]
    assert "Assertion" not in cluster.coordinator.output()
    proc = subprocess.run([str(COORDINATOR), "--listen", cluster.address, "--data-dir",
                           str(cluster.data_dir), "--store-reserve-mb", str(reserve_mb),
                           "--insecure"],
                          capture_output=True, text=True, timeout=30)
    print("restart on a full disk:", proc.returncode, proc.stderr)
    assert proc.returncode not in (0, -6), proc.returncode  # -6: SIGABRT (an assertion)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"mq-coordinator: data dir {cluster.data_dir} has no room ("), lines
    assert "Assertion" not in proc.stderr + proc.stdout

    # Room made: it starts, the job is there and finishes; nothing acknowledged was lost.
    junk.unlink()
    cluster.start_coordinator()
    assert cluster.job_state(job_id) in {"JOB_STATE_RUNNING"} | TERMINAL
    done = cluster.wait_job(job_id, TERMINAL, timeout=300)
    assert done["job"]["state"] == "JOB_STATE_SUCCEEDED", done["job"]["message"]
    committed = [e for e in done.get("events", []) if e["kind"] == "layer_committed"]
    assert len(committed) == len(done["job"]["plan"]["layers"]), [e["message"] for e in committed]
    check_output_dir(out)
    assert "Assertion" not in cluster.coordinator.output()
