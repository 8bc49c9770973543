"""Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv_proj and gate_up_proj, longrope, partial rotary dims, tied head):
HF folders load with transformers' logits, KV-cached generation crosses longrope's switch as transformers does,
adapters cross to and from PEFT under its fused keys, QLoRA trains, merge writes a folder transformers loads,
and the serving engine answers as transformers (recipe tier, tiny random models; logits and greedy tokens of the
three tiny families against transformers are in test_models, which runs every hf_tiny family)."""
import math

import numpy as np
import pytest
import torch
from hf_tiny import tiny_hf_model
from test_models import ours_from
from test_recipes import assert_peft_parity, chat_row, step_records, write_jsonl
from safetensors.torch import load_file
from tiny_folder import make_tiny_model_folder

from leantune import cli, methods
from leantune.models import generate as gen_mod
from leantune.models.generate import GenerationConfig, generate
from leantune.models.llama import ForwardMeta
from leantune.models.loader import load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "phi3", family="phi3")


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "phi4", family="phi4-mini")


def _ids(n=2, t=24, seed=0):
    return torch.randint(3, 400, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["phi3", "phi4"])
def test_folder_loads_fused_under_transformers_names(which, request):
    folder = request.getfixturevalue(which)
    model, _ = load(folder)
    cfg, layer = model.config, model.model.layers[0]
    assert cfg.model_type == "phi3" and cfg.fused_qkv and cfg.fused_gate_up
    names = {n for n, _ in model.named_modules()}
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
    assert not {n.rpartition(".")[2] for n in names} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert layer.self_attn.qkv_proj.out_features == (H + 2 * K) * D
    assert layer.mlp.gate_up_proj.out_features == 2 * cfg.intermediate_size
    if which == "phi4":
        assert cfg.rotary_dim == 12 and cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    for t in (10, 24):  # phi4: under and over original_max_position_embeddings (16): short, then long factors
        with torch.no_grad():
            assert (model(_ids(t=t)) - hf(_ids(t=t)).logits).abs().max().item() <= 1e-4


def test_fused_mlp_uses_the_swiglu_op(phi3, monkeypatch):
    import leantune.models.llama as llama

    model, _ = load(phi3)
    calls = []
    real = llama.swiglu_linear
    monkeypatch.setattr(llama, "swiglu_linear", lambda *a: calls.append(1) or real(*a))
    ids = _ids()
    model(ids).sum().backward()  # the op's backward through the chunked gate/up views
    assert len(calls) == model.config.num_layers
    assert model.model.layers[0].mlp.gate_up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["phi3-longrope", "phi4-mini"])
def test_cached_generation_logits_equal_a_full_forward_across_the_longrope_switch(family, monkeypatch):
    """Every step's logits (read where generate samples) equal transformers' full forward of the sequence so far,
    also past original_max_position_embeddings (16), where the cached keys from the short factors are stale and
    generate prefills again; greedy tokens alone cannot tell (a tiny random model is too flat)."""
    hf = tiny_hf_model(family)
    m = ours_from(hf)
    seen = []
    real = gen_mod.sample_next
    monkeypatch.setattr(gen_mod, "sample_next", lambda logits, g, rng: seen.append(logits.clone()) or real(logits, g, rng))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (11, 14)]
    out = generate(m, prompts, GenerationConfig(max_new_tokens=9), pad_id=0)
    assert all(len(p) + len(o) > 17 for p, o in zip(prompts, out))  # both rows cross the switch
    with torch.no_grad():
        for step, logits in enumerate(seen):
            for row, (p, o) in enumerate(zip(prompts, out)):
                ref = hf(torch.tensor([p + o[:step]])).logits[0, -1]
                assert (logits[row] - ref).abs().max().item() <= 1e-4, (step, row)


