"""Our f32 -> bf16 / fp8 e4m3fn conversions and fp8 decoding equal torch's, bit for bit."""

import pytest

from interop_util import require, run_helper

torch = require("torch")
st_torch = require("safetensors.torch")


@pytest.fixture(scope="module")
def numeric(tmp_path_factory):
    path = tmp_path_factory.mktemp("numeric") / "numeric.safetensors"
    run_helper("numeric", path)
    return st_torch.load_file(str(path))


def test_fp8_decoding_of_all_256_codes(numeric):
    codes = numeric["fp8_codes"]
    assert torch.equal(codes, torch.arange(256, dtype=torch.uint8))
    theirs = codes.view(torch.float8_e4m3fn).float()
    ours = numeric["fp8_decoded"]
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.isnan(ours).nonzero().flatten().tolist() == [0x7F, 0xFF]
    finite = ~torch.isnan(theirs)
    # Bit patterns, so that -0.0 (code 0x80) must match too.
    assert torch.equal(ours[finite].view(torch.int32), theirs[finite].view(torch.int32))


def test_fp8_encoding_matches_torch(numeric):
    inputs = numeric["input"]
    assert inputs.numel() >= 2_000_000
    ours = numeric["fp8"].view(torch.uint8)
    theirs = inputs.to(torch.float8_e4m3fn).view(torch.uint8)
    mismatch = (ours != theirs).nonzero().flatten()
    assert mismatch.numel() == 0, [
        (inputs[i].item(), hex(inputs[i:i + 1].view(torch.int32).item()), int(ours[i]),
         int(theirs[i])) for i in mismatch[:10]]
    # The inputs do exercise ties: midpoints between neighbouring normal fp8 codes have only
    # mantissa bit 19 set below the 3 kept bits.
    bits = inputs.view(torch.int32)
    magnitude = inputs.abs()
    normal = (magnitude >= 2.0**-6) & (magnitude <= 464)
    assert (normal & ((bits & 0xFFFFF) == 0x80000)).sum() > 100_000
    assert (magnitude <= 448).sum() > 1_000_000


def test_bf16_encoding_matches_torch(numeric):
    inputs = numeric["input"]
    ours = numeric["bf16"]
    theirs = inputs.to(torch.bfloat16)
    nan = torch.isnan(inputs)
    # torch's NaN bits differ between its scalar and vectorized paths: only NaN-ness is checked.
    assert torch.isnan(ours[nan]).all()
    ours_bits = ours[~nan].view(torch.int16)
    theirs_bits = theirs[~nan].view(torch.int16)
    mismatch = (ours_bits != theirs_bits).nonzero().flatten()
    assert mismatch.numel() == 0, [hex(v) for v in inputs[~nan][mismatch[:10]]
                                   .view(torch.int32).tolist()]
    low = inputs[~nan].view(torch.int32) & 0xFFFF
    assert (low == 0x8000).sum() > 500_000  # exact round-half-to-even ties

