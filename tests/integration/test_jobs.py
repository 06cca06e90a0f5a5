"""Jobs through real processes: submit, plan, crash recovery, leases, cancel/resume,
idempotency and request validation, all driven with mq-client."""

import json
import time

import pytest

from mq_cluster import generate_model, wait_until

MISSING_CAPABILITY = 'no live worker offers capability "quantize:gptq"'


@pytest.fixture
def model(tmp_path):
    return generate_model(tmp_path / "model", "--format", "fp8", "--seed", "7")


@pytest.fixture(autouse=True)
def planning_only_workers(cluster):
    # These tests are about the job lifecycle up to the plan: workers without the quantize
    # pipeline (--gang-port -1) so a planned job stops on the missing capability.
    cluster.worker_args = ["--gang-port", "-1"]


def submit(cluster, model, out, *extra):
    res = cluster.client("submit", "--model", model, "--output", out, *extra, check=True)
    return res.stdout.strip()


def events(job):
    return job.get("events", [])


def test_submit_plans_for_real_then_stops_on_missing_capability(cluster, model, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    res = cluster.client("submit", "--model", model, "--output", tmp_path / "out", "--wait")
    assert res.returncode == 1
    job_id = res.stdout.split()[0]
    # The failure is said once: one line on stderr, not again on stdout.
    assert "FAILED" not in res.stdout and MISSING_CAPABILITY not in res.stdout, res.stdout
    assert res.stderr.count(MISSING_CAPABILITY) == 1, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"job {job_id} ended FAILED: planning succeeded (3 steps" in res.stderr
    job = cluster.job(job_id)["job"]
    assert job["missing_capability"] == "quantize:gptq"
    # The plan the worker computed is kept with the job.
    assert job["plan"]["summary"]["weight_format"] == "fp8"
    assert len(job["plan"]["layers"]) == 3
    assert job["progress"]["layers_total"] == 3
    kinds = [e["kind"] for e in events(cluster.job(job_id))]
    assert kinds == ["submitted", "assigned", "state", "planned", "state"]
    # Human output names the state and the reason.
    human = cluster.client("status", job_id, check=True).stdout
    assert "State:        FAILED" in human and "Missing:      quantize:gptq" in human
    assert "History:" in human and "planning on worker" in human


def test_broken_checkpoint_fails_job_with_every_problem(cluster, tmp_path):
    model = generate_model(tmp_path / "broken", "--defect",
                           "missing-scale=model.layers.1.self_attn.o_proj.weight")
    cluster.start_coordinator()
    cluster.start_worker("w1")
    job_id = submit(cluster, model, tmp_path / "out")
    job = cluster.wait_job(job_id, "JOB_STATE_FAILED")["job"]
    assert "the checkpoint check found 1 problem" in job["message"]
    assert "model.layers.1.self_attn.o_proj.weight" in job["message"]
    assert job["missing_capability"] == ""


def test_coordinator_sigkill_between_submit_and_completion(cluster, model, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("slow", env={"MQ_FAULT_PLAN_DELAY_MS": "3000"})
    job_id = submit(cluster, model, tmp_path / "out", "--idempotency-key", "crash-1")
    cluster.wait_job(job_id, "JOB_STATE_PLANNING", timeout=20)
    before = cluster.job(job_id)
    cluster.kill_coordinator()
    cluster.start_coordinator()

    # Everything acknowledged before the crash is there.
    after = cluster.job(job_id)
    assert after["job"]["job_id"] == job_id
    assert after["job"]["state"] == "JOB_STATE_PLANNING"
    assert after["job"]["spec"] == before["job"]["spec"]
    assert events(after)[: len(events(before))] == events(before)
    listed = cluster.client_json("list")["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]
    # The same idempotency key still names the same job after the restart.
    again = cluster.client("submit", "--model", model, "--output", tmp_path / "out",
                           "--idempotency-key", "crash-1", check=True)
    assert again.stdout.strip() == job_id

    # The worker keeps its id, finishes its planning and reports to the new coordinator:
    # the work is not redone (one attempt, one assignment).
    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=30)
    assert MISSING_CAPABILITY in done["job"]["message"]
    assert done["job"]["attempt"] == 1
    assert [a["state"] for a in done["attempts"]] == ["ATTEMPT_STATE_SUCCEEDED"]
    seqs = [int(e["seq"]) for e in events(done)]
    assert seqs == list(range(len(seqs)))
    assert [e["kind"] for e in events(done)].count("assigned") == 1


def test_coordinator_sigkill_repeatedly_keeps_every_job(cluster, model, tmp_path):
    cluster.start_coordinator()
    ids = []
    for round_ in range(3):
        ids.append(submit(cluster, model, tmp_path / f"out{round_}"))
        cluster.kill_coordinator()
        cluster.start_coordinator()
    listed = [j["job_id"] for j in cluster.client_json("list")["jobs"]]
    assert listed == list(reversed(ids))
    for job_id in ids:
        assert cluster.job_state(job_id) == "JOB_STATE_QUEUED"
    cluster.start_worker("w1")
    for job_id in ids:
        cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=30)


def test_silent_worker_is_declared_dead_and_its_work_reassigned(cluster, model, tmp_path):
    cluster.start_coordinator()
    slow = cluster.start_worker("first", env={"MQ_FAULT_PLAN_DELAY_MS": "4000"})
    cluster.start_worker("second")
    job_id = submit(cluster, model, tmp_path / "out")
    wait_until(lambda: (cluster.worker_entry("first") or {}).get("job_id") == job_id, 20,
               "job assigned to the first worker")
    slow.pause()  # SIGSTOP: no heartbeats, no progress
    paused_at = time.monotonic()
    wait_until(lambda: cluster.worker_state("first") == "WORKER_STATE_DEAD", 15, "declared dead")
    detected_after = time.monotonic() - paused_at
    # Declared dead within its lease (plus the scheduler's tick and polling slack).
    assert detected_after < cluster.lease_ms / 1000 + 1.5, detected_after

    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=30)
    assert MISSING_CAPABILITY in done["job"]["message"]
    assert done["job"]["attempt"] == 2
    first, second = done["attempts"]
    assert first["state"] == "ATTEMPT_STATE_ABORTED" and "no heartbeat" in first["message"]
    assert second["state"] == "ATTEMPT_STATE_SUCCEEDED"
    second_id = cluster.worker_entry("second")["worker"]["worker_id"]
    assert second["worker_ids"] == [second_id]
    assert "lease_expired" in [e["kind"] for e in events(done)]

    # The zombie wakes up: its late result is refused and it rejoins as a live worker.
    slow.resume()
    wait_until(lambda: "not accepted" in slow.output() or "abandoned" in slow.output(), 20,
               "the stale worker notices")
    wait_until(lambda: cluster.worker_state("first") == "WORKER_STATE_IDLE", 20, "worker back")
    assert cluster.job(job_id)["job"]["attempt"] == 2


