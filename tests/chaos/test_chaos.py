"""Chaos: the quantization job survives SIGKILL of the coordinator at random moments, and of a
worker in the middle of a layer, repeatedly. Every job completes; its manifest equals the
uninterrupted run's; no committed layer is computed twice (one `layer_committed` event per
step, and no layer report from a later attempt for a committed step); no orphan files remain.
In the corruption mode, random bytes of committed layer files and of hidden-state checkpoints
are damaged between kills: the job still ends with the uninterrupted run's manifest (or fails
naming a damaged file)."""
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from mq_cluster import CLIENT, Cluster, wait_until  # noqa: E402
from quantize_env import check_output_dir, make_model, submit_args  # noqa: E402

LAYERS = 8
# Fault knobs: pauses after each reported step and inside each layer (between solve and write)
# widen the windows in which kills land.
FAULTS = {"MQ_FAULT_STEP_DELAY_MS": "500", "MQ_FAULT_MID_LAYER_DELAY_MS": "500"}
SEED = int(os.environ.get("MQ_CHAOS_SEED", time.time_ns() % 100000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    model, dataset, _ = make_model(tmp, layers=LAYERS)
    return {"model": model, "dataset": dataset, "tmp": tmp}


def new_cluster(tmp, worker_args=()):
    c = Cluster(tmp, lease_ms=2000, heartbeat_ms=200)
    c.worker_args = ["--gang-join-timeout-ms", "8000", *worker_args]
    return c


def submit(cluster, env, out, *extra):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 2,
                                      *extra), check=True)
    return res.stdout.split()[0]


def reference(env, worker_args=(), job_args=()):
    """The uninterrupted run's manifest hash with these worker and submit flags (computed
    once)."""
    key = ("reference", *worker_args, *job_args)
    if key not in env:
        tmp = env["tmp"] / "-".join(["reference", *worker_args, *job_args])
        tmp.mkdir(exist_ok=True)
        c = new_cluster(tmp, worker_args)
        try:
            c.start_coordinator()
            c.start_worker("r1")
            c.start_worker("r2")
            out = tmp / "out"
            job_id = submit(c, env, out, *job_args)
            job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)["job"]
            check_output_dir(out)
            env[key] = job["manifest_sha256"]
        finally:
            c.close()
    return env[key]


def check_history(job):
    committed = [e for e in job["events"] if e["kind"] == "layer_committed"]
    steps = sorted(e["message"].split()[1] for e in committed)
    assert len(committed) == LAYERS, [e["message"] for e in committed]
    assert len(set(steps)) == LAYERS, steps
    for layer in job.get("layers", []):
        assert layer["committed"], layer


def check_no_orphans(cluster, out, job):
    check_output_dir(out)
    # The gang that finished the job keeps no hidden-state checkpoints. (A worker whose attempt
    # was aborted keeps its last one for a later attempt until it runs its next assignment.)
    last = [e["message"] for e in job["events"]
            if e["kind"] == "assigned" and "gang of" in e["message"]][-1]
    names = last[last.rindex("(") + 1:last.rindex(")")].split(", ")
    for name in names:
        left = list((cluster.tmp / f"scratch-{name}").rglob("hidden-*"))
        assert not left, left


def print_retries(job):
    for e in job["events"]:
        if e["kind"] in ("attempt_failed", "lease_expired", "assigned"):
            print(f"  {e['kind']}: {e['message']}")


def test_coordinator_sigkill_at_random_moments(env, tmp_path):
    ref = reference(env)
    rng = random.Random(SEED)
    print(f"chaos seed {SEED}")
    c = new_cluster(tmp_path)
    try:
        c.start_coordinator()
        for name in ("w1", "w2"):
            c.start_worker(name, env={**os.environ, **FAULTS})
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
        print_retries(job)
        assert kills >= 2
        assert job["job"]["manifest_sha256"] == ref
        check_history(job)
        check_no_orphans(c, out, job)
    finally:
        c.close()


# Also with the routed rows dispatched in rounds (several per layer): a rank killed during a
# round's collectives; and an AWQ job, whose replays must run the folded tensors it committed.
@pytest.mark.parametrize("worker_args,job_args", [
    ((), ()), (("--dispatch-tokens", "300"), ()), ((), ("--method", "awq"))])
def test_worker_sigkill_mid_layer(env, tmp_path, worker_args, job_args):
    ref = reference(env, worker_args, job_args)
    rng = random.Random(SEED + 1)
    c = new_cluster(tmp_path, worker_args)
    try:
        c.start_coordinator()
        fault_env = {**os.environ, **FAULTS}
        c.start_worker("w1", env=fault_env)
        c.start_worker("w2", env=fault_env)
        out = tmp_path / "out"
        job_id = submit(c, env, out, *job_args)
        # Kill one rank once 1, 3 and 5 layers are committed, at a random moment inside the next
        # layer, and add a fresh worker (empty scratch: its rank is replayed from the committed
        # layers) each time.
        kills = 0
        for target in (1, 3, 5):
            if not kill_a_rank(c, job_id, target, 180, rng, fault_env, f"spare{kills + 1}"):
                break  # the job outran the killer
            kills += 1
        job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)
        print(f"workers killed {kills} times; attempts {job['job']['attempt']}, "
              f"uncounted {job['job'].get('uncounted_attempts', 0)}")
        print_retries(job)
        assert kills >= 2
        assert job["job"]["manifest_sha256"] == ref
        check_history(job)
        check_no_orphans(c, out, job)
        # Later attempts started after the committed layers, never from scratch.
        starts = [e["message"] for e in job["events"]
                  if e["kind"] == "assigned" and "gang of" in e["message"]]
        assert any("0 steps already committed" not in m for m in starts), starts
    finally:
        c.close()


