"""The quantization job end to end through real processes: mq-client submit --wait on a
generated FP8 model with 1 and 2 CPU workers; the output loads in transformers; perplexity next
to the original's and RTN's; bit-identical reruns; gang sizes 1 vs 2; fail-fast inputs."""
import json
import math
from pathlib import Path

import pytest

from mq_cluster import wait_until
from quantize_env import (check_output_dir, make_model, manifest, nll_mq_forward,
                          nll_transformers, run_in_transformers, submit_args)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qenv")
    model, dataset, heldout = make_model(tmp)
    return {"tmp": tmp, "model": model, "dataset": dataset, "heldout": heldout}


def run_job(cluster, env, out, *extra):
    res = cluster.client(*submit_args(env["model"], out, env["dataset"], *extra), "--wait",
                         timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    job_id = res.stdout.split()[0]
    return job_id, cluster.job(job_id)


def codes(out):
    """Every tensor of an output directory, by name."""
    from safetensors.torch import load_file
    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(Path(out) / f)))
    return tensors


def differing_codes(out_a, out_b, what):
    """Fraction of int4 codes that differ between two output directories of the same model."""
    a, b = codes(out_a), codes(out_b)
    assert set(a) == set(b)
    differing = total = 0
    for name in a:
        if name.endswith("weight_packed"):
            x = a[name].view(-1).numpy().view("uint8")
            y = b[name].view(-1).numpy().view("uint8")
            lo = (x & 15) != (y & 15)
            hi = (x >> 4) != (y >> 4)
            differing += int(lo.sum() + hi.sum())
            total += 2 * x.size
    frac = differing / total
    print(f"{what}: {differing} of {total} int4 codes differ ({frac:.4%})")
    return frac


