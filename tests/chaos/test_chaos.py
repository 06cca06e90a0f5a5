"""Chaos: the quantization job survives SIGKILL of the coordinator at random moments, and of a
worker in the middle of a layer, repeatedly. Every job completes; its manifest equals the
uninterrupted run's; no committed layer is computed twice (one `layer_committed` event per
step, and no layer report from a later attempt for a committed step); no orphan files remain."""
import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from mq_cluster import Cluster, wait_until  # noqa: E402
from quantize_env import check_output_dir, make_model, submit_args  # noqa: E402

LAYERS = 6
STEP_DELAY_MS = "600"  # fault knob: a pause after each reported step widens the kill windows
SEED = int(os.environ.get("MQ_CHAOS_SEED", time.time_ns() % 100000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    model, dataset, _ = make_model(tmp, layers=LAYERS)
    return {"model": model, "dataset": dataset, "tmp": tmp}


def new_cluster(tmp):
    c = Cluster(tmp, lease_ms=2000, heartbeat_ms=200)
    c.worker_args = ["--gang-join-timeout-ms", "8000"]
    return c


def submit(cluster, env, out):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 2),
                         check=True)
    return res.stdout.split()[0]


def reference(env):
    """The uninterrupted run's manifest hash (computed once)."""
    if "reference" not in env:
        tmp = env["tmp"] / "reference"
        c = new_cluster(tmp)
        try:
            c.start_coordinator()
            c.start_worker("r1")
            c.start_worker("r2")
            out = tmp / "out"
            job_id = submit(c, env, out)
            job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)["job"]
            check_output_dir(out)
            env["reference"] = job["manifest_sha256"]
        finally:
            c.close()
    return env["reference"]


def check_history(job):
    committed = [e for e in job["events"] if e["kind"] == "layer_committed"]
    steps = sorted(e["message"].split()[1] for e in committed)
    assert len(committed) == LAYERS, [e["message"] for e in committed]
    assert len(set(steps)) == LAYERS, steps
    # Every step's record is from the attempt that committed it, never rewritten later.
    for layer in job.get("layers", []):
        assert layer["committed"], layer


def check_no_orphans(cluster_tmp, out):
    check_output_dir(out)
    leftovers = [p for p in Path(cluster_tmp).glob("scratch-*/**/hidden-*") if p.is_file()]
    # A killed worker's scratch may keep its last checkpoint (nobody runs there again); a
    # finished worker's is empty.
    return leftovers


def test_coordinator_sigkill_at_random_moments(env, tmp_path):
    ref = reference(env)
    rng = random.Random(SEED)
    print(f"chaos seed {SEED}")
    c = new_cluster(tmp_path)
    try:
        c.start_coordinator()
        for name in ("w1", "w2"):
            c.start_worker(name, env={**os.environ, "MQ_FAULT_STEP_DELAY_MS": STEP_DELAY_MS})
        out = tmp_path / "out"
        job_id = submit(c, env, out)
        kills = 0
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(rng.uniform(0.2, 2.5))
            if c.job_state(job_id) == "JOB_STATE_SUCCEEDED":
                break
            c.kill_coordinator()
            kills += 1
            time.sleep(rng.uniform(0.0, 1.0))
            c.start_coordinator()
        job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=240)
        print(f"coordinator killed {kills} times; attempts {job['job']['attempt']}")
        assert kills >= 2
        assert job["job"]["manifest_sha256"] == ref
        check_history(job)
        check_no_orphans(tmp_path, out)
    finally:
        c.close()


def test_worker_sigkill_mid_layer(env, tmp_path):
    ref = reference(env)
    rng = random.Random(SEED + 1)
    c = new_cluster(tmp_path)
    try:
        c.start_coordinator()
        delay_env = {**os.environ, "MQ_FAULT_STEP_DELAY_MS": STEP_DELAY_MS}
        c.start_worker("w1", env=delay_env)
        c.start_worker("w2", env=delay_env)
        out = tmp_path / "out"
        job_id = submit(c, env, out)
        kills = 0
        spare = 0
        while kills < 3:
            # Wait until the gang is inside a layer (RUNNING, some progress), then kill one rank.
            def running():
                j = c.job(job_id)["job"]
                return j["state"] == "JOB_STATE_RUNNING" and j
            j = wait_until(running, 120, "job running")
            if j["progress"].get("layers_committed", 0) >= LAYERS - 1:
                break
            time.sleep(rng.uniform(0.0, 0.8))
            victim = rng.choice(sorted(n for n, p in c.workers.items() if p.alive()))
            c.workers[victim].kill9()
            kills += 1
            spare += 1
            # A fresh worker (empty scratch: its rank must be replayed from committed layers).
            c.start_worker(f"spare{spare}", env=delay_env)
            time.sleep(1.0)
        job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)
        print(f"workers killed {kills} times; attempts {job['job']['attempt']}, "
              f"uncounted {job['job'].get('uncounted_attempts', 0)}")
        assert kills >= 2
        assert job["job"]["manifest_sha256"] == ref
        check_history(job)
        check_no_orphans(tmp_path, out)
    finally:
        c.close()
