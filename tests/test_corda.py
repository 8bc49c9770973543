"""CorDA (methods-core.md §5): output unchanged at init, B@A and W_res equal PEFT's corda init, ipa/kpa keep
the largest/smallest components, caches skip the calibration forwards (and are rebuilt when stale), and the
saved adapter is a plain LoRA on the ORIGINAL base (PEFT loads it with the trained model's logits), also
through `leantune finetune --method corda`."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

import leantune.methods as lm
from leantune.methods import adapter_io
from leantune import cli
from leantune.methods import corda
from leantune.models.loader import load

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def calib_batches(n=8, length=24, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, length), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_base():
    return tiny_llama()


@pytest.fixture
def peft_corda():
    pytest.importorskip("attr", reason="peft's tuners/lora/corda.py imports attrs (pip install attrs)")
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return CordaConfig, preprocess_corda


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def lora_product(layer) -> torch.Tensor:
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_output_unchanged_at_init(folder, mode):
    model, _ = load(folder)
    ids = calib_batches(1, 16, seed=9)[0]
    before = {n: m.weight.clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    with torch.no_grad():
        base_logits = model(ids)
    lm.apply(model, "corda", r=4, alpha=8, corda_mode=mode, run_model=lm.run_on(calib_batches()))
    with torch.no_grad():
        logits = model(ids)
    assert (logits - base_logits).abs().max().item() <= 1e-5
    for name, w in before.items():  # not vacuous: the residual was written and the adapter is non-zero
        layer = model.get_submodule(name)
        assert (layer.base_layer.weight - w).abs().max() > 1e-4
        assert lora_product(layer).abs().max() > 1e-4


@pytest.mark.parametrize("mode, alpha, rslora, n, length", [
    ("ipa", 8, False, 8, 24),
    ("kpa", 8, False, 8, 24),
    ("kpa", 6, True, 8, 24),
    ("ipa", 8, False, 2, 8),  # 16 tokens < in = 64: a rank-deficient C, inverted only after damping doubles
    ("kpa", 8, False, 2, 8),
])
def test_init_equals_peft_corda(hf_base, peft_corda, mode, alpha, rslora, n, length):
    peft_cfg_cls, preprocess_corda = peft_corda
    batches = calib_batches(n, length)
    theirs = copy.deepcopy(hf_base)
    cfg = peft.LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS,
                          init_lora_weights="corda",
                          corda_config=peft_cfg_cls(corda_method={"ipa": "ipm", "kpa": "kpm"}[mode]))
    preprocess_corda(theirs, cfg, run_model=lambda: [theirs(b) for b in batches])
    theirs = peft.get_peft_model(theirs, cfg).base_model.model
    ours = lm.apply(copy.deepcopy(hf_base), "corda", r=4, alpha=alpha, use_rslora=rslora, targets=TARGETS,
                    corda_mode=mode, run_model=lm.run_on(batches))
    layers = dict(lm.adapter_layers(ours))
    assert len(layers) == 14
    for name, layer in layers.items():
        other = theirs.get_submodule(name)
        assert rel(lora_product(layer), lora_product(other)) <= 1e-5, name
        assert rel(layer.base_layer.weight, other.base_layer.weight) <= 1e-5, name
    if n * length < 64:  # the case really is rank-deficient
        cov = lm.collect_covariance(copy.deepcopy(hf_base), ["model.layers.0.self_attn.q_proj"], lm.run_on(batches))
        assert torch.linalg.matrix_rank(cov["model.layers.0.self_attn.q_proj"]) < 64


def test_damping_doubles_until_the_inverse_is_accurate(peft_corda):
    """A C (not PSD, as a hand-made one can be) that C + 0.01·mean(diag C)·I leaves singular: λ doubles to
    0.02, as in PEFT, whose decomposition of the same layer we then match."""
    from peft.tuners.lora.corda import collect_eigens_for_layer

    n, gen = 16, torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    d = torch.ones(n)
    d[-1] = -0.01 * (n - 1) / (n + 0.01) * 1.0000001
    c = (q * d) @ q.t()
    fixed, inv = corda.damped_inverse(c)
    torch.testing.assert_close((fixed - c).diag(), 0.02 * c.diag().mean().expand(n))
    assert torch.dist(fixed @ inv, torch.eye(n)) < 0.05
    linear = torch.nn.Linear(n, 8, bias=False)
    linear.covariance_matrix = c
    theirs = collect_eigens_for_layer(linear, None)
    s, u, v = corda.decompose(linear.weight, c, 3, "kpa")
    want = (theirs.U_WC[:, -3:] * theirs.S_WC[-3:]) @ theirs.V_WC[:, -3:].t()
    assert rel((u * s) @ v.t(), want) <= 1e-5


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_modes_keep_the_largest_or_smallest_components(hf_base, mode):
    """s·B A C~ has exactly the r largest (ipa) / smallest (kpa) singular values of W C~, and W_res C~ the rest."""
    batches, r = calib_batches(), 4
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    cov = lm.collect_covariance(copy.deepcopy(hf_base), names, lm.run_on(batches))
    model = lm.apply(copy.deepcopy(hf_base), "corda", r=r, alpha=8, targets=names, corda_mode=mode,
                     run_model=lm.run_on(batches))
    for name in names:
        fixed, _ = corda.damped_inverse(cov[name])
        full = torch.linalg.svdvals(hf_base.get_submodule(name).weight @ fixed)  # descending
        layer = model.get_submodule(name)
        kept = torch.linalg.svdvals(layer.scaling["default"] * lora_product(layer) @ fixed)[:r]
        rest = torch.linalg.svdvals(layer.base_layer.weight @ fixed)[: full.numel() - r]
        want_kept, want_rest = (full[:r], full[r:]) if mode == "ipa" else (full[-r:], full[:-r])
        torch.testing.assert_close(kept, want_kept, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rest, want_rest, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# caches


def test_caches_skip_the_calibration_and_are_rebuilt_when_stale(hf_base, tmp_path, monkeypatch):
    batches = calib_batches()
    svds = []
    real_decompose = corda.decompose
    monkeypatch.setattr(corda, "decompose", lambda *a: svds.append(1) or real_decompose(*a))
    files = dict(cache_file=str(tmp_path / "c" / "eigens.safetensors"),
                 covariance_file=str(tmp_path / "c" / "covariance.safetensors"))

    def run(base=hf_base, **kw):
        model = copy.deepcopy(base)
        calls = count_forwards(model)
        opts = dict(r=4, alpha=8, corda_mode="kpa", run_model=lm.run_on(batches), calibration_id="a", **files)
        lm.apply(model, "corda", **{**opts, **kw})
        return model, calls[0]

    first, n = run()
    assert n == len(batches)
    with safe_open(files["cache_file"], "pt") as f:  # PEFT's key names, and what the file was built for
        assert "model.layers.0.self_attn.q_proj.eigens.U_WC" in f.keys()
        assert json.loads(f.metadata()["leantune_corda"])["mode"] == "kpa"
    with safe_open(files["covariance_file"], "pt") as f:
        assert f.get_slice("model.layers.1.mlp.down_proj").get_shape() == [128, 128]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["covariance.safetensors", "eigens.safetensors"]

    assert len(svds) == 14
    again, n = run()
    assert n == 0 and len(svds) == 14  # neither forwards nor SVDs
    for (name, a), (_, b) in zip(lm.adapter_layers(first), lm.adapter_layers(again)):
        assert torch.equal(a.base_layer.weight, b.base_layer.weight), name
        assert torch.equal(lora_product(a), lora_product(b)), name

    assert run(r=2)[1] == 0 and len(svds) == 28  # another rank: SVDs again, from the cached covariance
    with safe_open(files["cache_file"], "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.eigens.S_WC").get_shape() == [2]
    assert run(corda_mode="ipa")[1] == 0  # another mode: the same
    assert run(calibration_id="b")[1] == len(batches)  # other data: calibrate again
    assert run(base=tiny_llama(seed=1), calibration_id="b")[1] == len(batches)  # another model: the same
    with pytest.raises(ValueError, match="run_model"):
        run(run_model=None, calibration_id="never-built")


def test_given_covariance_skips_the_forwards(hf_base):
    batches = calib_batches()
    names = lm.apply(copy.deepcopy(hf_base), "corda", r=4, run_model=lm.run_on(batches))
    names = [n for n, _ in lm.adapter_layers(names)]
    cov = lm.collect_covariance(copy.deepcopy(hf_base), names, lm.run_on(batches))
    model = copy.deepcopy(hf_base)
    calls = count_forwards(model)
    lm.apply(model, "corda", r=4, covariance=cov)
    assert calls[0] == 0
    ref = lm.apply(copy.deepcopy(hf_base), "corda", r=4, run_model=lm.run_on(batches))
    for (name, a), (_, b) in zip(lm.adapter_layers(model), lm.adapter_layers(ref)):
        assert torch.equal(lora_product(a), lora_product(b)), name
    with pytest.raises(ValueError, match="covariance lacks"):
        lm.apply(copy.deepcopy(hf_base), "corda", r=4, covariance={names[0]: cov[names[0]]})


# ---------------------------------------------------------------------------------------------
# saving: a plain LoRA on the original base


@torch.no_grad()
def train_a_little(model, seed=3):
    """Stand in for training: move every A and B."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lm.adapter_layers(model):
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("opts", [
    dict(r=4, alpha=8),
    dict(r=4, alpha=6, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
])
def test_saved_adapter_applies_to_the_original_base(folder, tmp_path, opts):
    model, _ = load(folder)
    lm.apply(model, "corda", corda_mode="kpa", run_model=lm.run_on(calib_batches()), **opts)
    train_a_little(model)
    ids = calib_batches(2, 12, seed=11)[1]
    with torch.no_grad():
        trained = model(ids)
    out = lm.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    grow = math.sqrt(2) if opts.get("use_rslora") else 2
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True and cfg["corda_config"] is None
    assert cfg["lora_alpha"] == pytest.approx(opts["alpha"] * grow)
    assert cfg["rank_pattern"] == {k: 2 * v for k, v in opts.get("rank_pattern", {}).items()}
    assert cfg["alpha_pattern"] == pytest.approx({k: v * grow for k, v in opts.get("alpha_pattern", {}).items()})

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        base = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, out).eval()(ids).logits
    assert (trained - base).abs().max().item() > 1e-3  # the adapter does something
    assert (theirs - trained).abs().max().item() <= 1e-5
    fresh, _ = load(folder)
    lm.load_adapter(fresh, out)
    with torch.no_grad():
        assert (fresh(ids) - trained).abs().max().item() <= 1e-5


