"""mq-gen-model: config keys, exact tensor inventory, FP8 block quantization (re-derived with
torch from a Python port of the generator's PRNG), sharding, determinism, defects and flag errors."""

import math
import os
import struct
import subprocess
import time

import pytest

from interop_util import (CONFIGS, gen_model_path, load_config, load_index, read_header,
                          run_gen_model, require, shard_files)

torch = require("torch")
st_torch = require("safetensors.torch")


def all_tensors(model):
    out = {}
    for file in shard_files(model):
        out.update(st_torch.load_file(os.path.join(model, file)))
    return out


def header_entries(model):
    """name -> (dtype string, shape list, shard file) from the raw headers."""
    out = {}
    for file in shard_files(model):
        _, header, _ = read_header(os.path.join(model, file))
        for name, entry in header.items():
            if name != "__metadata__":
                out[name] = (entry["dtype"], entry["shape"], file)
    return out


def expected_inventory(cfg):
    """name -> (dtype, shape), derived from config.json alone (FORMATS.md §2.2)."""
    fp8 = "quantization_config" in cfg
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rq, rkv, vocab = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["vocab_size"]
    out = {}

    def linear(name, rows, cols):
        if fp8:
            out[name] = ("F8_E4M3", [rows, cols])
            out[name + "_scale_inv"] = ("F32", [math.ceil(rows / 128), math.ceil(cols / 128)])
        else:
            out[name] = ("BF16", [rows, cols])

    def mlp(prefix, width):
        linear(prefix + "gate_proj.weight", width, h)
        linear(prefix + "up_proj.weight", width, h)
        linear(prefix + "down_proj.weight", h, width)

    out["model.embed_tokens.weight"] = ("BF16", [vocab, h])
    out["model.norm.weight"] = ("BF16", [h])
    out["lm_head.weight"] = ("BF16", [vocab, h])
    n_layers = cfg["num_hidden_layers"]
    for layer in range(n_layers + cfg["num_nextn_predict_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = ("BF16", [h])
        out[p + "post_attention_layernorm.weight"] = ("BF16", [h])
        if rq is None:
            linear(p + "self_attn.q_proj.weight", nh * (dn + dr), h)
        else:
            linear(p + "self_attn.q_a_proj.weight", rq, h)
            out[p + "self_attn.q_a_layernorm.weight"] = ("BF16", [rq])
            linear(p + "self_attn.q_b_proj.weight", nh * (dn + dr), rq)
        linear(p + "self_attn.kv_a_proj_with_mqa.weight", rkv + dr, h)
        out[p + "self_attn.kv_a_layernorm.weight"] = ("BF16", [rkv])
        linear(p + "self_attn.kv_b_proj.weight", nh * (dn + dv), rkv)
        linear(p + "self_attn.o_proj.weight", h, nh * dv)
        if layer < cfg["first_k_dense_replace"]:
            mlp(p + "mlp.", cfg["intermediate_size"])
        else:
            e = cfg["n_routed_experts"]
            out[p + "mlp.gate.weight"] = ("BF16", [e, h])
            out[p + "mlp.gate.e_score_correction_bias"] = ("F32", [e])
            for i in range(e):
                mlp(f"{p}mlp.experts.{i}.", cfg["moe_intermediate_size"])
            if cfg["n_shared_experts"]:
                mlp(p + "mlp.shared_experts.",
                    cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        if layer >= n_layers:
            out[p + "embed_tokens.weight"] = ("BF16", [vocab, h])
            out[p + "enorm.weight"] = ("BF16", [h])
            out[p + "hnorm.weight"] = ("BF16", [h])
            out[p + "eh_proj.weight"] = ("BF16", [h, 2 * h])
            out[p + "shared_head.norm.weight"] = ("BF16", [h])
            out[p + "shared_head.head.weight"] = ("BF16", [vocab, h])
    return out


# ------------------------------------------------------------------------------------------
# Python port of the generator's random streams (splitmix64 + xoshiro256** + Box-Muller).

M64 = (1 << 64) - 1


def _splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M64


def normals(seed, name, count):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    _, state = _splitmix(seed ^ h)
    s = []
    for _ in range(4):
        state, word = _splitmix(state)
        s.append(word)

    def nxt():
        result = (_rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    out = []
    while len(out) < count:
        u1 = ((nxt() >> 11) + 1.0) * 2.0**-53
        u2 = (nxt() >> 11) * 2.0**-53
        r = math.sqrt(-2.0 * math.log(u1))
        theta = 2.0 * 3.14159265358979323846 * u2
        out += [r * math.cos(theta), r * math.sin(theta)]
    return out[:count]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def regenerate(seed, name, shape, mean, std):
    """The generator's f32 values for a tensor: float32(mean + float32(std) * normal)."""
    values = [mean + f32(std) * z for z in normals(seed, name, math.prod(shape))]
    return torch.tensor(values, dtype=torch.float64).float().reshape(shape)


def quantize_fp8(w):
    m, n = w.shape
    mb, nb = math.ceil(m / 128), math.ceil(n / 128)
    padded = torch.zeros(mb * 128, nb * 128)
    padded[:m, :n] = w
    blocks = padded.reshape(mb, 128, nb, 128)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).reshape(mb * 128, nb * 128)[:m, :n]
    return q.to(torch.float8_e4m3fn), scale


def dequantize_fp8(w, scale):
    m, n = w.shape
    s = scale.repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]
    return w.float() * s


# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: run_gen_model(root / name, *flags) for name, flags in CONFIGS.items()}


def test_default_run_is_fast_and_prints_summary(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([gen_model_path(), "--output", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 2.0  # "well under a second" on an idle machine
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "tensors" in lines[0] and "2 shards" in lines[0]


def test_config_has_deepseek_v3_keys(models):
    cfg = load_config(models["default_fp8"])
    expected = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
        "hidden_size": 256, "num_hidden_layers": 3, "num_nextn_predict_layers": 0,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "intermediate_size": 512,
        "moe_intermediate_size": 128, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96,
        "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "transformers_version": "4.33.1",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    for key, value in expected.items():
        assert cfg.get(key) == value, key
    bf16 = load_config(models["bf16"])
    assert "quantization_config" not in bf16
    assert bf16["num_nextn_predict_layers"] == 1
    odd = load_config(models["odd_fp8"])
    assert odd["q_lora_rank"] is None and odd["rope_scaling"] is None
    assert odd["hidden_size"] == 200 and odd["n_shared_experts"] == 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_inventory_matches_config(models, config):
    model = models[config]
    expected = expected_inventory(load_config(model))
    got = {name: (dtype, shape) for name, (dtype, shape, _) in header_entries(model).items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected
    assert set(load_index(model)["weight_map"]) == set(expected)


@pytest.mark.parametrize("config", ["default_fp8", "odd_fp8", "wide_fp8"])
def test_fp8_blocks(models, config):
    tensors = all_tensors(models[config])
    n_fp8 = 0
    for name, w in tensors.items():
        if w.dtype != torch.float8_e4m3fn:
            continue
        n_fp8 += 1
        scale = tensors[name + "_scale_inv"]
        assert scale.dtype == torch.float32
        m, n = w.shape
        assert list(scale.shape) == [math.ceil(m / 128), math.ceil(n / 128)], name
        codes = w.view(torch.uint8)
        assert not ((codes & 0x7F) == 0x7F).any(), f"{name} has NaN codes"
        # Every block reaches the top code: scale_inv = amax / 448.
        mb, nb = scale.shape
        padded = torch.zeros(mb * 128, nb * 128)
        padded[:m, :n] = w.float().abs()
        block_max = padded.reshape(mb, 128, nb, 128).amax(dim=(1, 3))
        assert torch.all(block_max == 448.0), name
        deq = dequantize_fp8(w, scale)
        if deq.numel() >= 4096:
            assert 0.018 < deq.std().item() < 0.022, name
    assert n_fp8 > 0


def test_regenerated_values_match_bit_for_bit(models):
    """Re-derive a few tensors with torch from a port of the generator's PRNG: BF16 rounding,
    F32 bias, and FP8 block quantization (partial edge blocks) must match exactly."""
    seed = 7
    model = models["odd_fp8"]
    tensors = all_tensors(model)
    norm = "model.layers.1.input_layernorm.weight"
    want = regenerate(seed, norm, [200], 1.0, 0.02).to(torch.bfloat16)
    assert torch.equal(tensors[norm].view(torch.int16), want.view(torch.int16))
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    assert torch.equal(tensors[bias], regenerate(seed, bias, [6], 0.0, 0.01))
    router = "model.layers.3.mlp.gate.weight"
    want = regenerate(seed, router, [6, 200], 0.0, 0.02).to(torch.bfloat16)
    assert torch.equal(tensors[router].view(torch.int16), want.view(torch.int16))
    for name, shape in [("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", [144, 200]),
                        ("model.layers.4.mlp.experts.5.down_proj.weight", [200, 130])]:
        w = regenerate(seed, name, shape, 0.0, 0.02)
        q, scale = quantize_fp8(w)
        assert torch.equal(tensors[name + "_scale_inv"], scale), name
        assert torch.equal(tensors[name].view(torch.uint8), q.view(torch.uint8)), name
        # And the dequantized weight is close to the original draw.
        err = (dequantize_fp8(tensors[name], tensors[name + "_scale_inv"]) - w).abs()
        assert err.max().item() <= scale.max().item() * 16 + 1e-12


def test_bf16_format_has_no_fp8(models):
    for name, (dtype, _, _) in header_entries(models["bf16"]).items():
        assert dtype in ("BF16", "F32"), name
        assert not name.endswith("_scale_inv"), name


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_shard_assignment(models, config):
    model = models[config]
    entries = header_entries(model)
    files = shard_files(model)
    assert entries["model.embed_tokens.weight"][2] == files[0]
    assert entries["model.norm.weight"][2] == files[-1]
    assert entries["lm_head.weight"][2] == files[-1]
    layer_shard = {}
    for name, (_, _, file) in entries.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            assert layer_shard.setdefault(layer, file) == file, f"layer {layer} split"
    order = [files.index(layer_shard[layer]) for layer in sorted(layer_shard)]
    assert order == sorted(order)


def test_deterministic_and_independent_of_sharding(tmp_path):
    a = run_gen_model(tmp_path / "a", "--seed", "3")
    b = run_gen_model(tmp_path / "b", "--seed", "3")
    for file in os.listdir(a):
        with open(os.path.join(a, file), "rb") as fa, open(os.path.join(b, file), "rb") as fb:
            assert fa.read() == fb.read(), file
    c = run_gen_model(tmp_path / "c", "--seed", "4")
    with open(os.path.join(a, "model-00001-of-00002.safetensors"), "rb") as fa, \
            open(os.path.join(c, "model-00001-of-00002.safetensors"), "rb") as fc:
        assert fa.read() != fc.read()
    d = run_gen_model(tmp_path / "d", "--seed", "3", "--shards", "5")
    assert len(shard_files(d)) == 5
    ta, td = all_tensors(a), all_tensors(d)
    assert ta.keys() == td.keys()
    for name in ta:
        assert torch.equal(ta[name].view(torch.uint8), td[name].view(torch.uint8)), name
    # Re-running into the same directory with fewer shards leaves no stray shard files.
    run_gen_model(d, "--seed", "3", "--shards", "1")
    assert shard_files(d) == ["model-00001-of-00001.safetensors"]


def test_defects(tmp_path):
    good = all_tensors(run_gen_model(tmp_path / "good"))
    missing = "model.layers.1.mlp.experts.3.up_proj.weight"
    no_scale = "model.layers.0.self_attn.o_proj.weight"
    shape_fp8 = "model.layers.2.self_attn.kv_b_proj.weight"
    shape_bf16 = "model.layers.2.mlp.gate.weight"
    dtype_fp8 = "model.layers.1.self_attn.kv_b_proj.weight"
    dtype_f32 = "model.layers.1.mlp.gate.e_score_correction_bias"
    model = run_gen_model(
        tmp_path / "bad", "--defect", f"missing={missing}", "--defect",
        f"missing-scale={no_scale}", "--defect", f"wrong-shape={shape_fp8}",
        f"--defect=wrong-shape={shape_bf16}", "--defect", f"wrong-dtype={dtype_fp8}",
        "--defect", f"wrong-dtype={dtype_f32}")
    bad = all_tensors(model)
    index = load_index(model)
    assert missing not in bad and missing not in index["weight_map"]
    assert missing + "_scale_inv" in bad
    assert no_scale in bad and no_scale + "_scale_inv" not in bad
    assert no_scale + "_scale_inv" not in index["weight_map"]

    w = bad[shape_fp8]
    assert w.dtype == torch.float8_e4m3fn and list(w.shape) == [good[shape_fp8].shape[0] + 1,
                                                              good[shape_fp8].shape[1]]
    assert torch.equal(w[:-1].view(torch.uint8), good[shape_fp8].view(torch.uint8))
    assert torch.all(w[-1].view(torch.uint8) == 0)
    assert torch.equal(bad[shape_fp8 + "_scale_inv"], good[shape_fp8 + "_scale_inv"])
    g = bad[shape_bf16]
    assert list(g.shape) == [9, 256] and torch.all(g[-1] == 0)

    assert bad[dtype_fp8].dtype == torch.float32
    assert torch.equal(bad[dtype_fp8], good[dtype_fp8].float())
    assert bad[dtype_f32].dtype == torch.bfloat16
    assert torch.equal(bad[dtype_f32], good[dtype_f32].to(torch.bfloat16))

    touched = {missing, no_scale + "_scale_inv", shape_fp8, shape_bf16, dtype_fp8, dtype_f32}
    for name in set(good) - touched:
        assert torch.equal(bad[name].view(torch.uint8), good[name].view(torch.uint8)), name
    total = sum(t.numel() * t.element_size() for t in bad.values())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("args,flag", [
    (["--bogus", "1"], "--bogus"),
    (["--layers", "abc"], "--layers"),
    (["--layers", "0"], "--layers"),
    (["--layers"], "--layers"),
    (["--format", "int4"], "--format"),
    (["--dense-layers", "5"], "--dense-layers"),
    (["--groups", "3"], "--groups"),
    (["--topk-groups", "3"], "--topk-groups"),
    (["--experts-per-tok", "5"], "--experts-per-tok"),
    (["--qk-rope-dim", "7"], "--qk-rope-dim"),
    (["--shards", "9"], "--shards"),
    (["--seed", "-1"], "--seed"),
    (["--defect", "bogus=x"], "--defect"),
    (["--defect", "missing=no.such.tensor"], "--defect"),
    (["--format", "bf16", "--defect",
      "missing-scale=model.layers.0.self_attn.o_proj.weight"], "--defect"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, flag):
    proc = subprocess.run([gen_model_path(), "--output", str(tmp_path / "m"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], proc.stderr
    assert not (tmp_path / "m").exists()


def test_missing_output_flag():
    proc = subprocess.run([gen_model_path()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--output" in proc.stderr
