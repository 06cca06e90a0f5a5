"""The /metrics endpoints of real processes export exactly the metrics listed in
tests/deploy/metrics.txt (which the dashboard and alert rules are checked against), in
valid Prometheus text format."""

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from mq_cluster import free_port, generate_model, wait_until

SOURCE = Path(os.environ.get("MQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))


def listed_metrics():
    """{name: (type, {label: set(values) or None})} from metrics.txt."""
    out = {}
    for line in (SOURCE / "tests" / "deploy" / "metrics.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, kind, *labels = line.split()
        spec = {}
        for label in labels:
            key, _, values = label.partition("=")
            spec[key] = set(values.split("|")) if values else None
        out[name] = (kind, spec)
    return out


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def samples(text):
    """[(metric family name, {label: value})] for every mq_ sample line."""
    out = []
    for line in text.splitlines():
        if not line.startswith("mq_"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ", line)
        name, labels = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in listed_metrics():
                name = name[: -len(suffix)]
                labels.pop("le", None)
        out.append((name, labels))
    return out


def check_against_list(text, expected_names):
    listed = listed_metrics()
    seen = set()
    for name, labels in samples(text):
        assert name in listed, f"{name} is exported but not in metrics.txt"
        kind, spec = listed[name]
        assert set(labels) == set(spec), f"{name}: labels {sorted(labels)} != {sorted(spec)}"
        for key, value in labels.items():
            if spec[key] is not None:
                assert value in spec[key], f"{name}{{{key}={value!r}}} not in metrics.txt"
        assert f"# TYPE {name} {kind}" in text, f"{name} is not a {kind}"
        seen.add(name)
    assert expected_names <= seen, f"missing: {sorted(expected_names - seen)}"
    return seen


def promtool_check(text, tmp_path):
    if not shutil.which("promtool"):
        pytest.fail("promtool is missing: run scripts/setup.sh")
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                         text=True)
    # promtool reports lint problems (not format errors) with exit 1 too; exporter-internal
    # metrics of prometheus-cpp (exposer_*) are not ours to rename, so only mq_ lines count.
    problems = [l for l in (res.stdout + res.stderr).splitlines() if l.startswith("mq_")]
    assert problems == [], problems


def test_coordinator_and_worker_metrics(cluster, tmp_path):
    model = generate_model(tmp_path / "model")
    cport, wport = free_port(), free_port()
    cluster.start_coordinator(metrics_port=cport)
    cluster.start_worker("w1", metrics_port=wport)
    job = cluster.client("submit", "--model", model, "--output", tmp_path / "out").stdout.strip()
    cluster.wait_job(job, "JOB_STATE_FAILED")
    cluster.client("status", "j-00000000000000000000000000")  # one NOT_FOUND

    coordinator_names = {n for n in listed_metrics() if not n.startswith("mq_worker_")}
    text = scrape(cport)
    check_against_list(text, coordinator_names)
    promtool_check(text, tmp_path)
    assert 'mq_jobs{state="failed"} 1' in text
    assert "mq_jobs_submitted_total 1" in text
    assert 'mq_jobs_finished_total{result="failed"} 1' in text
    assert 'mq_assignments_total{kind="plan",result="ok"} 1' in text
    assert 'mq_workers{state="idle"} 1' in text
    assert 'mq_grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="GetJob"} 1' in text
    assert "mq_coordinator_ready 1" in text

    worker_names = {"mq_build_info", "mq_worker_info", "mq_worker_assignments_total",
                    "mq_worker_stage_duration_seconds", "mq_worker_heartbeats_total",
                    "mq_worker_heartbeat_failures_total"}
    wtext = wait_until(lambda: (t := scrape(wport)) and "mq_worker_stage_duration" in t and t,
                       10, "worker stage metric")
    check_against_list(wtext, worker_names)
    promtool_check(wtext, tmp_path)
    assert 'mq_worker_assignments_total{kind="plan",result="ok"} 1' in wtext
    assert 'mq_worker_info{device="cpu",worker="w1"} 1' in wtext


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    import socket
    from mq_cluster import COORDINATOR
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([str(COORDINATOR), "--listen", "127.0.0.1:0", "--data-dir",
                              str(tmp_path / "d"), "--metrics-listen", f"127.0.0.1:{port}",
                              "--insecure"],
                             capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert f"--metrics-listen = \"127.0.0.1:{port}\"" in res.stderr