def kill_a_rank(c, job_id, target, timeout, rng, fault_env, spare, while_down=None):
    """Once `target` layers are committed, SIGKILLs a random live worker at a random moment in
    the next layer, runs `while_down`, and starts a fresh worker `spare` (busy at once: not
    waited for idle). False, killing nothing, when the job left RUNNING first."""
    def reached():
        j = c.job(job_id)["job"]
        done = j["state"] in ("JOB_STATE_FINALIZING", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED")
        return (done or (j["state"] == "JOB_STATE_RUNNING" and
                         int(j.get("progress", {}).get("layers_committed", 0)) >= target)) and j
    if wait_until(reached, timeout, f"{target} layers committed")["state"] != "JOB_STATE_RUNNING":
        return False
    time.sleep(rng.uniform(0.05, 0.6))
    victim = rng.choice(sorted(n for n, p in c.workers.items() if p.alive()))
    c.workers[victim].kill9()
    if while_down:
        while_down()
    c.start_worker(spare, env=fault_env, wait=False)
    wait_until(lambda: c.worker_state(spare) is not None, 30, f"{spare} registered")
    return True


def damage(rng, c, job_id, out, log):
    """Flips a random byte of a random committed layer file, and overwrites 4 KiB of a random
    hidden-state checkpoint of a live worker; returns the layer file's name."""
    committed = [f["name"] for layer in c.job(job_id).get("layers", []) if layer.get("committed")
                 for r in layer.get("reports", []) for f in r.get("files", [])]
    name = rng.choice(sorted(committed))
    path = out / name
    offset = rng.randrange(path.stat().st_size)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    log.append(f"flipped byte {offset} of {name}")
    checkpoints = sorted(p for n, w in c.workers.items() if w.alive()
                         for p in (c.tmp / f"scratch-{n}").rglob("hidden-step*.safetensors"))
    if checkpoints:
        ckpt = rng.choice(checkpoints)
        size = ckpt.stat().st_size
        at = rng.randrange(size // 4, max(size // 4 + 1, size - 4096))
        with open(ckpt, "r+b") as f:
            f.seek(at)
            f.write(bytes(rng.randrange(256) for _ in range(4096)))
        log.append(f"overwrote 4 KiB at {at} of {ckpt.name}")
    return name


def test_corruption_between_worker_kills(env, tmp_path):
    ref = reference(env)
    rng = random.Random(SEED + 2)
    c = new_cluster(tmp_path)
    try:
        c.start_coordinator()
        fault_env = {**os.environ, **FAULTS}
        c.start_worker("w1", env=fault_env)
        c.start_worker("w2", env=fault_env)
        out = tmp_path / "out"
        # Room for the counted attempts that each detected corruption costs.
        res = c.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 2,
                                    "--max-attempts", 8), check=True)
        job_id = res.stdout.split()[0]
        flipped, log = [], []
        for target in (2, 5):
            def damage_while_down():
                time.sleep(0.5)  # the survivor notices the broken gang and stops
                flipped.append(damage(rng, c, job_id, out, log))
            if not kill_a_rank(c, job_id, target, 240, rng, fault_env, f"spare{len(flipped) + 1}",
                               while_down=damage_while_down):
                break
        job = c.wait_job(job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=400)
        print(f"chaos seed {SEED}; damage: {log}")
        print_retries(job)
        corrupt = [e["message"] for e in job["events"] if e["kind"] == "file_corrupt"]
        print("\n".join(corrupt))
        assert flipped
        if job["job"]["state"] == "JOB_STATE_FAILED":
            assert any(n in job["job"]["message"] for n in flipped), job["job"]["message"]
            return
        assert corrupt, "a damaged committed file went unnoticed"
        if job["job"]["manifest_sha256"] != ref:
            # Which files differ from the uninterrupted run's (for the investigation).
            import json
            mine = {f["name"]: f["sha256"] for f in
                    json.loads((out / "manifest.json").read_text())["files"]}
            theirs = {f["name"]: f["sha256"] for f in json.loads(
                (env["tmp"] / "reference" / "out" / "manifest.json").read_text())["files"]}
            differ = sorted(n for n in mine.keys() | theirs.keys()
                            if mine.get(n) != theirs.get(n))
            pytest.fail(f"manifest differs from the uninterrupted run's in {differ}; damage: {log}")
        for layer in job.get("layers", []):
            assert layer["committed"], layer
        check_no_orphans(c, out, job)
        res = subprocess.run([str(CLIENT), "verify", str(out)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
    finally:
        c.close()
