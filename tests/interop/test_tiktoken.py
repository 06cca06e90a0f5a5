"""worker/data's TiktokenTokenizer against the Python `tiktoken` package: a byte-level BPE is
built here (256 single bytes + merges found by greedy pair counting on a generated multilingual
corpus), written in Kimi-K2's layout (tiktoken.model + tokenizer_config.json), and thousands of
strings (Chinese, Japanese, Korean, Cyrillic, Arabic, Devanagari, emoji, code, digit and
whitespace runs, mixed case with apostrophes, special tokens) are encoded by mq-tokenize and by
tiktoken.Encoding(..., pat_str=<Kimi-K2's pattern>).encode(text, allowed_special="all"); the
ids must be identical."""

import base64
import collections
import json
import random
import re
import subprocess

import pytest

from interop_util import _binary, assigned_chars, require

tiktoken = require("tiktoken")

# tokenization_kimi.py's pat_str.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# cl100k_base's pattern (no set operations), for the pat_str override.
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
NUM_STRINGS = 3000
RESERVED = 256  # tokenization_kimi.py num_reserved_special_tokens
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
         6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
         15: "<|tool_calls_section_begin|>", 16: "<|tool_calls_section_end|>",
         21: "<|im_middle|>", 22: "<|media_start|>"}


def tokenize_path():
    return _binary("MQ_TOKENIZE", "tests/tools/mq-tokenize")


# ---- text -------------------------------------------------------------------------------------

WORDS = ("the of and to in is was for that with as on by at from it quantization model expert "
         "layer weight Kimi Moonshot DeepSeek MoE GPTQ I'm don't we'll they've she'd IT'S YOU'RE "
         "WE'LL He's O'Neil McDonald iPhone HTTPServer camelCase snake_case ǅemal ſ's Kelvin "
         "café naïve résumé Über straße Ελληνικά ΑΘΗΝΑ русский ЯЗЫК Москва العربية مرحبا "
         "हिन्दी नमस्ते ภาษาไทย עברית 한국어 서울 中文 模型 量化 专家 日本語 ひらがな カタカナ "
         "東京タワー 漢字かな交じり文 々 〇 ㈱ ｶﾀｶﾅ ＡＢＣ ｘｙｚ").split()
HAN_PUNCT = ["、", "。", "「", "」", "『", "』", "・", "ー", "〜", "，", "！", "？", "：", "；",
             "（", "）", "《", "》", "【", "】"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "if (x != nullptr && *x > 0) return -1;", "    \tself.w = torch.zeros(4096, 7168)\n",
        "print(f\"{name!r}: {value:>10.3f}\")", "#include <vector>\n", "x = [1, 2, 3]  # list",
        "SELECT * FROM t WHERE id = 42;", "{\"key\": [\"v\", 1.5e-3, null]}", "<div>&amp;</div>"]
EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "✨", "🤖", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "©", "™"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\u00a0", "\u3000",
          "\u2009", "\u0085", "\u200b", "        ", "\n    ", " \r\n\r\n "]
DIGITS = ["7", "42", "123", "2024", "1234567", "3.14159", "٣٤٥", "１２３", "²³", "½", "Ⅻ", "१२३"]


def gen_text(rng, n_parts):
    parts = []
    for _ in range(n_parts):
        r = rng.random()
        if r < 0.40:
            w = rng.choice(WORDS)
            parts.append(w.upper() if rng.random() < 0.05 else w)
        elif r < 0.48:
            parts.append(rng.choice(DIGITS) if rng.random() < 0.5
                         else str(rng.randrange(10 ** rng.randrange(1, 12))))
        elif r < 0.54:
            parts.append(rng.choice(CODE))
        elif r < 0.59:
            parts.append(rng.choice(EMOJI))
        elif r < 0.64:
            parts.append(rng.choice(HAN_PUNCT))
        elif r < 0.74:
            parts.append(rng.choice(SPACES))
        elif r < 0.82:
            parts.append(rng.choice(".,;:!?-()[]\"'/’"))
        else:
            parts.append(" ")
    return "".join(parts)


CHARS = assigned_chars()


