"""model.safetensors.index.json: transformers' exact text and consistent contents."""

import json
import os

import pytest

from interop_util import CONFIGS, load_index, read_header, run_gen_model, run_helper, shard_files


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_index_is_json_dumps_of_itself(tmp_path, config):
    model = run_gen_model(tmp_path / "model", *CONFIGS[config])
    with open(os.path.join(model, "model.safetensors.index.json"), "rb") as f:
        text = f.read()
    index = json.loads(text)
    assert text == (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("ascii")
    assert list(index) == ["metadata", "weight_map"]
    assert list(index["metadata"]) == ["total_size"]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_index_matches_shards(tmp_path, config):
    model = run_gen_model(tmp_path / "model", *CONFIGS[config])
    index = load_index(model)
    files = shard_files(model)
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    seen = {}
    data_bytes = 0
    for file in files:
        path = os.path.join(model, file)
        header_len, header, _ = read_header(path)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        assert tensors, f"{file} is empty"
        end = max(v["data_offsets"][1] for v in tensors.values())
        assert os.path.getsize(path) == 8 + header_len + end
        data_bytes += end
        for name in tensors:
            assert name not in seen, f"{name} in {seen.get(name)} and {file}"
            seen[name] = file
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == data_bytes


def test_escaping_matches_json_dumps(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    run_helper("index", path)
    index = {
        "metadata": {"total_size": 1234567890123},
        "weight_map": {
            "model.layers.0.mlp.gate.weight": "model-00001-of-00002.safetensors",
            "\u00fcn\u00ef.code": "model-00002-of-00002.safetensors",
            "emoji.\U0001F600": "f\u2028",
            "ctl.\x01\x1f\x7f\b\t\n\f\r": 'q"uote\\',
            "A": "Z",
            "a": "z",
        },
    }
    assert path.read_bytes() == (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
