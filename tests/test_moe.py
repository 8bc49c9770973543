"""Mixture of experts (Mixtral, Qwen3-MoE; leantune/models/moe.py) against transformers on tiny random models:
both checkpoint layouts load, the grouped and the looped expert paths agree with each other and with
transformers, the load-balancing loss equals transformers', LoRA crosses with PEFT, merge writes a folder
transformers loads, `finetune` trains, the engine serves greedy tokens equal to transformers'."""
import json

import pytest
import torch
from hf_tiny import tiny_hf_model
from test_recipes import assert_peft_parity, chat_row, step_records, write_jsonl
from tiny_folder import make_tiny_model_folder

from leantune import cli, methods
from leantune.models import moe
from leantune.models.llama import ForwardMeta
from leantune.models.loader import load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMS = ["mixtral", "qwen3-moe"]


@pytest.fixture(scope="module", params=FAMS)
def folder(request, tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / request.param, family=request.param)


def _ids(n=2, t=20, seed=0, vocab=256):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("original_format", [True, False])
def test_both_checkpoint_layouts_load_with_transformers_logits(family, original_format, tmp_path):
    hf = tiny_hf_model(family)
    # True: one tensor per expert, as on the Hub; False: transformers 5's stacked in-memory tensors
    hf.save_pretrained(tmp_path, save_original_format=original_format)
    model = _weights_only(tmp_path)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    layers = model.model.layers
    assert isinstance(layers[0].mlp, moe.SparseMoeBlock)
    if family == "qwen3-moe":  # mlp_only_layers=[1]: a dense MLP there, as transformers builds it
        assert not isinstance(layers[1].mlp, moe.SparseMoeBlock)


@pytest.mark.parametrize("family", FAMS)
def test_grouped_and_loop_paths_agree(family, monkeypatch):
    hf = tiny_hf_model(family)
    cfg = moe.ModelConfig.from_hf(hf.config.to_dict())
    block = moe.SparseMoeBlock(cfg)
    block.load_state_dict({k.split("mlp.", 1)[1]: v for k, v in hf.state_dict().items() if "layers.0.mlp." in k})
    x = torch.randn(3, 33, cfg.hidden_size, requires_grad=True)
    outs, grads = {}, {}
    for path in ("loop", "grouped"):
        block.experts.path = path
        with torch.no_grad():
            outs[path + "-nograd"] = block(x)  # grouped: torch._grouped_mm where it applies
        y = block(x)  # grouped with autograd: the padded bmm
        outs[path] = y
        grads[path] = torch.autograd.grad((y * y).sum(), [x, block.experts.gate_up_proj])
    ref = outs["loop"]
    for k, v in outs.items():
        assert (v - ref).abs().max().item() <= 1e-5, k
    for a, b in zip(grads["loop"], grads["grouped"]):
        assert (a - b).abs().max().item() <= 1e-4
    # the padded bmm path on its own (what a misaligned shape or bf16 under autograd takes)
    monkeypatch.setattr(moe, "_native_grouped_ok", lambda *a: False)
    with torch.no_grad():
        assert (block(x) - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="expert path"):
        block.experts.path = "fast"
        block(x)


@pytest.mark.parametrize("family", FAMS)
def test_aux_loss_equals_transformers(family):
    hf = tiny_hf_model(family, output_router_logits=True, router_aux_loss_coef=0.02)
    model, _ = _ours(hf)
    ids = _ids(t=16)
    out = hf(ids, labels=ids)
    logits = []
    with torch.no_grad():
        model(ids, ForwardMeta(router_logits=logits))
    n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.num_layers))
    assert len(logits) == n_moe
    ours = moe.load_balancing_loss(logits, model.config.num_experts, model.config.num_experts_per_tok)
    assert abs(ours.item() - out.aux_loss.item()) <= 1e-5 and ours.item() > 0
    # the trainer's loss: sum form, so loss / n = mean CE + coef * aux = transformers' loss
    from leantune.data import Batch
    from leantune.train.loss import lm_loss_sum

    batch = Batch(ids, ids.clone(), torch.arange(16).expand(2, 16), None, 30, 32)
    with torch.no_grad():
        s, n = lm_loss_sum(model, batch)
    assert abs(s.item() / n - out.loss.item()) <= 1e-5


