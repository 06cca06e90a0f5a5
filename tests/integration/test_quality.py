"""Quality on a trained model: the shipped DeepseekV3 of tests/data/ds3-trained (trained on
text by scripts/train_test_model.py; random weights hide what GPTQ does) quantized through the
service with GPTQ and RTN, each output run by transformers on held-out text that training never
saw. GPTQ must be closer to the original than RTN."""
import math
from pathlib import Path

import pytest

from quantize_env import check_output_dir, nll_transformers

DATA = Path(__file__).resolve().parents[1] / "data" / "ds3-trained"
WINDOW = 256
WINDOWS = 24


@pytest.fixture(scope="module")
def heldout():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DATA / "tokenizer.json"))
    ids = tok.encode((DATA / "heldout.txt").read_text(encoding="utf-8")).ids
    assert len(ids) >= WINDOW * WINDOWS
    step = len(ids) // WINDOWS  # windows spread over the whole held-out text
    return [ids[i * step:i * step + WINDOW] for i in range(WINDOWS)]


def quantize(cluster, out, method):
    res = cluster.client("submit", "--model", DATA, "--output", out, "--dataset",
                         DATA / "calibration.jsonl", "--num-calibration-samples", 128,
                         "--max-sequence-length", 256, "--seed", 1, "--method", method,
                         "--wait", timeout=900)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    check_output_dir(out)


def test_gptq_beats_rtn_on_the_trained_model(cluster, tmp_path, heldout):
    cluster.start_coordinator()
    cluster.start_worker("w0")
    quantize(cluster, tmp_path / "gptq", "gptq")
    quantize(cluster, tmp_path / "rtn", "rtn")
    orig = nll_transformers(DATA, heldout)
    gptq = nll_transformers(tmp_path / "gptq", heldout)
    rtn = nll_transformers(tmp_path / "rtn", heldout)
    print(f"trained model, held-out perplexity ({WINDOWS} x {WINDOW} tokens): original "
          f"{math.exp(orig):.3f}  gptq {math.exp(gptq):.3f} (+{math.exp(gptq) - math.exp(orig):.3f})"
          f"  rtn {math.exp(rtn):.3f} (+{math.exp(rtn) - math.exp(orig):.3f})")
    # Sanity: the model is trained (a random one sits near the vocabulary size, 4096).
    assert math.exp(orig) < 40
    # 4-bit routed experts cost something, and GPTQ loses less of it than RTN.
    assert rtn > orig
    assert abs(gptq - orig) < abs(rtn - orig)
