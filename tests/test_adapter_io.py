"""PEFT-format adapter I/O: exact files, interop both ways with peft 0.21.2, clear errors, atomic save."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import leantune.methods as lm
from leantune.methods import adapter_io

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


from hf_tiny import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def biased_model():
    return tiny_llama(attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(named_params, pattern=("lora_B",), std=0.1, seed=3):
    """Fill the parameters whose name contains any of `pattern` with N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if any(s in name for s in pattern):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def leantune_adapter(base, **opts):
    model = lm.apply(copy.deepcopy(base), "lora", **opts)
    randomize(model.named_parameters())
    return model


def peft_adapter(base, adapter_name="default", **opts):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **opts)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=adapter_name).eval()
    pattern = ("lora_B", "bias") if opts.get("bias", "none") != "none" else ("lora_B",)
    randomize(model.named_parameters(), pattern)
    return model


# ---------------------------------------------------------------------------------------------
# the files


def test_saved_files_match_peft_format(base_model, tmp_path):
    ours = leantune_adapter(base_model, r=4, alpha=8)
    out = lm.save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny/llama")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft_adapter(base_model, r=4, lora_alpha=8, target_modules="all-linear")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_cfg = json.loads((out / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(ours_cfg) == set(theirs_cfg) and len(ours_cfg) == 41
    same = {k: v for k, v in theirs_cfg.items() if k not in ("target_modules", "base_model_name_or_path")}
    assert {k: ours_cfg[k] for k in same} == same
    assert ours_cfg["base_model_name_or_path"] == "tiny/llama"
    assert ours_cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert set(ours_cfg["target_modules"]) == {n.rpartition(".")[2] for n in theirs_cfg["target_modules"]}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "theirs" / "adapter_model.safetensors"), "pt") as g:
        assert f.metadata() == {"format": "pt"} == g.metadata()
        assert set(f.keys()) == set(g.keys())
        key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
        assert f.get_tensor(key).shape == g.get_tensor(key).shape == (4, 64)


def test_adapter_state_dict_strips_adapter_name(base_model):
    model = lm.apply(copy.deepcopy(base_model), "lora", adapter_name="support", targets=["q_proj"])
    sd = lm.adapter_state_dict(model, "support")
    assert sorted(sd) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                          for i in (0, 1) for ab in ("A", "B")]


# ---------------------------------------------------------------------------------------------
# interop


LEANTUNE_CASES = {
    "all-linear": dict(r=4, alpha=8),
    "rslora-patterns": dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                            alpha_pattern={"q_proj": 5}),
    "regex-exclude": dict(r=2, alpha=4, targets=r".*\.(self_attn|mlp)\.\w+_proj",
                          exclude=["layers.0.mlp.up_proj"]),
}


@pytest.mark.parametrize("case", sorted(LEANTUNE_CASES))
def test_leantune_adapter_loads_in_peft(base_model, ids, tmp_path, case):
    ours = leantune_adapter(base_model, **LEANTUNE_CASES[case])
    expected = ours(ids).logits
    assert not torch.allclose(expected, base_model(ids).logits, atol=1e-3)  # the adapter does something
    lm.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "a").eval()
    assert torch.allclose(theirs(ids).logits, expected, atol=1e-4)


def test_leantune_adapter_with_biases_loads_in_peft(biased_model, ids, tmp_path):
    ours = lm.apply(copy.deepcopy(biased_model), "lora", r=4, targets=["q_proj", "o_proj"],
                    bias="all", lora_bias=True)
    randomize(lm.trainable_parameters(ours).items(), ("lora_B", "bias"))
    expected = ours(ids).logits
    lm.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(biased_model), tmp_path / "a").eval()
    assert torch.allclose(theirs(ids).logits, expected, atol=1e-4)


