"""Bounded work per client, with real processes: 1,000 WatchJob streams held open by one
client (mq-watch-load) while a quantization job runs. Open watches hold no server thread, so
the other RPCs keep being answered within a second, the job's worker keeps its lease and the
job succeeds; beyond --max-watch-streams a watch is refused with RESOURCE_EXHAUSTED."""
import json
import subprocess
import time

import pytest

from mq_cluster import WATCH_LOAD, wait_until
from quantize_env import make_model, submit_args

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounded")
    model, dataset, _ = make_model(tmp, layers=4)
    return {"model": model, "dataset": dataset}


def start_load(cluster, job_id, streams, hold_seconds):
    return subprocess.Popen([str(WATCH_LOAD), "--coordinator", cluster.address, "--job", job_id,
                             "--streams", str(streams), "--hold-seconds", str(hold_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_line(proc):
    line = proc.stdout.readline()
    assert line, f"mq-watch-load ended early: {proc.stderr.read()}"
    return json.loads(line)


def test_thousand_watchers_while_a_job_runs(cluster, env, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1", env={"MQ_FAULT_STEP_DELAY_MS": "1500"})
    res = cluster.client(*submit_args(env["model"], tmp_path / "out", env["dataset"]), check=True)
    job_id = res.stdout.strip()
    cluster.wait_job(job_id, "JOB_STATE_RUNNING", timeout=120)

    load = start_load(cluster, job_id, 1000, 600)
    try:
        first = read_line(load)
        print("watchers:", first)
        # Every watch is served (the callback API holds no thread per stream).
        assert first["accepted"] == 1000 and first["refused"] == 0 and first["other"] == 0, first
        # While they are open, other clients are answered within a second, until the job ends.
        slowest = {}
        rounds = 0
        while cluster.job_state(job_id) not in TERMINAL and rounds < 200:
            rounds += 1
            for args in (["status", job_id], ["list"], ["workers"], ["health"]):
                start = time.monotonic()
                r = cluster.client(*args, timeout=30)
                secs = time.monotonic() - start
                assert r.returncode == 0, f"mq-client {args}: {r.stderr}"
                slowest[args[0]] = max(slowest.get(args[0], 0.0), secs)
            time.sleep(0.2)
        print(f"slowest answers over {rounds} rounds with 1000 watchers: {slowest}")
        assert rounds >= 2, "the job ended before the watchers were checked"
        assert max(slowest.values()) < 1.0, slowest
        done = cluster.wait_job(job_id, TERMINAL, timeout=300)
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert done["job"]["state"] == "JOB_STATE_SUCCEEDED", done["job"]["message"]
    kinds = [e["kind"] for e in done.get("events", [])]
    assert "lease_expired" not in kinds, kinds
    # One attempt per phase (plan, quantize, finalize, evaluate), none lost or retried.
    assert [a["state"] for a in done["attempts"]] == ["ATTEMPT_STATE_SUCCEEDED"] * 4, \
        done["attempts"]
    # Every watcher saw the job end and its stream closed normally.
    second = json.loads(out.strip().splitlines()[-1])
    print("watchers at the end:", second)
    assert second["ended_ok"] == 1000 and second["saw_terminal"] == 1000, (second, err)


def test_watches_beyond_the_limit_are_refused(cluster, env, tmp_path):
    cluster.coordinator_args = ["--max-watch-streams", "50"]
    cluster.start_coordinator()
    res = cluster.client(*submit_args(env["model"], tmp_path / "out", env["dataset"]), check=True)
    job_id = res.stdout.strip()  # no worker: the job stays QUEUED
    load = start_load(cluster, job_id, 80, 1)
    try:
        first = read_line(load)
        assert first["accepted"] == 50 and first["refused"] == 30 and first["other"] == 0, first
        assert "too many open WatchJob streams (50" in first["refused_message"], first
        assert "--max-watch-streams" in first["refused_message"]
        # The refused ones cost nothing: a user's own watch waits for a free slot.
        r = cluster.client("status", job_id, check=True)
        assert "QUEUED" in r.stdout
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    second = json.loads(out.strip().splitlines()[-1])
    assert second["cancelled"] == 50, second
    # The slots are free again once the watchers went away.
    wait_until(lambda: run_load(cluster, job_id, 50)["accepted"] == 50, 20, "50 slots free again")


def run_load(cluster, job_id, streams):
    load = start_load(cluster, job_id, streams, 1)
    try:
        first = read_line(load)
        load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    return first