def _weights_only(path):
    """leantune's model from a folder transformers saved (no tokenizer there)."""
    from leantune.models.llama import LlamaForCausalLM
    from leantune.models.loader import hf_folder_config
    from leantune.models.safetensors_reader import FolderTensors

    m, src = LlamaForCausalLM(hf_folder_config(path)), FolderTensors(path)
    m.load_hf_state_dict({k: src.take(k) for k in src.keys()}, source=str(path))
    return m.eval()


def _ours(hf):
    from leantune.models.config import ModelConfig
    from leantune.models.llama import LlamaForCausalLM

    m = LlamaForCausalLM(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_hf_state_dict(hf.state_dict())
    return m.eval(), None


def test_config_roundtrips_through_transformers(folder):
    model, _ = load(folder)
    back = moe.ModelConfig.from_hf(model.config.to_hf())
    a, b = back.to_dict(), model.config.to_dict()
    a.pop("extra"), b.pop("extra")  # (to_hf drops architectures/dtype from the unknown keys it keeps)
    assert a == b and a["num_experts"] == 4
    hf_cfg = transformers.AutoConfig.for_model(**model.config.to_hf())
    assert hf_cfg.num_experts_per_tok == model.config.num_experts_per_tok


def _dequantized_state_dict(q) -> dict:
    """The float weights a 4-bit model computes with: its Linear4bit and Stacked4bit weights dequantized to fp32."""
    from leantune.quant import Linear4bit, Stacked4bit

    sd = {}
    for n, m in q.named_modules():
        if isinstance(m, Linear4bit):
            sd[n.replace(".base_layer", "") + ".weight"] = m.dequantized_weight(torch.float32)
        elif isinstance(m, Stacked4bit):
            sd[n.replace(".base_layer", "")] = m.dequantized(torch.float32)
    return sd


def test_4bit_moe_codes_are_quantize_4bit_per_expert_and_logits_equal_the_dequantized_float_model(folder):
    from leantune.quant import Linear4bit, Stacked4bit, quantize_4bit

    q, _ = load(folder, quantize="nf4")
    f, _ = load(folder)
    mlp = q.model.layers[0].mlp
    assert isinstance(mlp.experts.gate_up_proj, Stacked4bit) and isinstance(mlp.experts.down_proj, Stacked4bit)
    assert isinstance(q.model.layers[0].self_attn.q_proj, Linear4bit)
    assert mlp.gate.weight.dtype == torch.float32  # the router stays float
    for name in ("gate_up_proj", "down_proj"):
        st, W = getattr(mlp.experts, name), getattr(f.model.layers[0].mlp.experts, name).detach()
        for e in range(W.shape[0]):
            packed, state = quantize_4bit(W[e])  # nf4, blocksize 64, double quantization: QLoRA's
            assert torch.equal(st.packed[e], packed.reshape(-1)) and torch.equal(st.absmax[e], state.absmax)
            assert torch.equal(st.offset[e], state.offset) and torch.equal(st.absmax2[e], state.state2.absmax)
    f.load_state_dict(_dequantized_state_dict(q), strict=False)
    ids = _ids()
    with torch.no_grad():
        assert (q(ids) - f(ids)).abs().max().item() <= 1e-5
    x = torch.randn(5, q.config.hidden_size, requires_grad=True)  # the 4-bit loop's backward decodes again
    idx = torch.randint(0, 4, (5, 2))
    w = torch.rand(5, 2)
    q_out = mlp.experts(x, idx, w)
    (g_q,) = torch.autograd.grad(q_out.square().sum(), x)
    f_out = f.model.layers[0].mlp.experts(x, idx, w)
    (g_f,) = torch.autograd.grad(f_out.square().sum(), x)
    assert (q_out - f_out).abs().max().item() <= 1e-5 and (g_q - g_f).abs().max().item() <= 1e-5


def test_4bit_load_quantizes_the_experts_layer_by_layer(folder, monkeypatch):
    """Peak memory: a layer's expert stacks are quantized before any later layer's expert tensor is read, so one
    layer's fp32 stack is the most ever resident."""
    from leantune.models.safetensors_reader import FolderTensors
    from leantune.quant import Stacked4bit

    read, seen = [], []
    take, set_ = FolderTensors.take, Stacked4bit.set_
    monkeypatch.setattr(FolderTensors, "take", lambda self, k: read.append(k) or take(self, k))
    monkeypatch.setattr(Stacked4bit, "set_", lambda self, w: seen.append(list(read)) or set_(self, w))
    q, _ = load(folder, quantize="nf4")
    moe_layers = [i for i, layer in enumerate(q.model.layers) if isinstance(layer.mlp, moe.SparseMoeBlock)]
    assert len(seen) == 2 * len(moe_layers)
    for n, keys in enumerate(seen):  # gate_up_proj then down_proj of each MoE layer in order
        layers_read = {int(k.split(".")[2]) for k in keys if ".experts." in k}
        assert max(layers_read) == moe_layers[n // 2]


def test_qlora_finetune_trains_loads_in_peft_on_the_dequantized_base_and_merges(folder, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--method", "qlora"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]
    assert methods.read_sidecar(out) == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    q, tok = load(folder, quantize="nf4")  # the base the sidecar rebuilds
    ids = torch.tensor([tok.encode("What is 7?")])
    with torch.no_grad():
        base = q(ids)
    methods.load_adapter(q, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    missing, unexpected = hf.load_state_dict(_dequantized_state_dict(q), strict=False)
    assert not unexpected
    ref = peft.PeftModel.from_pretrained(hf, out).eval()
    assert any("experts" in n and "lora_A" in n for n, _ in ref.named_parameters())  # the experts are adapted
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(out), "--output", str(tmp_path / "m")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())  # plain float
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        ours = q(ids)
        assert (ours - base).abs().max().item() > 1e-3  # the adapter does something, so parity means something
        assert (ours - ref(ids).logits).abs().max().item() <= 1e-4
        assert (ours - merged(ids).logits).abs().max().item() <= 1e-4


def test_qlora_estimate_counts_the_4bit_experts(folder):
    from leantune.quant import Stacked4bit
    from leantune.recipes.estimate import estimate_memory

    model, _ = load(folder, quantize="nf4")
    methods.apply(model, "qlora", r=4, alpha=8, targets="all-linear")
    base = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n and n != "inv_freq"]
    held = sum(t.numel() * t.element_size() for t in base)
    held += sum(m.quant_state.nbytes() + 4 for m in model.modules() if getattr(m, "quant_state", None) is not None)
    est = estimate_memory(model.config, "qlora", batch=1, seq=8, rank=4)
    assert est.weights == held
    stacks = [m for m in model.modules() if isinstance(m, Stacked4bit)]
    assert stacks and sum(m.nbytes() for m in stacks) < sum(m.shape.numel() * 4 for m in stacks) / 6  # vs fp32


def test_lora_trains_and_loads_in_peft(folder, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--dtype", "fp32"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]
    _, tok = load(folder)
    assert_peft_parity(folder, out, tok)  # the adapter changes the logits, and PEFT's equal leantune's


def test_lora_leaves_the_router_frozen_and_merge_gives_a_folder_transformers_loads(folder, tmp_path):
    model, tok = load(folder)
    methods.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    wrapped = [n for n, _ in methods.adapter_layers(model)]
    assert not any(n.endswith("mlp.gate") for n in wrapped)
    assert not model.model.layers[0].mlp.gate.weight.requires_grad
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0, 0.05)
    adapter = methods.save_adapter(model, tmp_path / "a")
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(merged).__name__ in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
    ids = torch.tensor([tok.encode("What is 7?")])
    with torch.no_grad():
        assert (merged(ids).logits - model(ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_engine_serves_greedy_tokens_equal_to_transformers(folder, tmp_path, one_thread, quantize):
    """nf4: the engine on the 4-bit MoE (4-bit experts) against transformers carrying its dequantized weights."""
    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.requests import GenRequest
    from leantune.serve.store import Store

    model, tok = load(folder, quantize=quantize)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    if quantize:
        assert not hf.load_state_dict(_dequantized_state_dict(model), strict=False).unexpected_keys
    engine = Engine(model.eval(), tok, "model", Store(tmp_path / "data"), EngineConfig(num_blocks=64, block_size=4))
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (5, 9, 3)]
    events = {i: [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(GenRequest(p, "model", max_tokens=8, temperature=0, ignore_eos=True), events[i].append)
    for _ in range(10_000):
        if not engine.iteration():
            break
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert "".join(ev["text"] for ev in events[i]) == tok.decode(ref)
        assert events[i][-1]["completion_tokens"] == 8


def test_peft_expert_adapter_loads_in_leantune_on_both_paths(folder, tmp_path, monkeypatch):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    model, _ = load(folder)
    base_logits = model(_ids()).detach()
    methods.load_adapter(model, tmp_path / "peft")
    wrapped = {n for n, _ in methods.adapter_layers(model)}
    assert "model.layers.0.mlp.experts" in wrapped and "model.layers.0.mlp.experts.base_layer" in wrapped
    with torch.no_grad():
        theirs = pm(_ids()).logits
        for path in ("loop", "grouped"):
            monkeypatch.setattr(moe.Experts, "path", path)
            ours = model(_ids())
            assert (ours - theirs).abs().max().item() <= 1e-4, path
    assert (ours - base_logits).abs().max().item() > 1e-3
    # and back: leantune's save of what it loaded is PEFT's file, key for key
    from safetensors.torch import load_file

    again = methods.save_adapter(model, tmp_path / "again")
    a, b = load_file(again / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    saved = json.loads((again / "adapter_config.json").read_text())
    assert saved["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_adapter_for_other_expert_shapes_is_refused(folder, tmp_path):
    model, _ = load(folder)
    methods.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    adapter = methods.save_adapter(model, tmp_path / "a")
    fresh, _ = load(folder)
    from safetensors.torch import load_file, save_file

    t = load_file(adapter / "adapter_model.safetensors")
    k = next(k for k in t if k.endswith("mlp.experts.lora_A.weight"))
    t[k] = t[k][:-1]
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="expert weights .* expect lora_A"):
        methods.load_adapter(fresh, adapter)


def test_mixed_adapter_batch_routes_each_row_to_its_own_expert_lora(folder):
    """A serving batch mixing two adapters and base rows: each row gets what its adapter alone gives."""
    from leantune.methods.base import adapter_slots

    model, _ = load(folder)
    for name in ("a", "b"):
        methods.apply(model, "lora", adapter_name=name, r=4, alpha=8, targets="all-linear")
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0, 0.1)
    slots = adapter_slots(model)
    ids = _ids(3, 12)
    rows = torch.tensor([slots["a"], -1, slots["b"]])
    with torch.no_grad():
        mixed = model(ids, ForwardMeta(adapter_ids=rows))
        for i, slot in enumerate(rows.tolist()):
            alone = model(ids[i:i + 1], ForwardMeta(adapter_ids=torch.tensor([slot])))
            assert (mixed[i] - alone[0]).abs().max().item() <= 1e-5, i
        methods.set_adapter(model, "b")
        assert (model(ids[2:]) - mixed[2:]).abs().max().item() <= 1e-5  # the active adapter, without slots
        assert (mixed[0] - mixed[2]).abs().max().item() > 1e-3 or not torch.equal(ids[0], ids[2])


def test_peft_all_linear_adapter_on_the_router_is_refused_clearly(folder, tmp_path):
    """PEFT 0.21.2's all-linear on a transformers-5 MoE adapts the router (gate.weight) too; leantune keeps the
    router frozen, so such an adapter is refused with the reason, not half-loaded."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "p")
    model, _ = load(folder)
    with pytest.raises(ValueError, match="LoRA on the router is not supported"):
        methods.load_adapter(model, tmp_path / "p")


def test_mixtral_sliding_window_longer_than_the_window_equals_transformers():
    hf = tiny_hf_model("mixtral", sliding_window=6)
    model, _ = _ours(hf)
    assert model.config.sliding_window == 6
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    from leantune.models.generate import GenerationConfig, generate

    # greedy decode past the window (through the KV cache) picks what transformers' full forward ranks first at
    # every step. (transformers 5.24's own generate() disagrees with its forward here after 5 tokens: its cached
    # sliding-window decode, not the model, so its forward is the oracle.)
    prompt = ids[0, :9].tolist()
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + ours])).logits[0, 8:-1].argmax(-1).tolist()
    assert ours == ref


@pytest.mark.parametrize("family", FAMS)
def test_4bit_moe_gguf_loads_with_the_dequantized_float_logits(tmp_path, family):
    """A MoE GGUF (experts already stacked per weight) quantizes to the same 4-bit experts as its float load."""
    pytest.importorskip("gguf")
    from test_gguf import moe_gguf

    moe_gguf(tmp_path / "moe.gguf", family)
    q, _ = load(tmp_path / "moe.gguf", quantize="nf4")
    f, _ = load(tmp_path / "moe.gguf")
    assert type(q.model.layers[0].mlp.experts.down_proj).__name__ == "Stacked4bit"
    f.load_state_dict(_dequantized_state_dict(q), strict=False)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 60, 2]])
    with torch.no_grad():
        assert (q(ids) - f(ids)).abs().max().item() <= 1e-5
