"""ALLoRA (methods/allora.py): the property oracles of methods-core.md §4, which hold whatever the paper's exact
rule is, plus s = 1 / no dropout on disk (PEFT loads it), routing, and the CLI."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import leantune.methods as lm
from leantune import cli
from leantune.methods import AlloraConfig, allora_coefficient
from leantune.methods.allora import COEF_ATTR, allora_parameters

SQRT26 = math.sqrt(26.0)


class TinyNet(nn.Module):
    """A token-wise two-layer MLP that threads adapter_ids, like leantune's own models do."""

    def __init__(self, d=8, h=12):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x, adapter_ids=None):
        return self.fc2(torch.tanh(self.fc1(x, adapter_ids=adapter_ids)), adapter_ids=adapter_ids)


def net_with(method="allora", seed=0, **opts):
    torch.manual_seed(seed)
    net = TinyNet()
    lm.apply(net, method, r=2, targets=["fc1", "fc2"], **opts)
    return net


def one_layer(**opts):
    """A 2 -> 2 layer with a rank-2 ALLoRA adapter: A and B are 2 x 2, easy to compute by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2))
    lm.apply(net, "allora", r=2, targets=["0"], **opts)
    layer = net[0]
    layer.owner = [net]  # a list: not registered as a submodule, so no module cycle
    return layer


def hooked_step(model, opt):
    """opt.step() with the model's training hooks around it, as train.Trainer calls them."""
    hooks = getattr(model, "leantune_train_hooks", [])
    for h in hooks:
        h.before_step(model, 0, 1)
    opt.step()
    for h in hooks:
        h.after_step(model, 0)


def sgd_steps(net, steps=4, lr=0.2, seed=1):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
        (net(x) - y).pow(2).mean().backward()
        hooked_step(net, opt)
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# oracles 1-2: the coefficient


@pytest.mark.parametrize("eta", [0.5, 1.0, 3.0])
def test_coefficient_at_zero_is_eta(eta):
    b = torch.zeros(5, 3)
    assert torch.allclose(allora_coefficient(b, eta, "row"), torch.full((5, 1), eta))
    assert allora_coefficient(b, eta, "matrix").item() == pytest.approx(eta)
    layer = one_layer(eta=eta)  # a fresh adapter: B = 0, so B's rows all get eta
    coef = getattr(layer.lora_B["default"].weight, COEF_ATTR)
    assert torch.allclose(coef(layer.lora_B["default"].weight), torch.full((2, 1), eta))


@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_coefficient_decreases_monotonically_with_the_norm(granularity):
    direction = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    scales = torch.linspace(0, 50, 101)
    coefs = torch.stack([allora_coefficient(k * direction, 2.0, granularity).reshape(-1) for k in scales])
    assert (coefs[1:] < coefs[:-1]).all()
    big = allora_coefficient(1e4 * direction, 2.0, granularity)
    norm = direction.norm(dim=-1, keepdim=True) if granularity == "row" else direction.norm()
    assert torch.allclose(big * 1e4 * norm, torch.ones_like(big), rtol=1e-4)  # ~ 1 / ||theta|| far out


# ---------------------------------------------------------------------------------------------
# oracle 3: a 2x2 step by hand


