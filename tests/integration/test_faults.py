"""Faults that must end a job with a readable error in bounded time, never kill a worker or loop:
a model shard truncated while a job reads it (once SIGBUS, no log line, "no heartbeat"), and a
gang whose rendezvous address cannot be reached (once retried forever, each event carrying
kilobytes of C++ stack frames)."""
import json
import struct
import time
from pathlib import Path

import pytest

from mq_cluster import free_port, wait_until
from quantize_env import make_model, submit_args

EVENT_CAP = 1024  # common/error_text.h kMaxEventMessageBytes


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fenv")
    model, dataset, _ = make_model(tmp)
    return {"tmp": tmp, "model": model, "dataset": dataset}


def submit(cluster, env, out, *extra):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], *extra), check=True)
    return res.stdout.split()[0]


def events(job):
    return job.get("events", [])


def assert_clean_events(job):
    for e in events(job):
        msg = e.get("message", "")
        assert len(msg.encode()) <= EVENT_CAP, msg
        assert "frame #" not in msg and "Exception raised from" not in msg, msg


def shard_of(model, tensor):
    index = json.loads((Path(model) / "model.safetensors.index.json").read_text())
    return Path(model) / index["weight_map"][tensor]


def test_shard_truncated_while_mapped_fails_the_job_naming_it(cluster, env, tmp_path):
    # A private copy of the checkpoint: this test damages it.
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(env["model"]).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    shard = shard_of(model, "model.layers.1.self_attn.o_proj.weight")
    (header_len,) = struct.unpack("<Q", shard.read_bytes()[:8])

    cluster.start_coordinator()
    # Each layer finishes (write and report) before the next starts, and the worker pauses after
    # each report: the test truncates the shard while the worker holds it mapped (layer 1's
    # tensors were prefetched during layer 0) and before layer 1 is loaded.
    cluster.worker_args = ["--overlap-writes=false"]
    worker = cluster.start_worker("w1", env={"MQ_FAULT_STEP_DELAY_MS": "4000"})
    cluster.worker_args = []
    env_model = dict(env, model=model)
    job_id = submit(cluster, env_model, tmp_path / "out", "--max-attempts", 1)
    wait_until(lambda: cluster.job(job_id)["job"].get("progress", {}).get("layers_committed", 0)
               >= 1 or cluster.job_state(job_id) == "JOB_STATE_FAILED", 120, "layer 0 committed")
    assert cluster.job_state(job_id) != "JOB_STATE_FAILED", cluster.job(job_id)
    with open(shard, "r+b") as f:
        f.truncate(8 + header_len)  # every tensor's bytes gone
    started = time.monotonic()

    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=60)
    message = done["job"]["message"]
    print(f"failed {time.monotonic() - started:.1f} s after the truncation: {message}")
    assert f"model shard {shard} shrank or became unreadable while reading tensor" in message, \
        message
    assert time.monotonic() - started < 30
    assert_clean_events(done)
    # The worker logged it and is still alive and registered, ready for more work.
    assert worker.alive(), worker.output()[-3000:]
    assert str(shard) in worker.output()
    wait_until(lambda: cluster.worker_state("w1") == "WORKER_STATE_IDLE", 30, "w1 idle again")

    # Resumed on the truncated shard: refused when the shard is opened, naming both sizes.
    cluster.client("resume", job_id, check=True)
    wait_until(lambda: cluster.job(job_id)["job"]["attempt"] > done["job"]["attempt"], 30,
               "a new attempt")
    again = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=60)["job"]["message"]
    assert str(shard) in again and f"file is {8 + header_len} bytes but its header needs" in \
        again, again
    assert worker.alive()


def test_unreachable_rendezvous_fails_in_bounded_time_naming_the_address(cluster, env, tmp_path):
    # Rank 0 advertises an address nobody can reach. No IP address is reliably unreachable on
    # every test machine (loopback-only ones fail fast; some sandboxes route every address to a
    # proxy that answers), so the address is a name under .invalid (RFC 6761: never resolves),
    # which fails the same way, at once and deterministically: peers cannot connect to it. A
    # worker refuses such a --gang-host at start-up (it must listen there), so the advertised
    # address comes from the fault-injection knob; the worker still listens on 127.0.0.1.
    cluster.start_coordinator()
    host = "rendezvous.invalid"
    for name in ("w1", "w2"):
        cluster.worker_args = ["--gang-port", str(free_port()), "--gang-join-timeout-ms", "1000"]
        cluster.start_worker(name, env={"MQ_FAULT_GANG_ADVERTISE_HOST": host})
    cluster.worker_args = []
    started = time.monotonic()
    job_id = submit(cluster, env, tmp_path / "out", "--gang-size", 2, "--max-attempts", 2)
    done = cluster.wait_job(job_id, "JOB_STATE_FAILED", timeout=60)
    elapsed = time.monotonic() - started
    job = done["job"]
    message = job["message"]
    print(f"failed after {elapsed:.1f} s, attempt {job['attempt']}: {message}")
    assert elapsed < 60
    assert "the same infrastructure failure 3 times in a row" in message, message
    assert f"cannot join gang at {host}:" in message, message
    assert "--gang-host/--gang-port" in message, message
    # Three attempts, backing off between them, and no more.
    attempt_failed = [e for e in events(done) if e["kind"] == "attempt_failed"]
    assert len(attempt_failed) == 3, [e["message"] for e in attempt_failed]
    retries = [e["message"] for e in events(done) if "retrying in" in e.get("message", "")]
    assert any("retrying in 1 s" in m for m in retries), retries
    assert any("retrying in 2 s" in m for m in retries), retries
    assert_clean_events(done)
    # The workers' logs keep the full detail; both are alive and idle.
    for name in ("w1", "w2"):
        w = cluster.workers[name]
        assert w.alive(), w.output()[-3000:]
        wait_until(lambda: cluster.worker_state(name) == "WORKER_STATE_IDLE", 30, f"{name} idle")
    assert any(f"cannot join gang at {host}:" in cluster.workers[n].output() for n in ("w1", "w2"))
