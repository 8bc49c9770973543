"""Reading checkpoints tensor by tensor: the safetensors reader (plain reads, no mapping) against the
`safetensors` package, lazy GGUF reading against the eager reader, and quantize-at-load never holding
more than the float weight of the layer being quantized."""
from __future__ import annotations

import json
import struct
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import leantune
from leantune.models.safetensors_reader import FolderTensors, SafetensorsFile, read_hf_weights
from leantune.quant import Linear4bit, quantize_model

IDS = torch.tensor([[1, 5, 9, 40, 7, 3, 11, 2]])


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "i64": torch.arange(-4, 5),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.arange(256, dtype=torch.uint8).view(16, 16),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_safetensors_reader_equals_the_safetensors_package(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    ref, f = load_file(str(path)), SafetensorsFile(path)
    assert sorted(f.keys()) == sorted(ref)
    for k, t in ref.items():
        got = f.get(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
    got, want = f.get("f32"), ref["f32"].clone()
    path.write_bytes(b"\0" * path.stat().st_size)  # owned memory (a mapped tensor would read zeros now)
    assert torch.equal(got, want)


def test_safetensors_reader_errors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="w .*truncated"):
        SafetensorsFile(tmp_path / "cut.safetensors").get("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk.safetensors")
    (tmp_path / "list.safetensors").write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        SafetensorsFile(tmp_path / "list.safetensors")


def test_sharded_folder_reads_every_shard(tmp_path):
    ts = _tensors()
    names = sorted(ts)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, keys in shards.items():
        save_file({k: ts[k] for k in keys}, str(tmp_path / shard))
    wmap = {k: s for s, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    sd = read_hf_weights(tmp_path)
    assert sorted(sd) == names and all(torch.equal(sd[k], ts[k]) for k in names)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        FolderTensors(tmp_path)


# ------------------------------------------------------------------------------------------------
# GGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_gguf import tiny_llama

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    tiny_llama(path, untied=True, bias=True)
    return path


def test_lazy_gguf_tensors_equal_the_eager_reader(tiny_gguf):
    from leantune.models.gguf import open_gguf, read_gguf

    cfg, lazy, _ = open_gguf(tiny_gguf)
    cfg2, eager, _ = read_gguf(tiny_gguf)
    assert cfg == cfg2 and lazy.keys() == list(eager)
    for k in reversed(lazy.keys()):  # any order, any number of times
        t = lazy.take(k)
        assert t.dtype == torch.float32 and torch.equal(t, eager[k]), k
        assert torch.equal(lazy.take(k), t)


def _track_takes(monkeypatch, cls):
    """Record, at every `take`, which earlier-taken float weights of 4-bit layers are still alive."""
    taken, alive_at_take = [], []
    orig = cls.take

    def take(self, key):
        alive_at_take.append([k for k, ref in taken if ref() is not None])
        t = orig(self, key)
        if t.is_floating_point() and key.endswith("proj.weight"):
            taken.append((key, weakref.ref(t)))
        return t

    monkeypatch.setattr(cls, "take", take)
    return taken, alive_at_take


@pytest.mark.parametrize("kind", ["gguf", "folder"])
def test_quantized_load_holds_one_float_weight_at_a_time(request, monkeypatch, one_thread, kind):
    from leantune.models.gguf import GGUFTensors

    path = request.getfixturevalue("tiny_gguf" if kind == "gguf" else "folder")
    ref, _ = leantune.load(path)  # float model, quantized afterwards: the oracle
    quantize_model(ref)
    taken, alive_at_take = _track_takes(monkeypatch, GGUFTensors if kind == "gguf" else FolderTensors)
    model, _ = leantune.load(path, quantize="nf4")
    assert len(taken) == 7 * model.config.num_layers  # every decoder linear came through take()
    assert not any(alive_at_take), "a float weight of a quantized layer outlived its layer's quantization"
    assert all(ref() is None for _, ref in taken)
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(IDS), ref(IDS))