def test_lora_trains_through_the_cli_and_loads_in_peft(phi4, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(phi4), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--dtype", "fp32"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert f"base_model.model.model.layers.0.{name}.lora_A.weight" in keys
    _, tok = load(phi4)
    assert_peft_parity(phi4, out, tok)  # the adapter changes the logits, and PEFT's equal leantune's


def test_a_peft_adapter_on_the_fused_linears_loads_in_leantune(phi3, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(phi3).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg).eval()
    pm.save_pretrained(tmp_path / "a")
    ids = _ids()
    model, _ = load(phi3)
    with torch.no_grad():
        base = model(ids)
        methods.load_adapter(model, tmp_path / "a")
        ours, theirs = model(ids), pm(ids).logits
    assert {n.rpartition(".")[2] for n, _ in methods.adapter_layers(model)} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                            "down_proj"}
    assert (ours - base).abs().max().item() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_qlora_quantizes_the_fused_linears_and_trains(phi3, tmp_path, one_thread):
    q, _ = load(phi3, quantize="nf4")
    layer = q.model.layers[0]
    assert type(layer.self_attn.qkv_proj).__name__ == "Linear4bit" and type(layer.mlp.gate_up_proj).__name__ == "Linear4bit"
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(phi3), "--method", "qlora", "--data", str(data), "--output", str(out),
                    "--no-progress", "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--dtype", "fp32"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("which", ["phi3", "phi4"])
def test_merge_writes_a_folder_transformers_loads(which, request, tmp_path):
    folder = request.getfixturevalue(which)
    model, tok = load(folder)
    methods.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    adapter = methods.save_adapter(model, tmp_path / "a")
    assert cli.run(["merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert merged.config.model_type == "phi3"
    ids = _ids(t=20)  # past phi4's original_max_position_embeddings: the merged config keeps longrope's switch
    with torch.no_grad():
        assert (merged(ids).logits - model(ids)).abs().max().item() <= 1e-4
    back, _ = load(tmp_path / "m")
    for k in ("rope_scaling", "partial_rotary_factor", "sliding_window", "tie_word_embeddings", "fused_qkv"):
        assert getattr(back.config, k) == getattr(model.config, k), k


@pytest.mark.parametrize("which", ["phi3", "phi4"])
def test_the_engine_serves_what_transformers_generates(which, request, tmp_path, one_thread):
    from test_engine import _run

    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.ft_defaults import FineTuneDefaults
    from leantune.serve.store import Store

    folder = request.getfixturevalue(which)
    model, tok = load(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 9, 3)]
    # phi4: longrope's switch is 16 (prompts and fine-tuning examples past it are refused, see the next test)
    cfg = EngineConfig(num_blocks=32, block_size=4, max_model_len=16, finetune=FineTuneDefaults(max_length=16))
    engine = Engine(model.eval(), tok, "model", Store(tmp_path / "data"), cfg)
    out = _run(engine, prompts, max_tokens=6)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert "".join(ev["text"] for ev in out[i]) == tok.decode(ref[0, len(p):].tolist())


def test_the_engine_refuses_a_longrope_model_past_its_switch(phi4, tmp_path):
    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.store import Store

    from leantune.serve.ft_defaults import FineTuneDefaults

    model, tok = load(phi4)
    with pytest.raises(ValueError, match="--max-model-len 64 > 16.*pass --max-model-len 16 or less"):
        Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="--ft-max-length 1024 > 16"):
        Engine(model, tok, "model", Store(tmp_path / "data"), EngineConfig(max_model_len=16))
    with torch.no_grad(), pytest.raises(ValueError, match="paged engine serves sequences up to"):
        from leantune.serve.runner import ModelRunner, Work  # the model itself refuses, should a caller skip the check

        ModelRunner(model, 8, 4).step([Work(list(range(3, 21)), 0, list(range(18)), sample=True)])


