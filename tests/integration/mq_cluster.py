"""Starts real mq-coordinator and mq-worker processes on loopback for integration tests and
drives them with mq-client, the way a user would."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

BUILD_DIR = Path(os.environ.get("MQ_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
COORDINATOR = BUILD_DIR / "server" / "mq-coordinator"
WORKER = BUILD_DIR / "worker" / "mq-worker"
CLIENT = BUILD_DIR / "client" / "mq-client"
GEN_MODEL = BUILD_DIR / "tests" / "tools" / "mq-gen-model"
WATCH_LOAD = BUILD_DIR / "tests" / "tools" / "mq-watch-load"


def wait_until(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_model(out_dir, *args):
    """Runs mq-gen-model into out_dir with extra flags; returns the directory."""
    res = subprocess.run([str(GEN_MODEL), "--output", str(out_dir), *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"mq-gen-model failed: {res.stderr}"
    return Path(out_dir)


class Process:
    def __init__(self, name, argv, log_path, env=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def alive(self):
        return self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def output(self):
        return Path(self.log_path).read_text(errors="replace")


def make_pki(out_dir, server_ips=("127.0.0.1",), workers=("worker-a",)):
    """A CA, a server certificate for `server_ips` and client certificates for `workers`, made
    with openssl in out_dir. Returns a dict of paths: ca, server_cert, server_key, and
    WORKER_cert / WORKER_key per worker."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def run(*argv):
        res = subprocess.run(["openssl", *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"openssl {argv[0]} failed: {res.stderr}"

    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key"}
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(paths["ca_key"]), "-out", str(paths["ca"]), "-days", "2",
        "-subj", "/CN=mq test CA")

    def issue(name, cn, ext):
        key, csr, crt, extfile = (out / f"{name}.key", out / f"{name}.csr", out / f"{name}.crt",
                                  out / f"{name}.ext")
        extfile.write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey",
            str(paths["ca_key"]), "-CAcreateserial", "-out", str(crt), "-days", "2",
            "-extfile", str(extfile))
        return crt, key

    sans = ",".join(f"IP:{ip}" for ip in server_ips) + ",DNS:localhost"
    paths["server_cert"], paths["server_key"] = issue(
        "server", "mq-coordinator", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    for w in workers:
        paths[f"{w}_cert"], paths[f"{w}_key"] = issue(
            w, w, f"subjectAltName=DNS:{w}\nextendedKeyUsage=clientAuth\n")
    return paths


def add_token(tokens_file, principal, role, out_file):
    """Adds a token with mq-coordinator add-token; writes the printed token to out_file."""
    res = subprocess.run([str(COORDINATOR), "add-token", "--tokens-file", str(tokens_file),
                          "--principal", principal, "--role", role],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    Path(out_file).write_text(res.stdout)
    return Path(out_file)


class Security:
    """TLS and tokens for a Cluster: a PKI, a tokens file with an admin, a submitter, a viewer
    and a worker token. `client_args(principal)` are mq-client's flags for that principal."""

    def __init__(self, tmp_path, server_ips=("127.0.0.1",), workers=("worker-a",)):
        self.dir = Path(tmp_path) / "security"
        self.pki = make_pki(self.dir / "pki", server_ips, workers)
        self.tokens_file = self.dir / "tokens"
        self.token_files = {}
        for principal, role in [("root", "admin"), ("alice", "submitter"), ("bob", "submitter"),
                                ("vera", "viewer"), ("workers", "worker")]:
            self.token_files[principal] = add_token(self.tokens_file, principal, role,
                                                    self.dir / f"{principal}.token")

    def coordinator_args(self, mtls=True, allow_read="/", allow_write="/"):
        args = ["--tls-cert", str(self.pki["server_cert"]), "--tls-key",
                str(self.pki["server_key"]), "--tokens-file", str(self.tokens_file),
                "--allow-read", allow_read, "--allow-write", allow_write]
        return args + (["--tls-ca", str(self.pki["ca"])] if mtls else [])

    def worker_args(self, principal="workers"):
        return ["--tls-ca", str(self.pki["ca"]), "--token-file", str(self.token_files[principal])]

    def client_args(self, principal="root"):
        args = ["--tls-ca", str(self.pki["ca"])]
        return args + (["--token-file", str(self.token_files[principal])] if principal else [])


class Cluster:
    """A coordinator (on a fixed port once chosen) plus any number of workers. Plaintext with
    --insecure everywhere unless `security` (a Security) is given: then TLS and tokens, the
    workers use the worker token and the client the admin's unless told otherwise."""

    def __init__(self, tmp_path, lease_ms=3000, heartbeat_ms=300, security=None):
        self.tmp = Path(tmp_path)
        self.data_dir = self.tmp / "coordinator-data"
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms
        self.address = None
        self.metrics_port = None
        self.coordinator = None
        self.workers = {}
        self._starts = 0
        self.worker_args = []  # extra mq-worker flags for every worker
        self.coordinator_args = []  # extra mq-coordinator flags
        self.security = security
        self.client_principal = "root"  # with security: whose token mq-client uses
        self.client_args = []  # extra mq-client flags (after --coordinator)
        # Where the coordinator listens, and argv prefixes: the coordinator's and mq-client's
        # (e.g. ["ip", "netns", "exec", NS] to run them in a network namespace; the client must
        # reach the coordinator's address). A worker's prefix is start_worker's `prefix`.
        self.listen_host = "127.0.0.1"
        self.coordinator_prefix = []
        self.client_prefix = []

    # --- coordinator -------------------------------------------------------------------------
    def start_coordinator(self, metrics_port=None):
        self._starts += 1
        ready = self.tmp / f"ready-{self._starts}"
        listen = self.address or f"{self.listen_host}:0"
        argv = [*self.coordinator_prefix, str(COORDINATOR), "--listen", listen,
                "--data-dir", str(self.data_dir), "--ready-file", str(ready),
                "--lease-ms", str(self.lease_ms),
                "--heartbeat-interval-ms", str(self.heartbeat_ms)]
        if metrics_port:
            argv += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
        argv += self.security.coordinator_args() if self.security else ["--insecure"]
        argv += self.coordinator_args
        self.coordinator = Process("coordinator", argv, self.tmp / "coordinator.log")
        wait_until(lambda: ready.exists() or not self.coordinator.alive(), 30, "coordinator ready")
        assert self.coordinator.alive(), self.coordinator.output()
        self.address = ready.read_text().strip()
        return self.coordinator

    def kill_coordinator(self):
        self.coordinator.kill9()

    # --- workers -----------------------------------------------------------------------------
    def start_worker(self, name, env=None, wait=True, metrics_port=None, scratch=None, prefix=()):
        argv = [*prefix, str(WORKER), "--coordinator", self.address, "--name", name,
                "--scratch-dir", str(scratch or self.tmp / f"scratch-{name}"),
                "--poll-wait-ms", "1000",
                *(self.security.worker_args() if self.security else ["--insecure"]),
                *self.worker_args]
        if metrics_port:
            argv += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
        w = Process(name, argv, self.tmp / f"worker-{name}.log", env)
        self.workers[name] = w
        if wait:
            wait_until(lambda: self.worker_state(name) == "WORKER_STATE_IDLE", 30,
                       f"worker {name} registered")
        return w

    def worker_entry(self, name):
        for w in self.client_json("workers").get("workers", []):
            if w["worker"]["name"] == name:
                return w
        return None

    def worker_state(self, name):
        entry = self.worker_entry(name)
        return entry["state"] if entry else None

    # --- client ------------------------------------------------------------------------------
    def client_security_args(self, principal=None):
        if not self.security:
            return ["--insecure"]
        return self.security.client_args(principal or self.client_principal)

    def client(self, *args, check=False, timeout=120, principal=None):
        res = subprocess.run([*self.client_prefix, str(CLIENT), "--coordinator", self.address,
                              *self.client_security_args(principal), *self.client_args,
                              *map(str, args)],
                             capture_output=True, text=True, timeout=timeout)
        if check:
            assert res.returncode == 0, f"mq-client {args} failed: {res.stderr}{res.stdout}"
        return res

    def client_json(self, *args):
        res = self.client(*args, "--json", check=True)
        return json.loads(res.stdout)

    def job(self, job_id):
        return self.client_json("status", job_id)

    def job_state(self, job_id):
        return self.job(job_id)["job"]["state"]

    def wait_job(self, job_id, states, timeout=60):
        states = {states} if isinstance(states, str) else set(states)
        return wait_until(lambda: self.job_state(job_id) in states and self.job(job_id), timeout,
                          f"job {job_id} in {states}")

    def close(self):
        for w in self.workers.values():
            w.resume() if w.alive() else None
            w.stop()
        if self.coordinator:
            self.coordinator.stop()