def random_unicode(rng):
    return "".join(rng.choice(CHARS) if rng.random() < 0.7 else rng.choice(" \n\t1a.'A")
                   for _ in range(rng.randrange(0, 40)))


# ---- ranks ----------------------------------------------------------------------------------


def train_ranks(num_merges=1500, per_round=60, seed=1, size=300_000):
    """256 single bytes, then merges of adjacent tokens chosen by greedy pair counting over the
    words of a generated corpus (per_round most frequent pairs per round): every multi-byte
    token is the concatenation of two lower-ranked ones, as in a trained tiktoken file."""
    rng = random.Random(seed)
    words = collections.Counter()
    total = 0
    while total < size:
        text = gen_text(rng, rng.randrange(5, 60))
        total += len(text.encode())
        for w in re.findall(r"\s?\w+|\s?[^\w\s]+|\s+", text):
            words[w.encode()] += 1
    ranks = {bytes([b]): b for b in range(256)}
    segs = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < 256 + num_merges:
        pairs = collections.Counter()
        for w, n in words.items():
            s = segs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        chosen = [p for p, _ in pairs.most_common(per_round) if p[0] + p[1] not in ranks]
        if not chosen:
            break
        for a, b in chosen[:256 + num_merges - len(ranks)]:
            ranks[a + b] = len(ranks)
        new = set(ranks)
        for w, s in segs.items():  # re-segment greedily with the round's merges
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] + s[i + 1] in new and (s[i], s[i + 1]) in chosen:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    return ranks


def shuffled_byte_ranks(ranks, seed):
    """The same tokens with the single bytes' ranks permuted among themselves (real files do
    not rank bytes by value)."""
    rng = random.Random(seed)
    singles = [t for t in ranks if len(t) == 1]
    values = [ranks[t] for t in singles]
    rng.shuffle(values)
    out = dict(ranks)
    out.update(zip(singles, values))
    return out


def specials_for(num_base):
    """tokenization_kimi.py: ids [N, N + 256), named from added_tokens_decoder or reserved."""
    return {NAMED.get(i - num_base, f"<|reserved_token_{i}|>"): i
            for i in range(num_base, num_base + RESERVED)}


def write_kimi_dir(d, ranks, pat_str=None, bos=True):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "tiktoken.model", "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    n = len(ranks)
    config = {"added_tokens_decoder": {str(n + k): {"content": v, "lstrip": False,
                                                    "normalized": False, "rstrip": False,
                                                    "single_word": False, "special": True}
                                       for k, v in NAMED.items()},
              "tokenizer_class": "TikTokenTokenizer", "model_max_length": 1048576,
              "eos_token": "[EOS]", "pad_token": "[EOS]"}
    if bos:
        config["bos_token"] = "[BOS]"
    if pat_str is not None:
        config["pat_str"] = pat_str
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return d