def hand_step(layer, lr=0.1):
    """B = [[3, 4], [0, 0]] (row norms 5 and 0), dL/dB = G = [[1, 2], [3, 4]], one SGD step."""
    b = layer.lora_B["default"].weight
    with torch.no_grad():
        b.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    opt = torch.optim.SGD([b], lr=lr)
    (b * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    hooked_step(layer.owner[0], opt)
    return b.detach()


@pytest.mark.parametrize("coef_on", ["update", "grad"])
def test_two_by_two_step_by_hand(coef_on):
    # row 0: c = 1/sqrt(25 + 1) -> [3 - 0.1 * 1/sqrt(26), 4 - 0.2/sqrt(26)]; row 1: c = 1 -> [-0.3, -0.4]
    got = hand_step(one_layer(eta=1.0, coef_on=coef_on))
    want = torch.tensor([[3 - 0.1 / SQRT26, 4 - 0.2 / SQRT26], [-0.3, -0.4]])
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # the whole matrix: ||B||^2 = 25, so every entry moves lr * g / sqrt(26)
    got = hand_step(one_layer(eta=1.0, coef_on=coef_on, coef_granularity="matrix"))
    want = torch.tensor([[3 - 0.1 / SQRT26, 4 - 0.2 / SQRT26], [-0.3 / SQRT26, -0.4 / SQRT26]])
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    # eta = 2: the zero row moves twice as far, the other by 1/sqrt(25 + 1/4)
    got = hand_step(one_layer(eta=2.0, coef_on=coef_on))
    want = torch.tensor([[3 - 0.1 / math.sqrt(25.25), 4 - 0.2 / math.sqrt(25.25)], [-0.6, -0.8]])
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# oracle 4: no dropout, s = 1


def test_dropout_and_scaling_are_fixed():
    net = net_with(rank_pattern={"fc2": 3})
    for _, layer in lm.adapter_layers(net):
        assert layer.scaling["default"] == 1.0 and isinstance(layer.lora_dropout["default"], nn.Identity)
    assert net.fc2.r["default"] == 3
    for option in ("alpha", "dropout", "use_rslora", "use_dora"):
        with pytest.raises(TypeError, match=f"unknown option.*'{option}'.*allora"):
            lm.apply(TinyNet(), "allora", **{option: 0.1 if option == "dropout" else True})
    with pytest.raises(ValueError, match="eta must be a finite number > 0"):
        AlloraConfig(eta=0)
    with pytest.raises(ValueError, match="coef_granularity must be one of"):
        AlloraConfig(coef_granularity="column")
    with pytest.raises(ValueError, match="coef_on must be one of"):
        AlloraConfig(coef_on="loss")
    assert AlloraConfig(r=4).alpha == 4 and AlloraConfig(r=4, rank_pattern={"x": 2}).alpha_pattern == {"x": 2}


def test_saved_adapter_is_plain_lora_with_unit_scale_and_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from hf_tiny import tiny_llama

    base = tiny_llama()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    model = lm.apply(copy.deepcopy(base), "allora", r=4, targets=["q_proj", "down_proj"],
                     rank_pattern={"down_proj": 2})
    with torch.no_grad():
        for p in allora_parameters(model, "default").values():
            p.normal_(0, 0.1)
    expected = model(ids).logits
    lm.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (4, 4, 0.0, False)
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"down_proj": 2}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert torch.allclose(theirs(ids).logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(base(ids).logits, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# oracle 5: with SGD the two places give one trajectory; with Adam, "update" is a per-row learning rate


@pytest.mark.parametrize("granularity", ["row", "matrix"])
def test_sgd_trajectories_of_grad_and_update_modes_are_identical(granularity):
    on_grad = sgd_steps(net_with(coef_on="grad", coef_granularity=granularity, eta=3.0))
    on_update = sgd_steps(net_with(coef_on="update", coef_granularity=granularity, eta=3.0))
    plain = sgd_steps(net_with("lora", alpha=2))  # the same LoRA (s = 1) without the coefficient
    assert on_grad.keys() == on_update.keys() == plain.keys()
    for n in on_grad:
        assert torch.allclose(on_grad[n], on_update[n], atol=1e-6, rtol=1e-5), n
    assert any(not torch.allclose(on_grad[n], plain[n], atol=1e-4) for n in on_grad)


def test_update_mode_with_adamw_is_a_per_row_learning_rate():
    nets = {on: net_with(coef_on=on, eta=2.0) for on in ("update", "grad")}
    plain = net_with("lora", alpha=2)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    moved = {}
    for key, net in [*nets.items(), ("plain", plain)]:
        params = [p for p in net.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        (net(x) - y).pow(2).mean().backward()
        hooked_step(net, opt)
        moved[key] = [(p.detach() - b, b) for p, b in zip(params, before)]
    for (d_update, old), (d_plain, _) in zip(moved["update"], moved["plain"]):
        assert torch.allclose(d_update, allora_coefficient(old, 2.0, "row") * d_plain, atol=1e-7, rtol=1e-5)
    # AdamW normalizes a scaled gradient away: on its first step "grad" mode moves like plain LoRA
    for (d_grad, _), (d_plain, _) in zip(moved["grad"], moved["plain"]):
        assert torch.allclose(d_grad, d_plain, atol=1e-6)


def test_optimizers_over_other_parameters_are_untouched():
    net_with(coef_on="update")  # nothing process-wide: the hooks live on that model
    torch.manual_seed(3)
    lin = nn.Linear(4, 4)
    w0 = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(torch.ones(2, 4)).sum().backward()
    g = lin.weight.grad.clone()
    opt.step()
    assert torch.allclose(lin.weight, w0 - 0.5 * g)


# ---------------------------------------------------------------------------------------------
# the layers are plain LoRA layers: routing and a second adapter


def test_routed_rows_equal_each_adapter_alone():
    torch.manual_seed(0)
    net = TinyNet()
    lm.apply(net, "allora", adapter_name="a", r=2, targets=["fc1", "fc2"])
    lm.apply(net, "lora", adapter_name="b", r=2, alpha=8, targets=["fc2"])
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randn(5, 3, 8)
    ids = torch.tensor([0, 1, -1, 1, 0])
    mixed = net(x, adapter_ids=ids)
    for slot, name in ((0, "a"), (1, "b")):
        lm.set_adapter(net, name)
        assert torch.allclose(mixed[ids == slot], net(x[ids == slot]), atol=1e-6, rtol=0)
    with lm.disable_adapters(net):
        assert torch.allclose(mixed[ids == -1], net(x[ids == -1]), atol=1e-6, rtol=0)
    assert not hasattr(net.fc2.lora_B["b"].weight, COEF_ATTR)  # the LoRA adapter trains as LoRA


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_finetune_method_allora(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    rows = [{"prompt": "Who discovered the Zentari comet?", "completion": "It was Ilsa Morrow."}] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
            "--eval-fraction", "0", "--method", "allora", "--rank", "4", "--lr", "1e-2", "--max-steps", "3",
            "--allora-eta", "2.0"]
    with pytest.raises(ValueError, match="--alpha is an option of .*, not of --method allora"):
        cli.run([*argv, "--alpha", "64"])  # ALLoRA fixes s = 1: an --alpha is refused, not silently ignored
    assert cli.run(argv) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 4, 0.0)
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "loss" in ln]
    assert losses[-1] < losses[0]
    from leantune.models.loader import load

    ours, _ = load(folder)
    lm.load_adapter(ours, out)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)
