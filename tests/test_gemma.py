"""Gemma 2 and Gemma 3 text (soft-capping, per-layer sliding windows, (1 + w) norms, sandwich norms, GeGLU,
scaled embeddings; Gemma 3's q/k norms and local RoPE base): an HF folder loads with transformers' logits,
its config goes back to transformers, LoRA trains through the CLI and crosses to PEFT both ways, QLoRA
loads, merge writes a folder transformers loads (recipe tier, tiny random models from hf_tiny.FAMILIES).
The logit and greedy-generation parity of the bare models is test_models.py's, over the same FAMILIES."""
import json

import pytest
import torch
from hf_tiny import tiny_hf_model
from test_recipes import assert_peft_parity, chat_row, step_records, write_jsonl
from tiny_folder import make_tiny_model_folder

from leantune import cli, methods
from leantune.models.config import ModelConfig
from leantune.models.loader import load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GEMMAS = ["gemma2", "gemma3"]


@pytest.fixture(scope="module", params=GEMMAS)
def gemma(request, tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / request.param, family=request.param)


def test_gemma_folder_loads_with_transformers_logits_past_the_window(gemma):
    model, _ = load(gemma)
    cfg = model.config
    assert cfg.model_type in ("gemma2", "gemma3_text") and cfg.sliding_window == 8
    assert [cfg.layer_window(i) for i in range(cfg.num_layers)][:2] == [8, None]  # alternating local/global
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma).eval()
    ids = torch.randint(3, 400, (2, 30), generator=torch.Generator().manual_seed(0))  # 30 > window 8
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_gemma_config_goes_back_to_transformers(gemma, tmp_path):
    cfg = ModelConfig.from_hf(json.loads((gemma / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    orig = transformers.AutoConfig.from_pretrained(gemma)
    assert type(back) is type(orig)
    for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "hidden_activation", "rope_parameters", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(orig, key), key
    again = ModelConfig.from_hf(back.to_dict())
    assert again.to_dict() == cfg.to_dict() | {"extra": again.extra}


def test_gemma_lora_trains_and_loads_in_peft(gemma, tmp_path, one_thread):
    data = write_jsonl(tmp_path / "t.jsonl", [chat_row(f"What is {i}?", f"It is {i}.") for i in range(8)])
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", str(gemma), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--max-steps", "4", "--lr", "1e-2", "--dtype", "fp32"]) == 0
    losses = [r["loss"] for r in step_records(out)]
    assert losses[-1] < losses[0]
    _, tok = load(gemma)
    assert_peft_parity(gemma, out, tok)  # the adapter changes the logits, and PEFT's equal leantune's


def test_peft_adapter_on_gemma_loads_in_leantune(gemma, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma).eval()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                     target_modules="all-linear")).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(tmp_path / "a")
    ours, _ = load(gemma)
    ids = torch.randint(3, 400, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = ours(ids)
        methods.load_adapter(ours, tmp_path / "a")
        mine, ref = ours(ids), theirs(ids).logits
    assert (mine - base).abs().max().item() > 1e-3
    assert (mine - ref).abs().max().item() <= 1e-4


def test_gemma_qlora_and_merge_give_a_folder_transformers_loads(gemma, tmp_path):
    q, _ = load(gemma, quantize="nf4")
    assert type(q.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    assert q.model.layers[0].post_feedforward_layernorm.weight.dtype == torch.float32  # norms stay float
    ids = torch.randint(3, 400, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(q(ids)).all()
    model, tok = load(gemma)
    methods.apply(model, "lora", r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for _, layer in methods.adapter_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    adapter = methods.save_adapter(model, tmp_path / "a")
    assert cli.run(["merge", "--model", str(gemma), "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert merged.config.model_type == model.config.model_type
    ids = torch.tensor([tok.encode("What is 7? It is seven, and 8 is eight.")])
    assert ids.shape[1] > 8  # past the window
    with torch.no_grad():
        assert (merged(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_multimodal_gemma3_and_bidirectional_are_refused():
    with pytest.raises(ValueError, match="gemma3_text"):
        ModelConfig.from_hf({"model_type": "gemma3", "text_config": {}})
    d = dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
             num_attention_heads=1, use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ModelConfig.from_hf(d)


def test_engine_serves_gemma_as_transformers_generates_past_the_window(gemma, tmp_path, one_thread):
    """The paged engine (chunked prefill, batched decode, per-layer windows, soft-capped scores) gives
    transformers' greedy tokens, for prompts longer than the window of 8."""
    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.requests import GenRequest
    from leantune.serve.store import Store

    model, tok = load(gemma)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (13, 5, 21)]
    engine = Engine(model, tok, "model", Store(tmp_path / "data"),
                    EngineConfig(num_blocks=32, block_size=4, max_tokens_per_step=16))
    out = {}
    for i, p in enumerate(prompts):
        engine.add_request(GenRequest(p, "model", max_tokens=8, temperature=0, ignore_eos=True),
                           out.setdefault(i, []).append)
    for _ in range(1000):
        if not engine.iteration():
            break
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert "".join(ev["text"] for ev in out[i]) == tok.decode(ref)


def write_gemma_gguf(hf, path, arch):
    """`hf` as llama.cpp's convert_hf_to_gguf writes a Gemma 2/3: gguf's own HF -> GGUF tensor names, +1 on
    every norm weight, no lm_head (tied), the metadata keys its Gemma2Model / Gemma3Model write; fp32 tensors."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import add_byte_level_tokenizer, write_gguf

    c = hf.config
    hp = dict(context_length=c.max_position_embeddings, embedding_length=c.hidden_size,
              block_count=c.num_hidden_layers, feed_forward_length=c.intermediate_size,
              head_count=c.num_attention_heads, head_count_kv=c.num_key_value_heads,
              layer_norm_rms_eps=c.rms_norm_eps, key_length=c.head_dim, value_length=c.head_dim,
              sliding_window=c.sliding_window)
    if arch == "gemma2":
        hp.update(attn_logit_softcapping=c.attn_logit_softcapping, final_logit_softcapping=c.final_logit_softcapping)
    else:
        full = c.rope_parameters["full_attention"]
        hp.update(rope_freq_base=full["rope_theta"])
        if full.get("rope_type") == "linear":
            hp.update(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=full["factor"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3,
                                     c.num_hidden_layers)
    tensors = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.float() + 1.0 if k.endswith("norm.weight") else v.float()
        tensors[names.get_name(k, try_suffixes=(".weight",))] = (v.numpy(), None)
    return write_gguf(path, arch, tensors, hp, add_byte_level_tokenizer)


@pytest.mark.parametrize("family,arch", [("gemma2", "gemma2"), ("gemma3", "gemma3")])
def test_gemma_gguf_reads_as_llamacpp_writes_it(family, arch, tmp_path):
    from test_gguf import byte_level_vocab

    vocab = len(byte_level_vocab()[0])
    # what llama.cpp hard-codes rather than stores: scale 1/sqrt(head_dim), every 2nd (Gemma 2) / 6th (Gemma 3)
    # layer global, Gemma 3's local RoPE base 10000; the tiny models are built to match
    over = dict(query_pre_attn_scalar=32) if arch == "gemma2" else dict(
        num_hidden_layers=6, layer_types=None, sliding_window_pattern=6, rope_local_base_freq=10000.0)
    ref = tiny_hf_model(family, vocab_size=vocab, **over)
    path = write_gemma_gguf(ref, tmp_path / f"{arch}.gguf", arch)
    model, _ = load(path)
    cfg = model.config
    assert cfg.model_type == ref.config.model_type and cfg.layer_types == ref.config.layer_types
    assert "full_attention" in cfg.layer_types and cfg.sliding_window == 8
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))  # past the window
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4
