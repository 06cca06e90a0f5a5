"""Shared helpers for the interop tests: optional-module handling and our binaries."""

import importlib
import json
import os
import struct
import subprocess

import pytest


def require(name):
    """Imports `name`; skips the calling test module when it is missing, unless
    MQ_REQUIRE_INTEROP is set (then a missing module is a failure)."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("MQ_REQUIRE_INTEROP", "") not in ("", "0"):
            pytest.fail(f"MQ_REQUIRE_INTEROP is set but python module {name!r} is missing: {e}",
                        pytrace=False)
        pytest.skip(f"python module {name!r} is missing ({e}); "
                    "set MQ_REQUIRE_INTEROP=1 to make this a failure", allow_module_level=True)


def _binary(env, relative):
    path = os.environ.get(env)
    if not path:
        build = os.environ.get("MQ_BUILD_DIR")
        if not build:
            pytest.fail(f"set {env} or MQ_BUILD_DIR (ctest sets both)", pytrace=False)
        path = os.path.join(build, relative)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not built: cmake --build <dir> --target {os.path.basename(path)}",
                    pytrace=False)
    return path


def gen_model_path():
    return _binary("MQ_GEN_MODEL", "tests/tools/mq-gen-model")


def helper_path():
    return _binary("MQ_INTEROP_HELPER", "tests/interop/mq-interop-helper")


def run_gen_model(out_dir, *flags):
    """Runs mq-gen-model --output out_dir flags...; asserts success; returns out_dir."""
    cmd = [gen_model_path(), "--output", str(out_dir), *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    return out_dir


def run_helper(*args):
    cmd = [helper_path(), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"


def read_header(path):
    """Returns (header length N, parsed header dict, raw header bytes) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
    return n, json.loads(raw), raw


def load_index(model_dir):
    with open(os.path.join(model_dir, "model.safetensors.index.json"), encoding="utf-8") as f:
        return json.load(f)


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def shard_files(model_dir):
    return sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))


# Generator configurations the tests sweep: defaults, BF16, and odd sizes (dims not multiples of
# 128 or of 8, plain q_proj, an MTP layer, no shared expert, many shards).
CONFIGS = {
    "default_fp8": [],
    "bf16": ["--format", "bf16", "--mtp", "1"],
    "odd_fp8": ["--hidden", "200", "--intermediate", "300", "--moe-intermediate", "130",
                "--q-lora-rank", "0", "--kv-lora-rank", "136", "--qk-rope-dim", "8",
                "--heads", "3", "--vocab", "300", "--layers", "4", "--dense-layers", "2",
                "--experts", "6", "--groups", "3", "--topk-groups", "2", "--experts-per-tok",
                "3", "--shared-experts", "0", "--mtp", "1", "--shards", "5", "--no-yarn",
                "--seed", "7"],
    "wide_fp8": ["--hidden", "384", "--moe-intermediate", "256", "--q-lora-rank", "200",
                 "--shared-experts", "2", "--shards", "1"],
}


def assigned_chars():
    """Code points assigned in Python's Unicode database (14.0, the version PCRE2 10.42 uses),
    excluding surrogates and private use: the alphabet of the tokenizer tests' random strings."""
    import unicodedata
    out = []
    for cp in list(range(0x20, 0x3400)) + list(range(0x4e00, 0x4f00)) + \
            list(range(0xa000, 0xd7a4)) + list(range(0xf900, 0x10000)) + \
            list(range(0x10000, 0x10a00)) + list(range(0x1d400, 0x1d800)) + \
            list(range(0x1f300, 0x1fb00)) + list(range(0x20000, 0x20100)):
        if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co"):
            out.append(chr(cp))
    return out
