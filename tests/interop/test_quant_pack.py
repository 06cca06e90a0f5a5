"""compressed-tensors `pack-quantized` (FORMATS.md §4): our packed tensors (worker/quant/pack.h
through mq-quant-tool) are byte-identical to compressed-tensors' own packing of our codes, and
compressed-tensors decompresses them to exactly our dequantized weight (bit for bit, the sign of
zeros included), both through `PackedQuantizationCompressor.decompress` on a state dict and, for
symmetric schemes, through the path transformers takes (`apply_quantization_config` +
`ModelCompressor.compress_model` on a meta-device nn.Linear, load, `decompress_model`)."""

import json
import struct
import subprocess

import pytest

from interop_util import _binary, require

torch = require("torch")
st_torch = require("safetensors.torch")
ct = require("compressed_tensors")
from compressed_tensors.compressors import (  # noqa: E402
    ModelCompressor,
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)


def tool_path():
    return _binary("MQ_QUANT_TOOL", "tests/tools/mq-quant-tool")


def run_tool(tmp_path, tensors, *flags, tag="q"):
    src = tmp_path / f"{tag}-in.safetensors"
    dst = tmp_path / f"{tag}-out.safetensors"
    st_torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(src))
    cmd = [tool_path(), "--input", str(src), "--output", str(dst), *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}"
    return st_torch.load_file(str(dst))


def weights_args(group, sym):
    return QuantizationArgs(num_bits=4, type="int", symmetric=sym,
                            strategy="group" if group else "channel",
                            group_size=group or None)


CASES = [
    # (rows, inputs, group (0 = channel), symmetric, method)
    (77, 256, 128, True, "gptq"),
    (64, 512, 32, True, "gptq"),
    (40, 192, 64, True, "rtn"),
    (33, 96, 0, True, "gptq"),  # per-channel
    (77, 256, 64, False, "gptq"),  # asymmetric: zero points packed along dim 0, 77 rows
    (9, 128, 0, False, "rtn"),  # asymmetric per-channel
]


@pytest.mark.parametrize("rows,inputs,group,sym,method", CASES)
def test_compressed_tensors_decompresses_bit_exact(tmp_path, rows, inputs, group, sym, method):
    g = torch.Generator().manual_seed(rows * 31 + inputs + group)
    w = torch.randn(rows, inputs, generator=g) * 0.05
    if not sym:
        w += 0.02  # shifted groups: nontrivial zero points
    x = torch.randn(4 * inputs, inputs, generator=g) @ torch.randn(inputs, inputs, generator=g)
    flags = ["--method", method, "--group-size", group]
    if not sym:
        flags.append("--asym")
    out = run_tool(tmp_path, {"weight": w, "x": x}, *flags)
    ours = out["weight.dequant"]
    codes = out["weight.codes"]

    packed = out["weight.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (rows, -(-inputs // 8))
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([rows, inputs])), codes)
    scale = out["weight.weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (rows, inputs // group if group else 1)
    assert out["weight.weight_shape"].dtype == torch.int64
    assert out["weight.weight_shape"].tolist() == [rows, inputs]
    state = {k: out[f"weight.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
    if sym:
        assert "weight.weight_zero_point" not in out
    else:
        zp = out["weight.weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (-(-rows // 8), scale.shape[1])
        assert torch.equal(zp, pack_to_int32(out["weight.zero_points"], 4, packed_dim=0))
        state["weight_zero_point"] = zp

    scheme = QuantizationScheme(targets=["Linear"], weights=weights_args(group, sym))
    result = PackedQuantizationCompressor.decompress(dict(state), scheme)
    theirs = result["weight"]
    assert theirs.dtype == torch.bfloat16 and theirs.shape == ours.shape
    assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16)), "not bit-exact"

    if not sym:
        # compressed-tensors 0.20's meta-device compress_model (what transformers runs before
        # loading) leaves weight_zero_point unpacked int8 [O, G] while its own compress() writes
        # packed int32 [ceil(O/8), G], so asymmetric pack-quantized checkpoints do not load through
        # transformers at all; vLLM and our outputs are symmetric. The state-dict path above is
        # the decompression check for asym.
        return

    # The transformers loading path (CompressedTensorsHfQuantizer): a meta-device Linear gets the
    # scheme and the compressed layout, our tensors are loaded into it, and ModelCompressor
    # decompresses it.
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed")
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(inputs, rows, bias=False,
                                                    dtype=torch.bfloat16))
    apply_quantization_config(model, config, run_compressed=False, show_progress=False)
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(model)
    result = model.load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=False,
                                   assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    compressor.decompress_model(model)
    weight = model[0].weight.data
    assert weight.dtype == torch.bfloat16 and weight.shape == ours.shape
    assert torch.equal(weight.view(torch.int16), ours.view(torch.int16)), "not bit-exact"
