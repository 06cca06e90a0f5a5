"""Ownership and fencing through real processes: one output directory per live job, unique
worker names, a job cancelled while it finalizes leaves no manifest, cancel followed at once by
resume runs one finalizer, and the coordinator's memory bound on ended jobs
(--retain-ended-jobs)."""
import time
from pathlib import Path

import pytest

from mq_cluster import Process, WORKER, wait_until
from quantize_env import check_output_dir, make_model, submit_args


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fenv")
    model, dataset, _ = make_model(tmp, layers=2)
    return {"model": model, "dataset": dataset}


def submit(cluster, env, out, *extra):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], *extra), check=True)
    return res.stdout.strip()


def kinds(job):
    return [e["kind"] for e in job.get("events", [])]


def finalizer_of(cluster, job_id):
    """Name of the worker holding the job's live assignment, or None."""
    for w in cluster.client_json("workers").get("workers", []):
        if w.get("job_id") == job_id:
            return w["worker"]["name"]
    return None


def wait_finalizing(cluster, job_id):
    """Waits until a worker holds the job's FINALIZE assignment; returns that worker's name."""
    def holder():
        job = cluster.job(job_id)["job"]
        if job["state"] != "JOB_STATE_FINALIZING" or "finalizing the output" not in job["message"]:
            return None
        return finalizer_of(cluster, job_id)
    name = wait_until(holder, 120, f"job {job_id} finalizing on a worker", interval=0.05)
    # Delivered: the worker runs it (a cancel before delivery would stop nothing).
    wait_until(lambda: "running finalize assignment" in cluster.workers[name].output(), 20,
               f"{name} running the finalize assignment", interval=0.05)
    return name


def test_cancel_while_finalizing_leaves_no_manifest(cluster, env, tmp_path):
    cluster.start_coordinator()
    w = cluster.start_worker("w1", env={"MQ_FAULT_FINALIZE_DELAY_MS": "3000"})
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    assert wait_finalizing(cluster, job_id) == "w1"
    res = cluster.client("cancel", job_id, "--reason", "changed my mind", check=True)
    assert "CANCELLED" in res.stdout
    # The finalizer comes out of its stall, asks to publish, is refused and writes nothing more.
    wait_until(lambda: "publish refused" in w.output(), 30, "the finalizer's publish refused")
    wait_until(lambda: cluster.worker_state("w1") == "WORKER_STATE_IDLE", 20, "worker idle")
    time.sleep(0.5)
    assert not (out / "manifest.json").exists(), sorted(p.name for p in out.iterdir())
    job = cluster.job(job_id)
    assert job["job"]["state"] == "JOB_STATE_CANCELLED"
    assert job["job"]["message"] == "cancelled by user: changed my mind"
    assert "publishing" not in kinds(job)
    assert not job["job"].get("publishing", False)
    assert "finalized" not in kinds(job)


def test_cancel_then_resume_at_once_runs_one_finalizer(cluster, env, tmp_path):
    cluster.start_coordinator()
    slow = {"MQ_FAULT_FINALIZE_DELAY_MS": "4000"}
    workers = {"w1": cluster.start_worker("w1", env=slow),
               "w2": cluster.start_worker("w2", env=slow)}
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    first = wait_finalizing(cluster, job_id)
    attempt = cluster.job(job_id)["job"]["attempt"]
    cluster.client("cancel", job_id, check=True)
    res = cluster.client("resume", job_id, check=True)
    assert "QUEUED" in res.stdout
    # The cancelled finalizer is still inside its assignment (it ignores cancellation while it
    # stalls, as a finalizer does while writing): no worker gets the job until it is out.
    checks = 0
    deadline = time.monotonic() + 30
    while "publish refused" not in workers[first].output():
        assert time.monotonic() < deadline, "the cancelled finalizer never asked to publish"
        holder = finalizer_of(cluster, job_id)
        attempt_now = cluster.job(job_id)["job"]["attempt"]
        # The worker logs the refusal before it polls again: if the log still lacks it, both
        # observations were made while the old finalizer was inside its assignment.
        if "publish refused" in workers[first].output():
            break
        assert holder is None, "a second finalizer started"
        assert attempt_now == attempt
        checks += 1
        time.sleep(0.1)
    assert checks >= 5, checks  # the window was really observed
    done = cluster.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=120)
    assert kinds(done).count("publishing") == 1, kinds(done)
    assert kinds(done).count("finalized") == 1
    finalizers = [a for a in done["attempts"] if a["phase"] == "finalize"]
    assert len(finalizers) == 2, done["attempts"]
    assert [a["state"] for a in finalizers] == ["ATTEMPT_STATE_ABORTED", "ATTEMPT_STATE_SUCCEEDED"]
    check_output_dir(out)  # every file listed with its hash, nothing else
    for w in workers.values():
        assert "rename" not in w.output(), w.output()