def test_cancel_and_resume(cluster, model, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1", env={"MQ_FAULT_PLAN_DELAY_MS": "2000"})
    job_id = submit(cluster, model, tmp_path / "out")
    cluster.wait_job(job_id, "JOB_STATE_PLANNING")
    res = cluster.client("cancel", job_id, "--reason", "wrong model", check=True)
    assert "CANCELLED" in res.stdout
    job = cluster.job(job_id)
    assert job["job"]["message"] == "cancelled by user: wrong model"
    assert job["attempts"][0]["state"] == "ATTEMPT_STATE_ABORTED"
    again = cluster.client("cancel", job_id)
    assert again.returncode == 1 and "already ended (CANCELLED)" in again.stderr
    # The worker is told to stop and becomes free again.
    wait_until(lambda: cluster.worker_state("w1") == "WORKER_STATE_IDLE", 20, "worker idle")

    res = cluster.client("resume", job_id, check=True)
    assert "QUEUED" in res.stdout
    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=30)
    assert done["job"]["attempt"] == 2
    bad = cluster.client("resume", "j-00000000000000000000000000")
    assert bad.returncode == 1 and "not found" in bad.stderr


def test_watch_follows_a_job_to_its_end(cluster, model, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1", env={"MQ_FAULT_PLAN_DELAY_MS": "1000"})
    job_id = submit(cluster, model, tmp_path / "out")
    res = cluster.client("watch", job_id, timeout=60)
    assert res.returncode == 1  # the job ends FAILED (missing capability)
    for text in ("submitted", "planning on worker", "planned"):
        assert text in res.stdout, res.stdout
    assert MISSING_CAPABILITY not in res.stdout, res.stdout  # said once, on stderr
    assert res.stderr.count(MISSING_CAPABILITY) == 1, res.stderr
    lines = cluster.client("watch", job_id, "--json").stdout.strip().splitlines()
    assert json.loads(lines[0])["job"]["job_id"] == job_id


def test_idempotent_submit(cluster, model, tmp_path):
    cluster.start_coordinator()
    out = tmp_path / "out"
    a = submit(cluster, model, out, "--idempotency-key", "k1")
    b = submit(cluster, model, out, "--idempotency-key", "k1")
    assert a == b
    res = cluster.client("submit", "--model", model, "--output", out, "--group-size", "64",
                         "--idempotency-key", "k1")
    assert res.returncode == 1
    assert "already exists" in res.stderr and "idempotency_key" in res.stderr and a in res.stderr
    assert len(cluster.client_json("list")["jobs"]) == 1


@pytest.mark.parametrize("args,field", [
    (["--group-size", "96"], "spec.group_size = 96"),
    (["--bits", "8"], "spec.bits = 8"),
    (["--gang-size", "-2"], "spec.gang_size = -2"),
    (["--gang-size", "5000"], "spec.gang_size = 5000"),
    (["--damping", "2"], "spec.damping = 2"),
    (["--damping", "-0.5"], "spec.damping = -0.5"),
    (["--ignore", "(unclosed"], "spec.ignore[0]"),
    (["--num-calibration-samples", "-1"], "spec.calibration.num_samples = -1"),
    (["--max-sequence-length", "99999999"], "spec.calibration.max_sequence_length"),
    (["--max-attempts", "1000"], "spec.max_attempts = 1000"),
    (["--priority", "5000"], "spec.priority = 5000"),
    (["--idempotency-key", "has space"], "idempotency_key"),
    (["--dataset", "s3://Bad_Bucket/data.jsonl"], "spec.calibration.dataset_uri"),
    (["--method", "awq", "--awq-grid", "101"],
     "spec.awq.grid = 101: must be in [0, 100] (0 keeps only s = 1)"),
    (["--method", "awq-gptq", "--awq-tokens", "-1"],
     "spec.awq.max_tokens = -1: must be in [1, 16777216] (0 means 32768)"),
    (["--awq-grid", "5"],
     "spec.awq = {grid: 5}: applies to methods awq and awq-gptq only (spec.method is gptq)"),
    (["--min-expert-tokens", "-3"], "spec.calibration.min_expert_tokens = -3"),
    (["--min-expert-tokens", "-1", "--rare-expert-rtn"], "spec.calibration.rare_expert_rtn"),
])
def test_invalid_submit_names_the_field(cluster, model, tmp_path, args, field):
    cluster.start_coordinator()
    res = cluster.client("submit", "--model", model, "--output", tmp_path / "out", *args)
    assert res.returncode == 1, res.stdout
    assert res.stderr.startswith("mq-client: submit: invalid argument: ")
    assert field in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert cluster.client_json("list").get("jobs", []) == []  # refused before queueing
    assert cluster.coordinator.alive()


def test_awq_submit_fills_its_defaults(cluster, model, tmp_path):
    """AWQ jobs are accepted with their defaults (no act-order: AWQ rounds its scaled weights
    with RTN); awq-gptq keeps act-order and the settings given."""
    cluster.start_coordinator()  # no worker: the jobs stay queued
    awq = cluster.job(submit(cluster, model, tmp_path / "awq", "--method", "awq"))["job"]
    assert awq["spec"]["method"] == "METHOD_AWQ"
    assert awq["spec"]["act_order"] is False
    assert awq["spec"]["awq"] == {"grid": 20, "max_tokens": "32768"}
    job_id = submit(cluster, model, tmp_path / "awq-gptq", "--method", "awq-gptq", "--awq-grid",
                    "0", "--awq-tokens", "4096")
    awq_gptq = cluster.job(job_id)["job"]
    assert awq_gptq["spec"]["method"] == "METHOD_AWQ_GPTQ"
    assert awq_gptq["spec"]["act_order"] is True
    assert awq_gptq["spec"]["awq"] == {"grid": 0, "max_tokens": "4096"}
    human = cluster.client("status", job_id, check=True).stdout
    assert "Method:       awq-gptq 4-bit, group 128, symmetric, act-order" in human, human
    assert ("AWQ:          grid 0 (only s = 1), scale search on up to 4096 tokens per layer"
            in human), human
    listed = cluster.client("list", check=True).stdout
    assert "awq-gptq" in listed and " awq " in listed, listed
    gptq = cluster.job(submit(cluster, model, tmp_path / "gptq"))["job"]
    assert "awq" not in gptq["spec"]  # cleared for the other methods


def test_tf32_update_is_stored_for_gptq_solves_only(cluster, model, tmp_path):
    """--tf32-update is a setting of the GPTQ solve: on by default and shown for gptq and
    awq-gptq, off when asked (--tf32-update=false), stored false for RTN and AWQ (no GPTQ
    solve) even when asked for."""
    cluster.start_coordinator()  # no worker: the jobs stay queued
    for i, args in enumerate(([], ["--tf32-update"], ["--method", "awq-gptq"])):
        job_id = submit(cluster, model, tmp_path / f"on{i}", *args)
        assert cluster.job(job_id)["job"]["spec"]["tf32_update"] is True, args
    human = cluster.client("status", job_id, check=True).stdout
    assert "TF32 update" in human, human
    job_id = submit(cluster, model, tmp_path / "fp32", "--tf32-update=false")
    assert cluster.job(job_id)["job"]["spec"]["tf32_update"] is False
    human = cluster.client("status", job_id, check=True).stdout
    assert "Method:       gptq 4-bit, group 128, symmetric, act-order, gang size" in human, human
    cases = (["--method", "rtn", "--tf32-update"], ["--method", "awq", "--tf32-update"],
             ["--method", "rtn"])
    for i, args in enumerate(cases):
        spec = cluster.job(submit(cluster, model, tmp_path / f"out{i}", *args))["job"]["spec"]
        assert spec["tf32_update"] is False, (args, spec)
    # A value that is neither true nor false is refused by the client, naming it; no job is made.
    before = cluster.client("list", check=True).stdout
    res = cluster.client("submit", "--model", model, "--output", tmp_path / "bad",
                         "--tf32-update=maybe")
    assert res.returncode != 0
    assert '--tf32-update = "maybe": must be true or false' in res.stderr, res.stderr
    assert cluster.client("list", check=True).stdout == before


def test_output_inside_model_is_refused(cluster, model):
    cluster.start_coordinator()
    res = cluster.client("submit", "--model", model, "--output", model / "out")
    assert res.returncode == 1 and "spec.output_uri" in res.stderr
    assert "inside" in res.stderr


def test_client_usage_errors(cluster, model, tmp_path):
    cluster.start_coordinator()
    cases = [
        (["submit", "--output", tmp_path], "--model DIR is required"),
        (["submit", "--model", model, "--output", tmp_path, "--method", "foo"], "--method"),
        (["submit", "--model", model, "--output", tmp_path, "--bits", "x"], "must be an integer"),
        (["status"], "exactly one job id"),
        (["list", "--state", "bogus"], "--state"),
        (["frobnicate"], "unknown command"),
        (["status", "j-1", "--nope"], "unknown option --nope"),
    ]
    for args, text in cases:
        res = cluster.client(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert text in res.stderr, (args, res.stderr)
    res = cluster.client("status", "not-a-job")
    assert res.returncode == 1 and "job_id" in res.stderr and "not-a-job" in res.stderr


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
    import subprocess
    from mq_cluster import CLIENT
    res = subprocess.run([str(CLIENT), "--coordinator", "127.0.0.1:1", "--timeout", "2", "--insecure",
                          "list"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "unavailable" in res.stderr or "deadline" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value,allowed", [
    ("--dispatch-tokens", "-1", "auto (chosen by the plan), 0 (all at once) or a positive token "
     "count"),
    ("--cpu-threads", "-2", "between 0 (automatic) and 4096"),
    ("--experts-per-pass", "5000", "auto (chosen by the plan), 0 (all) or 1..4096"),
    ("--experts-per-pass", "many", "auto (chosen by the plan), 0 (all) or 1..4096"),
    ("--checkpoint-every", "-1", "between 0 (chosen by the cost model) and 100000"),
    ("--profile-layers", "3,x", "must be comma-separated layer numbers (0..100000)"),
    ("--profile-layers", "-1", "must be comma-separated layer numbers (0..100000)"),
])
def test_worker_rejects_bad_flags(tmp_path, flag, value, allowed):
    import subprocess
    from mq_cluster import WORKER
    res = subprocess.run([str(WORKER), "--coordinator", "127.0.0.1:1", "--scratch-dir",
                          str(tmp_path), "--insecure", flag, value], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"{flag} = {value}" in res.stderr and allowed in res.stderr, res.stderr


def test_worker_profile_layers_need_an_existing_directory(tmp_path):
    import subprocess
    from mq_cluster import WORKER
    for extra in ([], ["--profile-dir", str(tmp_path / "absent")]):
        res = subprocess.run([str(WORKER), "--coordinator", "127.0.0.1:1", "--scratch-dir",
                              str(tmp_path), "--insecure", "--profile-layers", "3"] + extra,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert "--profile-layers needs --profile-dir, an existing directory" in res.stderr, \
            res.stderr


@pytest.mark.parametrize("flag", ["--overlap-writes", "--prefetch-next-layer",
                                  "--stage-next-layer", "--overlap-transfers"])
def test_worker_rejects_bad_switch_values(tmp_path, flag):
    import subprocess
    from mq_cluster import WORKER
    res = subprocess.run([str(WORKER), "--coordinator", "127.0.0.1:1", "--scratch-dir",
                          str(tmp_path), "--insecure", f"{flag}=maybe"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0
    assert f'{flag} = "maybe": must be true or false' in res.stderr, res.stderr


def test_health_workers_and_list(cluster, model, tmp_path):
    cluster.start_coordinator()
    assert cluster.client("health", check=True).stdout.strip() == "SERVING"
    cluster.start_worker("gpu-less")
    human = cluster.client("workers", check=True).stdout
    assert "gpu-less" in human and "IDLE" in human and "cpu" in human
    entry = cluster.worker_entry("gpu-less")
    assert int(entry["worker"]["capabilities"]["host_memory_bytes"]) > 0
    assert "plan" in entry["worker"]["capabilities"]["capabilities"]
    job_id = submit(cluster, model, tmp_path / "out")
    cluster.wait_job(job_id, "JOB_STATE_FAILED")
    assert job_id in cluster.client("list", check=True).stdout
    only_queued = cluster.client_json("list", "--state", "queued")
    assert only_queued.get("jobs", []) == []


def test_worker_sigkill_mid_assignment_goes_to_a_new_worker(cluster, model, tmp_path):
    cluster.start_coordinator()
    doomed = cluster.start_worker("doomed", env={"MQ_FAULT_PLAN_DELAY_MS": "30000"})
    job_id = submit(cluster, model, tmp_path / "out")
    wait_until(lambda: (cluster.worker_entry("doomed") or {}).get("job_id") == job_id, 20,
               "job assigned")
    doomed.kill9()
    cluster.start_worker("replacement")
    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=30)
    assert MISSING_CAPABILITY in done["job"]["message"]
    assert [a["state"] for a in done["attempts"]] == ["ATTEMPT_STATE_ABORTED",
                                                      "ATTEMPT_STATE_SUCCEEDED"]
    assert cluster.worker_state("doomed") == "WORKER_STATE_DEAD"
