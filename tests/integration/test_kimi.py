"""Kimi-K2 out of the box, through a real coordinator and worker: a Kimi-K2-shaped FP8 model
(model_type kimi_k2, 384 small experts, n_group = topk_group = 1, one dense layer, tiktoken.model
+ tokenizer_config.json, no tokenizer.json) is quantized from a text dataset, so calibration
goes through the tiktoken tokenizer; the output loads in transformers as DeepseekV3. The output,
being W4A16 compressed-tensors (as Kimi-K2-Thinking ships), is then refused as an input at
planning. `mq-client inspect` on header-only checkpoints of Kimi-K2's and DeepSeek-V3's real
dimensions gives credible totals (about 1.03T and 685B parameters, MTP and scales included)."""
import json
import shutil

import pytest

from mq_cluster import generate_model
from quantize_env import check_output_dir, run_in_transformers

TEXTS = ["Kimi K2 is a mixture-of-experts model with 384 experts and one shared expert.",
         "月之暗面发布了Kimi K2模型，总参数量约为一万亿。", "东京タワーは333メートルです。",
         "The quick brown fox jumps over the lazy dog; it's 42 degrees in the shade.",
         "<|im_user|>user<|im_middle|>How are you?<|im_end|><|im_assistant|>assistant"
         "<|im_middle|>Fine, thanks.<|im_end|>", "def f(x):\n    return x ** 2  # square\n",
         "Привет, мир! Как дела?", "مرحبا بالعالم", "   indented    with\ttabs\r\nand CRLF"]


def kimi_model(tmp_path):
    return generate_model(tmp_path / "kimi", "--kimi", "--layers", 2, "--hidden", 128,
                          "--intermediate", 192, "--moe-intermediate", 128, "--heads", 2,
                          "--q-lora-rank", 64, "--kv-lora-rank", 32, "--qk-nope-dim", 16,
                          "--qk-rope-dim", 8, "--v-dim", 16, "--seed", 3)


def test_kimi_k2_job_with_tiktoken_calibration(cluster, tmp_path):
    model = kimi_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["n_routed_experts"] == 384
    assert (config["n_group"], config["topk_group"], config["first_k_dense_replace"]) == (1, 1, 1)
    assert not (model / "tokenizer.json").exists() and (model / "tiktoken.model").exists()
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"text": TEXTS[i % len(TEXTS)] * (1 + i % 3)}) + "\n"
                               for i in range(64)))

    cluster.start_coordinator()
    cluster.start_worker("w1")
    out = tmp_path / "out"
    res = cluster.client("submit", "--model", model, "--output", out, "--dataset", dataset,
                         "--num-calibration-samples", 32, "--max-sequence-length", 64,
                         "--seed", 1, "--scale-search", "minmax", "--wait", timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    full = cluster.job(res.stdout.split()[0])
    job = full["job"]
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert job["progress"]["layers_committed"] == job["progress"]["layers_total"] == 2
    check_output_dir(out)
    # The tokenizer files travel with the output, unchanged.
    for name in ("tiktoken.model", "tokenizer_config.json", "tokenization_kimi.py"):
        assert (out / name).read_bytes() == (model / name).read_bytes(), name
    # transformers has no kimi_k2 model type: the output says deepseek_v3 (the architecture
    # Kimi-K2 is), keeping every other key (auto_map included), and loads without remote code.
    out_config = json.loads((out / "config.json").read_text())
    assert out_config["model_type"] == "deepseek_v3"
    assert out_config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert out_config["routed_scaling_factor"] == 2.827 and out_config["n_routed_experts"] == 384
    assert out_config["quantization_config"]["quant_method"] == "compressed-tensors"
    import transformers
    loaded = transformers.AutoConfig.from_pretrained(str(out))
    assert type(loaded).__name__ == "DeepseekV3Config"
    lines = run_in_transformers(out, ids=(config["bos_token_id"], 300, 301, 302, 5, 6))
    assert "ran it" in lines[0], lines

    # A W4A16 compressed-tensors checkpoint (what Kimi-K2-Thinking ships) as the input: refused
    # at planning, before any layer runs.
    res = cluster.client("submit", "--model", out, "--output", tmp_path / "again", "--dataset",
                         dataset, "--num-calibration-samples", 8, "--wait", timeout=300)
    assert res.returncode == 1, res.stdout
    assert "already quantized; quantize the original (FP8 or BF16) checkpoint" in \
        res.stdout + res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "again" / "config.json").exists()


def test_missing_tiktoken_config_fails_fast(cluster, tmp_path):
    model = kimi_model(tmp_path)
    (model / "tokenizer_config.json").unlink()
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    cluster.start_coordinator()
    cluster.start_worker("w1")
    res = cluster.client("submit", "--model", model, "--output", tmp_path / "out", "--dataset",
                         dataset, "--num-calibration-samples", 1, "--wait", timeout=120)
    assert res.returncode == 1
    assert "tokenizer_config.json" in res.stdout + res.stderr


