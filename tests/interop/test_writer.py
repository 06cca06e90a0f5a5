"""Writer byte identity: our safetensors files equal safetensors.torch.save_file's output."""

import os

import pytest

from interop_util import CONFIGS, read_header, run_gen_model, run_helper, require, shard_files

torch = require("torch")
st_torch = require("safetensors.torch")
safetensors = require("safetensors")


def _expected_mixed():
    bf16 = torch.bfloat16
    return {
        "z.u8": torch.tensor([0, 1, 2, 3, 255], dtype=torch.uint8),
        "layer.2.w": torch.tensor([2.0], dtype=bf16),
        "b.bf16": torch.tensor([[-1.0, 0.5, 0.0], [3.0, -0.25, 448.0]], dtype=bf16),
        "f.fp8": torch.tensor([0x00, 0x38, 0xB8, 0x7E], dtype=torch.uint8)
        .view(torch.float8_e4m3fn).reshape(2, 2),
        "a.f32": torch.tensor([1.5, -2.25, 0.125], dtype=torch.float32),
        "scalar": torch.tensor(7.0, dtype=torch.float32),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
        "c.i64": torch.tensor([-1, 1 << 40], dtype=torch.int64),
        "i.i32": torch.tensor([[0, -5], [7, 2147483647]], dtype=torch.int32),
        "layer.10.w": torch.tensor([1.0], dtype=bf16),
        "h.f16": torch.tensor([1.0, -0.5], dtype=torch.float16),
        "k.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "m.bool": torch.tensor([True, False, True]),
        "d.f64": torch.tensor([0.1], dtype=torch.float64),
        "\u00fcn\u00ef.code": torch.tensor([2.0], dtype=torch.float32),
        'q"uote\\name': torch.tensor([9], dtype=torch.uint8),
    }


def _raw(t):
    """The tensor's bytes as a flat uint8 tensor (bit-exact comparison, NaN-safe)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_mixed_dtypes_match_save_file(tmp_path):
    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "theirs.safetensors"
    run_helper("mixed", ours)
    expected = _expected_mixed()
    st_torch.save_file(expected, str(theirs), metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes(), (
        f"ours: {read_header(ours)[2]!r}\ntheirs: {read_header(theirs)[2]!r}")
    loaded = st_torch.load_file(str(ours))
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(_raw(loaded[name]), _raw(tensor)), name


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_generated_shards_resave_identically(tmp_path, config):
    model = run_gen_model(tmp_path / "model", *CONFIGS[config])
    shards = shard_files(model)
    assert shards
    for shard in shards:
        path = os.path.join(model, shard)
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        assert metadata == {"format": "pt"}
        resaved = tmp_path / "resaved.safetensors"
        st_torch.save_file(st_torch.load_file(path), str(resaved), metadata=metadata)
        with open(path, "rb") as f:
            ours = f.read()
        assert ours == resaved.read_bytes(), f"{config}/{shard} differs from save_file's bytes"
        n, _, raw = read_header(path)
        assert n % 8 == 0 and raw.startswith(b"{")
