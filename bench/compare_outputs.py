"""Compares two mq output directories tensor by tensor (no third-party packages beyond torch):
int4 codes of every *.weight_packed (fraction of differing codes), scales and unquantized
tensors (max abs difference). Used to check that gangs of different sizes give the same
checkpoint up to rounding.   usage: python3 bench/compare_outputs.py DIR_A DIR_B [--detail]
--detail: also how the differing codes spread over linears (per projection and per block of
32 routed experts), to tell a difference upstream of every solve from one in a few of them."""
import re
import json
import struct
import sys
from pathlib import Path

import torch

DTYPES = {"I32": torch.int32, "I64": torch.int64, "BF16": torch.bfloat16, "F32": torch.float32,
          "I8": torch.int8, "F16": torch.float16}


def tensors(directory):
    index = json.loads((Path(directory) / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        data = (Path(directory) / name).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            t = torch.frombuffer(bytearray(data[base + lo:base + hi]), dtype=DTYPES[info["dtype"]])
            out[key] = t.reshape(info["shape"])
    return out


def main(a_dir, b_dir, detail=False):
    a, b = tensors(a_dir), tensors(b_dir)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    codes = differing = 0
    worst = 0.0
    groups = {}  # (projection, expert block) -> [linears, linears with a difference, codes, differing]
    for name in a:
        if name.endswith("weight_packed"):
            x, y = a[name].view(torch.uint8), b[name].view(torch.uint8)
            d = int(((x & 15) != (y & 15)).sum() + ((x >> 4) != (y >> 4)).sum())
            differing += d
            codes += 2 * x.numel()
            m = re.search(r"experts\.(\d+)\.(\w+)_proj", name)
            key = (m.group(2), int(m.group(1)) // 32 * 32) if m else (name, -1)
            g = groups.setdefault(key, [0, 0, 0, 0])
            g[0] += 1
            g[1] += d > 0
            g[2] += 2 * x.numel()
            g[3] += d
        elif a[name].is_floating_point():
            worst = max(worst, (a[name].float() - b[name].float()).abs().max().item())
    print(f"{len(a)} tensors; int4 codes differing: {differing} of {codes} "
          f"({differing / max(codes, 1):.6%}); max abs difference of other float tensors: {worst}")
    if detail:
        for (proj, block), (n, nd, c, d) in sorted(groups.items()):
            where = f"experts {block}-{block + 31}" if block >= 0 else ""
            print(f"  {proj:6s} {where:14s} {nd:4d} of {n:4d} linears differ, {d / max(c, 1):.4%} of codes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--detail" in sys.argv[3:])