# Real dimensions (config.json of each release): Kimi-K2 (384 experts of 2048, 64 heads,
# vocab 163840, n_group 1) and DeepSeek-V3 (256 experts in 8 groups, 128 heads, vocab 129280,
# one MTP layer).
REAL = {
    "kimi_k2": ["--kimi", "--vocab", 163840, "--heads", 64],
    "deepseek_v3": ["--experts", 256, "--groups", 8, "--topk-groups", 4, "--experts-per-tok", 8,
                    "--dense-layers", 3, "--vocab", 129280, "--heads", 128, "--mtp", 1],
}
COMMON = ["--header-only", "--layers", 61, "--hidden", 7168, "--intermediate", 18432,
          "--moe-intermediate", 2048, "--q-lora-rank", 1536, "--kv-lora-rank", 512,
          "--qk-nope-dim", 128, "--qk-rope-dim", 64, "--v-dim", 128, "--shards", 63]


@pytest.mark.parametrize("name,params", [("kimi_k2", 1.0265e12), ("deepseek_v3", 0.6845e12)])
def test_inspect_real_dimensions(cluster, tmp_path, name, params):
    model = generate_model(tmp_path / name, *COMMON, *REAL[name])
    cluster.start_coordinator()
    cluster.start_worker("inspector")
    res = cluster.client("inspect", model, "--gang-size", 8, "--json")
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads(res.stdout)["report"]
    assert report.get("problems", []) == []
    s = report["summary"]
    assert s["model_type"] == name
    n = int(s["num_parameters"])
    print(f"{name}: {n / 1e12:.4f}T parameters, checkpoint {int(s['checkpoint_bytes']) / 1e9:.0f} GB")
    assert abs(n - params) / params < 0.01, n
    est = report["estimate"]
    gib = 2 ** 30
    print(json.dumps(est, indent=1))
    # int4 + group scales is about half of fp8 (the BF16 attention and embeddings stay).
    assert 0.45 < int(est["output_bytes"]) / int(s["checkpoint_bytes"]) < 0.6
    assert 8 * gib < int(est["gpu_bytes_per_rank"]) < 141 * gib  # fits an H200
    assert int(est["host_bytes_per_rank"]) > 0
    human = cluster.client("inspect", model, "--gang-size", 8, check=True).stdout
    print(human)
    assert "Estimate (gang of 8)" in human
    # A projected time for the whole quantize phase (one H200 per rank, GPTQ).
    assert 60 < est["total_seconds"] < 60 * 60, est
    assert "time (projected):" in human
    # Hidden-state checkpoints (3.76 GB per rank, 2.7 s to write) every 36 (Kimi-K2: 48 experts
    # a rank) or 43 (DeepSeek-V3: 32) layers, within 3% of a layer's time; two on disk at most
    # (61 steps write one).
    every = {"kimi_k2": 36, "deepseek_v3": 43}[name]
    assert est["checkpoint_every"] == every, est
    on_disk = min(2, 60 // every)
    assert int(est["scratch_bytes_per_rank"]) == on_disk * 64 * 4096 * 7168 * 2
    assert f"hidden states saved:   every {every} layers (a resume replays at most {every - 1}" \
        in human
    # A gang of one holds the default 512 x 4096 calibration tokens on one 141 GB card: the hidden
    # states (3 x 30 GB) live in host memory, which the host estimate counts.
    alone = json.loads(cluster.client("inspect", model, "--gang-size", 1, "--json",
                                      check=True).stdout)["report"]["estimate"]
    print("gang of one:", json.dumps(alone, indent=1))
    assert int(alone["gpu_bytes_per_rank"]) < 141 * gib
    assert int(alone["host_bytes_per_rank"]) > 3 * 512 * 4096 * 7168 * 2
    # The shards are sparse (about 1 TB apparent size): do not leave them to pytest's kept
    # temporary directories.
    shutil.rmtree(model)


def test_tokenizer_config_symlink_leading_out_is_refused(cluster, tmp_path):
    """tokenizer_config.json is read beside tiktoken.model: like every model-directory file, it
    may not be a symlink leading out of the directory."""
    model = kimi_model(tmp_path)
    outside = tmp_path / "elsewhere.json"
    (model / "tokenizer_config.json").rename(outside)
    (model / "tokenizer_config.json").symlink_to(outside)
    dataset = tmp_path / "calibration.jsonl"
    dataset.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    cluster.start_coordinator()
    cluster.start_worker("w1")
    res = cluster.client("submit", "--model", model, "--output", tmp_path / "out", "--dataset",
                         dataset, "--num-calibration-samples", 1, "--wait", timeout=120)
    assert res.returncode == 1
    assert "tokenizer_config.json" in res.stdout + res.stderr
    assert "symlink leading out of the model directory" in res.stdout + res.stderr
