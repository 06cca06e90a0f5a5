"""Shared pieces of the end-to-end quantization tests: a generated FP8 model with a trained
byte-level BPE tokenizer, generated text for calibration and held-out evaluation, the job's
command line, and perplexity through transformers (quantized outputs) and mq-forward (the
original FP8 checkpoint, same numerics as transformers to ~1e-7)."""
import json
import math
import os
import random
import subprocess
from pathlib import Path

from mq_cluster import BUILD_DIR, generate_model

VOCAB = 384
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or had not but expert layer token weight scale group model router gate quant "
         "mixture hidden state attention value key query rotary norm matrix solve hessian").split()


def sentences(seed, n):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 40))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        out.append(" ".join(words).capitalize() + ".")
    return out


def make_model(tmp, layers=3, mtp=0, seed=7):
    """FP8 DeepseekV3 checkpoint with a trained tokenizer.json, plus calibration and held-out
    text. Returns (model_dir, dataset_path, heldout_ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = Path(tmp)
    model = generate_model(tmp / "model", "--layers", layers, "--dense-layers", 1, "--experts", 8,
                           "--experts-per-tok", 2, "--groups", 2, "--topk-groups", 1,
                           "--hidden", 128, "--intermediate", 192, "--moe-intermediate", 128,
                           "--heads", 2, "--vocab", VOCAB, "--mtp", mtp, "--seed", seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(1, 2000), trainer)
    tok.save(str(Path(model) / "tokenizer.json"))
    dataset = tmp / "calibration.jsonl"
    dataset.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(2, 200)))
    heldout = [tok.encode(s).ids[:48] for s in sentences(3, 24)]
    heldout = [ids for ids in heldout if len(ids) >= 16]
    return Path(model), dataset, heldout


def submit_args(model, out, dataset, *extra):
    # Min-max scales: the generated model has random weights, on which MSE scales bring RTN as
    # close to the original as GPTQ, so GPTQ-vs-RTN checks here keep min-max (the default, mse,
    # is judged on the trained model in test_quality.py).
    return ["submit", "--model", model, "--output", out, "--dataset", dataset,
            "--num-calibration-samples", 64, "--max-sequence-length", 48, "--seed", 5,
            "--scale-search", "minmax", *extra]


def manifest(out):
    return json.loads((Path(out) / "manifest.json").read_text())


OWNER_MARKER = ".mq-job"  # {"job_id": ...}: the job the output belongs to (not in the manifest)


def check_output_dir(out):
    """Every file listed with its hash, nothing else in the directory but the manifest and the
    owner marker."""
    import hashlib
    m = manifest(out)
    listed = {f["name"]: f for f in m["files"]}
    present = {p.name for p in Path(out).iterdir()}
    expected = set(listed) | {"manifest.json", OWNER_MARKER}
    assert present == expected, present ^ expected
    assert json.loads((Path(out) / OWNER_MARKER).read_text())["job_id"].startswith("j-")
    for name, f in listed.items():
        data = (Path(out) / name).read_bytes()
        assert len(data) == f["size"], name
        assert hashlib.sha256(data).hexdigest() == f["sha256"], name
    return m


def run_in_transformers(out, ids=(1, 2, 3, 4, 5, 6, 7, 8)):
    """Loads an output directory with transformers and runs one forward; returns the lines to
    show a user. transformers has no MTP module: it drops an MTP layer's weights and would list
    every one of them as UNEXPECTED, so the load is quiet (errors only) and one line says so."""
    import torch
    import transformers
    config = json.loads((Path(out) / "config.json").read_text())
    weights = json.loads((Path(out) / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = [config["num_hidden_layers"] + i for i in range(config.get("num_nextn_predict_layers", 0))]
    mtp = [l for l in mtp if any(k.startswith(f"model.layers.{l}.") for k in weights)]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits
    assert torch.isfinite(logits).all()
    lines = [f"transformers {transformers.__version__} loaded the quantized model and ran it; "
             f"logits {tuple(logits.shape)}"]
    if mtp:
        lines.append(f"MTP layer {', '.join(map(str, mtp))}: its weights are in the checkpoint "
                     "for vLLM's speculative decoding; transformers has no MTP module and drops "
                     "them (expected)")
    return lines


def nll_transformers(model_dir, heldout, **kwargs):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", **kwargs).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in heldout:
            t = torch.tensor([ids])
            logits = model(t).logits[0, :-1].double()
            lp = torch.log_softmax(logits, -1)
            total -= lp.gather(1, t[0, 1:].unsqueeze(1)).sum().item()
            count += len(ids) - 1
    return total / count


def nll_mq_forward(model_dir, heldout, tmp):
    """The original checkpoint through mq-forward (fp32), one sequence at a time."""
    import torch
    from safetensors.torch import load_file, save_file
    total, count = 0.0, 0
    for i, ids in enumerate(heldout):
        inp = Path(tmp) / f"ids{i}.safetensors"
        outp = Path(tmp) / f"logits{i}.safetensors"
        save_file({"input_ids": torch.tensor([ids])}, str(inp))
        proc = subprocess.run([str(BUILD_DIR / "tests/tools/mq-forward"), "--model",
                               str(model_dir), "--input", str(inp), "--output", str(outp)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        logits = load_file(str(outp))["logits"][0, :-1].double()
        lp = torch.log_softmax(logits, -1)
        t = torch.tensor(ids)
        total -= lp.gather(1, t[1:].unsqueeze(1)).sum().item()
        count += len(ids) - 1
    return total / count
