"""worker/data against the Python `tokenizers` package: byte-level BPE tokenizers trained here
(GPT-2, DeepSeek-V3, Llama-3 style pre-tokenizers and a mix of Split behaviors) encode thousands
of strings through mq-tokenize; the ids must be identical. Calibration loading (mq-tokenize
--calibration) is compared with a Python re-implementation of the documented selection."""

import json
import os
import random
import subprocess

import pytest

from interop_util import _binary, assigned_chars, require

tokenizers = require("tokenizers")
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,  # noqa: E402
                        processors, trainers)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
NUM_STRINGS = 2500  # per tokenizer, before the fixed edge cases

GPT4_LIKE = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
             r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenize_path():
    return _binary("MQ_TOKENIZE", "tests/tools/mq-tokenize")


# ---- text generation --------------------------------------------------------------------------

WORDS = ("the of and to in is was for that with as on by at from it an be this which or are "
         "quantization model expert layer weight tensor matrix hessian calibration token "
         "DeepSeek Mixture GPTQ AWQ Hopper kernel I'm don't we'll they've she'd IT'S YOU'RE "
         "café naïve résumé façade Über straße São Paulo Ελληνικά русский язык العربية हिन्दी "
         "中文 模型 量化 专家 日本語 ひらがな カタカナ 한국어 東京 北京").split()
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "if (x != nullptr && *x > 0) return -1;", "    \tself.w = torch.zeros(4096, 7168)\n",
        "print(f\"{name!r}: {value:>10.3f}\")", "#include <vector>\n", "x = [1, 2, 3]  # list",
        "SELECT * FROM t WHERE id = 42;", "{\"key\": [\"v\", 1.5e-3, null]}"]
EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "✨", "🤖", "🧪", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009",
          "\u0085", "\u200b", "        "]


def gen_text(rng, n_parts):
    parts = []
    for _ in range(n_parts):
        r = rng.random()
        if r < 0.45:
            parts.append(rng.choice(WORDS))
        elif r < 0.55:
            parts.append(str(rng.randrange(10 ** rng.randrange(1, 12))))
        elif r < 0.62:
            parts.append(rng.choice(CODE))
        elif r < 0.68:
            parts.append(rng.choice(EMOJI))
        elif r < 0.78:
            parts.append(rng.choice(SPACES))
        elif r < 0.85:
            parts.append(rng.choice(".,;:!?-()[]\"'/"))
        else:
            parts.append(" ")
    return "".join(parts)


CHARS = assigned_chars()


def random_unicode(rng):
    return "".join(rng.choice(CHARS) if rng.random() < 0.7 else rng.choice(" \n\t1a.'")
                   for _ in range(rng.randrange(0, 40)))


def corpus(seed=1, size=300_000):
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = gen_text(rng, rng.randrange(5, 60))
        lines.append(line)
        total += len(line.encode())
    return lines


