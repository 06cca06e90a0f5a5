"""mq-quantize-local output (compressed-tensors pack-quantized W4A16) loaded by transformers.

A small random fp32 DeepseekV3ForCausalLM (hidden 256, 3 layers with 1 dense, 8 experts,
moe_intermediate 128, every linear input a multiple of 128) is saved, quantized by
mq-quantize-local (GPTQ and RTN, routed experts only and all linears), and so is a "narrow" one
whose q_lora_rank (96) and kv_lora_rank (64) are not multiples of the group size 128 (q_b_proj
and kv_b_proj are then left BF16 and listed in `ignore`); for each:
  * the config's quantization_config parses as compressed-tensors' QuantizationConfig, and the
    checkpoint holds weight_packed/weight_scale/weight_shape for exactly the selected linears;
  * compressed-tensors' PackedQuantizationCompressor.decompress of every quantized linear equals
    our dequantization (q - 8) * scale bit for bit (bf16);
  * AutoModelForCausalLM.from_pretrained(out_dir) loads it and runs a forward, and its logits
    match transformers' logits of an unquantized checkpoint holding those dequantized weights
    (everything else as written, bf16) to < 1e-3 relative;
  * GPTQ's mean relative output error (report) is below RTN's.
Python packages: torch, safetensors, transformers (5.x), compressed-tensors, pytest.
"""

import json
import os
import subprocess

import pytest

from interop_util import require

torch = require("torch")
st_torch = require("safetensors.torch")
transformers = require("transformers")
ct = require("compressed_tensors")
from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

TOLERANCE = 1e-3
N_SEQ, SEQ = 8, 32

CONFIG = dict(
    vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=4096, num_nextn_predict_layers=0, tie_word_embeddings=False,
    rope_scaling=None)
NARROW = dict(CONFIG, q_lora_rank=96, kv_lora_rank=64)


def tool():
    path = os.environ.get("MQ_QUANTIZE_LOCAL")
    if not path:
        build = os.environ.get("MQ_BUILD_DIR")
        if not build:
            pytest.fail("set MQ_QUANTIZE_LOCAL or MQ_BUILD_DIR", pytrace=False)
        path = os.path.join(build, "tests/tools/mq-quantize-local")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not built", pytrace=False)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("ct"), CONFIG)


@pytest.fixture(scope="module")
def narrow_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("ct_narrow"), NARROW)


def make_model_dir(tmp, model_config):
    config = transformers.DeepseekV3Config(**model_config)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
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
    d = tmp / "model"
    model.save_pretrained(str(d), safe_serialization=True)
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(rope_theta=CONFIG["rope_theta"], rope_scaling=None, scoring_func="sigmoid",
               topk_method="noaux_tc")
    path.write_text(json.dumps(cfg, indent=2))
    ids = torch.randint(0, CONFIG["vocab_size"], (N_SEQ, SEQ), generator=gen)
    st_torch.save_file({"input_ids": ids}, str(tmp / "ids.safetensors"))
    return tmp


