"""Path policy (mq-coordinator --allow-read / --allow-write) and the model directory's symlinks:
real coordinator and worker processes on a generated model. Locations outside the roots are
refused at submit; a symlink inside a root leading out is refused on the worker before anything
is read or created; a model file that is a symlink leading out of the model directory fails the
job whatever the policy; a secret file reached through a symlink never shows up, not one of its
bytes, in the output, the job's events, the client's output or the logs."""
import shutil
import subprocess
from pathlib import Path

import pytest

from mq_cluster import COORDINATOR
from quantize_env import check_output_dir, make_model, submit_args

# A file the submitter must never see through mq (as /etc/shadow would be).
SECRET_TOKEN = "s3cr3t-7f1c9a2e"
SECRET = f"root:$6${SECRET_TOKEN}$Zx9:19000:0:99999:7:::\nadmin:{SECRET_TOKEN}-2:19000::::::\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    model, dataset, _ = make_model(tmp / "gen", layers=2)
    read_root = tmp / "roots" / "in"
    write_root = tmp / "roots" / "out"
    outside = tmp / "outside"
    for d in (read_root, write_root, outside):
        d.mkdir(parents=True)
    shutil.copytree(model, read_root / "model")
    shutil.copy(dataset, read_root / "calibration.jsonl")
    secret = outside / "shadow"
    secret.write_text(SECRET)
    return {"tmp": tmp, "model": read_root / "model", "dataset": read_root / "calibration.jsonl",
            "read_root": read_root, "write_root": write_root, "outside": outside,
            "secret": secret}


def enforce(cluster, env):
    cluster.coordinator_args = ["--allow-read", str(env["read_root"]),
                                "--allow-write", str(env["write_root"])]


def text_of(res):
    return res.stdout + res.stderr


def assert_no_secret(cluster, *texts, out=None):
    """Not one line (nor the distinctive token) of the secret in any message, log or file."""
    texts = list(texts)
    texts.append(cluster.coordinator.output())
    texts += [w.output() for w in cluster.workers.values()]
    for job in cluster.client_json("list").get("jobs", []):
        texts.append(str(cluster.job(job["job_id"])))
    for text in texts:
        assert SECRET_TOKEN not in text, text
        for line in SECRET.splitlines():
            assert line not in text
    if out is not None and Path(out).exists():
        for p in Path(out).rglob("*"):
            if p.is_file():
                assert SECRET_TOKEN.encode() not in p.read_bytes(), p


