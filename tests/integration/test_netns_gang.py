"""A gang of two across two "hosts": two network namespaces joined by a veth pair. The
coordinator and worker A run in the first (10.77.0.1), worker B in the second (10.77.0.2), each
worker advertising its own namespace's address with --gang-host, every channel over TLS with
tokens (the coordinator's certificate names both its addresses). The job's output must equal the
same job's on one host, and rank 0's rendezvous store must listen on its gang host only.

Needs root and iproute2 (`ip netns`); skipped otherwise (CI runs as root)."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from mq_cluster import Cluster, Security, wait_until
from quantize_env import check_output_dir, make_model, submit_args

HOST_A, HOST_B = "10.77.0.1", "10.77.0.2"


def ip(*args, check=True):
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check:
        assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr}"
    return res


def in_ns(ns):
    return ["ip", "netns", "exec", ns]


@pytest.fixture
def netns_pair():
    """Two fresh namespaces (unique names per run) joined by a veth pair, lo up in both:
    (ns_a with HOST_A, ns_b with HOST_B). Removed afterwards, also when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    tag = uuid.uuid4().hex[:8]
    ns_a, ns_b = f"mq-gang-a-{tag}", f"mq-gang-b-{tag}"
    veth_a, veth_b = f"mqa{tag}", f"mqb{tag}"  # interface names: at most 15 characters
    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        ip("link", "set", veth_a, "netns", ns_a)
        ip("link", "set", veth_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, veth_a, HOST_A), (ns_b, veth_b, HOST_B)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b
    finally:
        # Deleting a namespace deletes the veth end inside it; a pair never moved is deleted
        # from here. Errors are ignored: whatever was not created is not there.
        ip("link", "del", veth_a, check=False)
        for ns in (ns_a, ns_b):
            ip("netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("netns-env")
    model, dataset, _ = make_model(tmp)
    return {"model": model, "dataset": dataset}


def file_hashes(out):
    """SHA-256 of every file of an output directory, read from disk (not from its manifest),
    except the owner marker (it names the job)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).iterdir()) if p.name != ".mq-job"}


def run_gang_of_two(cluster, env, out):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 2),
                         "--wait", timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    job = cluster.job(res.stdout.split()[0])
    assert job["job"]["state"] == "JOB_STATE_SUCCEEDED", job["job"]
    assert job["job"]["progress"]["gang_size"] == 2, job["job"]["progress"]
    return job


def listeners(ns, port):
    """Local addresses of the TCP sockets listening on `port` inside namespace `ns`."""
    res = subprocess.run([*in_ns(ns), "ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [line.split()[3] for line in res.stdout.splitlines() if line.strip()]


def connects(ns, host, port):
    """Whether a TCP connection from inside `ns` to host:port is accepted."""
    code = (f"import socket,sys\ns=socket.socket();s.settimeout(3)\n"
            f"sys.exit(0 if s.connect_ex(({host!r},{port}))==0 else 1)")
    return subprocess.run([*in_ns(ns), "python3", "-c", code], timeout=30).returncode == 0


def test_gang_across_two_namespaces_matches_one_host(netns_pair, env, tmp_path):
    ns_a, ns_b = netns_pair

    # The reference: the same job on one host (loopback), a gang of two.
    (tmp_path / "one-host").mkdir()
    (tmp_path / "two-hosts").mkdir()
    security = Security(tmp_path, server_ips=("127.0.0.1", HOST_A))
    ref = Cluster(tmp_path / "one-host", security=security)
    try:
        ref.start_coordinator()
        ref.start_worker("w1")
        ref.start_worker("w2")
        out_ref = tmp_path / "out-one-host"
        run_gang_of_two(ref, env, out_ref)
    finally:
        ref.close()

    c = Cluster(tmp_path / "two-hosts", security=security)
    c.listen_host = HOST_A
    c.coordinator_prefix = c.client_prefix = in_ns(ns_a)
    # Each rank's steps take a second longer, so the gang (and rank 0's store) stays up long
    # enough to be looked at.
    slow = {"MQ_FAULT_STEP_DELAY_MS": "1000"}
    try:
        c.start_coordinator()
        assert c.address.startswith(HOST_A + ":"), c.address
        c.worker_args = ["--gang-host", HOST_A]
        c.start_worker("a", prefix=in_ns(ns_a), env=slow)
        c.worker_args = ["--gang-host", HOST_B]
        c.start_worker("b", prefix=in_ns(ns_b), env=slow)
        # name -> (its namespace, the other's, its gang host, its rendezvous port)
        workers = {}
        for name, ns, other, host in (("a", ns_a, ns_b, HOST_A), ("b", ns_b, ns_a, HOST_B)):
            address = c.worker_entry(name)["worker"]["capabilities"]["gang_address"]
            assert address.rsplit(":", 1)[0] == host, address
            workers[name] = (ns, other, host, address.rsplit(":", 1)[1])

        # While the gang runs: what listens on rank 0's rendezvous port (rank 0 is whichever
        # worker's port gets a listener), and from where it can be reached.
        seen = {}

        def rank0_listening():
            for name, (ns, _, _, port) in workers.items():
                found = listeners(ns, port)
                if found:
                    return name, found
            return None

        def watch():
            try:
                name, seen["listeners"] = wait_until(rank0_listening, 120,
                                                     "rank 0's rendezvous store", interval=0.05)
                ns, other, host, port = workers[name]
                seen["expected"] = [f"{host}:{port}"]
                seen["from_peer"] = connects(other, host, port)
                seen["from_loopback"] = connects(ns, "127.0.0.1", port)
            except AssertionError as e:
                seen["error"] = str(e)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        out = tmp_path / "out-two-hosts"
        job = run_gang_of_two(c, env, out)
        watcher.join(timeout=150)
        assigned = [e["message"] for e in job["events"] if e["kind"] == "assigned"]
        assert any("gang of 2" in m for m in assigned), assigned
    finally:
        c.close()

    print(f"rank 0's rendezvous store while the gang ran: {seen}")
    assert "error" not in seen, seen
    # Listening on the gang host only (not 0.0.0.0 or [::]): reachable from the peer's
    # namespace, refused on another address of the same host.
    assert seen["listeners"] == seen["expected"], seen
    assert seen["from_peer"], seen
    assert not seen["from_loopback"], seen

    # The same checkpoint, byte for byte. Hashes are of the files' bytes, and both manifests
    # are checked against those bytes: a single differing byte anywhere fails here.
    check_output_dir(out_ref)
    check_output_dir(out)
    ref_hashes, hashes = file_hashes(out_ref), file_hashes(out)
    index = json.loads((out_ref / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards and shards <= set(ref_hashes), (shards, sorted(ref_hashes))
    assert "manifest.json" in ref_hashes
    assert hashes == ref_hashes