def quantize(tmp, tag, *flags):
    out = tmp / f"out_{tag}"
    report = tmp / f"report_{tag}.json"
    cmd = [tool(), "--model", str(tmp / "model"), "--output", str(out), "--input",
           str(tmp / "ids.safetensors"), "--report", str(report), *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    return out, json.loads(report.read_text())


def load_all(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(st_torch.load_file(str(out / f)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def our_dequant(packed, scale, shape):
    rows, cols = shape
    shifts = torch.arange(8, dtype=torch.int32) * 4
    u = (packed.unsqueeze(-1) >> shifts) & 0xF
    q = (u.reshape(rows, -1)[:, :cols] - 8).float()
    group = cols // scale.shape[1]
    s = scale.float().repeat_interleave(group, dim=1)
    return (q * s).to(torch.bfloat16)


def load(model_path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def params(model):
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


@pytest.mark.parametrize("model", ["model_dir", "narrow_model_dir"])
@pytest.mark.parametrize("targets", ["routed-experts", "all-linear"])
def test_transformers_loads_quantized_model(request, model, targets):
    model_dir = request.getfixturevalue(model)
    narrow = model == "narrow_model_dir"
    out, report = quantize(model_dir, f"gptq_{targets}", "--method", "gptq", "--targets", targets)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # extra="forbid": no unknown keys
    scheme = parsed.config_groups["group_0"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] is None

    tensors = load_all(out)
    quantized = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    assert quantized == sorted(l["name"] for l in report["linears"])
    if targets == "routed-experts":
        assert all(".mlp.experts." in m for m in quantized)
        assert len(quantized) == 2 * CONFIG["n_routed_experts"] * 3
    else:
        assert any("self_attn.o_proj" in m for m in quantized)
        assert any("shared_experts" in m for m in quantized)
        assert any("layers.0.mlp.gate_proj" in m for m in quantized)
        # Input widths that are not a multiple of the group size: written BF16, in `ignore`.
        short = ["self_attn.q_b_proj", "self_attn.kv_b_proj"]
        for m in short:
            is_quantized = any(m in q for q in quantized)
            assert is_quantized != narrow, (m, quantized)
            assert (("re:.*\\." + m.replace(".", "\\.") + "$") in qc["ignore"]) == narrow, qc
            if narrow:
                assert tensors[f"model.layers.1.{m}.weight"].dtype == torch.bfloat16
    for m in quantized:  # whole groups only
        assert tensors[f"{m}.weight_shape"][1] % 128 == 0, m
    assert not any(k.endswith("mlp.gate.weight_packed") for k in tensors)
    assert not any(k.endswith("_scale_inv") for k in tensors)

    # (c) compressed-tensors' decompression == our dequantization, bit for bit.
    dense = {}
    for m in quantized:
        state = {k: tensors[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        assert state["weight_packed"].dtype == torch.int32
        assert state["weight_scale"].dtype == torch.bfloat16
        theirs = PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
        ours = our_dequant(state["weight_packed"], state["weight_scale"],
                           state["weight_shape"].tolist())
        assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16)), m
        dense[f"{m}.weight"] = ours
    for k, v in tensors.items():
        if not any(k == f"{m}.{s}" for m in quantized for s in ("weight_packed", "weight_scale",
                                                                  "weight_shape")):
            want = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
            assert v.dtype == want, k
            dense[k] = v

    # Reference: an unquantized checkpoint with our dequantized weights.
    ref_dir = model_dir / f"ref_{targets}"
    ref_dir.mkdir()
    st_torch.save_file(dense, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    ref_cfg = dict(cfg)
    del ref_cfg["quantization_config"]
    (ref_dir / "config.json").write_text(json.dumps(ref_cfg, indent=2))

    ids = st_torch.load_file(str(model_dir / "ids.safetensors"))["input_ids"][:2]
    # (a) transformers loads the compressed-tensors checkpoint: every parameter equals the
    # reference's value (transformers 5 keeps decompressed weights in bf16, the scale dtype).
    # Routed experts are decompressed on load by transformers 5 (fused 3-D experts) with the
    # default config. Quantized nn.Linear modules stay compressed by default; for the parameter
    # comparison all-linear loads with dequantize=True (decompression on load), and the default
    # load's forward is checked below.
    kwargs = {}
    if targets == "all-linear":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    quant_model = load(out, **kwargs)
    ref_model = load(ref_dir)
    qs, rs = params(quant_model), params(ref_model)
    with torch.no_grad():
        for k, r in rs.items():
            m = k[: -len(".weight")]
            if k not in qs and m in quantized:  # kept compressed: weight_packed/_scale/_shape
                assert torch.equal(our_dequant(qs[f"{m}.weight_packed"], qs[f"{m}.weight_scale"],
                                               qs[f"{m}.weight_shape"].tolist()).float(),
                                   r.float()), k
                continue
            q = qs[k]
            assert q.shape == r.shape and torch.equal(q.float(), r.float()), k
            if q.dtype != r.dtype:  # run the reference in the same dtypes
                r.data = r.data.to(q.dtype)
        # (b) the same logits.
        got = quant_model(ids).logits.double()
        ref = ref_model(ids).logits.double()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"{targets}: transformers(quantized) vs reference logits rel err {err:.3e}")
    assert err < TOLERANCE, err
    if targets == "all-linear":
        # Loaded as a user loads it: the quantized linears stay compressed and run through
        # compressed-tensors' forward (which refuses partial groups). It computes in bf16, which
        # this random model (weights of std 0.06) amplifies to a few percent of the logits; the
        # exact comparison is the decompressed load above.
        with torch.no_grad():
            compressed = load(out)(ids).logits.double()
        err_compressed = ((compressed - ref).norm() / ref.norm()).item()
        print(f"{targets}: transformers(compressed forward) vs reference rel err "
              f"{err_compressed:.3e}")
        assert torch.isfinite(compressed).all()
        assert err_compressed < 0.1, err_compressed

    # (d) our own forward (mq-forward, fp32) on the same dequantized weights: same logits.
    forward = os.path.join(os.environ["MQ_BUILD_DIR"], "tests/tools/mq-forward")
    ids_path = model_dir / f"ids_{targets}.safetensors"
    st_torch.save_file({"input_ids": ids.contiguous()}, str(ids_path))
    ours_path = model_dir / f"mq_forward_{targets}.safetensors"
    proc = subprocess.run([forward, "--model", str(ref_dir), "--input", str(ids_path), "--output",
                           str(ours_path), "--dtype", "float32"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = st_torch.load_file(str(ours_path))["logits"].double()
    # transformers keeps the decompressed weights in bf16 and so computes part of the model in
    # bf16; cast the loaded model to fp32 (exact for bf16 values) to compare like with like.
    with torch.no_grad():
        for t in list(quant_model.parameters()) + list(quant_model.buffers()):
            if t.is_floating_point():
                t.data = t.data.float()
        got32 = quant_model(ids).logits.double()
    err_ours = ((ours - got32).norm() / got32.norm()).item()
    print(f"{targets}: transformers(quantized) vs mq-forward logits rel err {err_ours:.3e}")
    assert err_ours < TOLERANCE, err_ours


def test_gptq_beats_rtn(model_dir):
    _, gptq = quantize(model_dir, "cmp_gptq", "--method", "gptq")
    _, rtn = quantize(model_dir, "cmp_rtn", "--method", "rtn")
    g = gptq["mean_relative_output_error"]
    r = rtn["mean_relative_output_error"]
    print(f"mean relative output error: gptq {g:.4e} rtn {r:.4e}")
    assert gptq["quantized_linears"] == rtn["quantized_linears"] == 2 * 8 * 3
    assert g < r
    # Holding fewer expert Hessians at once (more passes) gives the same checkpoint.
    split, _ = quantize(model_dir, "cmp_gptq_split", "--method", "gptq", "--experts-per-pass", 3)
    one = load_all(model_dir / "out_cmp_gptq")
    two = load_all(split)
    assert set(one) == set(two)
    for k in one:
        assert torch.equal(one[k], two[k]), k
    for l in gptq["linears"]:
        if l["tokens"] == 0:
            assert l["fallback"] == "rtn" and l["fallback_reason"]