def test_relative_or_empty_root_refused_at_startup(tmp_path):
    for flag, root in (("--allow-read", "data/models"), ("--allow-write", "")):
        res = subprocess.run([str(COORDINATOR), "--data-dir", str(tmp_path / "d"), "--listen",
                              "127.0.0.1:0", "--insecure", flag, root], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 2, res.stderr
        assert flag in res.stderr, res.stderr
        assert "absolute" in res.stderr, res.stderr


def test_outside_the_roots_refused_at_submit(cluster, env, tmp_path):
    enforce(cluster, env)
    cluster.start_coordinator()
    cluster.start_worker("w1")
    out = env["outside"] / "out"
    res = cluster.client(*submit_args(env["model"], out, env["dataset"]))
    text = text_of(res)
    print(text)
    assert res.returncode != 0, text
    assert "permission denied" in text, text
    assert f'spec.output_uri = "{out}"' in text, text
    assert f"outside the allowed write roots ({env['write_root']})" in text, text
    assert "--allow-write" in text, text
    # Prefix trickery: roots/out2 is not inside roots/out; ".." out of a root neither.
    for bad in (Path(str(env["write_root"]) + "2") / "o", env["write_root"] / ".." / "o"):
        res = cluster.client(*submit_args(env["model"], bad, env["dataset"]))
        assert res.returncode != 0 and "spec.output_uri" in text_of(res), text_of(res)
    # Reads: the model, the dataset and the tokenizer against the read roots.
    res = cluster.client(*submit_args(env["secret"].parent, env["write_root"] / "o",
                                      env["dataset"]))
    assert "spec.model_uri" in text_of(res) and "--allow-read" in text_of(res), text_of(res)
    res = cluster.client(*submit_args(env["model"], env["write_root"] / "o", env["secret"]))
    assert "spec.calibration.dataset_uri" in text_of(res), text_of(res)
    res = cluster.client("inspect", env["outside"])
    assert res.returncode != 0 and "model_uri" in text_of(res), text_of(res)
    assert cluster.client_json("list").get("jobs", []) == []
    assert not out.exists()


def test_symlinked_output_leading_out_refused_on_worker(cluster, env, tmp_path):
    enforce(cluster, env)
    cluster.start_coordinator()
    cluster.start_worker("w1")
    target = env["outside"] / "victim-dir"
    target.mkdir()
    link = env["write_root"] / "link"
    link.symlink_to(target, target_is_directory=True)
    out = link / "job-out"
    res = cluster.client(*submit_args(env["model"], out, env["dataset"]), "--wait", timeout=120)
    text = text_of(res)
    print(text)
    assert res.returncode == 1, text
    assert str(out) in text, text
    assert f'resolves to "{target / "job-out"}"' in text, text
    job = cluster.client_json("list")["jobs"][0]
    assert job["state"] == "JOB_STATE_FAILED", job
    assert list(target.iterdir()) == []  # nothing created outside the roots


@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja"])
def test_model_file_symlinked_out_of_the_model_dir_fails_the_job(cluster, env, tmp_path, name):
    """No policy at all: the model directory check always applies. tokenizer.json is read at
    planning (the calibration tokenizer); chat_template.jinja only at finalization, where it
    would be copied into the output."""
    cluster.start_coordinator()
    cluster.start_worker("w1")
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(env["secret"])
    if name != "tokenizer.json":  # the calibration tokenizer: a real copy, elsewhere
        shutil.copy(env["model"] / "tokenizer.json", tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    extra = [] if name == "tokenizer.json" else ["--tokenizer", tmp_path / "tokenizer.json"]
    res = cluster.client(*submit_args(model, out, env["dataset"], "--max-attempts", 1, *extra),
                         "--wait", timeout=300)
    text = text_of(res)
    print(text)
    assert res.returncode == 1, text
    assert f'"{name}"' in text and "a symlink leading out of the model directory" in text, text
    assert cluster.client_json("list")["jobs"][0]["state"] == "JOB_STATE_FAILED"
    assert not (out / name).exists()
    assert_no_secret(cluster, text, out=out)


def test_dataset_symlinked_to_a_secret(cluster, env, tmp_path):
    # With the policy: the dataset's name is inside the read roots, its target is not.
    enforce(cluster, env)
    cluster.start_coordinator()
    cluster.start_worker("w1")
    link = env["read_root"] / "innocent.jsonl"
    link.symlink_to(env["secret"])
    res = cluster.client(*submit_args(env["model"], env["write_root"] / "d1", link), "--wait",
                         timeout=120)
    text = text_of(res)
    print(text)
    assert res.returncode == 1, text
    assert str(link) in text and f'resolves to "{env["secret"]}"' in text, text
    assert_no_secret(cluster, text)


def test_dataset_symlinked_to_a_secret_without_policy(cluster, env, tmp_path):
    # Without a policy the file is read, but a parse error quotes none of it.
    cluster.start_coordinator()
    cluster.start_worker("w1")
    texts = []
    for name in ("data.jsonl", "data.safetensors"):
        link = tmp_path / name
        link.symlink_to(env["secret"])
        res = cluster.client(*submit_args(env["model"], tmp_path / f"out-{name}", link),
                             "--wait", timeout=120)
        text = text_of(res)
        print(text)
        assert res.returncode == 1, text
        assert str(link) in text, text
        if name.endswith(".jsonl"):
            assert "line 1: not valid JSON (syntax error at byte" in text, text
        else:
            assert "not a valid safetensors file" in text and "header length" not in text, text
        texts.append(text)
    assert_no_secret(cluster, *texts)


def test_job_inside_the_roots_succeeds(cluster, env, tmp_path):
    enforce(cluster, env)
    cluster.start_coordinator()
    cluster.start_worker("w1")
    out = env["write_root"] / "good" / "out"  # parents are created inside the root
    res = cluster.client(*submit_args(env["model"], f"file://{out}", env["dataset"]), "--wait",
                         timeout=300)
    assert res.returncode == 0, text_of(res)
    check_output_dir(out)
    res = cluster.client("inspect", env["model"])
    assert res.returncode == 0, text_of(res)
