"""The /metrics endpoints of real processes export exactly the metrics listed in
tests/deploy/metrics.txt (which the dashboard and alert rules are checked against), in
valid Prometheus text format; a quantize job fills every pipeline stage's histogram and moves
the per-job progress gauges, which go away when it ends; the gauges are right at once after
a coordinator restart (a worker killed meanwhile is not idle; jobs match the store)."""

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from mq_cluster import free_port, generate_model, wait_until
from quantize_env import make_model, submit_args

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

    # mq_job_progress_ratio has series only while a job runs (test_quantize_job_...).
    coordinator_names = {n for n in listed_metrics()
                         if not n.startswith("mq_worker_") and n != "mq_job_progress_ratio"}
    text = scrape(cport)
    check_against_list(text, coordinator_names)
    promtool_check(text, tmp_path)
    assert 'mq_jobs{state="failed"} 1' in text
    assert "mq_jobs_submitted_total 1" in text
    assert 'mq_jobs_finished_total{result="failed"} 1' in text
    assert 'mq_assignments_total{kind="plan",result="ok"} 1' in text
    assert 'mq_workers{state="idle"} 1' in text
    assert 'mq_workers{state="unknown"} 0' in text
    assert 'mq_job_layers{kind="total"} 0' in text
    assert "mq_job_progress_ratio{" not in text  # no job in progress
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


def value(text, series):
    """The value of one exact series (name{labels} as exported), or None."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


PIPELINE_STAGES = ("load", "forward", "hessian", "solve", "propagate", "write")


def test_quantize_job_stage_and_progress_metrics(cluster, tmp_path):
    model, dataset, _ = make_model(tmp_path / "m", layers=3)
    cport, wport = free_port(), free_port()
    cluster.start_coordinator(metrics_port=cport)
    # Slow steps, so several scrapes see the job between layers.
    cluster.start_worker("w1", metrics_port=wport, env={"MQ_FAULT_STEP_DELAY_MS": "1500"})
    res = cluster.client(*submit_args(model, tmp_path / "out", dataset), check=True)
    job = res.stdout.split()[0]
    series = f'mq_job_progress_ratio{{job_id="{job}"}}'

    seen = []  # (ratio, committed, total) while the job runs
    def finished():
        text = scrape(cport)
        ratio = value(text, series)
        if ratio is not None:
            seen.append((ratio, value(text, 'mq_job_layers{kind="committed"}'),
                         value(text, 'mq_job_layers{kind="total"}')))
        return cluster.job_state(job) in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED")
    wait_until(finished, 300, f"job {job} ended", interval=0.3)
    assert cluster.job_state(job) == "JOB_STATE_SUCCEEDED", cluster.job(job)

    ratios = sorted({r for r, _, _ in seen})
    assert len(ratios) >= 2 and ratios[0] < 1, f"progress did not move: {seen}"
    assert all(0 <= r <= 1 for r in ratios), seen
    total = cluster.job(job)["job"]["progress"]["layers_total"]
    assert all(t == total and 0 <= c <= t for _, c, t in seen), seen
    assert any(0 < c < total for _, c, _ in seen), f"no scrape between layers: {seen}"

    text = scrape(cport)
    check_against_list(text, {"mq_jobs", "mq_job_layers", "mq_workers"})
    assert "mq_job_progress_ratio{" not in text  # removed when the job ended
    assert 'mq_job_layers{kind="committed"} 0' in text
    assert 'mq_job_layers{kind="total"} 0' in text
    assert 'mq_jobs{state="succeeded"} 1' in text
    assert f"mq_layers_committed_total {total}" in text

    wtext = scrape(wport)
    check_against_list(wtext, {"mq_worker_stage_duration_seconds"})
    promtool_check(wtext, tmp_path)
    assert 'stage="layer"' not in wtext
    for stage in PIPELINE_STAGES:  # one observation per layer run (gang of one: every layer)
        count = value(wtext, f'mq_worker_stage_duration_seconds_count{{stage="{stage}"}}')
        assert count == total, f"stage {stage}: {count} observations for {total} layers"
        assert value(wtext, f'mq_worker_stage_duration_seconds_sum{{stage="{stage}"}}') >= 0
    for stage in ("plan", "finalize"):
        assert value(wtext, f'mq_worker_stage_duration_seconds_count{{stage="{stage}"}}') == 1
    assert 'mq_worker_assignments_total{kind="finalize",result="ok"} 1' in wtext


def test_gauges_right_after_a_coordinator_restart(cluster, tmp_path):
    model = generate_model(tmp_path / "model")
    cport = free_port()
    cluster.coordinator_args = ["--retain-ended-jobs", "1"]  # one ended job stays in memory
    cluster.start_coordinator(metrics_port=cport)
    cluster.start_worker("w1")
    jobs = [cluster.client("submit", "--model", model, "--output", tmp_path / f"out{i}",
                           check=True).stdout.strip() for i in range(2)]
    for job in jobs:
        cluster.wait_job(job, "JOB_STATE_FAILED")
    text = scrape(cport)
    assert 'mq_jobs{state="failed"} 2' in text  # also the one evicted from memory
    assert 'mq_workers{state="idle"} 1' in text

    cluster.workers["w1"].kill9()
    cluster.kill_coordinator()
    cluster.start_coordinator(metrics_port=cport)
    text = scrape(cport)  # at once: the worker's lease has not run out yet
    check_against_list(text, {"mq_jobs", "mq_workers"})
    assert 'mq_workers{state="idle"} 0' in text, text
    assert 'mq_workers{state="busy"} 0' in text
    assert 'mq_workers{state="unknown"} 1' in text
    assert 'mq_jobs{state="failed"} 2' in text  # what the store holds

    # A worker that registers is idle; the dead one leaves when its lease runs out.
    cluster.start_worker("w2")
    text = wait_until(lambda: (t := scrape(cport)) and 'mq_workers{state="unknown"} 0' in t and t,
                      cluster.lease_ms / 1000 + 10, "w1 declared lost")
    assert "mq_workers_lost_total 1" in text
    assert 'mq_workers{state="idle"} 1' in text


def test_a_recovered_worker_that_calls_is_idle_again(cluster, tmp_path):
    cport = free_port()
    cluster.start_coordinator(metrics_port=cport)
    cluster.start_worker("w1")
    cluster.kill_coordinator()
    cluster.start_coordinator(metrics_port=cport)  # same address: w1 reconnects
    text = wait_until(lambda: (t := scrape(cport)) and 'mq_workers{state="idle"} 1' in t and t,
                      10, "w1 heard from")
    assert 'mq_workers{state="unknown"} 0' in text
    assert "mq_workers_lost_total 0" in text


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