def sample_strings(seed, specials):
    rng = random.Random(seed)
    names = list(NAMED.values()) + [s for s in specials if "reserved" in s][:20]
    out = ["", " ", "  ", "\n", "\r\n", "\t\t", " \n \n", "a", " a", "a ", "a  b", "a \n b",
           "  leading", "trailing  ", "123", "1234567890123", "x1y22z333", "٣٤٥ ١٢", "Ⅻ ⅷ ½",
           "I'm", "I'M", "we'LL", "'s 't 're", "don’t", "HELLO's", "McDONALD'S", "ǅ's",
           "ſ's", "'ſ", "\u212a's", "Straße'S", "\u0085x\u0085", "\x1c\x1d\x1e\x1f",
           "\u00a0\u00a0a", "a\u3000b", "e\u0301", "\u0301\u0301", "ﬁ", "中文测试一下",
           "中文，测试。「引用」、列举", "ひらがなカタカナ漢字", "東京タワー123", "々〇〻", "ㇰㇱ",
           "Ｈｅｌｌｏ　Ｗｏｒｌｄ", "🇯🇵🇯🇵", "👨‍👩‍👧 family", "a" * 300, " " * 100 + "x",
           "\n" * 50, "中" * 500, "[BOS]", "[BOS][EOS]", "<|im_user|>user<|im_middle|>hi<|im_end|>",
           "<|im_end", "[BOS", "<|reserved_token_", "x<|im_end|>y", "<|im_end|><|im_end|>",
           f"<|reserved_token_{max(specials.values())}|>", "<|reserved_token_1|>"]
    out += [gen_text(rng, rng.randrange(1, 40)) for _ in range(NUM_STRINGS // 2)]
    out += [random_unicode(rng) for _ in range(NUM_STRINGS // 4)]
    for _ in range(NUM_STRINGS // 4):
        out.append(gen_text(rng, rng.randrange(0, 6)) + rng.choice(names) +
                   gen_text(rng, rng.randrange(0, 6)))
    return out


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


@pytest.fixture(scope="module")
def ranks():
    return train_ranks()


def compare(enc, got, strings, prefix=()):
    mismatches = []
    for s, ids in zip(strings, got):
        want = list(prefix) + enc.encode(s, allowed_special="all")
        if ids != want:
            mismatches.append((s, ids, want))
    assert not mismatches, (f"{len(mismatches)} of {len(strings)} differ; first: "
                            f"{mismatches[0][0]!r}: ours {mismatches[0][1]} tiktoken "
                            f"{mismatches[0][2]}")


VARIANTS = ["kimi", "kimi_shuffled_bytes", "cl100k_pattern"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ids_identical(variant, ranks, tmp_path):
    if variant == "kimi_shuffled_bytes":
        ranks = shuffled_byte_ranks(ranks, seed=5)
    pattern = CL100K_PATTERN if variant == "cl100k_pattern" else KIMI_PATTERN
    d = write_kimi_dir(tmp_path / variant, ranks,
                       pat_str=CL100K_PATTERN if variant == "cl100k_pattern" else None)
    specials = specials_for(len(ranks))
    enc = tiktoken.Encoding(variant, pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens=specials)
    strings = sample_strings(seed=VARIANTS.index(variant) + 7, specials=specials)
    assert len(strings) >= 3000
    # A directory, a tiktoken.model path: the same tokenizer.
    compare(enc, run_tokenize(d, strings, special=False), strings)
    some = strings[:300]
    bos = specials["[BOS]"]
    compare(enc, run_tokenize(d / "tiktoken.model", some, special=True), some, prefix=[bos])
    # Many merges really happen (not just single bytes).
    assert sum(len(enc.encode(s, allowed_special="all")) for s in strings) < \
        sum(len(s.encode()) for s in strings) * 0.7


def test_long_inputs(ranks, tmp_path):
    d = write_kimi_dir(tmp_path / "k", ranks)
    enc = tiktoken.Encoding("k", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials_for(len(ranks)))
    rng = random.Random(3)
    strings = ["".join(gen_text(rng, 40) for _ in range(300)), "中文" * 20000, " " * 50000 + "x",
               "ab" * 30000]
    compare(enc, run_tokenize(d, strings, special=False), strings)


def test_no_bos_and_errors(ranks, tmp_path):
    d = write_kimi_dir(tmp_path / "nobos", ranks, bos=False)
    assert run_tokenize(d, ["hi"], special=True) == run_tokenize(d, ["hi"], special=False)
    # A bad ranks file names the line, never its content.
    bad = tmp_path / "bad"
    write_kimi_dir(bad, ranks)
    lines = (bad / "tiktoken.model").read_text().splitlines()
    lines[9] = "c2VjcmV0LXRva2Vu!! 9"
    (bad / "tiktoken.model").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([tokenize_path(), "--tokenizer", str(bad)], input="x\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "line 10" in proc.stderr and "base64" in proc.stderr
    assert "c2VjcmV0" not in proc.stderr
    (bad / "tiktoken.model").write_text("\n".join(lines[:9] + lines[10:]) + "\n")
    (bad / "tokenizer_config.json").unlink()
    proc = subprocess.run([tokenize_path(), "--tokenizer", str(bad)], input="x\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "tokenizer_config.json" in proc.stderr
    proc = subprocess.run([tokenize_path(), "--tokenizer", str(tmp_path / "missing")],
                          input="x\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "missing" in proc.stderr
