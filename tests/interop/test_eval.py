"""mq-eval-local (worker/eval) against the same measurement done independently with transformers.

On the trained test model (tests/data/ds3-trained), mq-quantize-local writes a GPTQ and an RTN
W4A16 output (compressed-tensors pack-quantized, routed experts), and a broken copy of the RTN
output has the weight_scale of every routed expert of layer 1 scrambled (a fixed permutation of
each tensor's values and random signs). For each candidate, mq-eval-local compares it with the original on
held-out windows (24 x 256 tokens of heldout.txt, as tests/integration/test_quality.py takes
them), and the same numbers are computed in Python: both models loaded by transformers (the
W4A16 one through its compressed-tensors integration, then every parameter cast to float32,
which is exact for the bf16 values, so that both sides compute in float32), logits of the same
windows, log-softmax in float64, KL(p_ref || p_cand) by torch's kl_div, top-1 agreement,
perplexity of each model on positions 0..n-2 predicting 1..n-1, and each decoder layer's
relative output error through forward hooks.

Agreement: every number within 1e-3 relative, with an absolute floor of 1e-9 for KL values
(KL of float32 logits that agree to ~1e-6 carries a rounding noise of order 1e-12, so the floor
only matters where KL is exactly 0: the reference against itself, and layer 0, which is not
quantized). Ordering: KL(GPTQ) < KL(RTN) < KL(broken), the broken one by a wide margin.
Python packages: torch, safetensors, transformers (5.x), compressed-tensors, tokenizers, pytest.
"""

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from interop_util import _binary, require

torch = require("torch")
st_torch = require("safetensors.torch")
transformers = require("transformers")
require("compressed_tensors")
tokenizers = require("tokenizers")

DATA = Path(__file__).resolve().parents[1] / "data" / "ds3-trained"
WINDOW, WINDOWS = 256, 24
CALIBRATION_SAMPLES = 128
REL_TOL = 1e-3
KL_FLOOR = 1e-9
BROKEN_LAYER = 1


def eval_tool():
    return _binary("MQ_EVAL_LOCAL", "tests/tools/mq-eval-local")


def quantize_tool():
    return _binary("MQ_QUANTIZE_LOCAL", "tests/tools/mq-quantize-local")


