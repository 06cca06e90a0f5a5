"""mq-client inspect through a real coordinator and worker: generated FP8/BF16 checkpoints
and deliberately broken ones, with exact expectations."""

import json
from pathlib import Path

import pytest

from mq_cluster import generate_model


@pytest.fixture
def served(cluster):
    cluster.start_coordinator()
    cluster.start_worker("inspector")
    return cluster


def inspect_json(cluster, model, *args):
    res = cluster.client("inspect", model, *args, "--json")
    return res, json.loads(res.stdout)["report"]


def problems(report):
    return [(p["where"], p["message"]) for p in report.get("problems", [])]


def test_fp8_model_with_ragged_dims(served, tmp_path):
    model = generate_model(tmp_path / "m", "--format", "fp8", "--hidden", "200", "--layers", "4",
                           "--dense-layers", "1", "--experts", "16", "--experts-per-tok", "4",
                           "--groups", "4", "--topk-groups", "2", "--moe-intermediate", "130",
                           "--mtp", "1", "--shards", "3")
    # Per-channel: no group size divides the experts' 200 and 130 input columns.
    res, report = inspect_json(served, model, "--gang-size", "2", "--group-size", "-1")
    assert res.returncode == 0, res.stderr
    assert problems(report) == []
    s = report["summary"]
    assert s["architecture"] == "DeepseekV3ForCausalLM" and s["model_type"] == "deepseek_v3"
    assert s["weight_format"] == "fp8"
    assert (s["num_hidden_layers"], s["first_k_dense_replace"], s["num_nextn_predict_layers"]) \
        == (4, 1, 1)
    assert (s["n_routed_experts"], s["num_experts_per_tok"], s["n_group"], s["topk_group"]) \
        == (16, 4, 4, 2)
    assert (s["hidden_size"], s["moe_intermediate_size"]) == ("200", "130")
    assert s["num_shards"] == 3
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert int(s["num_tensors"]) == len(index["weight_map"])
    assert int(s["checkpoint_bytes"]) == index["metadata"]["total_size"]

    # The plan: MTP left out unless asked for; experts split evenly over the gang.
    kinds = [l["kind"] for l in report["layers"]]
    assert kinds == ["LAYER_KIND_DENSE"] + ["LAYER_KIND_MOE"] * 3
    assert [l["num_quantized_linears"] for l in report["layers"]] == [0, 48, 48, 48]
    ranks = [(r["rank"], r.get("first_expert", 0), r["num_experts"], r["num_sequences"])
             for r in report["ranks"]]
    assert ranks == [(0, 0, 8, "256"), (1, 8, 8, "256")]
    est = report["estimate"]
    assert int(est["calibration_tokens"]) == 512 * 4096
    assert est["tokens_per_expert"] == 512 * 4096 * 4 / 16
    # The worker leaves --experts-per-pass and --dispatch-tokens to the plan: chosen for its
    # host memory (a CPU worker), the fewest passes, then the fewest rounds, that fit.
    assert est.get("experts_per_pass_chosen") and est.get("dispatch_tokens_chosen"), est
    assert int(est["device_memory_bytes"]) > 0
    assert int(est["gpu_bytes_per_rank"]) <= 0.95 * int(est["device_memory_bytes"])
    per_pass, tokens = int(est.get("experts_per_pass", 0)), int(est.get("dispatch_tokens", 0))
    passes = 1 if per_pass == 0 else -(-8 // per_pass)  # 8 experts a rank
    rounds = 1 if tokens == 0 else min(512, -(-512 * 4096 // tokens))
    assert int(est["expert_passes"]) == passes and int(est["dispatch_rounds"]) == rounds, est
    for key in ("gpu_bytes_per_rank", "host_bytes_per_rank", "output_bytes",
                "scratch_bytes_per_rank"):
        assert int(est[key]) > 0, key

    res, with_mtp = inspect_json(served, model, "--include-mtp", "--all-linear", "--group-size",
                                 "-1")
    assert [l["kind"] for l in with_mtp["layers"]][-1] == "LAYER_KIND_MTP"
    assert len(with_mtp["ranks"]) == 1
    assert with_mtp["layers"][0]["num_quantized_linears"] > 0  # all linear: dense layer too

    human = served.client("inspect", model, "--gang-size", "2", "--layers", "--group-size", "-1",
                          check=True).stdout
    for text in ("fp8 weights", "Layers:       4 (1 dense, 3 MoE) + 1 MTP",
                 "Estimate (gang of 2)", f"dispatch rounds:       {rounds} per MoE layer",
                 f"experts per pass:      {per_pass or 'all'} ({passes} pass",
                 "per MoE layer), chosen by the plan for ", "RANK",
                 "0..7", "8..15", "LAYER  KIND",
                 # 1 M tokens of 200 wide per rank: a checkpoint (0.84 s to write) is 13% of a
                 # 6.6 s layer, so one every two layers.
                 "hidden states saved:   every 2 layers (a resume replays at most 1 layer, ~4 s"):
        assert text in human, human


    # Groups of 128 would leave the experts short last groups: refused, with what fits.
    res, report = inspect_json(served, model)
    assert res.returncode == 1
    assert problems(report) == [(
        "request.group_size",
        "group_size = 128: the routed experts' mlp.experts.*.gate_proj has 200, "
        "mlp.experts.*.up_proj has 200, mlp.experts.*.down_proj has 130 input columns, not a "
        "multiple of 128 (a short last group, which vLLM and transformers cannot run; a layer's "
        "experts share one scheme, so they cannot be left unquantized): use group_size "
        "-1 (per channel)")]


def test_all_linear_names_the_linears_left_unquantized(served, tmp_path):
    model = generate_model(tmp_path / "m")  # q_lora_rank 96, kv_lora_rank 64
    res, report = inspect_json(served, model, "--all-linear")
    assert res.returncode == 0, res.stderr
    assert [(n["where"], n["message"]) for n in report["notes"]] == [
        ("model.layers.*.self_attn.q_b_proj", "left unquantized (BF16, in "
         "quantization_config.ignore): 96 input columns are not a multiple of group_size 128"),
        ("model.layers.*.self_attn.kv_b_proj", "left unquantized (BF16, in "
         "quantization_config.ignore): 64 input columns are not a multiple of group_size 128")]
    human = served.client("inspect", model, "--all-linear", check=True).stdout
    assert "Notes (2):\n  model.layers.*.self_attn.q_b_proj: left unquantized" in human, human
    res, report = inspect_json(served, model, "--all-linear", "--group-size", "32")
    assert report.get("notes", []) == []


def test_mtp_declared_but_absent(served, tmp_path):
    # transformers saves num_nextn_predict_layers: 1 without the MTP layer's weights.
    model = generate_model(tmp_path / "m", "--layers", "4")
    config = json.loads((model / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (model / "config.json").write_text(json.dumps(config))
    res, report = inspect_json(served, model)
    assert res.returncode == 0, res.stderr
    assert report["summary"]["num_nextn_predict_layers"] == 1
    assert report["summary"]["num_mtp_layers_present"] == 0
    assert [l["kind"] for l in report["layers"]] == ["LAYER_KIND_DENSE"] + ["LAYER_KIND_MOE"] * 3
    human = served.client("inspect", model, check=True).stdout
    assert ("Layers:       4 (1 dense, 3 MoE) + 1 MTP declared in config.json but absent (no "
            "model.layers.4.* tensors; left out of the job)") in human, human
    res, report = inspect_json(served, model, "--include-mtp")
    assert res.returncode == 1
    assert [w for w, _ in problems(report)] == ["model.layers.4"]


def test_bf16_model(served, tmp_path):
    model = generate_model(tmp_path / "m", "--format", "bf16", "--q-lora-rank", "0",
                           "--no-yarn")
    res, report = inspect_json(served, model)
    assert res.returncode == 0, res.stderr
    assert report["summary"]["weight_format"] == "bf16"
    assert report["summary"].get("q_lora_rank", "0") == "0"


def test_broken_checkpoint_reports_every_problem(served, tmp_path):
    # Pick the defects among tensors of the first shard, then delete the last shard.
    probe = generate_model(tmp_path / "probe", "--shards", "3", "--layers", "4")
    weight_map = json.loads((probe / "model.safetensors.index.json").read_text())["weight_map"]
    first = "model-00001-of-00003.safetensors"
    in_first = sorted(n for n, f in weight_map.items() if f == first)
    shape_victim = next(n for n in in_first if n.endswith("experts.3.up_proj.weight"))
    scale_victim = next(n for n in in_first if n.endswith("self_attn.o_proj.weight"))
    lost = sum(1 for f in weight_map.values() if f == "model-00003-of-00003.safetensors")

    model = generate_model(tmp_path / "broken", "--shards", "3", "--layers", "4",
                           "--defect", f"wrong-shape={shape_victim}",
                           "--defect", f"missing-scale={scale_victim}")
    (model / "model-00003-of-00003.safetensors").unlink()
    res, report = inspect_json(served, model)
    assert res.returncode == 1
    assert res.stderr.strip() == f"mq-client: inspect: {model} has 4 problems"
    assert sorted(problems(report)) == sorted([
        ("model-00003-of-00003.safetensors",
         f"missing shard: file not found; {lost} tensors mapped to it are unavailable"),
        (shape_victim, "shape [129, 256]: expected [128, 256]"),
        (shape_victim + "_scale_inv",
         "shape [1, 2]: expected [2, 2] = ceil([129, 256] / 128) for the weight_scale_inv of "
         f"F8_E4M3 weight \"{shape_victim}\""),
        (scale_victim + "_scale_inv",
         f"missing tensor: F8_E4M3 weight \"{scale_victim}\" needs an F32 weight_scale_inv "
         "of shape [2, 1]"),
    ])
    human = served.client("inspect", model).stdout
    assert "Problems (4):" in human and "missing shard" in human


def test_bad_config_and_missing_directory(served, tmp_path):
    model = generate_model(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["n_group"] = 3
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    res, report = inspect_json(served, model)
    assert res.returncode == 1
    messages = [m for w, m in problems(report) if w == "config.json"]
    assert any('"hidden_size"' in m for m in messages), messages
    assert any('"n_group" = 3' in m for m in messages), messages

    res, report = inspect_json(served, tmp_path / "nowhere")
    assert res.returncode == 1
    assert problems(report) == [("request.model_dir", f"\"{tmp_path / 'nowhere'}\" does not exist")]


def test_request_checks(served, tmp_path):
    model = generate_model(tmp_path / "m")
    res, report = inspect_json(served, model, "--gang-size", "9")  # 8 experts
    assert res.returncode == 1
    assert [w for w, _ in problems(report)] == ["request.gang_size"]
    bad = served.client("inspect", model, "--gang-size", "-1")
    assert bad.returncode == 1 and "invalid argument: gang_size = -1" in bad.stderr
    bad = served.client("inspect", model, "--group-size", "100")
    assert bad.returncode == 1 and "group_size = 100" in bad.stderr


def test_inspect_without_workers_is_unavailable(cluster, tmp_path):
    cluster.start_coordinator()
    model = generate_model(tmp_path / "m")
    res = cluster.client("inspect", model)
    assert res.returncode == 1
    assert "no live worker can inspect" in res.stderr
