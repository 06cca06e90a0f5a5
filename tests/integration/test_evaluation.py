"""The EVALUATING phase and evaluation jobs on the trained model (tests/data/ds3-trained).

A quantize job measures its output against the original after finalization: quality.json in the
output (listed in the manifest), the numbers in status, events and metrics. Checked here: the
numbers equal an independent transformers computation on the same tokens (1e-3 relative, the
definitions of tests/interop/test_eval.py), GPTQ is closer to the original than RTN, a broken
checkpoint fails a --max-kl gate with the measured value in the reason while a good one passes,
SIGKILL of the coordinator or the worker during EVALUATING ends with the same quality.json and
no layer quantized again, a file changed after finalization is recomputed instead of measured,
and bad settings get clear errors."""
import importlib.util
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from mq_cluster import free_port
from quantize_env import check_output_dir, manifest

DATA = Path(__file__).resolve().parents[1] / "data" / "ds3-trained"
INTEROP = Path(__file__).resolve().parents[1] / "interop" / "test_eval.py"
WINDOW, WINDOWS = 256, 8


def interop():
    """tests/interop/test_eval.py: the transformers side of the measurement."""
    import sys
    sys.path.insert(0, str(INTEROP.parent))
    spec = importlib.util.spec_from_file_location("interop_eval", INTEROP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """WINDOWS x WINDOW token windows of heldout.txt (text training never saw), as an input_ids
    JSONL dataset."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DATA / "tokenizer.json"))
    ids = tok.encode((DATA / "heldout.txt").read_text(encoding="utf-8")).ids
    step = len(ids) // WINDOWS
    windows = [ids[i * step:i * step + WINDOW] for i in range(WINDOWS)]
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    path.write_text("".join(json.dumps({"input_ids": w}) + "\n" for w in windows))
    return path, windows


def quantize(cluster, out, method, *extra, expect=0, seqlen=256):
    res = cluster.client("submit", "--model", DATA, "--output", out, "--dataset",
                         DATA / "calibration.jsonl", "--num-calibration-samples", 128,
                         "--max-sequence-length", seqlen, "--seed", 1, "--method", method,
                         *extra, "--wait", timeout=900)
    assert res.returncode == expect, f"{res.stdout}\n{res.stderr}"
    return res.stdout.split()[0], res


def submit_rtn(cluster, out):
    """Submits a small RTN job (128 x 128 calibration, 8 evaluation sequences); its id."""
    res = cluster.client("submit", "--model", DATA, "--output", out, "--dataset",
                         DATA / "calibration.jsonl", "--num-calibration-samples", 128,
                         "--max-sequence-length", 128, "--seed", 1, "--method", "rtn",
                         "--eval-samples", 8)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[0]


def quality(out):
    return json.loads((Path(out) / "quality.json").read_text())


def phases(cluster, job_id):
    return [a["phase"] for a in cluster.client_json("status", job_id).get("attempts", [])]


def test_quality_matches_transformers_gptq_beats_rtn_and_the_gate(cluster, tmp_path, heldout):
    path, windows = heldout
    port = free_port()
    cluster.start_coordinator(metrics_port=port)
    cluster.start_worker("w0")
    evalargs = ("--eval-dataset", path, "--eval-samples", WINDOWS,
                "--eval-max-sequence-length", WINDOW)
    jobs = {}
    for method in ("gptq", "rtn"):
        jobs[method], res = quantize(cluster, tmp_path / method, method, *evalargs,
                                     "--max-kl", "0.5")
        assert "evaluated" in res.stdout  # submit --wait shows the evaluation's line
        m = check_output_dir(tmp_path / method)
        assert "quality.json" in {f["name"] for f in m["files"]}
        verify = cluster.client("verify", tmp_path / method)
        assert verify.returncode == 0, verify.stderr
    q = {m: quality(tmp_path / m) for m in jobs}

    # Independent computation with transformers on the same tokens.
    ie = interop()
    import torch
    ids = torch.tensor(windows)
    ref = ie.python_side(DATA, ids)
    worst = 0.0
    for method in jobs:
        assert q[method]["format"] == "mq-quality-1"
        assert q[method]["sequences"] == WINDOWS and q[method]["positions"] == WINDOWS * (WINDOW - 1)
        assert q[method]["gate"] == {"max_kl": 0.5, "max_ppl_ratio": None, "verdict": "passed"}
        theirs = ie.python_metrics(ref, ie.python_side(tmp_path / method, ids), ids)
        worst = max(worst, ie.compare(ie.flatten(q[method]), theirs, method))
    print(f"job quality.json against transformers: max relative difference {worst:.2e}")
    gptq, rtn = q["gptq"], q["rtn"]
    print(f"KL mean: GPTQ {gptq['kl']['mean']:.5f}  RTN {rtn['kl']['mean']:.5f}; top-1 "
          f"{gptq['top1_agreement']:.4f} / {rtn['top1_agreement']:.4f}")
    assert 0 < gptq["kl"]["mean"] < rtn["kl"]["mean"]

    # Status (text and JSON) and the job's events carry the same numbers.
    status = cluster.client_json("status", jobs["gptq"])
    assert status["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert status["job"]["quality"]["kl_mean"] == pytest.approx(gptq["kl"]["mean"], rel=1e-12)
    assert status["job"]["quality"]["gate"] == "passed"
    assert [e for e in status["events"] if e["kind"] == "evaluated"]
    assert phases(cluster, jobs["gptq"]) == ["plan", "quantize", "finalize", "evaluate"]
    text = cluster.client("status", jobs["gptq"]).stdout
    assert "Quality:      KL(original || quantized) mean" in text
    assert "Gate:         passed" in text
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert re.search(r"^mq_job_quality_kl_mean_count 2$", metrics, re.M), metrics
    assert re.search(r'^mq_job_quality_gate_total\{result="passed"\} 2$', metrics, re.M)

    # A broken checkpoint (layer 1's expert scales scrambled) against a gate between RTN's KL
    # and the broken one's: it fails with the measured value; the good one passes.
    broken = ie.scramble_scales(tmp_path / "rtn", tmp_path / "broken", 1)
    gate = str(4 * rtn["kl"]["mean"])
    good = cluster.client("eval", "--model", tmp_path / "rtn", "--reference", DATA,
                          "--dataset", path, "--samples", WINDOWS, "--max-sequence-length",
                          WINDOW, "--max-kl", gate, "--wait", timeout=600)
    assert good.returncode == 0, good.stderr
    good_q = cluster.client_json("status", good.stdout.split()[0])["job"]["quality"]
    # Same tokens, same device: the evaluation job measures what the quantize job measured.
    assert good_q["kl_mean"] == pytest.approx(rtn["kl"]["mean"], rel=1e-6)
    assert good_q["gate"] == "passed"
    bad = cluster.client("eval", "--model", broken, "--reference", DATA, "--dataset", path,
                         "--samples", WINDOWS, "--max-sequence-length", WINDOW, "--max-kl", gate,
                         "--wait", timeout=600)
    assert bad.returncode == 1
    bad_job = cluster.client_json("status", re.search(r"job (j-\S+)", bad.stderr).group(1))["job"]
    assert bad_job["state"] == "JOB_STATE_FAILED"
    measured = bad_job["quality"]["kl_mean"]
    assert measured > 5 * rtn["kl"]["mean"]
    assert "failed the quality gate: mean KL" in bad.stderr
    assert f"mean KL {measured:.6g}"[:12] in bad.stderr, bad.stderr
    # The evaluation job wrote nothing into the checkpoint it measured.
    assert not (broken / "quality.json").exists() or (broken / "quality.json").read_bytes() == \
        (tmp_path / "rtn" / "quality.json").read_bytes()


def test_kill_during_evaluating_keeps_quantization_and_quality(cluster, tmp_path):
    """Coordinator SIGKILLed during EVALUATING (the worker's evaluation continues), then worker
    SIGKILLed during EVALUATING of a second identical job (another worker evaluates again):
    both succeed with identical quality.json and one quantize attempt each."""
    cluster.start_coordinator()
    slow = {"MQ_FAULT_EVAL_LAYER_DELAY_MS": "1500"}
    cluster.start_worker("w0", env=slow)
    outs, ids = {}, {}
    for case in ("coordinator", "worker"):
        out = tmp_path / case
        job = submit_rtn(cluster, out)
        cluster.wait_job(job, "JOB_STATE_EVALUATING", timeout=600)
        time.sleep(1.0)
        if case == "coordinator":
            cluster.kill_coordinator()
            cluster.start_coordinator()
        else:
            cluster.workers["w0"].kill9()
            cluster.start_worker("w1")
        cluster.wait_job(job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=600)
        assert cluster.job_state(job) == "JOB_STATE_SUCCEEDED", cluster.client("status", job).stdout
        status = cluster.client_json("status", job)
        ph = phases(cluster, job)
        assert ph.count("quantize") == 1 and ph.count("plan") == 1, ph
        assert ph.count("finalize") == 1, ph  # a lost evaluation is not finalized again
        if case == "worker":
            assert ph.count("evaluate") == 2, ph
        steps = [e for e in status["events"] if e["kind"] == "layer_committed"]
        assert len(steps) == 3, steps  # no layer quantized again
        check_output_dir(out)
        outs[case] = quality(out)
        ids[case] = job
    a, b = (outs[c] for c in ("coordinator", "worker"))
    for q in (a, b):
        assert "held-out sequences" in q["source"] and "calibration used 0..127" in q["source"]
    assert a == b


def test_file_changed_after_finalization_is_recomputed_not_measured(cluster, tmp_path):
    """A layer file whose byte flips between finalization and evaluation is not measured as it
    is: the evaluation verifies every file against the manifest first, the coordinator
    uncommits that layer, quantizes it again, finalizes and evaluates again; the job succeeds
    with an output that verifies and the same quality.json as an undisturbed job."""
    cluster.start_coordinator()
    # The delay holds the evaluation before its verification (its first progress report).
    cluster.start_worker("w0", env={"MQ_FAULT_EVAL_LAYER_DELAY_MS": "3000"})
    outs = {}
    for case in ("clean", "flipped"):
        out = tmp_path / case
        job = submit_rtn(cluster, out)
        if case == "flipped":
            cluster.wait_job(job, "JOB_STATE_EVALUATING", timeout=600)
            victim = sorted(out.glob("model-layer00001-*.safetensors"))[0]
            data = bytearray(victim.read_bytes())
            data[len(data) // 2] ^= 0x40
            victim.write_bytes(bytes(data))
        cluster.wait_job(job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=600)
        status = cluster.client_json("status", job)
        assert status["job"]["state"] == "JOB_STATE_SUCCEEDED", json.dumps(status)[:3000]
        ph = phases(cluster, job)
        if case == "flipped":
            corrupt = [e["message"] for e in status["events"] if e["kind"] == "file_corrupt"]
            assert len(corrupt) == 1 and victim.name in corrupt[0], status["events"]
            assert ph.count("quantize") == 2 and ph.count("finalize") == 2, ph
            assert ph.count("evaluate") == 2, ph
        else:
            assert ph.count("evaluate") == 1, ph
        check_output_dir(out)
        outs[case] = (quality(out), {p.name: p.read_bytes() for p in out.glob("model-layer*")})
    assert outs["clean"] == outs["flipped"]


def test_not_measured_eval_off_and_bad_settings(cluster, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w0")

    def refused(*args, needle):
        res = cluster.client(*args)
        assert res.returncode != 0, res.stdout
        assert needle in res.stderr, res.stderr

    base = ("submit", "--model", DATA, "--output", tmp_path / "x", "--dataset",
            DATA / "calibration.jsonl")
    refused(*base, "--max-kl", "-1", needle="spec.eval.max_kl = -1: must be a finite number >= 0")
    refused(*base, "--max-kl", "abc", needle='--max-kl = "abc": must be a number >= 0')
    refused(*base, "--max-ppl-ratio", "0", needle="spec.eval.max_ppl_ratio = 0: must be")
    refused(*base, "--eval-samples", "0", "--max-kl", "0.1",
            needle="a quality gate (max_kl, max_ppl_ratio) needs the evaluation")
    refused(*base, "--eval-samples", "-3", needle="spec.eval.num_samples = -3")
    refused("eval", "--model", DATA, "--reference", DATA, needle="--dataset PATH is required")
    refused("eval", "--model", DATA, "--reference", DATA, "--dataset", DATA / "calibration.jsonl",
            "--samples", "0", needle="an evaluation job needs between 1 and 100000 sequences")

    # Calibration takes every sequence of the dataset: nothing is left to evaluate on. Without
    # a gate the job succeeds and says so; with one it fails, saying why.
    # (1000 asked for, the dataset holds 150: the plan says so and estimates for 150.)
    job, _ = quantize(cluster, tmp_path / "all", "rtn", "--num-calibration-samples", 1000,
                      "--max-kl", "1", expect=1, seqlen=64)
    st = cluster.client_json("status", job)["job"]
    notes = {n["where"]: n["message"] for n in st["plan"].get("notes", [])}
    assert "holds 150 sequences, fewer than the 1000 asked for: the job calibrates on 150" in \
        notes["request.calibration.num_samples"], notes
    assert "none is left for the evaluation to hold out" in notes["request.calibration.num_samples"]
    assert int(st["plan"]["estimate"]["calibration_tokens"]) == 150 * 64
    assert "holds 150 sequences" in cluster.client("status", job).stdout
    assert st["state"] == "JOB_STATE_FAILED"
    assert "no held-out sequence: calibration used 150 of the 150" in st["quality"]["not_measured"]
    assert "failed the quality gate: nothing was measured" in st["message"]
    assert quality(tmp_path / "all")["not_measured"] == st["quality"]["not_measured"]
    assert cluster.client("verify", tmp_path / "all").returncode == 0  # the output stays whole

    # --eval-samples 0: no evaluation, no quality.json.
    job, _ = quantize(cluster, tmp_path / "off", "rtn", "--eval-samples", 0, seqlen=64)
    assert phases(cluster, job) == ["plan", "quantize", "finalize"]
    assert "quality.json" not in {f["name"] for f in manifest(tmp_path / "off")["files"]}
    assert "Evaluation:   off" in cluster.client("status", job).stdout

    # An evaluation job on a checkpoint of another architecture fails naming the field.
    other = tmp_path / "other"
    gen = os.environ.get("MQ_GEN_MODEL") or str(Path(os.environ["MQ_BUILD_DIR"]) /
                                                "tests/tools/mq-gen-model")
    import subprocess
    subprocess.run([gen, "--output", str(other), "--layers", "2"], check=True,
                   capture_output=True)
    res = cluster.client("eval", "--model", other, "--reference", DATA, "--dataset",
                         DATA / "calibration.jsonl", "--samples", 2, "--max-attempts", 1,
                         "--wait", timeout=300)
    assert res.returncode == 1
    assert "the models must have the same architecture" in res.stderr, res.stderr