def write_phi3_gguf(path, hf):
    """`hf`'s weights and config as llama.cpp's convert_hf_to_gguf.py (Phi3MiniModel) writes them: tensor names from
    gguf's own name map (fused attn_qkv, ffn_up holding gate and up), no q/k permutation, the longrope factors as
    rope_factors_short/long with the attention factor, the rotated dims as rope.dimension_count, window 0 for none."""
    import gguf
    from test_gguf import add_byte_level_tokenizer

    c, rp = hf.config, hf.config.rope_parameters
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_name("tiny phi")
    w.add_context_length(c.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings", c.original_max_position_embeddings))
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads)
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_sliding_window(c.sliding_window or 0)
    add_byte_level_tokenizer(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, c.num_hidden_layers)
    sd = hf.state_dict()
    for k, v in sd.items():
        if k == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, _, kind = k.rpartition(".")
        w.add_tensor(f"{names.get_name(stem)}.{kind}", v.float().numpy())
    if rp.get("long_factor"):
        scale = c.max_position_embeddings / rp["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(rp["original_max_position_embeddings"])))
        for k in ("long", "short"):
            w.add_tensor(f"rope_factors_{k}.weight", np.array(rp[f"{k}_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["phi3", "phi4-mini"])
def test_a_llamacpp_phi3_gguf_loads_with_transformers_logits(family, tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import byte_level_vocab

    hf = tiny_hf_model(family, vocab_size=len(byte_level_vocab()[0]))
    path = write_phi3_gguf(tmp_path / "phi.gguf", hf)
    model, _ = load(path)
    cfg = model.config
    assert cfg.model_type == "phi3" and cfg.fused_qkv and cfg.fused_gate_up
    if family == "phi3":
        assert cfg.sliding_window == 12 and cfg.rope_scaling is None and not cfg.tie_word_embeddings
    else:
        assert cfg.partial_rotary_factor == 0.75 and cfg.tie_word_embeddings and cfg.sliding_window is None
        assert cfg.rope_scaling["long_factor"] == pytest.approx(hf.config.rope_parameters["long_factor"])
    ids = torch.randint(3, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))  # past the switch
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["phi-3.5-mini", "phi-4-mini", "phi-3-mini-128k-su"])
def test_real_config_shapes_give_transformers_rope_and_round_trip(name, tmp_path):
    """config.json as the hub's Phi-3.5-mini / Phi-4-mini / early Phi-3-128k ("su") write it (rope_scaling with `type`,
    original_max_position_embeddings beside it, partial_rotary_factor at the top): leantune's short and long inverse
    frequencies and attention factor equal transformers' longrope init, and to_hf loads back in transformers as the
    same config."""
    import json

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from leantune.models.config import ModelConfig
    from leantune.models.llama import rope_attention_scale, rope_inv_freq

    heads, partial = (24, 0.75) if name == "phi-4-mini" else (32, 1.0)
    pairs = int(3072 // heads * partial) // 2
    d = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 32064, "hidden_size": 3072,
         "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": heads, "num_key_value_heads": 8,
         "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-5, "sliding_window": 262144, "tie_word_embeddings": name == "phi-4-mini",
         "rope_scaling": {"type": "su" if name.endswith("su") else "longrope",
                          "short_factor": [1.0 + 0.01 * i for i in range(pairs)],
                          "long_factor": [1.0 + 0.8 * i for i in range(pairs)]}}
    if partial != 1.0:
        d["partial_rotary_factor"] = partial
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.rotary_dim == 2 * pairs
    d["rope_scaling"]["type"] = "longrope"  # transformers 5.24 renames "su" too late to load such a file itself
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    short, scale = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=4097)
    assert torch.equal(rope_inv_freq(cfg), torch.stack((short, long))) and rope_attention_scale(cfg) == scale
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    back = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(tmp_path).to_dict())
    assert {**back.to_dict(), "extra": {}} == {**cfg.to_dict(), "extra": {}}


def test_packed_samples_each_get_their_own_longrope_factors():
    """A packed row holds a short sample (short factors) and one past original_max_position_embeddings (long ones):
    each equals its forward alone."""
    m = ours_from(tiny_hf_model("phi3-longrope"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 256, (1, 7), generator=g), torch.randint(3, 256, (1, 20), generator=g)
    seg = torch.tensor([[1] * 7 + [2] * 20])
    pos = torch.tensor([list(range(7)) + list(range(20))])
    with torch.no_grad():
        out = m(torch.cat([a, b], 1), ForwardMeta(positions=pos, segment_ids=seg))
        assert (out[:, :7] - m(a)).abs().max().item() <= 1e-5
        assert (out[:, 7:] - m(b)).abs().max().item() <= 1e-5