def tokenizer():
    return tokenizers.Tokenizer.from_file(str(DATA / "tokenizer.json"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Held-out windows, calibration ids, and the GPTQ / RTN / broken outputs."""
    tmp = tmp_path_factory.mktemp("eval")
    tok = tokenizer()
    ids = tok.encode((DATA / "heldout.txt").read_text(encoding="utf-8")).ids
    assert len(ids) >= WINDOW * WINDOWS
    step = len(ids) // WINDOWS
    heldout = torch.tensor([ids[i * step:i * step + WINDOW] for i in range(WINDOWS)])
    st_torch.save_file({"input_ids": heldout}, str(tmp / "heldout.safetensors"))

    calib = []
    for line in (DATA / "calibration.jsonl").read_text(encoding="utf-8").splitlines():
        t = tok.encode(json.loads(line)["text"]).ids
        if len(t) >= WINDOW:
            calib.append(t[:WINDOW])
    calib = calib[:CALIBRATION_SAMPLES]
    assert len(calib) >= 64, len(calib)
    st_torch.save_file({"input_ids": torch.tensor(calib)}, str(tmp / "calib.safetensors"))

    outs = {}
    for method in ("gptq", "rtn"):
        out = tmp / method
        cmd = [quantize_tool(), "--model", str(DATA), "--output", str(out), "--input",
               str(tmp / "calib.safetensors"), "--method", method]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
        outs[method] = out
    outs["broken"] = scramble_scales(outs["rtn"], tmp / "broken", BROKEN_LAYER)
    return {"tmp": tmp, "heldout": heldout, **outs}


def scramble_scales(src, dst, layer):
    """A copy of `src` whose routed experts of `layer` have their weight_scale values scrambled
    (a fixed permutation per tensor, and a random sign per value: a permutation alone moves
    values of similar size around and hurts little), rewritten in their shard with
    safetensors."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = f"model.layers.{layer}.mlp.experts."
    names = [n for n in index if n.startswith(prefix) and n.endswith(".weight_scale")]
    assert names
    gen = torch.Generator().manual_seed(11)
    for shard in sorted({index[n] for n in names}):
        path = dst / shard
        tensors = st_torch.load_file(str(path))
        for n in names:
            if index[n] == shard:
                t = tensors[n]
                perm = torch.randperm(t.numel(), generator=gen)
                sign = torch.randint(0, 2, (t.numel(),), generator=gen).to(t.dtype) * 2 - 1
                tensors[n] = (t.flatten()[perm] * sign).reshape(t.shape).contiguous()
        st_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


def run_eval(reference, model, ids_path, out_path):
    cmd = [eval_tool(), "--reference", str(reference), "--model", str(model), "--input",
           str(ids_path), "--output", str(out_path), "--device", "cpu", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    report = json.loads(Path(out_path).read_text())
    assert json.loads(proc.stdout) == report
    return report


def load_fp32(path):
    """transformers' model of `path`, every floating parameter and buffer in float32 (the
    compressed-tensors integration keeps decompressed weights in bf16, the scale dtype)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.float()
    return model


def forward_with_layers(model, ids):
    """Logits [n, seq, V] and each decoder layer's output [n, seq, H]."""
    outputs = []

    def hook(_module, _args, out):
        outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert len(outputs) == len(model.model.layers)
    return logits, outputs


_cache = {}


def python_side(path, ids):
    key = str(path)
    if key not in _cache:
        _cache[key] = forward_with_layers(load_fp32(path), ids)
    return _cache[key]


def python_metrics(ref, cand, ids):
    """The definitions of worker/eval/next_token.h, written independently."""
    ref_logits, ref_layers = ref
    cand_logits, cand_layers = cand
    lr = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    lc = torch.log_softmax(cand_logits[:, :-1].double(), -1)
    kl = torch.nn.functional.kl_div(lc, lr, reduction="none", log_target=True).sum(-1).flatten()
    n = kl.numel()
    target = ids[:, 1:].unsqueeze(-1)
    nll_r = -lr.gather(-1, target).mean().item()
    nll_c = -lc.gather(-1, target).mean().item()
    layers = [((c.double() - r.double()).norm() / r.double().norm()).item()
              for r, c in zip(ref_layers, cand_layers)]
    return {
        "positions": n,
        "kl_mean": kl.mean().item(),
        "kl_p99": kl.sort().values[math.ceil(0.99 * n) - 1].item(),  # nearest rank
        "kl_max": kl.max().item(),
        "top1": (lr.argmax(-1) == lc.argmax(-1)).double().mean().item(),
        "nll_ref": nll_r, "nll_cand": nll_c,
        "ppl_ref": math.exp(nll_r), "ppl_cand": math.exp(nll_c),
        "layers": layers,
    }


def flatten(report):
    return {
        "positions": report["positions"],
        "kl_mean": report["kl"]["mean"], "kl_p99": report["kl"]["p99"],
        "kl_max": report["kl"]["max"], "top1": report["top1_agreement"],
        "nll_ref": report["nll"]["reference"], "nll_cand": report["nll"]["candidate"],
        "ppl_ref": report["perplexity"]["reference"],
        "ppl_cand": report["perplexity"]["candidate"],
        "layers": [l["relative_error"] for l in report["layers"]],
    }


def compare(ours, theirs, tag):
    """Max relative difference; asserts every value within REL_TOL (KL-like values with the
    KL_FLOOR absolute floor)."""
    assert ours["positions"] == theirs["positions"]
    worst = 0.0
    pairs = [(k, ours[k], theirs[k]) for k in ours if k not in ("positions", "layers")]
    pairs += [(f"layer{i}", a, b) for i, (a, b) in enumerate(zip(ours["layers"],
                                                                  theirs["layers"]))]
    assert len(ours["layers"]) == len(theirs["layers"])
    for key, a, b in pairs:
        floor = KL_FLOOR if key.startswith(("kl", "layer")) else 0.0
        diff = abs(a - b)
        assert diff <= REL_TOL * abs(b) + floor, f"{tag} {key}: ours {a!r} transformers {b!r}"
        if diff > floor:
            worst = max(worst, diff / abs(b))
    return worst


def test_eval_matches_transformers_and_ranks_methods(work):
    tmp, ids = work["tmp"], work["heldout"]
    ids_path = tmp / "heldout.safetensors"
    ref_side = python_side(DATA, ids)
    results, worst = {}, 0.0
    for name in ("gptq", "rtn", "broken"):
        ours = flatten(run_eval(DATA, work[name], ids_path, tmp / f"quality_{name}.json"))
        theirs = python_metrics(ref_side, python_side(work[name], ids), ids)
        worst = max(worst, compare(ours, theirs, name))
        results[name] = ours
    for name, r in results.items():
        print(f"{name}: KL mean {r['kl_mean']:.5f} p99 {r['kl_p99']:.5f} max {r['kl_max']:.4f} "
              f"top-1 {r['top1']:.4f} ppl {r['ppl_cand']:.3f} (original {r['ppl_ref']:.3f}) "
              f"layers {' '.join(f'{e:.4f}' for e in r['layers'])}")
    print(f"max relative difference against transformers: {worst:.3e}")
    assert results["gptq"]["ppl_ref"] < 40  # the model is trained (random: ~4096)
    gptq, rtn, broken = (results[m] for m in ("gptq", "rtn", "broken"))
    assert 0 < gptq["kl_mean"] < rtn["kl_mean"]
    assert gptq["kl_p99"] < rtn["kl_p99"]
    assert broken["kl_mean"] > 5 * rtn["kl_mean"]
    assert broken["top1"] < rtn["top1"] <= 1
    # Layer 0 (dense, not quantized) is exact; the scrambled layer is where the error jumps.
    for r in results.values():
        assert r["layers"][0] == 0.0
    assert broken["layers"][BROKEN_LAYER] > 5 * rtn["layers"][BROKEN_LAYER]


def test_reference_against_itself_is_exact(work):
    tmp = work["tmp"]
    r = flatten(run_eval(DATA, DATA, tmp / "heldout.safetensors", tmp / "quality_self.json"))
    assert r["positions"] == WINDOWS * (WINDOW - 1)
    assert r["kl_mean"] == r["kl_p99"] == r["kl_max"] == 0.0
    assert r["top1"] == 1.0
    assert r["ppl_ref"] == r["ppl_cand"]
    assert all(e == 0.0 for e in r["layers"])


def test_refuses_other_formats_and_architectures(work, tmp_path):
    tmp = work["tmp"]
    # A compressed-tensors format mq cannot read: refused, naming the format.
    other = tmp_path / "marlin"
    shutil.copytree(work["gptq"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"]["format"] = "marlin-24"
    (other / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([eval_tool(), "--reference", str(DATA), "--model", str(other),
                           "--input", str(tmp / "heldout.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "marlin-24" in proc.stderr and "pack-quantized" in proc.stderr, proc.stderr
    # A different architecture: refused, naming the field.
    wide = tmp_path / "wide"
    wide.mkdir()
    cfg = json.loads((DATA / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (wide / "config.json").write_text(json.dumps(cfg))
    shutil.copy(DATA / "model.safetensors", wide / "model.safetensors")
    proc = subprocess.run([eval_tool(), "--reference", str(DATA), "--model", str(wide),
                           "--input", str(tmp / "heldout.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "num_hidden_layers" in proc.stderr, proc.stderr