def sample_strings(seed):
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "\r\n", "\t\t", " \n \n", "a", " a", "a ", "a  b", "a \n b",
           "  leading", "trailing  ", "123", "1234567890123", "x1y22z333", "٣٤٥ ١٢", "Ⅻ ⅷ ½",
           "I'm", "I'M", "we'LL", "'s 't 're", "don’t", "\u0085x\u0085", "\x1c\x1d\x1e\x1f",
           "\u00a0\u00a0a", "a\u3000b", "e\u0301", "\u0301\u0301", "ﬁ", "ǅ", "ſ's", "'ſ",
           BOS, EOS, BOS + EOS, BOS + "hello" + EOS, "hi " + BOS + " there", BOS + BOS,
           "<｜begin▁of", "<think>", " <think> x </think> ", "hello world", "say hello world!",
           "ahello worldz", "<think><think>", "\n<think>\n", "中文测试一下", "ひらがなカタカナ漢字",
           "東京タワー123", "🇯🇵🇯🇵", "👨‍👩‍👧 family", "a" * 300, " " * 100 + "x", "\n" * 50]
    out += [gen_text(rng, rng.randrange(1, 40)) for _ in range(NUM_STRINGS // 2)]
    out += [random_unicode(rng) for _ in range(NUM_STRINGS // 4)]
    for _ in range(NUM_STRINGS // 4):  # special and added tokens inside text
        pieces = [gen_text(rng, rng.randrange(0, 6)),
                  rng.choice([BOS, EOS, "<think>", "</think>", "hello world", "<|extra|>"]),
                  gen_text(rng, rng.randrange(0, 6))]
        out.append("".join(pieces))
    return out


# ---- tokenizers ---------------------------------------------------------------------------


def pre_tokenizer(kind):
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2_prefix":
        return pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    if kind == "deepseek_v3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex("[一-龥぀-ゟ゠-ヿ]+"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(GPT4_LIKE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "llama3":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if kind == "behaviors":  # every Split behavior, invert, String patterns, Digits
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split("\n", behavior="merged_with_previous"),
            pre_tokenizers.Split(Regex(r"[.,;:!?]"), behavior="merged_with_next"),
            pre_tokenizers.Split(Regex(r"\s+"), behavior="contiguous", invert=True),
            pre_tokenizers.Split(Regex(r"\t"), behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    if kind == "digits_contiguous":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="isolated", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(kind)


KINDS = ["gpt2", "gpt2_prefix", "deepseek_v3", "llama3", "behaviors", "digits_contiguous"]


def train(kind, path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS])
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken("<think>", lstrip=True, rstrip=True, normalized=False),
                    AddedToken("</think>", lstrip=False, rstrip=True, normalized=True),
                    AddedToken("hello world", single_word=True, normalized=False),
                    AddedToken("<|extra|>", special=True, normalized=False)])
    bos = tok.token_to_id(BOS)
    if kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "gpt2_prefix":
        tok.post_processor = processors.RobertaProcessing((EOS, tok.token_to_id(EOS)), (BOS, bos))
    else:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                          special_tokens=[(BOS, bos)])])
    spec = json.loads(tok.to_str())
    if kind == "llama3":
        spec["model"]["ignore_merges"] = True
    if kind == "deepseek_v3":  # DeepSeek-V3 ships an empty normalizer Sequence and list merges
        spec["normalizer"] = {"type": "Sequence", "normalizers": []}
        spec["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m
                                   for m in spec["model"]["merges"]]
    if kind == "gpt2":  # the legacy "a b" string form of merges
        spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                                   for m in spec["model"]["merges"]]
    text = json.dumps(spec, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Tokenizer.from_file(str(path))


def run_tokenize(tok_path, strings, special):
    cmd = [tokenize_path(), "--tokenizer", str(tok_path), "--json"]
    if not special:
        cmd.append("--no-special")
    stdin = "".join(json.dumps(s) + "\n" for s in strings)
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(strings)
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("kind", KINDS)
def test_ids_identical(kind, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok = train(kind, path)
    strings = sample_strings(seed=KINDS.index(kind) + 100)
    assert len(strings) >= 2000
    for special in (True, False):
        ours = run_tokenize(path, strings, special)
        theirs = [e.ids for e in tok.encode_batch(strings, add_special_tokens=special)]
        bad = [(s, a, b) for s, a, b in zip(strings, ours, theirs) if a != b]
        assert not bad, (f"{kind} add_special_tokens={special}: {len(bad)}/{len(strings)} "
                         f"differ; first: {bad[0][0]!r}\n ours   {bad[0][1]}\n theirs {bad[0][2]}")
    print(f"{kind}: {len(strings)} strings x 2 identical")


def test_invalid_utf8_and_unsupported(tmp_path):
    path = tmp_path / "tokenizer.json"
    train("gpt2", path)
    proc = subprocess.run([tokenize_path(), "--tokenizer", str(path)], input=b"ok\n\xff\xfe\n",
                          capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert b"stdin line 2" in proc.stderr and b"not valid UTF-8" in proc.stderr
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFC"}
    bad = tmp_path / "nfc.json"
    bad.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run([tokenize_path(), "--tokenizer", str(bad)], input="x\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "normalizer.type" in proc.stderr and "NFC" in proc.stderr


# ---- calibration ----------------------------------------------------------------------------


def splitmix_shuffle(n, seed):
    """calibration.h CalibrationShuffle."""
    mask = (1 << 64) - 1
    state = seed & mask
    idx = list(range(n))

    def nxt():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for i in range(n - 1, 0, -1):
        j = nxt() % (i + 1)
        idx[i], idx[j] = idx[j], idx[i]
    return idx


def expected_selection(id_lists, num, max_len, min_len, seed):
    usable = [ids for ids in id_lists if len(ids) >= min_len]
    order = splitmix_shuffle(len(usable), seed)
    return [usable[i][:max_len] for i in order[:num]], len(id_lists) - len(usable), len(usable)


def run_calibration(*flags):
    cmd = [tokenize_path(), "--calibration", *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("seed", [0, 7, 2**63 + 5])
def test_calibration_text_matches_python(seed, tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    tok = train("deepseek_v3", tok_path)
    rng = random.Random(seed % 1000)
    texts = [gen_text(rng, rng.randrange(1, 200)) for _ in range(300)]
    data = tmp_path / "calib.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "id": i}, ensure_ascii=(i % 2 == 0)) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are skipped
    got = run_calibration("--dataset", data, "--tokenizer", tok_path, "--num-samples", 64,
                          "--max-seq-len", 100, "--min-seq-len", 20, "--seed", seed,
                          "--vocab-size", tok.get_vocab_size())
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
    want, skipped, available = expected_selection(ids, 64, 100, 20, seed)
    assert got["format"] == "text"
    assert got["skipped_short"] == skipped and got["available"] == available
    assert got["samples"] == want
    assert got["total_tokens"] == sum(map(len, want))


def test_calibration_messages_and_input_ids(tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    tok = train("llama3", tok_path)
    convs = [[{"role": "user", "content": f"question {i} about 模型"},
              {"role": "assistant", "content": f"answer {i}\n with  spaces"}] for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    got = run_calibration("--dataset", data, "--tokenizer", tok_path, "--num-samples", 10,
                          "--max-seq-len", 1000, "--seed", 3)
    rendered = ["\n\n".join(f"{m['role']}: {m['content']}" for m in c) for c in convs]
    ids = [e.ids for e in tok.encode_batch(rendered, add_special_tokens=True)]
    want, _, _ = expected_selection(ids, 10, 1000, 1, 3)
    assert got["format"] == "messages" and got["samples"] == want

    pre = tmp_path / "ids.jsonl"
    rows = [[(i * 7 + k) % 500 for k in range(i % 30)] for i in range(100)]
    pre.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    got = run_calibration("--dataset", pre, "--num-samples", 20, "--max-seq-len", 16,
                          "--min-seq-len", 5, "--seed", 11, "--vocab-size", 500)
    want, skipped, available = expected_selection(rows, 20, 16, 5, 11)
    assert got["format"] == "input_ids" and got["samples"] == want
    assert (got["skipped_short"], got["available"]) == (skipped, available)