def test_end_to_end_gang_of_two_and_one(cluster, env, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    cluster.start_worker("w2")
    out2 = tmp_path / "out-gptq-k2"
    job_id, job = run_job(cluster, env, out2, "--gang-size", 2)
    j = job["job"]
    assert j["state"] == "JOB_STATE_SUCCEEDED"
    assert j["progress"]["layers_committed"] == j["progress"]["layers_total"] == 3
    m2 = check_output_dir(out2)
    assert j["manifest_sha256"]
    kinds = [e["kind"] for e in job["events"]]
    assert kinds.count("layer_committed") == 3, kinds
    # Per-layer statistics reached the job.
    last = j["progress"]["last_layer"]
    assert int(last["expert_tokens_max"]) > 0 and int(last["quantized_linears"]) > 0
    # 64 x <= 48 tokens fit one dispatch round; 8 experts on 2 ranks fit one pass of 16.
    assert last["dispatch_rounds"] == 1 and last["expert_passes"] == 1, last
    assert last["exchange_seconds"] > 0, last  # time in the gang's collectives

    # The same job again: bit-identical output.
    out2b = tmp_path / "out-gptq-k2-again"
    _, again = run_job(cluster, env, out2b, "--gang-size", 2)
    assert again["job"]["manifest_sha256"] == j["manifest_sha256"]
    assert manifest(out2b) == m2

    # Gang of one: the same up to rounding (documented in the README).
    out1 = tmp_path / "out-gptq-k1"
    run_job(cluster, env, out1, "--gang-size", 1)
    check_output_dir(out1)
    gang_frac = differing_codes(out1, out2, "gang 1 vs 2")
    assert gang_frac < 0.01

    # Holding fewer expert Hessians at once (a worker with --experts-per-pass 3: three batched
    # solves per layer instead of one) gives the same checkpoint.
    for name in ("w1", "w2"):
        cluster.workers[name].stop()
    cluster.worker_args = ["--experts-per-pass", "3"]
    cluster.start_worker("w3")
    out1p = tmp_path / "out-gptq-k1-passes"
    run_job(cluster, env, out1p, "--gang-size", 1)
    assert manifest(out1p) == manifest(out1)

    # Routed rows dispatched in rounds of at most 40 tokens over the gang (sequence i in round
    # i mod rounds: one or two sequences per round, so a rank often has nothing to send), each
    # of four expert passes dispatching its own experts' rows. The worker checks that every
    # routed row reached its expert's Hessians exactly once; the Hessians are summed in other
    # pieces, so GPTQ (act-order) rounds some weights the other way: a few percent of this tiny
    # random model's codes, 0.5% with 300-token rounds. Quality is checked below (perplexity).
    cluster.workers["w3"].stop()
    cluster.worker_args = ["--experts-per-pass", "1", "--dispatch-tokens", "40"]
    cluster.start_worker("w5")
    cluster.start_worker("w6")
    out2r = tmp_path / "out-gptq-k2-rounds"
    rounds_id, rounds = run_job(cluster, env, out2r, "--gang-size", 2)
    check_output_dir(out2r)
    last = rounds["job"]["progress"]["last_layer"]
    assert 32 < last["dispatch_rounds"] <= 64, last  # 64 samples of 2 to 48 tokens
    assert last["expert_passes"] == 4, last  # 8 experts, 4 per rank, one per pass
    status = cluster.client("status", rounds_id).stdout
    assert f"Dispatch:     {last['dispatch_rounds']} rounds, 4 expert passes" in status, status
    assert differing_codes(out2r, out2, "rounds vs one dispatch") < 0.05
    # Rounds are global (by sequence index), so a gang of one makes the same rounds: gang 1 and
    # gang 2 agree at least as well as they do with one dispatch.
    out1r = tmp_path / "out-gptq-k1-rounds"
    run_job(cluster, env, out1r, "--gang-size", 1)
    assert differing_codes(out1r, out2r, "rounds, gang 1 vs 2") <= gang_frac
    cluster.worker_args = []

    # RTN through the service, and perplexities.
    out_rtn = tmp_path / "out-rtn"
    run_job(cluster, env, out_rtn, "--method", "rtn", "--gang-size", 2)
    heldout = env["heldout"]
    orig = nll_mq_forward(env["model"], heldout, tmp_path)
    gptq = nll_transformers(out2, heldout)
    gptq_rounds = nll_transformers(out2r, heldout)
    rtn = nll_transformers(out_rtn, heldout)
    print(f"held-out perplexity: original {math.exp(orig):.4f}  gptq {math.exp(gptq):.4f}  "
          f"gptq in dispatch rounds {math.exp(gptq_rounds):.4f}  rtn {math.exp(rtn):.4f}")
    assert abs(gptq - orig) < abs(rtn - orig)
    assert abs(gptq_rounds - orig) < abs(rtn - orig)


def test_layer_writes_overlap_the_next_layer(cluster, env, tmp_path):
    """Each layer is written and reported on a second thread while the next layer runs
    (mq-worker --overlap-writes, the default), and the next layer's weights are read ahead
    (--prefetch-next-layer). The checkpoint equals the one of a worker doing neither; a write
    that fails fails the job naming the file, with the layers before it committed; a resume
    completes it with the same checkpoint."""
    cluster.start_coordinator()
    cluster.worker_args = ["--overlap-writes=false", "--prefetch-next-layer=false"]
    cluster.start_worker("sequential")
    out_seq = tmp_path / "out-sequential"
    run_job(cluster, env, out_seq, "--gang-size", 1)
    cluster.workers["sequential"].stop()
    cluster.worker_args = []
    cluster.start_worker("w1")
    out = tmp_path / "out-overlapped"
    run_job(cluster, env, out, "--gang-size", 1)
    check_output_dir(out)
    assert manifest(out) == manifest(out_seq)

    # Layer 1's file cannot be created (a directory holds its name, made once the job owns the
    # directory and layer 0 is committed; a slow worker leaves time for it): the failure
    # surfaces while layer 2 runs, and the job fails with the file's name; layer 0 stays
    # committed.
    cluster.workers["w1"].stop()
    # Until its lease runs out the stopped worker still counts as idle and could be handed the
    # plan (a lost planner counts against --max-attempts 1).
    wait_until(lambda: cluster.worker_state("w1") == "WORKER_STATE_DEAD", 30, "w1 declared dead")
    cluster.start_worker("slow", env={"MQ_FAULT_STEP_DELAY_MS": "3000"})
    out_f = tmp_path / "out-write-fails"
    blocker = out_f / "model-layer00001-rank000-of-001.safetensors"
    res = cluster.client(*submit_args(env["model"], out_f, env["dataset"], "--gang-size", 1,
                                      "--max-attempts", 1), check=True)
    job_id = res.stdout.split()[0]
    progress = lambda: cluster.job(job_id)["job"].get("progress", {})  # noqa: E731
    wait_until(lambda: int(progress().get("layers_committed", 0)) >= 1, 120, "layer 0 committed")
    (blocker / "in-the-way").mkdir(parents=True)
    failed = cluster.wait_job(job_id, {"JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED"},
                              timeout=300)["job"]
    print("write failure:", failed["message"])
    assert failed["state"] == "JOB_STATE_FAILED", failed
    assert "model-layer00001-rank000-of-001.safetensors" in failed["message"], failed
    assert failed["progress"]["layers_committed"] == 1, failed["progress"]
    (blocker / "in-the-way").rmdir()
    blocker.rmdir()
    cluster.client("resume", job_id, check=True)
    done = cluster.wait_job(job_id, "JOB_STATE_SUCCEEDED", timeout=300)["job"]
    assert done["progress"]["layers_committed"] == 3
    check_output_dir(out_f)
    assert manifest(out_f) == manifest(out_seq)


def test_bad_inputs_fail_fast(cluster, env, tmp_path):
    cluster.start_coordinator()
    cluster.start_worker("w1")
    # Missing dataset file.
    res = cluster.client(*submit_args(env["model"], tmp_path / "o1", tmp_path / "nope.jsonl"),
                         "--wait", timeout=120)
    assert res.returncode == 1
    assert "nope.jsonl" in res.stdout + res.stderr
    # Malformed dataset.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    res = cluster.client(*submit_args(env["model"], tmp_path / "o2", bad), "--wait", timeout=120)
    assert res.returncode == 1
    assert "line 2" in res.stdout + res.stderr
    # Output directory holding someone else's files.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    res = cluster.client(*submit_args(env["model"], busy, env["dataset"]), "--wait", timeout=120)
    assert res.returncode == 1
    assert "notes.txt" in res.stdout + res.stderr
    assert (busy / "notes.txt").read_text() == "mine"
    # Broken checkpoint: a missing shard.
    model2 = tmp_path / "model-broken"
    import shutil
    shutil.copytree(env["model"], model2)
    shard = sorted(model2.glob("model-*.safetensors"))[0]
    shard.unlink()
    res = cluster.client(*submit_args(model2, tmp_path / "o3", env["dataset"]), "--wait",
                         timeout=120)
    assert res.returncode == 1
    assert shard.name in res.stdout + res.stderr


def test_rtn_all_linear_with_narrow_attention_runs_in_transformers(cluster, tmp_path, capfd):
    """What a new user sees: an RTN job over every linear of a model whose kv_lora_rank (64),
    q_lora_rank (96), attention output (64) and dense MLP (192) are not multiples of the group
    size 128. Those linears stay BF16 and are listed in the config's ignore and in the plan; the
    output runs a forward in transformers, quietly about the MTP layer it drops. RTN
    accumulates no Hessians, and status says so; a healthy job's attempts read as healthy;
    unsupported settings are refused at submit; a failure is printed once."""
    model, dataset, _ = make_model(tmp_path / "env", mtp=1)
    cluster.start_coordinator()
    cluster.start_worker("w1")
    out = tmp_path / "out-rtn-all"

    # A bad AWQ setting is refused at submit, naming the field and what is allowed; nothing is
    # queued.
    res = cluster.client(*submit_args(model, tmp_path / "awq", dataset, "--method", "awq",
                                      "--awq-grid", 101))
    assert res.returncode == 1
    assert res.stderr == ("mq-client: submit: invalid argument: spec.awq.grid = 101: must be in "
                          "[0, 100] (0 keeps only s = 1)\n"), res.stderr
    assert cluster.client_json("list").get("jobs", []) == []

    res = cluster.client(*submit_args(model, out, dataset, "--method", "rtn", "--targets",
                                      "all-linear", "--min-expert-tokens", 40,
                                      "--rare-expert-rtn"), "--wait", timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    job_id = res.stdout.split()[0]
    assert res.stdout.count("SUCCEEDED") == 1, res.stdout
    full = cluster.job(job_id)
    j = full["job"]
    assert j["spec"]["act_order"] is False
    assert j["spec"]["calibration"]["min_expert_tokens"] == "40"
    assert j["spec"]["calibration"]["rare_expert_rtn"] is True
    left_out = ["self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.down_proj"]
    assert [n["where"] for n in j["plan"]["notes"]] == [f"model.layers.*.{m}" for m in left_out]

    # No Hessians: every layer report says 0 s, and no rare expert was "topped up".
    for layer in full["layers"]:
        for report in layer["reports"]:
            st = report["stats"]
            assert st["hessian_seconds"] == 0, st
            assert all(r["treatment"] == "rtn" for r in st.get("rare", [])), st
    status = cluster.client("status", job_id, check=True).stdout
    assert "Method:       rtn 4-bit, group 128, symmetric, gang size 1\n" in status, status
    assert ("Attempts:     plan 1, quantize 1, finalize 1, evaluate 1 (evaluate: 1 of at most 3 counted)"
            in status), status
    assert "round (RTN)" in status and "hessian" not in status, status
    assert "Notes (4):" in status, status

    # The output: BF16 for the linears left out, listed in ignore; transformers runs it.
    check_output_dir(out)
    config = json.loads((out / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    for m in left_out:
        assert "re:.*\\." + m.replace(".", "\\.") + "$" in ignore, ignore
    tensors = codes(out)
    assert "model.layers.1.self_attn.kv_b_proj.weight" in tensors
    assert "model.layers.1.self_attn.kv_b_proj.weight_packed" not in tensors
    assert "model.layers.1.self_attn.q_a_proj.weight_packed" in tensors
    capfd.readouterr()
    lines = run_in_transformers(out)
    captured = capfd.readouterr()
    assert "UNEXPECTED" not in captured.out + captured.err, captured
    assert lines[0].startswith("transformers ") and "ran it" in lines[0], lines
    assert lines[1].startswith("MTP layer 3: "), lines

    # A job that fails says why once (stderr), and calls a bad dataset a request problem.
    res = cluster.client(*submit_args(model, tmp_path / "o-bad", tmp_path / "nope.jsonl"),
                         "--wait", timeout=120)
    assert res.returncode == 1
    lines = [l for l in (res.stdout + res.stderr).splitlines() if "nope.jsonl" in l]
    assert len(lines) == 1, res.stdout + res.stderr
    assert "ended FAILED: the request has 1 problem: request.calibration.dataset_uri" in lines[0]


def test_the_plans_settings_reach_every_rank(cluster, env, tmp_path):
    """The expert passes and dispatch rounds a job runs are those of its plan, whatever the flags
    of the workers that run it: planned by a worker that leaves them to the plan (chosen for its
    host memory: everything at once for this small model), run by two workers whose flags say
    otherwise; then the other way round."""
    cluster.start_coordinator()

    def plan_then_run(planner_args, runner_args, out):
        cluster.worker_args = planner_args
        planner = f"planner-{out.name}"
        cluster.start_worker(planner)
        job_id = cluster.client(*submit_args(env["model"], out, env["dataset"], "--gang-size", 2),
                                check=True).stdout.split()[0]
        # Planned, then waiting for a gang of two: the planner leaves before it forms.
        job = wait_until(lambda: (j := cluster.job(job_id))["job"].get("plan", {}).get("layers")
                         and j["job"]["state"] == "JOB_STATE_QUEUED" and j, 60, "job planned")
        cluster.workers[planner].stop()
        cluster.worker_args = runner_args
        runners = [f"runner-{out.name}-{i}" for i in range(2)]
        for name in runners:
            cluster.start_worker(name)
        done = cluster.wait_job(job_id, ["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"], timeout=600)
        assert done["job"]["state"] == "JOB_STATE_SUCCEEDED", done["job"].get("message")
        for name in runners:
            cluster.workers[name].stop()
        return job_id, job["job"]["plan"]["estimate"], done, runners

    # Chosen by the plan: all 4 experts of a rank in one pass, all tokens in one round.
    job_id, est, done, runners = plan_then_run([], ["--experts-per-pass", "1", "--dispatch-tokens", "40"],
                                       tmp_path / "out-chosen")
    assert est.get("experts_per_pass_chosen") and est.get("dispatch_tokens_chosen"), est
    assert int(est.get("experts_per_pass", 0)) == 0 and int(est.get("dispatch_tokens", 0)) == 0
    assert int(est["expert_passes"]) == 1 and int(est["dispatch_rounds"]) == 1, est
    last = done["job"]["progress"]["last_layer"]
    assert last["expert_passes"] == 1 and last["dispatch_rounds"] == 1, last  # not 4 and > 32
    for name in runners:
        log = (cluster.tmp / f"worker-{name}.log").read_text()
        assert "experts per pass 0, dispatch tokens 0 (the job's plan)" in log, log[-2000:]
    status = cluster.client("status", job_id, check=True).stdout
    assert "experts per pass:      all (1 pass per MoE layer), chosen by the plan for" in status
    assert "dispatch tokens:       all, chosen by the plan for" in status, status

    # Given by the planner's flags: two experts a pass, rounds of at most 300 tokens; the
    # runners leave both to the plan (alone they would run one pass and one round).
    job_id, est, done, runners = plan_then_run(["--experts-per-pass", "2", "--dispatch-tokens", "300"], [],
                                       tmp_path / "out-given")
    assert not est.get("experts_per_pass_chosen") and not est.get("dispatch_tokens_chosen"), est
    assert int(est["experts_per_pass"]) == 2 and int(est["dispatch_tokens"]) == 300, est
    assert int(est["expert_passes"]) == 2 and int(est["dispatch_rounds"]) == 11, est  # 64 x 48
    last = done["job"]["progress"]["last_layer"]
    assert last["expert_passes"] == 2, last
    assert 1 < last["dispatch_rounds"] <= 11, last  # sequences of 2 to 48 tokens
    status = cluster.client("status", job_id, check=True).stdout
    assert "experts per pass:      2 (2 passes per MoE layer), given (mq-worker " \
           "--experts-per-pass)" in status, status
    cluster.worker_args = []
