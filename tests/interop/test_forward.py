"""Our DeepSeek-V3 forward (mq-forward) against transformers' DeepseekV3ForCausalLM.

Random fp32 models are built with transformers from several configs (dense only, several MoE
layers, group-limited routing with 4 groups / 1 group / 2 experts per group, hidden sizes not
divisible by 128, q_lora_rank null and set, YaRN on and off, with and without mscale_all_dim),
saved with save_pretrained, run through mq-forward in float32 on the same token ids, and every
hidden state and the logits are compared: relative error ||ours - theirs|| / ||theirs|| < 1e-4.

transformers runs with attn_implementation="eager" and experts_implementation="eager" (the
per-expert loop of DeepseekV3Experts.forward; "grouped_mm" is checked to agree as well).
Python packages: torch, safetensors, transformers (and its dependencies), pytest.
"""

import json
import os
import subprocess

import pytest

from interop_util import require

torch = require("torch")
st_torch = require("safetensors.torch")
transformers = require("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: these tests need 5.x (native "
                "DeepseekV3, experts_implementation)", allow_module_level=True)

TOLERANCE = 1e-4
BATCH, SEQ = 2, 19

BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, num_nextn_predict_layers=0, tie_word_embeddings=False,
    rope_scaling=None)

YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CONFIGS = {
    # Only dense layers, plain RoPE.
    "dense_only": dict(num_hidden_layers=2, first_k_dense_replace=2),
    # 8 experts in 4 groups, keep 2 groups; YaRN with mscale_all_dim (softmax scale × m²).
    "moe_4groups_yarn": dict(rope_scaling=YARN, qk_rope_head_dim=16, max_position_embeddings=2560),
    # One group, q_proj (q_lora_rank null), hidden 200, no renormalisation of the top-k weights.
    "one_group_no_qlora_h200": dict(hidden_size=200, n_group=1, topk_group=1, q_lora_rank=None,
                                    norm_topk_prob=False, routed_scaling_factor=1.5),
    # Hidden 200 with q LoRA; YaRN without mscale_all_dim (cos/sin × 0.1·ln(factor)+1).
    "h200_yarn_no_mscale_all_dim": dict(
        hidden_size=200, intermediate_size=136, q_lora_rank=72, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                      "beta_fast": 16, "beta_slow": 2}),
    # Several MoE layers, 16 experts in 8 groups of 2, keep 3 groups, 2 shared experts,
    # DeepSeek-V2-style mscale = mscale_all_dim = 0.707.
    "many_moe_8groups": dict(
        num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16, n_group=8,
        topk_group=3, num_experts_per_tok=4, n_shared_experts=2, qk_rope_head_dim=16,
        max_position_embeddings=256, rope_scaling=dict(YARN, factor=4.0, mscale=0.707, mscale_all_dim=0.707)),
}


def forward_binary():
    path = os.environ.get("MQ_FORWARD")
    if not path:
        build = os.environ.get("MQ_BUILD_DIR")
        if not build:
            pytest.fail("set MQ_FORWARD or MQ_BUILD_DIR (ctest sets MQ_BUILD_DIR)", pytrace=False)
        path = os.path.join(build, "tests/tools/mq-forward")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not built: cmake --build <dir> --target mq-forward",
                    pytrace=False)
    return path


