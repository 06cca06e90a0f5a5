"""llm-compressor's AWQ on the trained test model, for comparison with mq's (bench/RESULTS.md).

Not part of the tests: llmcompressor pins transformers and compressed-tensors versions of its
own, so it runs from a separate environment that sees the system packages:

    python3 -m venv --system-site-packages /tmp/lcvenv && /tmp/lcvenv/bin/pip install llmcompressor
    /tmp/lcvenv/bin/python bench/llmcompressor_awq.py quantize /tmp/lc-out
    python3 bench/llmcompressor_awq.py evaluate /tmp/lc-out      # with the system transformers

Quantize: AWQModifier (grid 20, duo scaling) then W4A16 (group 128, symmetric, its default
min-max observer) on the routed experts only, 128 calibration texts cut to 256 tokens. Its
DeepseekV3 mappings put the router into one post-attention mapping for every layer and fail on
the dense first layer (no router there), so the mappings are written per layer kind here, the
router kept as a balance layer of the MoE layers. Its cached activations are pinned in host
memory, which needs a CUDA driver: on a CPU-only machine the pinning is skipped.
Evaluate: held-out perplexity through transformers on the windows integration_quality uses.
"""
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "ds3-trained"


def quantize(out):
    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    model = transformers.AutoModelForCausalLM.from_pretrained(DATA, dtype=torch.float32)
    tok = Tokenizer.from_file(str(DATA / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in open(DATA / "calibration.jsonl")]
    ids = [tok.encode(t).ids[:256] for t in texts][:128]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    moe = r"layers\.[12]\."  # the MoE layers of this model; layer 0 is dense
    mappings = [
        AWQMapping("re:.*input_layernorm$", ["re:.*q_a_proj$", "re:.*kv_a_proj_with_mqa$"]),
        AWQMapping("re:.*q_a_layernorm$", ["re:.*q_b_proj$"]),
        AWQMapping("re:.*kv_a_layernorm$", ["re:.*kv_b_proj$"]),
        AWQMapping(f"re:.*{moe}post_attention_layernorm$",
                   [f"re:.*{moe}mlp\\.gate$", f"re:.*{moe}.*gate_proj$", f"re:.*{moe}.*up_proj$"]),
        AWQMapping(r"re:.*layers\.0\.post_attention_layernorm$",
                   [r"re:.*layers\.0\.mlp\.gate_proj$", r"re:.*layers\.0\.mlp\.up_proj$"]),
        AWQMapping("re:.*up_proj$", ["re:.*down_proj$"]),
    ]
    recipe = [AWQModifier(n_grid=20, mappings=mappings),
              QuantizationModifier(targets=[r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"],
                                   scheme="W4A16", ignore=["lm_head"])]
    start = time.time()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=256,
            num_calibration_samples=len(ids), output_dir=str(out))
    print(f"oneshot: {time.time() - start:.0f} s")


def evaluate(out):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from quantize_env import nll_transformers
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DATA / "tokenizer.json"))
    ids = tok.encode((DATA / "heldout.txt").read_text(encoding="utf-8")).ids
    for n in (24, 48):
        step = len(ids) // n
        windows = [ids[i * step:i * step + 256] for i in range(n)]
        orig = math.exp(nll_transformers(DATA, windows))
        quant = math.exp(nll_transformers(out, windows))
        print(f"{n} windows of 256 tokens: original {orig:.4f}, quantized {quant:.4f} "
              f"(+{quant - orig:.4f})")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("quantize", "evaluate"):
        sys.exit("usage: llmcompressor_awq.py quantize|evaluate OUTPUT_DIR")
    (quantize if sys.argv[1] == "quantize" else evaluate)(Path(sys.argv[2]))