PEFT_CASES = {
    "list-rslora-patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                                 use_rslora=True, rank_pattern={"k_proj": 2},
                                 alpha_pattern={r"layers\.0\.mlp\.up_proj": 3}),
    "all-linear": dict(r=2, lora_alpha=16, target_modules="all-linear"),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.self_attn\.(q|v)_proj"),
    "gaussian-dropout": dict(r=4, lora_alpha=8, target_modules=["gate_proj"], init_lora_weights="gaussian",
                             lora_dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_in_leantune(base_model, ids, tmp_path, case):
    theirs = peft_adapter(base_model, **PEFT_CASES[case])
    theirs.save_pretrained(tmp_path / "a")
    ours = lm.load_adapter(copy.deepcopy(base_model), tmp_path / "a").eval()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    assert lm.trainable_parameters(ours) == {}  # loaded adapters are frozen by default


def test_peft_adapter_with_biases_loads_in_leantune(biased_model, ids, tmp_path):
    theirs = peft_adapter(biased_model, r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"],
                          bias="all", lora_bias=True)
    theirs.save_pretrained(tmp_path / "a")
    ours = lm.load_adapter(copy.deepcopy(biased_model), tmp_path / "a", trainable=True).eval()
    assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
    trainable = lm.trainable_parameters(ours)
    assert "model.layers.0.self_attn.q_proj.bias" in trainable  # bias="all"
    assert "model.layers.0.self_attn.v_proj.lora_B.default.bias" in trainable


def test_round_trip_and_two_loaded_adapters(base_model, ids, tmp_path):
    first = leantune_adapter(base_model, r=4, targets=["q_proj", "v_proj"])
    second = lm.apply(copy.deepcopy(base_model), "lora", r=2, targets=["o_proj"])
    randomize(second.named_parameters(), seed=9)
    lm.save_adapter(first, tmp_path / "first")
    lm.save_adapter(second, tmp_path / "second")
    both = copy.deepcopy(base_model)
    lm.load_adapter(both, tmp_path / "first", adapter_name="first")
    lm.load_adapter(both, tmp_path / "second", adapter_name="second")
    assert torch.allclose(both(ids).logits, first(ids).logits, atol=1e-6)
    lm.set_adapter(both, "second")
    assert torch.allclose(both(ids).logits, second(ids).logits, atol=1e-6)
    assert both.leantune_adapter_slots == {"first": 0, "second": 1}


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def saved(base_model, tmp_path):
    lm.save_adapter(leantune_adapter(base_model, r=4, targets=["q_proj", "down_proj"]), tmp_path / "a")
    return tmp_path / "a"


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_missing_files(base_model, tmp_path, saved):
    model = copy.deepcopy(base_model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm.load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json.*subfolders \['a'\]"):
        lm.load_adapter(model, tmp_path)
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lm.load_adapter(model, saved)


def test_pickle_weights_refused(base_model, saved):
    os.rename(saved / "adapter_model.safetensors", saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle file"):
        lm.load_adapter(copy.deepcopy(base_model), saved)


@pytest.mark.parametrize("changes, message", [
    (dict(peft_type="IA3"), "unsupported peft_type 'IA3'"),
    (dict(use_dora=True), "use_dora=True in adapter_config.json, but module .* lacks a DoRA lora_magnitude_vector"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(init_lora_weights="pissa"), "changes the base weights"),
    (dict(use_future_trick=True), "unknown option use_future_trick"),
    (dict(r=0), "bad adapter_config.json: LoraConfig.r"),
])
def test_unsupported_options(base_model, saved, changes, message):
    edit_config(saved, **changes)
    model = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match=message):
        lm.load_adapter(model, saved)
    assert lm.list_adapters(model) == []


def test_dora_tensor_without_use_dora_refused(base_model, saved):
    tensors = adapter_io.read_adapter(saved)[1]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, str(saved / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="use_dora=False in adapter_config.json, but module .* has a DoRA"):
        lm.load_adapter(copy.deepcopy(base_model), saved)


def test_bad_json(base_model, saved):
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        lm.load_adapter(copy.deepcopy(base_model), saved)


def test_adapter_for_another_model_shape(saved):
    other = tiny_llama(hidden_size=32, intermediate_size=96)
    with pytest.raises(ValueError) as err:
        lm.load_adapter(other, saved)
    msg = str(err.value)
    assert str(saved) in msg and "different base model" in msg
    # names the module, and the shapes this model expects vs what the file has
    assert re.search(r"module 'model\.layers\.\d\.(self_attn\.q_proj|mlp\.down_proj)'.*expects lora_A of "
                     r"shape \(4, (32|96)\).*the adapter has \(4, (64|128)\)", msg), msg
    assert lm.list_adapters(other) == [] and not list(lm.adapter_layers(other))


def test_adapter_for_another_model_missing_module(tmp_path):
    deeper = tiny_llama(num_hidden_layers=3)
    lm.save_adapter(leantune_adapter(deeper, r=4, targets=["q_proj"]), tmp_path / "a")
    with pytest.raises(ValueError, match=r"different base model.*'model.layers.2.self_attn.q_proj'.*does not have"):
        lm.load_adapter(tiny_llama(), tmp_path / "a")


def test_inconsistent_rank(base_model, saved):
    edit_config(saved, r=8)
    with pytest.raises(ValueError, match="rank 8, but its tensors have"):
        lm.load_adapter(copy.deepcopy(base_model), saved)


def test_incomplete_adapter(base_model, saved):
    edit_config(saved, target_modules=["q_proj", "down_proj", "k_proj"])
    with pytest.raises(ValueError, match="no weights for.*k_proj.*incomplete"):
        lm.load_adapter(copy.deepcopy(base_model), saved)


def test_duplicate_name_on_load(base_model, saved):
    model = lm.load_adapter(copy.deepcopy(base_model), saved)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lm.load_adapter(model, saved)


# ---------------------------------------------------------------------------------------------
# atomic save


def failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full")


def test_failed_save_leaves_nothing(base_model, tmp_path, monkeypatch):
    model = leantune_adapter(base_model, r=4, targets=["q_proj"])
    monkeypatch.setattr(adapter_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        lm.save_adapter(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_old_adapter(base_model, ids, tmp_path, monkeypatch):
    old = leantune_adapter(base_model, r=4, targets=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # a training run's other outputs share the folder
    lm.save_adapter(old, out)
    monkeypatch.setattr(adapter_io, "save_file", failing_save_file)
    with pytest.raises(OSError):
        lm.save_adapter(leantune_adapter(base_model, r=2, targets=["v_proj"]), out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl"]
    monkeypatch.undo()
    loaded = lm.load_adapter(copy.deepcopy(base_model), out)
    assert torch.allclose(loaded(ids).logits, old(ids).logits, atol=1e-6)
    new = leantune_adapter(base_model, r=2, targets=["v_proj"])
    lm.save_adapter(new, out)  # a successful overwrite replaces the adapter, keeps the rest
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