def randomize(model, seed):
    """Non-trivial random weights: linears N(0, 0.06), embeddings N(0, 1), norms 1 + N(0, 0.2),
    e_score_correction_bias N(0, 0.05) (large enough to change which experts are selected)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.06 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def to_deepseek_config_json(model_dir, rope_scaling, rope_theta):
    """transformers 5 writes `rope_parameters` (rope_theta inside) and no scoring_func /
    topk_method; DeepSeek-V3 checkpoints carry `rope_theta`, `rope_scaling`, `scoring_func` and
    `topk_method` (FORMATS.md §2.1), which is what our config parser reads. Add them."""
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    cfg["scoring_func"] = "sigmoid"
    cfg["topk_method"] = "noaux_tc"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def rel_err(ours, theirs):
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def build_model(name, tmp_path):
    kwargs = dict(BASE)
    kwargs.update(CONFIGS[name])
    rope_scaling = kwargs["rope_scaling"]
    config = transformers.DeepseekV3Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    randomize(model, seed=sum(map(ord, name)))
    model_dir = tmp_path / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    to_deepseek_config_json(str(model_dir), rope_scaling, kwargs["rope_theta"])
    return model, model_dir, kwargs


def routing_probe(model):
    """Registers hooks on every router; returns a list filled with (scores+bias, topk_indices,
    n_group, topk_group, k) per MoE layer call."""
    records = []
    for module in model.modules():
        if type(module).__name__ == "DeepseekV3TopkRouter":
            def hook(mod, args, out):
                x = args[0].reshape(-1, mod.hidden_dim).float()
                scores = torch.sigmoid(x @ mod.weight.float().T)
                records.append((scores, scores + mod.e_score_correction_bias, out[2]))
            module.register_forward_hook(hook)
    return records


def run_forward(model_dir, ids_path, out_path, dtype):
    cmd = [forward_binary(), "--model", str(model_dir), "--input", str(ids_path), "--output",
           str(out_path), "--device", "cpu", "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    return st_torch.load_file(str(out_path))


def compare(name, ours, ref, n_layers):
    assert len(ref.hidden_states) == n_layers + 1
    assert sorted(ours) == sorted(["logits"] + [f"hidden_states.{i}" for i in range(n_layers + 1)])
    errors = {"logits": rel_err(ours["logits"], ref.logits)}
    for i, h in enumerate(ref.hidden_states):
        assert ours[f"hidden_states.{i}"].shape == h.shape
        errors[f"hidden_states.{i}"] = rel_err(ours[f"hidden_states.{i}"], h)
    print(f"\n{name}: max relative error {max(errors.values()):.3e}; "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"{name}: relative errors over {TOLERANCE}: {bad}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_transformers(name, tmp_path):
    model, model_dir, kwargs = build_model(name, tmp_path)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, kwargs["vocab_size"], (BATCH, SEQ), generator=gen, dtype=torch.int64)
    ids_path = tmp_path / "ids.safetensors"
    st_torch.save_file({"input_ids": ids}, str(ids_path))
    ours = run_forward(model_dir, ids_path, tmp_path / "out.safetensors", "float32")

    records = routing_probe(model)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
    n_layers = kwargs["num_hidden_layers"]
    compare(name, ours, ref, n_layers)

    # The configs must exercise the router: the correction bias and (with several groups) the
    # group limit change which experts some tokens get, so a wrong rule could not pass.
    moe_layers = n_layers - kwargs["first_k_dense_replace"]
    assert len(records) == moe_layers
    k = kwargs["num_experts_per_tok"]
    for scores, biased, chosen in records:
        chosen_set = chosen.sort(-1).values
        unbiased = scores.topk(k, -1).indices.sort(-1).values
        assert (chosen_set != unbiased).any(), "e_score_correction_bias never changes a choice"
        if kwargs["topk_group"] < kwargs["n_group"]:
            ungrouped = biased.topk(k, -1).indices.sort(-1).values
            assert (chosen_set != ungrouped).any(), "the group limit never changes a choice"

    # transformers' default experts implementation (grouped_mm) computes the same thing.
    if moe_layers:
        model.set_experts_implementation("grouped_mm")
        with torch.no_grad():
            grouped = model(input_ids=ids).logits
        assert rel_err(grouped, ref.logits) < TOLERANCE

    # bf16: transformers loading the saved checkpoint in bfloat16 (router weight and
    # e_score_correction_bias kept in fp32 by _keep_in_fp32_modules_strict) against our bf16
    # forward on the CPU. Same op sequence and the same libtorch kernels: bit-identical here
    # (observed error 0), so the fp32 tolerance applies.
    ours16 = run_forward(model_dir, ids_path, tmp_path / "out16.safetensors", "bfloat16")
    model16 = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, attn_implementation="eager",
        experts_implementation="eager").eval()
    with torch.no_grad():
        ref16 = model16(input_ids=ids, output_hidden_states=True)
    compare(name + " (bf16)", ours16, ref16, n_layers)