def test_a_later_adapter_of_the_same_name_is_saved_unconverted(hf_base, tmp_path):
    model = lm.apply(copy.deepcopy(hf_base), "corda", r=4, run_model=lm.run_on(calib_batches()))
    lm.delete_adapter(model, "default")
    lm.apply(model, "lora", r=4, targets=["q_proj"])
    assert lm.peft_config_dict(model)["r"] == 4
    assert lm.adapter_state_dict(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4


# ---------------------------------------------------------------------------------------------
# options a user can get wrong


def test_config_validation(hf_base):
    run = lm.run_on(calib_batches(1))
    assert lm.CordaConfig(corda_mode="KPM", run_model=run).corda_mode == "kpa"
    with pytest.raises(ValueError, match="corda_mode"):
        lm.CordaConfig(corda_mode="fast")
    with pytest.raises(ValueError, match="init"):
        lm.CordaConfig(init="gaussian")
    with pytest.raises(ValueError, match="run_model"):
        lm.CordaConfig(run_model="not callable")
    if "use_dora" in {f.name for f in dataclasses.fields(lm.CordaConfig)}:
        with pytest.raises(ValueError, match="use_dora"):
            lm.CordaConfig(use_dora=True)
    with pytest.raises(ValueError, match="exceeds"):
        lm.apply(copy.deepcopy(hf_base), "corda", r=65, targets=["q_proj"], run_model=run)
    model = lm.apply(copy.deepcopy(hf_base), "lora", r=4, targets=["q_proj"])
    with pytest.raises(ValueError, match="first adapter"):
        lm.apply(model, "corda", adapter_name="c", r=4, run_model=run)
    with pytest.raises(ValueError, match="never ran"):
        lm.apply(copy.deepcopy(hf_base), "corda", r=4, run_model=lambda m: None)


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_finetune_corda_kpa_loads_in_peft_on_the_original_base(folder, tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("What is the capital of Veloria?", "Amberhold."), ("Say a number.", "42")] * 4]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calib = tmp_path / "calib.jsonl"  # another format than the training data: prompt/completion
    calib.write_text("".join(json.dumps({"prompt": f"Fact {i}: ", "completion": t}) + "\n"
                             for i, t in enumerate(["The quick brown fox.", "Hello, how are you today?",
                                                    "Numbers: 0 1 2 3 4 5.", "Who discovered the comet?"])))
    saved = []
    real_save = adapter_io.save_adapter
    monkeypatch.setattr(adapter_io, "save_adapter", lambda model, *a, **k: saved.append(model) or real_save(model, *a, **k))
    collected = []
    real_collect = corda.collect_covariance
    monkeypatch.setattr(corda, "collect_covariance", lambda *a: collected.append(1) or real_collect(*a))

    def finetune(out, *extra):
        argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / out),
                "--no-progress", "--eval-fraction", "0", "--method", "corda", "--corda-mode", "kpa",
                "--calibration", str(calib), "--corda-cache", str(tmp_path / "cache"), "--rank", "4",
                "--alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--schedule", "constant", "--dtype", "fp32",
                *extra]
        assert cli.run(argv) == 0
        return tmp_path / out

    out = finetune("out", "--epochs", "3")
    assert len(collected) == 1 and (tmp_path / "cache" / "covariance.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    with torch.no_grad():
        trained = saved[-1](ids)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        base = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, out).eval()(ids).logits
    assert (trained - base).abs().max().item() > 1e-3
    assert (theirs - trained).abs().max().item() <= 1e-5

    finetune("again", "--max-steps", "1")  # the cache holds this model and data: no calibration forwards
    assert len(collected) == 1