def test_overlapping_outputs_of_live_jobs_are_refused(cluster, env, tmp_path):
    cluster.start_coordinator()  # no workers: the jobs stay QUEUED (live)
    out = tmp_path / "out"
    first = submit(cluster, env, out)
    for other, relation in [(out, "is the output"), (out / "sub", "lies inside the output"),
                            (tmp_path, "contains the output")]:
        res = cluster.client(*submit_args(env["model"], other, env["dataset"]))
        assert res.returncode == 1, res.stdout
        assert f"spec.output_uri = {other} {relation} {out} of job {first} (QUEUED)" in res.stderr
        assert "choose another directory or wait for that job to end" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    sibling = submit(cluster, env, tmp_path / "out2")  # a shared prefix is not an overlap
    assert sibling != first
    assert len(cluster.client_json("list")["jobs"]) == 2
    # Once the first job ended, its output may be used (the worker then decides whether the
    # files there are its own).
    cluster.client("cancel", first, check=True)
    assert submit(cluster, env, out / "sub")


def test_duplicate_worker_name_is_refused(cluster, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    holder = cluster.worker_entry("w1")["worker"]["worker_id"]
    dup = Process("dup", [str(WORKER), "--coordinator", cluster.address, "--name", "w1",
                          "--scratch-dir", str(tmp_path / "scratch-dup"), "--gang-port", "-1",
                          "--insecure"],
                  tmp_path / "worker-dup.log")
    try:
        wait_until(lambda: not dup.alive(), 30, "the duplicate worker exits")
        assert dup.proc.returncode != 0
        log = dup.output()
        assert f'worker name "w1" is held by live worker {holder}, registered from host' in log
    finally:
        dup.stop()
    names = [w["worker"]["name"] for w in cluster.client_json("workers")["workers"]]
    assert names == ["w1"]
    assert cluster.worker_state("w1") == "WORKER_STATE_IDLE"


def test_retain_ended_jobs_bounds_what_list_shows(cluster, env, tmp_path):
    cluster.coordinator_args = ["--retain-ended-jobs", "1"]
    cluster.start_coordinator()
    ids = [submit(cluster, env, tmp_path / f"out{i}") for i in range(3)]
    for job_id in ids[:2]:
        cluster.client("cancel", job_id, check=True)
        time.sleep(0.02)
    wait_until(lambda: len(cluster.client_json("list")["jobs"]) == 2, 10, "eviction")
    assert [j["job_id"] for j in cluster.client_json("list")["jobs"]] == [ids[2], ids[1]]
    # The evicted job is read from the store, also after a restart.
    assert cluster.job_state(ids[0]) == "JOB_STATE_CANCELLED"
    cluster.kill_coordinator()
    cluster.start_coordinator()
    assert [j["job_id"] for j in cluster.client_json("list")["jobs"]] == [ids[2], ids[1]]
    assert "submitted" in kinds(cluster.job(ids[0]))
    res = cluster.client("resume", ids[0], check=True)
    assert "QUEUED" in res.stdout
    assert ids[0] in [j["job_id"] for j in cluster.client_json("list")["jobs"]]


@pytest.mark.parametrize("value", ["-1", "10x", "0h", "", "1.5h"])
def test_retain_ended_jobs_rejects_bad_values(tmp_path, value):
    import subprocess
    from mq_cluster import COORDINATOR
    res = subprocess.run([str(COORDINATOR), "--data-dir", str(tmp_path / "d"),
                          "--retain-ended-jobs", value], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2, res.stderr
    assert f'--retain-ended-jobs = "{value}"' in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
