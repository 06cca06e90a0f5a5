"""An output belongs to one job, and every byte is verified: real coordinator and worker
processes on a generated model. Another model's checkpoint or a finished job's output is never
touched (SHA-256 of every file before and after); a byte flipped in a committed layer file, or
4 KiB of a hidden-state checkpoint overwritten, while the job is stopped is detected and the job
ends with the manifest of an uninterrupted run; `mq-client verify` names a damaged file."""
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mq_cluster import CLIENT, Cluster, generate_model, wait_until
from quantize_env import OWNER_MARKER, check_output_dir, make_model, submit_args

# Pauses after each reported layer: time to stop the job between layers.
SLOW = {"MQ_FAULT_STEP_DELAY_MS": "1500"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ownership")
    model, dataset, _ = make_model(tmp, layers=3)
    return {"tmp": tmp, "model": model, "dataset": dataset}


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted run: its manifest hash and its finished output directory."""
    tmp = env["tmp"] / "reference"
    tmp.mkdir()
    c = Cluster(tmp)
    try:
        c.start_coordinator()
        c.start_worker("r1")
        out = tmp / "out"
        job_id = submit(c, env, out)
        job = c.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)["job"]
        check_output_dir(out)
        # Each layer file was read back from the storage after its commit: finalization read
        # none of them again (their stamps had not changed).
        log = c.workers["r1"].output()
        assert ("committed files checked, 0 read again (0 bytes), 3 unchanged since read back"
                in log), log[-3000:]
        return {"manifest_sha256": job["manifest_sha256"], "out": out, "job_id": job_id}
    finally:
        c.close()


def submit(cluster, env, out, *extra):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 1,
                                      *extra), check=True)
    return res.stdout.split()[0]


def hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).iterdir()) if p.is_file()}


def verify(out):
    return subprocess.run([str(CLIENT), "verify", str(out)], capture_output=True, text=True,
                          timeout=60)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def events(cluster, job_id, kind):
    return [e["message"] for e in cluster.job(job_id)["events"] if e["kind"] == kind]


def committed(cluster, job_id):
    return int(cluster.job(job_id)["job"].get("progress", {}).get("layers_committed", 0))


def stop_after(cluster, job_id, layers):
    """Cancels the job once `layers` layers are committed (the worker pauses after each)."""
    wait_until(lambda: committed(cluster, job_id) >= layers, 180, f"{layers} layers committed")
    cluster.client("cancel", job_id, check=True)
    cluster.wait_job(job_id, "JOB_STATE_CANCELLED", timeout=30)
    # The worker has abandoned the assignment (idle again) before files are touched.
    wait_until(lambda: all(cluster.worker_state(n) == "WORKER_STATE_IDLE"
                           for n, p in cluster.workers.items() if p.alive()), 30, "workers idle")


def test_foreign_checkpoint_in_output_is_refused_and_untouched(cluster, env, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    # The output directory holds another model's checkpoint (shards, config, index, tokenizer).
    out = generate_model(tmp_path / "someone-elses-model", "--layers", 2, "--dense-layers", 1,
                         "--experts", 8, "--hidden", 128, "--intermediate", 192,
                         "--moe-intermediate", 128, "--heads", 2, "--vocab", 256, "--seed", 3)
    shutil.copy(env["model"] / "tokenizer.json", out / "tokenizer.json")
    before = hashes(out)
    shards = [n for n in before if n.startswith("model-") and n.endswith(".safetensors")]
    assert shards and "config.json" in before and "model.safetensors.index.json" in before
    res = cluster.client(*submit_args(env["model"], out, env["dataset"]), "--wait",
                         timeout=120)
    text = res.stdout + res.stderr
    print(text)
    assert res.returncode == 1, text
    assert "config.json" in text and shards[0] in text, text
    assert "mq did not write" in text, text
    jobs = cluster.client_json("list")["jobs"]
    assert [j["state"] for j in jobs] == ["JOB_STATE_FAILED"], jobs
    assert hashes(out) == before
    assert not (out / OWNER_MARKER).exists()


def test_finished_output_is_never_reused(cluster, env, reference):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    out = reference["out"]
    before = hashes(out)
    res = cluster.client(*submit_args(env["model"], out, env["dataset"]), "--wait",
                         timeout=120)
    text = res.stdout + res.stderr
    print(text)
    assert res.returncode == 1, text
    assert f"belongs to job {reference['job_id']}" in text, text
    assert hashes(out) == before
    assert verify(out).returncode == 0


def test_flipped_byte_in_committed_file_found_by_replay(cluster, env, reference, tmp_path):
    """Stopped after two layers; one byte of layer 1's file flipped; resumed on a fresh worker,
    which replays the committed layers from the output files and finds the damage: layer 1 and
    after are uncommitted and computed again."""
    cluster.start_coordinator()
    cluster.start_worker("w1", env=SLOW)
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    stop_after(cluster, job_id, 2)
    cluster.workers["w1"].stop()
    victim = out / "model-layer00001-rank000-of-001.safetensors"
    flip_byte(victim, victim.stat().st_size - 100)
    cluster.start_worker("w2")  # empty scratch: no hidden-state checkpoint, replay
    cluster.client("resume", job_id, check=True)
    job = cluster.wait_job(job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=300)
    print("\n".join(e["kind"] + ": " + e["message"] for e in job["events"]))
    assert job["job"]["state"] == "JOB_STATE_SUCCEEDED", job["job"]["message"]
    corrupt = events(cluster, job_id, "file_corrupt")
    assert len(corrupt) == 1 and victim.name in corrupt[0] and "step 1" in corrupt[0], corrupt
    assert job["job"]["manifest_sha256"] == reference["manifest_sha256"]
    check_output_dir(out)
    res = verify(out)
    assert res.returncode == 0, res.stderr
    print(res.stdout)


def test_flipped_byte_in_committed_file_found_by_finalization(cluster, env, reference,
                                                              tmp_path):
    """Stopped after one layer; one byte of layer 0's file flipped; resumed on the same worker,
    which continues from its hidden-state checkpoint (no replay): finalization finds the damage
    before writing anything, layer 0 and after are computed again."""
    cluster.start_coordinator()
    cluster.start_worker("w1", env=SLOW)
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    stop_after(cluster, job_id, 1)
    victim = out / "model-layer00000-rank000-of-001.safetensors"
    flip_byte(victim, victim.stat().st_size // 2)
    cluster.client("resume", job_id, check=True)
    job = cluster.wait_job(job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=300)
    print("\n".join(e["kind"] + ": " + e["message"] for e in job["events"]))
    assert job["job"]["state"] == "JOB_STATE_SUCCEEDED", job["job"]["message"]
    corrupt = events(cluster, job_id, "file_corrupt")
    assert len(corrupt) == 1 and victim.name in corrupt[0] and "step 0" in corrupt[0], corrupt
    assert job["job"]["manifest_sha256"] == reference["manifest_sha256"]
    check_output_dir(out)
    assert verify(out).returncode == 0


def test_damaged_hidden_state_checkpoint_is_not_used(cluster, env, reference, tmp_path):
    """Stopped after two layers; 4 KiB of the worker's hidden-state checkpoint overwritten;
    resumed on the same worker: the checkpoint fails its checksum, the committed layers are
    replayed instead, and the output is the uninterrupted run's."""
    cluster.start_coordinator()
    # Layers one at a time with a long pause after each report, so the cancel lands before the
    # next layer's checkpoint replaces the one the resume needs (only the newest is kept).
    cluster.worker_args = ["--overlap-writes=false"]
    cluster.start_worker("w1", env={"MQ_FAULT_STEP_DELAY_MS": "5000"})
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    stop_after(cluster, job_id, 2)
    ckpt = tmp_path / "scratch-w1" / job_id / "hidden-step00001-seq000000-000064.safetensors"
    assert ckpt.exists(), list((tmp_path / "scratch-w1").rglob("*"))
    size = ckpt.stat().st_size
    assert size > 16384
    with open(ckpt, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    cluster.client("resume", job_id, check=True)
    job = cluster.wait_job(job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=300)
    assert job["job"]["state"] == "JOB_STATE_SUCCEEDED", job["job"]["message"]
    assert job["job"]["manifest_sha256"] == reference["manifest_sha256"]
    log = cluster.workers["w1"].output()
    assert f"hidden-state checkpoint {ckpt} failed its SHA-256 check" in log, log[-3000:]
    replayed = [line for line in log.splitlines() if f"of job {job_id}: " in line]
    assert replayed and " 0 replayed" not in replayed[-1], replayed
    check_output_dir(out)


def test_forced_checkpoint_cadence_resumes_by_replay(cluster, env, reference, tmp_path):
    """mq-worker --checkpoint-every 2 on three layers: a hidden-state checkpoint after layer 1
    only. Stopped after one layer, there is none; the resume on the same worker replays layer 0
    from the embeddings and the output is the uninterrupted run's."""
    cluster.start_coordinator()
    cluster.worker_args = ["--overlap-writes=false", "--checkpoint-every", "2"]
    cluster.start_worker("w1", env={"MQ_FAULT_STEP_DELAY_MS": "5000"})
    out = tmp_path / "out"
    job_id = submit(cluster, env, out)
    stop_after(cluster, job_id, 1)
    scratch = tmp_path / "scratch-w1" / job_id
    assert not list(scratch.glob("hidden-step*")), list(scratch.iterdir())
    cluster.client("resume", job_id, check=True)
    job = cluster.wait_job(job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=300)
    assert job["job"]["state"] == "JOB_STATE_SUCCEEDED", job["job"]["message"]
    assert job["job"]["manifest_sha256"] == reference["manifest_sha256"]
    log = cluster.workers["w1"].output()
    done = [line for line in log.splitlines()
            if "quantize assignment" in line and f"of job {job_id}: " in line]
    assert done and done[-1].endswith(
        "2 steps run, 1 replayed from the embeddings; hidden states checkpointed every 2 steps"), \
        done
    check_output_dir(out)


def test_verify_names_a_damaged_file(env, reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference["out"], out)
    res = verify(out)
    assert res.returncode == 0, res.stderr
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert f"{len(listed)} files" in res.stdout, res.stdout
    victim = out / "model-layer00002-rank000-of-001.safetensors"
    flip_byte(victim, 4000)
    (out / "notes.txt").write_text("not mq's")
    (out / "config.json").unlink()
    res = verify(out)
    print(res.stderr)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert any(victim.name in l and "SHA-256" in l for l in lines), lines
    assert any("config.json: missing" in l for l in lines), lines
    assert any("notes.txt: not listed" in l for l in lines), lines
    assert not any(OWNER_MARKER in l for l in lines), lines
    assert verify(tmp_path / "nowhere").returncode == 1
