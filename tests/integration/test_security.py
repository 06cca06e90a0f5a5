"""TLS, tokens, roles, job owners and worker identity through real processes with real TLS
(certificates made here with openssl), tried the way a hostile client or an impostor worker
would: every refusal names what was missing and who may."""

import subprocess
from pathlib import Path

import pytest

from mq_cluster import (BUILD_DIR, CLIENT, COORDINATOR, Cluster, Process, Security, free_port,
                        generate_model, wait_until)
from quantize_env import check_output_dir, make_model, submit_args

WORKER_CALL = BUILD_DIR / "tests" / "tools" / "mq-worker-call"


@pytest.fixture
def security(tmp_path):
    return Security(tmp_path, workers=("worker-a", "worker-b"))


@pytest.fixture
def secure(tmp_path, security):
    c = Cluster(tmp_path, security=security)
    yield c
    c.close()


@pytest.fixture
def model(tmp_path):
    return generate_model(tmp_path / "model", "--format", "fp8", "--seed", "7")


def raw_client(address, *args, timeout=60):
    return subprocess.run([str(CLIENT), "--coordinator", address, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def worker_call(cluster, call, *args, token=None, cert=None, session=None):
    """One WorkerService call by a process that is not mq-worker; returns (code, message, kv)."""
    sec = cluster.security
    argv = [str(WORKER_CALL), "--coordinator", cluster.address, "--tls-ca", str(sec.pki["ca"])]
    if token:
        argv += ["--token-file", str(sec.token_files[token])]
    if cert:
        argv += ["--tls-cert", str(sec.pki[f"{cert}_cert"]), "--tls-key",
                 str(sec.pki[f"{cert}_key"])]
    if session:
        argv += ["--session", session]
    res = subprocess.run(argv + [call, *map(str, args)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    kv = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    return lines[0], lines[1] if len(lines) > 1 else "", kv


def test_coordinator_refuses_to_serve_plaintext_unless_told(tmp_path, security):
    res = subprocess.run([str(COORDINATOR), "--listen", "127.0.0.1:0", "--data-dir",
                          str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "TLS and authentication are required" in res.stderr and "--insecure" in res.stderr
    res = subprocess.run([str(COORDINATOR), "--listen", "127.0.0.1:0", "--data-dir",
                          str(tmp_path / "d"), *security.coordinator_args()[:6]],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "--allow-read and --allow-write are required" in res.stderr
    res = subprocess.run([str(COORDINATOR), "--listen", "127.0.0.1:0", "--data-dir",
                          str(tmp_path / "d"), "--insecure", "--tokens-file",
                          str(security.tokens_file)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "cannot be combined" in res.stderr, res.stderr
    # A worker without a credential does not start either.
    res = subprocess.run([str(BUILD_DIR / "worker" / "mq-worker"), "--coordinator",
                          "127.0.0.1:1", "--scratch-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "a credential is required" in res.stderr, res.stderr


def test_tokens_file_errors_never_show_its_content(tmp_path, security):
    secret = "mqt_" + "ab" * 32
    bad = tmp_path / "tokens.bad"
    bad.write_text(f"# ops\nalice submitter {secret}\n")
    res = subprocess.run([str(COORDINATOR), "--listen", "127.0.0.1:0", "--data-dir",
                          str(tmp_path / "d"), *security.coordinator_args(mtls=False)[:4],
                          "--tokens-file", str(bad), "--allow-read", "/", "--allow-write", "/"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert f"tokens file {bad} line 2: third field must be sha256:" in res.stderr, res.stderr
    assert secret not in res.stderr and "ab" * 8 not in res.stderr
    # add-token refuses to append to a malformed file and leaves it as it was.
    before = bad.read_bytes()
    res = subprocess.run([str(COORDINATOR), "add-token", "--tokens-file", str(bad), "--principal",
                          "carol", "--role", "viewer"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and bad.read_bytes() == before
    # The tokens file holds hashes only, readable by its owner only.
    text = security.tokens_file.read_text()
    for f in security.token_files.values():
        assert f.read_text().strip() not in text
    assert security.tokens_file.stat().st_mode & 0o777 == 0o600


def test_clients_need_tls_and_a_token_and_roles_limit_them(secure, model, tmp_path):
    secure.start_coordinator()
    ca = secure.security.pki["ca"]
    # Plaintext to a TLS port: the connection fails, nothing is answered.
    res = raw_client(secure.address, "--insecure", "--timeout", "3", "list")
    assert res.returncode == 1, res.stderr
    assert "unavailable" in res.stderr or "deadline" in res.stderr, res.stderr
    # TLS without verifying against the right CA: refused by the client.
    other = Security(tmp_path / "other")
    res = raw_client(secure.address, "--tls-ca", other.pki["ca"], "--token-file",
                     secure.security.token_files["root"], "--timeout", "3", "list")
    assert res.returncode == 1 and "check --tls-ca" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # TLS, no token: UNAUTHENTICATED, saying what is needed.
    res = raw_client(secure.address, "--tls-ca", ca, "list")
    assert res.returncode == 1, res.stderr
    assert "not authenticated: no credentials" in res.stderr and "--token-file" in res.stderr
    # A token from another coordinator's file.
    res = raw_client(secure.address, "--tls-ca", ca, "--token-file",
                     other.token_files["root"], "list")
    assert "not authenticated: the bearer token is not in the coordinator's tokens file" \
        in res.stderr, res.stderr
    assert other.token_files["root"].read_text().strip() not in res.stderr
    # The token from the environment works like --token-file.
    res = subprocess.run([str(CLIENT), "--coordinator", secure.address, "list"],
                         capture_output=True, text=True, timeout=60,
                         env={"MQ_TLS_CA": str(ca), "PATH": "/usr/bin:/bin",
                              "MQ_TOKEN": secure.security.token_files["vera"].read_text().strip()})
    assert res.returncode == 0, res.stderr
    # A viewer reads but cannot submit; a worker token cannot use the job API.
    res = secure.client("submit", "--model", model, "--output", tmp_path / "o", principal="vera")
    assert res.returncode == 1
    assert ('permission denied: principal "vera" (role viewer) may not call SubmitJob: it needs '
            'role submitter or admin') in res.stderr, res.stderr
    res = secure.client("list", principal="workers")
    assert 'principal "workers" (role worker) may not call ListJobs' in res.stderr, res.stderr
    res = secure.client("inspect", model, principal="vera")
    assert "may not call InspectModel" in res.stderr, res.stderr
    # The health port answers plaintext probes and nothing else.
    health = f"127.0.0.1:{free_port()}"
    secure.coordinator.stop()
    secure.coordinator_args = ["--health-listen", health]
    secure.start_coordinator()
    res = raw_client(health, "--insecure", "health")
    assert res.returncode == 0 and res.stdout.strip() == "SERVING", res.stderr
    res = raw_client(health, "--insecure", "list")
    assert res.returncode == 1 and "error 12" in res.stderr, res.stderr  # UNIMPLEMENTED


def test_owners_and_principals(secure, model, tmp_path):
    secure.start_coordinator()
    # No worker: jobs stay QUEUED, so cancel and resume have something to act on.
    job = secure.client("submit", "--model", model, "--output", tmp_path / "a",
                        principal="alice", check=True).stdout.strip()
    status = secure.job(job)
    assert status["job"]["owner"] == "alice"
    assert status["events"][0]["principal"] == "alice"
    # Another submitter can neither cancel nor resume it; a viewer cannot either.
    res = secure.client("cancel", job, principal="bob")
    assert res.returncode == 1
    assert (f'permission denied: job {job} belongs to "alice": principal "bob" may not cancel it '
            "(only its owner or an admin)") in res.stderr, res.stderr
    res = secure.client("cancel", job, principal="vera")
    assert "may not call CancelJob" in res.stderr
    assert secure.job_state(job) == "JOB_STATE_QUEUED"
    # Its owner can; the event names who.
    secure.client("cancel", job, "--reason", "mine", principal="alice", check=True)
    job_now = secure.job(job)
    assert job_now["job"]["message"] == "cancelled by alice: mine"
    assert job_now["events"][-1]["principal"] == "alice"
    human = secure.client("status", job, principal="vera", check=True).stdout
    assert "Owner:        alice" in human and "mine  (by alice)" in human, human
    res = secure.client("resume", job, principal="bob")
    assert "may not resume it" in res.stderr, res.stderr
    # An admin can act on anyone's job.
    secure.client("resume", job, principal="root", check=True)
    assert secure.job(job)["events"][-1]["principal"] == "root"
    # An idempotency key belongs to whoever used it first.
    key = "k-shared"
    first = secure.client("submit", "--model", model, "--output", tmp_path / "b",
                          "--idempotency-key", key, principal="alice", check=True).stdout.strip()
    res = secure.client("submit", "--model", model, "--output", tmp_path / "b",
                        "--idempotency-key", key, principal="bob")
    assert res.returncode == 1 and "already used by another principal" in res.stderr
    assert first not in res.stderr + res.stdout


def test_worker_identity_is_bound_to_its_credential(secure, model, tmp_path):
    secure.start_coordinator()
    w = secure.start_worker("w1")
    entry = secure.worker_entry("w1")
    wid = entry["worker"]["worker_id"]
    # No credential, or a client's: cannot register, heartbeat, poll or complete.
    for token, code in [(None, "UNAUTHENTICATED"), ("alice", "PERMISSION_DENIED"),
                        ("root", "PERMISSION_DENIED")]:
        for call, args in [("register", ["--name", "evil"]), ("heartbeat", ["--worker-id", wid]),
                           ("poll", ["--worker-id", wid]),
                           ("complete", ["--worker-id", wid, "--assignment-id", "a-x"])]:
            got, message, _ = worker_call(secure, call, *args, token=token)
            assert got == code, (token, call, got, message)
            if token:
                assert "needs role worker" in message, message
    # The worker token itself, without w1's session: cannot act as w1 or take its id.
    got, message, _ = worker_call(secure, "heartbeat", "--worker-id", wid, token="workers")
    assert got == "PERMISSION_DENIED" and "current session" in message, message
    got, message, _ = worker_call(secure, "poll", "--worker-id", wid, token="workers",
                                  session="0" * 64)
    assert got == "PERMISSION_DENIED", message
    got, message, _ = worker_call(secure, "register", "--worker-id", wid, "--name", "evil",
                                  token="workers")
    assert got == "ALREADY_EXISTS" and "a live worker holds this id" in message, message
    # Another worker credential (a client certificate of the same CA) cannot take it either.
    got, message, _ = worker_call(secure, "register", "--worker-id", wid, "--name", "evil",
                                  cert="worker-b")
    assert got == "PERMISSION_DENIED" and "bound to the credential" in message, message
    # A worker registered with a client certificate is x509:NAME; it can work for itself only.
    got, message, kv = worker_call(secure, "register", "--name", "certified", cert="worker-b")
    assert got == "OK", message
    entries = {e["worker"]["name"]: e for e in secure.client_json("workers")["workers"]}
    assert entries["certified"]["worker"]["principal"] == "x509:worker-b"
    assert entries["w1"]["worker"]["principal"] == "workers"
    got, _, _ = worker_call(secure, "heartbeat", "--worker-id", kv["worker_id"], cert="worker-b",
                            session=kv["session"])
    assert got == "OK"
    got, message, _ = worker_call(secure, "heartbeat", "--worker-id", kv["worker_id"],
                                  token="workers", session=kv["session"])
    assert got == "PERMISSION_DENIED" and "bound to another credential" in message, message
    # The real worker was never disturbed.
    assert w.alive() and secure.worker_state("w1") == "WORKER_STATE_IDLE"


def test_impostor_cannot_complete_anothers_assignment(secure, model, tmp_path):
    """A fake worker with a valid worker credential takes real work and reports for it, and
    reports for a real worker's assignment: the first only fails its own assignment, the
    second is refused; no job succeeds on fabricated results."""
    secure.start_coordinator()
    got, message, fake = worker_call(secure, "register", "--name", "fake", token="workers")
    assert got == "OK", message
    job = secure.client("submit", "--model", model, "--output", tmp_path / "o", "--gang-size", 1,
                        check=True).stdout.strip()
    got, message, a = worker_call(secure, "poll", "--worker-id", fake["worker_id"], "--wait-ms",
                                  5000, token="workers", session=fake["session"])
    assert got == "OK" and a["job_id"] == job, (got, message, a)
    # Someone else (the real worker registered later) cannot complete the fake's assignment.
    secure.start_worker("w1")
    w1 = secure.worker_entry("w1")["worker"]["worker_id"]
    got, message, _ = worker_call(secure, "complete", "--worker-id", fake["worker_id"],
                                  "--assignment-id", a["assignment_id"], "--lease-epoch",
                                  a["lease_epoch"], token="workers")
    assert got == "PERMISSION_DENIED", message
    got, message, _ = worker_call(secure, "complete", "--worker-id", w1, "--assignment-id",
                                  a["assignment_id"], "--lease-epoch", a["lease_epoch"],
                                  token="workers")
    assert got == "PERMISSION_DENIED", message
    state = secure.job(job)
    assert all("fabricated" not in e["message"] for e in state["events"])
    # Its holder may fail it (it is its own); the job goes on elsewhere and the event says who.
    got, message, _ = worker_call(secure, "complete", "--worker-id", fake["worker_id"],
                                  "--assignment-id", a["assignment_id"], "--lease-epoch",
                                  a["lease_epoch"], token="workers", session=fake["session"])
    assert got == "OK", message
    failed = [e for e in secure.job(job)["events"] if e["kind"] == "attempt_failed"]
    assert len(failed) == 1 and "fabricated" in failed[0]["message"], failed
    assert failed[0]["principal"] == "workers" and failed[0]["worker_id"] == fake["worker_id"]


def test_secure_job_end_to_end_with_mtls_and_token_workers(tmp_path, security):
    """A gang of two workers, one with a client certificate and one with the worker token,
    quantizes a model over TLS; the output checks out against its manifest."""
    m, dataset, _ = make_model(tmp_path / "m")
    (tmp_path / "c").mkdir()
    c = Cluster(tmp_path / "c", security=security)
    try:
        c.start_coordinator()
        c.start_worker("tok")
        cert = ["--tls-cert", str(security.pki["worker-a_cert"]), "--tls-key",
                str(security.pki["worker-a_key"])]
        argv = [str(BUILD_DIR / "worker" / "mq-worker"), "--coordinator", c.address, "--name",
                "crt", "--scratch-dir", str(tmp_path / "scratch-crt"), "--poll-wait-ms", "1000",
                "--tls-ca", str(security.pki["ca"]), *cert]
        c.workers["crt"] = Process("crt", argv, tmp_path / "worker-crt.log")
        wait_until(lambda: c.worker_state("crt") == "WORKER_STATE_IDLE", 30, "crt registered")
        out = tmp_path / "out"
        res = c.client(*submit_args(m, out, dataset, "--gang-size", 2), "--wait",
                       principal="alice", timeout=600)
        assert res.returncode == 0, res.stderr + c.workers["crt"].output()[-3000:]
        job = c.client_json("list")["jobs"][0]
        assert job["owner"] == "alice"
        principals = {e["principal"] for e in c.job(job["job_id"])["events"]}
        # Worker events carry the principal of whichever worker reported them (planner,
        # finalizer, ranks' failures): one of the two credentials, by scheduling.
        assert {"alice", "mq-coordinator"} <= principals, principals
        assert principals & {"workers", "x509:worker-a"}, principals
        by_name = {w["worker"]["name"]: w["worker"]["principal"]
                   for w in c.client_json("workers")["workers"]}
        assert by_name == {"tok": "workers", "crt": "x509:worker-a"}, by_name
        check_output_dir(out)
    finally:
        c.close()
