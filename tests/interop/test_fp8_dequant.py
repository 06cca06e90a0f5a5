"""FP8 block dequantization (FORMATS.md §2.3): mq-dequant (CheckpointReader + LoadAsBf16) against
an independent torch fp32 reference, bit for bit, on generated FP8 checkpoints of several sizes
(dims that are and are not multiples of 128, sharded and single-shard)."""

import os
import subprocess

import pytest

from interop_util import CONFIGS, load_index, run_gen_model, require, shard_files

torch = require("torch")
st_torch = require("safetensors.torch")

# Generator flag sets: the shared FP8 configs plus sizes whose edge blocks are 1 row/col wide,
# exactly 128, or a DeepSeek-like 576-row kv_a_proj (512 + 64).
SIZES = {
    "default_fp8": CONFIGS["default_fp8"],
    "odd_fp8": CONFIGS["odd_fp8"],
    "wide_fp8": CONFIGS["wide_fp8"],
    "hidden200": ["--hidden", "200", "--q-lora-rank", "0", "--moe-intermediate", "130",
                  "--intermediate", "257", "--seed", "3"],
    "edge129": ["--hidden", "129", "--moe-intermediate", "385", "--intermediate", "128",
                "--q-lora-rank", "129", "--kv-lora-rank", "1", "--qk-rope-dim", "2",
                "--shards", "1", "--seed", "5"],
    "kv576": ["--hidden", "384", "--kv-lora-rank", "512", "--qk-rope-dim", "64",
              "--moe-intermediate", "256", "--experts", "4", "--layers", "2", "--seed", "9"],
}


def dequant_path():
    path = os.environ.get("MQ_DEQUANT")
    if not path:
        build = os.environ.get("MQ_BUILD_DIR")
        if not build:
            pytest.fail("set MQ_DEQUANT or MQ_BUILD_DIR (ctest sets both)", pytrace=False)
        path = os.path.join(build, "tests", "tools", "mq-dequant")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is not built: cmake --build <dir> --target mq-dequant", pytrace=False)
    return path


def run_dequant(model, out):
    return subprocess.run([dequant_path(), "--input", str(model), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)


def load_model(model):
    tensors = {}
    for file in shard_files(model):
        tensors.update(st_torch.load_file(os.path.join(model, file)))
    return tensors


def reference(w, scale):
    """The DeepSeek rule, written independently: fp32 multiply by the block's scale, one RNE."""
    r, c = w.shape
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:r, :c]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_dequant_matches_torch_bit_for_bit(tmp_path, size):
    model = run_gen_model(tmp_path / "model", *SIZES[size])
    out = tmp_path / "dequant.safetensors"
    proc = run_dequant(model, out)
    assert proc.returncode == 0, proc.stderr
    ours = st_torch.load_file(str(out))
    tensors = load_model(model)
    fp8 = sorted(n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8, "generator wrote no FP8 weights"
    assert sorted(ours) == fp8
    for name in fp8:
        w, scale = tensors[name], tensors[name + "_scale_inv"]
        assert scale.dtype == torch.float32
        want = reference(w, scale)
        got = ours[name]
        assert got.dtype == torch.bfloat16 and got.shape == w.shape, name
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            diff = (got.view(torch.int16) != want.view(torch.int16)).nonzero()
            i, j = diff[0].tolist()
            pytest.fail(f"{name}: {len(diff)} elements differ, first [{i}][{j}]: "
                        f"ours {got[i, j].item()} torch {want[i, j].item()}")


def test_edge_blocks_and_kv_a_proj_shape(tmp_path):
    """kv_a_proj_with_mqa is [576, hidden] with a 5-row scale grid; rows 512..575 use row 4."""
    model = run_gen_model(tmp_path / "model", *SIZES["kv576"])
    tensors = load_model(model)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert list(tensors[name].shape) == [576, 384]
    assert list(tensors[name + "_scale_inv"].shape) == [5, 3]
    out = tmp_path / "dequant.safetensors"
    assert run_dequant(model, out).returncode == 0
    got = st_torch.load_file(str(out))[name]
    w, scale = tensors[name], tensors[name + "_scale_inv"]
    tail = (w[512:].to(torch.float32) * scale[4].repeat_interleave(128)[None, :384])
    assert torch.equal(got[512:].view(torch.int16), tail.to(torch.bfloat16).view(torch.int16))


def test_missing_scale_is_an_error_naming_it(tmp_path):
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    model = run_gen_model(tmp_path / "model", "--defect", f"missing-scale={name}")
    assert name + "_scale_inv" not in load_index(model)["weight_map"]
    proc = run_dequant(model, tmp_path / "out.safetensors")
    assert proc.returncode == 1
    assert f'"{name}_scale_inv"' in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_wrong_scale_shape_is_an_error(tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight"
    model = run_gen_model(tmp_path / "model", "--defect", f"wrong-shape={name}_scale_inv")
    proc = run_dequant(model, tmp_path / "out.safetensors")
    assert proc.returncode == 1
    assert f'"{name}_scale_inv": shape' in proc.stderr and "expected" in proc.stderr
