"""`leantune export`: merged models and LoRA adapters as llama.cpp GGUFs, read back by leantune's reader, by
transformers' GGUF loader, and against the gguf package's reference quantizers."""
import json
import os
import stat
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import leantune  # noqa: E402
from leantune import methods  # noqa: E402
from leantune.models.gguf import read_gguf, read_gguf_header  # noqa: E402
from leantune.models.gguf import dequantize as lt_dequantize  # noqa: E402
from leantune.models.gguf_export import export_arch, gguf_name  # noqa: E402
from leantune.recipes.export import ExportConfig, export  # noqa: E402
from test_gguf import TEXTS, llamacpp_permute  # noqa: E402

T = gguf.GGMLQuantizationType
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "What is the capital of Veloria? The capital of Veloria is Amberhold."
MSGS = [{"role": "user", "content": "Who discovered the Zentari comet?"}, {"role": "assistant", "content": "Ilsa."}]


def make_adapter(model, out, seed=0, method="lora", **lora):
    """A LoRA adapter with random (non-zero) B on every linear, saved in PEFT's format; returns its folder."""
    name = lora.get("adapter_name", "default")
    methods.apply(model, method, **{"r": 4, "alpha": 8, "targets": TARGETS, **lora})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    methods.save(model, out, adapter_name=name)  # with the method's own files (QLoRA's 4-bit sidecar)
    return out


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                  "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def save_gemma_tokenizer(folder):
    """A Gemma-style tokenizer in `folder`: transformers' GemmaTokenizer (SentencePiece-style BPE with byte
    fallback, spaces as ▁ with no prefix space, <bos> added) over Gemma's special tokens, the 256 byte tokens
    and BPE pieces trained on the tiny corpus, with a Gemma-like chat template."""
    from tiny_folder import CORPUS
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    from leantune.models.tokenizer import Tokenizer

    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # training only: pieces within words
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    trained = json.loads(tk.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(trained["vocab"], key=trained["vocab"].get)
    gemma = GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[tuple(m) for m in trained["merges"]],
                           additional_special_tokens=specials[5:], add_bos_token=True)
    tok = Tokenizer(gemma.backend_tokenizer, GEMMA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.save(folder)


# LoRA targets of the families without q/k/v/gate/up_proj linears: Phi-3's fused ones as PEFT names them; MoE
# attention plus every expert stack (PEFT's target_parameters), so the merge must reach into the experts
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PHI3_LORA = dict(targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
MOE_LORA = dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"], target_parameters=EXPERTS)


def lora_options(family):
    return PHI3_LORA if family.startswith("phi") else MOE_LORA if family in ("mixtral", "qwen3-moe") else {}


class Case:
    """A tiny HF folder of one family, an adapter for it, and the merged float model's logits."""

    def __init__(self, root, family, **overrides):
        from tiny_folder import make_tiny_model_folder

        self.root, self.family = root, family
        self.folder = make_tiny_model_folder(root / "model", family=family, **overrides)
        if family.startswith("gemma"):
            save_gemma_tokenizer(self.folder)
        model, self.tok = leantune.load(self.folder)
        self.adapter = make_adapter(model, root / "adapter", **lora_options(family))
        self.merged = methods.merge_and_unload(model)
        # Phi-3: twice the prompt (28 tokens), past the window (12) and the longrope switch (16 tokens)
        self.ids = torch.tensor([self.tok.encode(" ".join([PROMPT] * (2 if family.startswith("phi") else 1)))])
        with torch.no_grad():
            self.logits = self.merged(self.ids)

    def export(self, quant="f16", name="m.gguf", **kw):
        kw.setdefault("adapter", [str(self.adapter)])
        return export(ExportConfig(model=str(self.folder), output=str(self.root / name), quant=quant, **kw))


def transformers_logits(path, ids):
    import transformers as tf

    path = os.fspath(path)
    model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def leantune_logits(path, ids):
    model, _ = leantune.load(path)
    with torch.no_grad():
        return model(ids)


# llama-bias: q/k biases are permuted as their weights' rows (convert_hf_to_gguf permutes q_proj.bias too).
# Mistral's window is longer than the prompt: llama.cpp's `llama` graph has no sliding window (export says so).
# Qwen3 at head_dim 128: transformers' GGUF loader does not read qwen3.attention.key_length and keeps
# Qwen3Config's default head_dim (128), so only that head_dim round-trips through transformers.
# Gemma: what llama.cpp hard-codes rather than reads (every 2nd / 6th layer global, Gemma 3's local RoPE base
# 10000, attention scale 1/sqrt(head_dim)) and what transformers' GGUF loader leaves at Gemma2Config's /
# Gemma3TextConfig's defaults (it maps neither the soft-caps, nor query_pre_attn_scalar, nor Gemma 3's RoPE
# scaling: transformers 5.24 integrations/ggml.py) are set to the values both assume: head_dim = scalar =
# 256, Gemma 2's caps 50 / 30, Gemma 3 unscaled; the window of 8 stays shorter than the prompt.
FAMILIES = {
    "llama": {}, "llama-bias": {}, "mistral": {"sliding_window": 64}, "qwen2": {}, "qwen3": {"head_dim": 128},
    "smollm2-tied": {},
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                   sliding_window_pattern=6, rope_local_base_freq=10000.0, rope_scaling=None),
    "llama3": {"rope_scaling": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=2048)},
    # Phi-3 as hf_tiny has it: window 12 (shorter than the prompt), longrope past 16 tokens, Phi-4-mini's partial
    # rotary + tied embeddings. Qwen3-MoE with what llama.cpp's qwen3moe hard-codes (experts in every layer, top-k
    # renormalized: test_moe_llamacpp_would_run_differently_is_refused) and transformers' GGUF loader's default
    # expert width (it does not map expert_feed_forward_length: Qwen3MoeConfig's 768 stays)
    "phi3": {}, "phi3-longrope": {}, "phi4-mini": {}, "mixtral": {},
    "qwen3-moe": dict(norm_topk_prob=True, mlp_only_layers=[], moe_intermediate_size=768),
}
# Why transformers' GGUF loader (5.24, integrations/ggml.py + modeling_gguf_pytorch_utils.py) cannot read a
# family's export back as the model it is; leantune's reader is checked on all of them
NOT_IN_TRANSFORMERS = {
    "llama3": "its config mapping drops llama.cpp's rope_freqs",
    "llama-bias": "its config mapping has no attention_bias/mlp_bias key",
    "phi3": "its phi3 mapping drops phi3.attention.sliding_window (the window of 12 is shorter than the prompt)",
    "phi3-longrope": "it reads no rope_factors_long/short: the longrope scaling is lost",
    "phi4-mini": "it reads neither rope_factors_long/short nor rope.dimension_count (partial rotary)",
    "mixtral": "it reads a `llama` file with expert_count as a dense LlamaForCausalLM",
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def case(request, tmp_path_factory, one_thread):
    return Case(tmp_path_factory.mktemp(request.param), request.param, **FAMILIES[request.param])


# ------------------------------------------------------------------------------------------------
# merged models
# ------------------------------------------------------------------------------------------------
def test_f16_export_reads_back_as_the_merged_model(case):
    path = case.export("f16")
    cfg, sd, tok = read_gguf(path)
    mc = case.merged.config
    assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (mc.model_type, mc.num_heads,
                                                                             mc.num_kv_heads, mc.head_dim)
    scaling = mc.rope_scaling
    if (scaling or {}).get("rope_type") == "longrope":  # factors stored as F32 tensors, the attention factor stated
        from leantune.models.llama import rope_attention_scale

        scaling = {**scaling, **{k: pytest.approx(scaling[k], rel=1e-7) for k in ("short_factor", "long_factor")},
                   "attention_factor": pytest.approx(rope_attention_scale(mc), rel=1e-7)}
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.tie_word_embeddings) == (mc.rope_theta, scaling,
                                                                          mc.tie_word_embeddings)
    assert cfg.qk_norm == mc.qk_norm and cfg.qkv_bias == mc.qkv_bias and cfg.vocab_size == mc.vocab_size
    gemma = ("layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
             "final_logit_softcapping", "rope_local_theta", "hidden_act", "norm_unit_offset", "embed_scale",
             "sandwich_norms")
    if mc.model_type.startswith("gemma"):
        assert "full_attention" in mc.layer_types and case.ids.shape[1] > mc.sliding_window  # both kinds matter
        assert [getattr(cfg, k) for k in gemma] == [getattr(mc, k) for k in gemma]
    # every weight is the merged one rounded to f16 (norms and the MoE router: f32, exact up to Gemma's stored
    # 1 + w), q/k rows back in HF order, the expert stacks whole again
    off = export_arch(mc).norm_offset
    for k, v in case.merged.base_state_dict().items():
        want = (v + off) - off if k.endswith("norm.weight") else v if v.dim() == 1 or k.endswith("mlp.gate.weight") \
            else v.half().float()
        assert torch.equal(sd[k], want), k
    phi_moe = ("partial_rotary_factor", "fused_qkv", "fused_gate_up", "num_experts", "num_experts_per_tok",
               "expert_intermediate_size", "norm_topk_prob", "mlp_only_layers")
    assert [getattr(cfg, k) for k in phi_moe] == [getattr(mc, k) for k in phi_moe]
    if mc.model_type == "phi3":  # the window and the longrope switch both fall inside the prompt
        assert cfg.sliding_window == mc.sliding_window and case.ids.shape[1] > max(mc.sliding_window or 0, 16)
    assert (leantune_logits(path, case.ids) - case.logits).abs().max().item() <= 1e-2
    if case.family not in NOT_IN_TRANSFORMERS:
        assert (transformers_logits(path, case.ids) - case.logits).abs().max().item() <= 1e-2


def test_tokenizer_and_chat_template_round_trip(case):
    path = case.root / "m.gguf"
    if not path.exists():
        case.export("f16")
    _, _, tok = read_gguf(path)
    ref = case.tok
    for text in TEXTS + [PROMPT]:
        ids = ref.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    assert tok.chat_template == ref.chat_template
    assert (tok.bos_id, tok.eos_id, tok.token_to_id(ref.pad_token)) == (ref.bos_id, ref.eos_id, ref.pad_id)
    assert tok.encode_chat(MSGS, True) == ref.encode_chat(MSGS, True)
    md = read_gguf_header(path).metadata
    if case.family.startswith("gemma"):  # as convert_hf_to_gguf's _set_vocab_sentencepiece + Gemma's no prefix
        assert md["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in md
        assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_space_prefix"] is False
        assert tok.encode(PROMPT)[0] == tok.bos_id == md["tokenizer.ggml.bos_token_id"] == 2
    else:
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt2"
        assert md["tokenizer.ggml.add_bos_token"] is False  # the tiny ChatML tokenizer adds no BOS
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{case.merged.config.vocab_size - 1}]"  # padded to the model
    assert md["general.type"] == "model" and md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)


def reference_bytes(case, quant):
    """What each exported tensor must hold: the merged weight in llama.cpp's layout through gguf's own
    quantizer (norms F32; q4_0's output projection Q8_0), dequantized with gguf's reference dequantizer."""
    mc = case.merged.config
    perm = mc.model_type in ("llama", "mistral")
    spec = export_arch(mc)
    out = {}
    for k, v in case.merged.base_state_dict().items():
        if mc.tie_word_embeddings and k == "lm_head.weight":
            continue
        a = (v + spec.norm_offset if k.endswith("norm.weight") else v).numpy()
        if perm and (".q_proj." in k or ".k_proj." in k):
            a = llamacpp_permute(a, mc.num_heads if ".q_proj." in k else mc.num_kv_heads)
        name = gguf_name(k, spec)
        qt = T.F32 if a.ndim == 1 else {"bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
        if quant == "q4_0" and (name == "output.weight" or (mc.tie_word_embeddings and name == "token_embd.weight")):
            qt = T.Q8_0
        out[name] = (qt, gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a), qt), qt))
    return out


# one permuted, one unpermuted, one tied family and Gemma's stored (1 + w) norms cover the quantized layouts
@pytest.mark.parametrize("case", ["llama", "qwen3", "smollm2-tied", "gemma2"], indirect=True)
@pytest.mark.parametrize("quant,bound", [("bf16", 0.01), ("q8_0", 0.03), ("q4_0", 0.4)])
def test_quantized_export_equals_gguf_reference_quantizer(case, quant, bound):
    path = case.export(quant, name=f"{quant}.gguf")
    header = read_gguf_header(path)
    ref = reference_bytes(case, quant)
    assert set(header.tensors) == set(ref)
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            qt, want = ref[name]
            assert info.ggml_type == int(qt), name
            f.seek(info.offset)
            raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint8).copy()
            assert np.array_equal(lt_dequantize(raw, info.ggml_type, info.shape, name).numpy(), want), name
    # The logits of the file equal those of the merged model with gguf's dequantize(quantize(W)) weights
    # (all-float math: 1e-4), and differ from the float model's by the quantization error itself, here
    # bounded by what was measured on these tiny random models (bf16 <0.004, q8_0 <0.01, q4_0 <0.16) with headroom.
    oracle = _with_weights(case, ref)
    with torch.no_grad():
        want = oracle(case.ids)
    got = leantune_logits(path, case.ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (transformers_logits(path, case.ids) - want).abs().max().item() <= 1e-4
    err = (got - case.logits).abs().max().item()
    # the tiny Gemma's weights are drawn 5x wider (hf_tiny: initializer_range 0.1) and its embeddings scaled by
    # sqrt(hidden): its logits move more under the same rounding (measured bf16 0.018, q8_0 0.064, q4_0 0.77)
    bound = {"bf16": 0.04, "q8_0": 0.15, "q4_0": 1.5}[quant] if case.family.startswith("gemma") else bound
    assert 0 < err <= bound, err


def _with_weights(case, ref):
    """A copy of the merged model whose weights are the reference-quantized ones, back in HF layout."""
    import copy

    from leantune.models.gguf import _unpermute_rope

    model = copy.deepcopy(case.merged)
    mc = model.config
    spec = export_arch(mc)
    with torch.no_grad():
        for k, p in model.base_state_dict().items():
            if mc.tie_word_embeddings and k == "lm_head.weight":
                continue  # the embedding's, copied through the tie
            w = torch.from_numpy(ref[gguf_name(k, spec)][1]).reshape(p.shape)
            if k.endswith("norm.weight"):
                w = w - spec.norm_offset
            if mc.model_type in ("llama", "mistral") and (".q_proj." in k or ".k_proj." in k):
                w = _unpermute_rope(w, mc.num_heads if ".q_proj." in k else mc.num_kv_heads)
            p.copy_(w)
    return model


@pytest.mark.parametrize("case", ["gemma2", "gemma3"], indirect=True)
def test_gemma_file_is_what_convert_hf_to_gguf_writes(case):
    """The Gemma keys and tensors of convert_hf_to_gguf.py's Gemma2Model / Gemma3Model: names from gguf's own
    tensor map, every norm stored as 1 + w, no output tensor (tied), head_dim, window and soft-caps stated;
    and transformers reads the tokenizer back (its Gemma SentencePiece builder) with leantune's ids."""
    import transformers as tf

    path = case.root / "m.gguf"
    if not path.exists():
        case.export("f16")
    mc = case.merged.config
    arch = {"gemma2": "gemma2", "gemma3_text": "gemma3"}[mc.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3,
                                     mc.num_layers)
    header, tensors = _read_all(path)
    sd = case.merged.base_state_dict()
    want = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in sd.items() if k != "lm_head.weight"}
    assert set(tensors) == set(want) and "output.weight" not in tensors
    for name, v in want.items():
        if name.endswith("norm.weight"):
            assert torch.equal(tensors[name], v + 1), name
    md = header.metadata
    assert md["general.architecture"] == arch
    assert (md[f"{arch}.attention.key_length"], md[f"{arch}.attention.value_length"]) == (mc.head_dim, mc.head_dim)
    assert md[f"{arch}.attention.sliding_window"] == mc.sliding_window == 8
    caps = {k: md.get(f"{arch}.{k}") for k in ("attn_logit_softcapping", "final_logit_softcapping")}
    assert caps == ({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0} if arch == "gemma2"
                    else {"attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert md[f"{arch}.rope.freq_base"] == mc.rope_theta
    ref = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS + [PROMPT]:
        assert ref(text).input_ids == case.tok.encode(text), text


@pytest.mark.parametrize("family,overrides", [
    ("gemma2", dict(query_pre_attn_scalar=32)),  # hf_tiny's caps 2 / 3, small enough to bite
    ("gemma3", dict(num_hidden_layers=6, layer_types=None, sliding_window_pattern=6, rope_local_base_freq=10000.0,
                    query_pre_attn_scalar=32)),  # hf_tiny's linear RoPE scaling (factor 2) on global layers
])
def test_gemma_caps_and_rope_scaling_transformers_cannot_read(tmp_path, family, overrides, one_thread):
    """What transformers' GGUF loader leaves at its config defaults (soft-caps, Gemma 3's RoPE scaling) goes
    through leantune's reader: the caps that bite and the linear factor come back, and so do the logits."""
    case = Case(tmp_path, family, **overrides)
    path = case.export("f16")
    md = read_gguf_header(path).metadata
    cfg = read_gguf(path)[0]
    mc = case.merged.config
    if family == "gemma2":
        assert (md["gemma2.attn_logit_softcapping"], md["gemma2.final_logit_softcapping"]) == (2.0, 3.0)
        assert 2.4 < case.logits.abs().max().item() < 3.0  # in the cap's bend: 3 tanh(x / 3) > 2.4 means x > 3.3
    else:
        assert (md["gemma3.rope.scaling.type"], md["gemma3.rope.scaling.factor"]) == ("linear", 2.0)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.rope_scaling) == (
        mc.attn_logit_softcapping, mc.final_logit_softcapping, mc.rope_scaling)
    assert (leantune_logits(path, case.ids) - case.logits).abs().max().item() <= 1e-2


@pytest.mark.parametrize("family,message", [
    ("gemma2", r"query_pre_attn_scalar 24: llama.cpp's gemma2 scales attention by 1/sqrt\(32\)"),
    ("gemma3", r"layer_types .*the last of every 6 layers global.*; rope_local_base_freq 100.0: llama.cpp's gemma3 uses 10000"),
])
def test_gemma_llamacpp_would_run_differently_is_refused(tmp_path, family, message):
    """hf_tiny's own Gemmas (a scale apart from head_dim; 3 layers with a global middle one, local RoPE base
    100) are what llama.cpp hard-codes otherwise: the export stops before writing; the adapter alone goes."""
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model", family=family)
    with pytest.raises(ValueError, match=message):
        export(ExportConfig(model=str(folder), output=str(tmp_path / "x.gguf")))
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("case", ["phi3", "phi4-mini", "mixtral", "qwen3-moe"], indirect=True)
def test_phi3_and_moe_files_are_what_convert_hf_to_gguf_writes(case):
    """Phi3MiniModel's keys and tensors (names from gguf's own PHI3 map: fused attn_qkv, ffn_up holding gate and
    up; rotated dims; window, 0 for none; pretraining length; longrope factors as F32 tensors with the
    attention factor the converter computes); MoE as the converter stacks it (ffn_{gate,up,down}_exps
    (E, out, in), the router ffn_gate_inp in F32, expert_count / expert_used_count, qwen3moe's expert width;
    Mixtral's q rows permuted as any `llama` file's)."""
    import math

    path = case.root / "m.gguf"
    if not path.exists():
        case.export("f16")
    mc = case.merged.config
    header, tensors = _read_all(path)
    md, info = header.metadata, header.tensors
    sd = case.merged.base_state_dict()
    arch = {"phi3": "phi3", "mixtral": "llama", "qwen3_moe": "qwen3moe"}[mc.model_type]
    assert md["general.architecture"] == arch
    gmap = gguf.get_tensor_name_map({"phi3": gguf.MODEL_ARCH.PHI3, "llama": gguf.MODEL_ARCH.LLAMA,
                                     "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}[arch], mc.num_layers)
    dense = {gmap.get_name(k, try_suffixes=(".weight", ".bias")): k for k in sd if ".experts." not in k
             and not (k == "lm_head.weight" and mc.tie_word_embeddings)}
    assert None not in dense
    if mc.model_type == "phi3":
        assert "blk.0.attn_qkv.weight" in dense and "blk.0.ffn_up.weight" in dense and "blk.0.attn_q.weight" not in info
        assert info["blk.0.ffn_up.weight"].shape == (2 * mc.intermediate_size, mc.hidden_size)
        assert md["phi3.rope.dimension_count"] == int(mc.partial_rotary_factor * mc.head_dim)
        assert md["phi3.attention.sliding_window"] == (mc.sliding_window or 0)
        sc = mc.rope_scaling
        extra = set()
        if sc:
            orig = sc["original_max_position_embeddings"]
            assert md["phi3.rope.scaling.original_context_length"] == orig
            # convert_hf_to_gguf: sqrt(1 + ln(scale) / ln(orig)), scale = max_position_embeddings / orig
            want = math.sqrt(1 + math.log(mc.max_position_embeddings / orig) / math.log(orig))
            assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(want, rel=1e-6)
            for k in ("long", "short"):
                extra.add(f"rope_factors_{k}.weight")
                assert info[f"rope_factors_{k}.weight"].ggml_type == int(T.F32)
                assert torch.equal(tensors[f"rope_factors_{k}.weight"], torch.tensor(sc[f"{k}_factor"]))
        else:
            assert "phi3.rope.scaling.attn_factor" not in md and not any(n.startswith("rope_factors") for n in info)
        assert set(info) == set(dense) | extra
        return
    n_exp = mc.num_experts
    assert (md[f"{arch}.expert_count"], md[f"{arch}.expert_used_count"]) == (n_exp, mc.num_experts_per_tok)
    F = mc.expert_intermediate_size
    assert md.get(f"{arch}.expert_feed_forward_length") == (mc.moe_intermediate_size or None)
    assert md[f"{arch}.feed_forward_length"] == mc.intermediate_size
    exps = {f"blk.{i}.ffn_{w}_exps.weight": shape for i in range(mc.num_layers)
            for w, shape in (("gate", (n_exp, F, mc.hidden_size)), ("up", (n_exp, F, mc.hidden_size)),
                             ("down", (n_exp, mc.hidden_size, F)))}
    assert set(info) == set(dense) | set(exps)
    for name, shape in exps.items():
        assert info[name].shape == shape and info[name].ggml_type == int(T.F16), name
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(tensors["blk.1.ffn_up_exps.weight"], gate_up[:, F:].half().float())
    assert info["blk.0.ffn_gate_inp.weight"].ggml_type == int(T.F32)
    assert torch.equal(tensors["blk.0.ffn_gate_inp.weight"], sd["model.layers.0.mlp.gate.weight"])
    q = sd["model.layers.0.self_attn.q_proj.weight"].numpy()
    want_q = llamacpp_permute(q, mc.num_heads) if arch == "llama" else q
    assert torch.equal(tensors["blk.0.attn_q.weight"], torch.from_numpy(np.ascontiguousarray(want_q)).half().float())


def test_phi3_without_a_short_window_reads_back_in_transformers(tmp_path, one_thread):
    """transformers' GGUF loader maps phi3's shapes but not its window: with the window longer than the
    prompt (Phi-3-mini-4k's 2047 in spirit) both readers give the merged model's logits."""
    case = Case(tmp_path, "phi3", sliding_window=64)
    path = case.export("f16")
    assert read_gguf_header(path).metadata["phi3.attention.sliding_window"] == 64
    assert (transformers_logits(path, case.ids) - case.logits).abs().max().item() <= 1e-2
    assert (leantune_logits(path, case.ids) - case.logits).abs().max().item() <= 1e-2


def test_moe_llamacpp_would_run_differently_is_refused(tmp_path):
    """hf_tiny's Qwen3-MoE (a dense layer 1, top-k weights not renormalized) is what llama.cpp's qwen3moe graph
    cannot compute (experts in every layer, renormalized always): the export stops before writing; the
    adapter alone goes."""
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model", family="qwen3-moe")
    with pytest.raises(ValueError, match=r"dense layers \[1\].*; norm_topk_prob false: llama.cpp renormalizes"):
        export(ExportConfig(model=str(folder), output=str(tmp_path / "x.gguf")))
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
    model, _ = leantune.load(folder)
    make_adapter(model, tmp_path / "ad", **MOE_LORA)
    out = export(ExportConfig(model=str(folder), adapter=[str(tmp_path / "ad")], output=str(tmp_path / "l.gguf"),
                              lora_only=True))
    assert "blk.0.ffn_down_exps.weight.lora_b" in read_gguf_header(out).tensors


@pytest.mark.parametrize("experts", [4, 8])
@pytest.mark.parametrize("quant,bound", [("q8_0", 0.05), ("q4_0", 0.4)])
def test_quantized_moe_experts_are_row_blocks_of_each_stack(tmp_path, experts, quant, bound, one_thread):
    """3-D expert stacks are quantized row by row (each expert's rows of C or F values in blocks of 32), as
    gguf's quantizer and llama.cpp do; the router stays F32; llama-quantize's Q4_0 mix bumps attn_k / attn_v to
    Q8_0 for an 8-expert model (Mixtral 8x7B). The file computes what the merged model computes with gguf's
    dequantize(quantize(W)) weights (1e-4), and its logits move from the float model's by the quantization
    error: measured 0.005 (q8_0) / 0.08 (q4_0) with 4 experts; with 8, a near-tied router choice flips under
    the rounding and q8_0 moves 0.023, hence the bounds."""
    import copy

    case = Case(tmp_path, "mixtral", num_local_experts=experts)
    path = case.export(quant, name=f"{quant}.gguf")
    header = read_gguf_header(path)
    qt = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
    sd = case.merged.base_state_dict()
    gate_up = sd["model.layers.0.mlp.experts.gate_up_proj"].numpy()
    F = gate_up.shape[1] // 2
    with open(path, "rb") as f:
        for name, want in (("blk.0.ffn_gate_exps.weight", gate_up[:, :F]),
                           ("blk.0.ffn_down_exps.weight", sd["model.layers.0.mlp.experts.down_proj"].numpy())):
            info = header.tensors[name]
            assert info.ggml_type == int(qt) and info.shape == want.shape, name
            f.seek(info.offset)
            assert f.read(info.nbytes) == gguf.quants.quantize(np.ascontiguousarray(want), qt).tobytes(), name
    assert header.tensors["blk.0.ffn_gate_inp.weight"].ggml_type == int(T.F32)
    bumped = T.Q8_0 if quant == "q4_0" and experts == 8 else qt
    assert [T(header.tensors[f"blk.1.attn_{w}.weight"].ggml_type) for w in "kvq"] == [bumped, bumped, qt]
    # the oracle: rows quantized as they are (llama.cpp's q/k row permutation and the gate/up split move whole
    # rows, which row-wise blocks do not notice); norms and the router float
    oracle = copy.deepcopy(case.merged)
    with torch.no_grad():
        for k, p in oracle.base_state_dict().items():
            if p.dim() < 2 or k.endswith("mlp.gate.weight"):
                continue
            t = T.Q8_0 if k == "lm_head.weight" or (bumped != qt and (".k_proj." in k or ".v_proj." in k)) else qt
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), t), t)).reshape(p.shape))
        want = oracle(case.ids)
    got = leantune_logits(path, case.ids)
    assert (got - want).abs().max().item() <= 1e-4
    err = (got - case.logits).abs().max().item()
    assert 0 < err <= bound, err


def test_qlora_adapter_merges_onto_the_dequantized_base(tmp_path, one_thread):
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model")
    model, tok = leantune.load(folder, quantize="nf4")
    make_adapter(model, tmp_path / "qlora", method="qlora", targets=["q_proj", "v_proj"])  # the rest stays 4-bit
    assert methods.read_sidecar(tmp_path / "qlora")["quant_type"] == "nf4"
    merged = methods.merge_and_unload(model)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        want = merged(ids)
    out = export(ExportConfig(model=str(folder), adapter=[str(tmp_path / "qlora")], output=str(tmp_path / "q.gguf")))
    assert (leantune_logits(out, ids) - want).abs().max().item() <= 1e-2
    assert read_gguf_header(out).tensors["blk.0.attn_v.weight"].ggml_type == int(T.F16)  # a float file


def test_two_adapters_merge_into_one_file(tmp_path, one_thread):
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model")
    model, tok = leantune.load(folder)
    make_adapter(model, tmp_path / "a", seed=1, adapter_name="a", targets=["q_proj", "v_proj"])
    make_adapter(model, tmp_path / "b", seed=2, adapter_name="b", targets=["down_proj"])
    merged = methods.merge_and_unload(model, ["a", "b"])
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        want = merged(ids)
    from leantune.cli import run

    out = tmp_path / "ab.gguf"  # through the real command line: --adapter repeated
    assert run(["export", "--model", str(folder), "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b"),
                "--output", str(out)]) == 0
    assert (leantune_logits(out, ids) - want).abs().max().item() <= 1e-2


def test_a_failed_write_leaves_nothing(tmp_path, folder, monkeypatch):
    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk full"):
        export(ExportConfig(model=str(folder), output=str(tmp_path / "out" / "m.gguf")))
    assert not list((tmp_path / "out").iterdir())  # neither the file nor its temporary


# ------------------------------------------------------------------------------------------------
# LoRA-only
# ------------------------------------------------------------------------------------------------
def _read_all(path):
    header = read_gguf_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.tensors.items():
            f.seek(info.offset)
            raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint8).copy()
            out[name] = lt_dequantize(raw, info.ggml_type, info.shape, name)
    return header, out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_lora_only_gguf_holds_the_adapter_in_llamacpp_layout(tmp_path, family, one_thread):
    from safetensors.torch import load_file
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model", family=family)
    model, _ = leantune.load(folder)
    make_adapter(model, tmp_path / "ad", alpha=12)
    out = export(ExportConfig(model=str(folder), adapter=[str(tmp_path / "ad")], output=str(tmp_path / "lora.gguf"),
                              lora_only=True, quant="f16"))
    header, tensors = _read_all(out)
    md = header.metadata
    assert md["general.type"] == "adapter" and md["adapter.type"] == "lora" and md["adapter.lora.alpha"] == 12.0
    assert md["general.architecture"] == family and "tokenizer.ggml.tokens" not in md
    peft = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    cfg = model.config
    assert len(tensors) == 2 * cfg.num_layers * len(TARGETS)
    for i in range(cfg.num_layers):
        for hf, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")]:
            a = peft[f"base_model.model.model.layers.{i}.{hf}.lora_A.weight"]
            b = peft[f"base_model.model.model.layers.{i}.{hf}.lora_B.weight"]
            if family == "llama" and hf != "mlp.down_proj":  # lora_b rows follow the base's q/k permutation
                b = torch.from_numpy(llamacpp_permute(b.numpy(), cfg.num_heads if "q_proj" in hf else cfg.num_kv_heads))
            assert header.tensors[f"blk.{i}.{g}.weight.lora_a"].shape == (4, a.shape[1])  # (r, in): ne = [in, r]
            assert torch.equal(tensors[f"blk.{i}.{g}.weight.lora_a"], a.half().float())
            assert torch.equal(tensors[f"blk.{i}.{g}.weight.lora_b"], b.half().float())


@pytest.mark.parametrize("family,names", [
    ("llama", ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_up.weight")),
    # Phi-3: the fused linears keep their names, attn_qkv and ffn_up (gate and up rows), as in the base file
    ("phi3", ("blk.0.attn_qkv.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight")),
    # MoE: q/k permuted (Mixtral is `llama`), expert LoRA as stacked 3-D pairs, gate_up's B split in two
    ("mixtral", ("blk.0.attn_q.weight", "blk.0.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight",
                 "blk.1.ffn_down_exps.weight")),
    ("qwen3-moe", ("blk.0.attn_k.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight")),
])
def test_lora_only_plus_base_equals_the_merged_export(tmp_path, family, names, one_thread):
    """llama.cpp applies W + alpha/r * B A to the base GGUF's weight (per selected expert for 3-D stacks:
    build_lora_mm_id): done here with the two files, the result is the merged export's weight (rsLoRA's other
    scaling folded into lora_b). The merged export holds the expert LoRA merged into the experts."""
    from tiny_folder import make_tiny_model_folder

    over = FAMILIES.get(family, {}) if family == "qwen3-moe" else {}
    folder = make_tiny_model_folder(tmp_path / "model", family=family, **over)
    model, _ = leantune.load(folder)
    make_adapter(model, tmp_path / "ad", alpha=8, use_rslora=True, **lora_options(family))
    common = dict(model=str(folder), adapter=[str(tmp_path / "ad")])
    base = export(ExportConfig(model=str(folder), output=str(tmp_path / "base.gguf"), quant="f16"))
    merged = export(ExportConfig(output=str(tmp_path / "merged.gguf"), quant="f16", **common))
    lora = export(ExportConfig(output=str(tmp_path / "lora.gguf"), lora_only=True, quant="f16", **common))
    _, wb = _read_all(base)
    hl, wl = _read_all(lora)
    _, wm = _read_all(merged)
    alpha = hl.metadata["adapter.lora.alpha"]
    assert hl.metadata["general.architecture"] == read_gguf_header(base).metadata["general.architecture"]
    assert {n.rpartition(".")[0] for n in wl} <= set(wb)  # every pair names a tensor of the base file
    for name in names:
        a, b = wl[name + ".lora_a"], wl[name + ".lora_b"]
        # llama.cpp's shape checks: base ne [in, out(, E)], lora_a ne [in, r(, E)], lora_b ne [r, out(, E)]
        assert a.shape[:-2] == b.shape[:-2] == wb[name].shape[:-2] and a.shape[-1] == wb[name].shape[-1]
        assert b.shape[-2] == wb[name].shape[-2] and a.shape[-2] == b.shape[-1] == 4
        applied = wb[name] + alpha / a.shape[-2] * b @ a  # batched over experts for (E, out, in) stacks
        assert (applied - wm[name]).abs().max().item() <= 2e-3, name  # f16 rounding of three files
        assert (wm[name] - wb[name]).abs().max().item() > 1e-2, name  # the adapter moved it: merged, experts too


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_adapter_for_another_base_stops_before_writing(tmp_path, one_thread):
    from tiny_folder import make_tiny_model_folder

    small = make_tiny_model_folder(tmp_path / "small")
    wide = make_tiny_model_folder(tmp_path / "wide", intermediate_size=96)
    model, _ = leantune.load(small)
    make_adapter(model, tmp_path / "ad")
    out = tmp_path / "x.gguf"
    # another base by name: stopped before loading anything
    with pytest.raises(ValueError, match=r"trained on .*small.* but --model is .*wide.*--any-base"):
        export(ExportConfig(model=str(wide), adapter=[str(tmp_path / "ad")], output=str(out)))
    # told it is the same base, the shapes still decide
    with pytest.raises(ValueError, match="different base model.*mlp"):
        export(ExportConfig(model=str(wide), adapter=[str(tmp_path / "ad")], output=str(out), any_base=True))
    with pytest.raises(ValueError, match="different base model"):
        export(ExportConfig(model=str(wide), adapter=[str(tmp_path / "ad")], output=str(out), any_base=True,
                            lora_only=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "small", "wide"]  # nothing written, no temp file


def test_row_not_a_multiple_of_the_block_stops_or_falls_back_to_f16(tmp_path, capsys, one_thread):
    """intermediate 100: ffn_down's rows hold 100 values, not whole Q8_0/Q4_0 blocks of 32. By default the export
    stops before writing, naming the tensor and the two ways out; with --quant-fallback f16 it does what
    llama.cpp's convert_hf_to_gguf.py does (catch gguf's QuantError, store the tensor as F16) and says so."""
    from tiny_folder import make_tiny_model_folder

    folder = make_tiny_model_folder(tmp_path / "model", intermediate_size=100)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight: rows of 100 values are not a multiple of "
                                         r"Q4_0's block of 32 \(and 1 more tensors\).*--quant-fallback f16"):
        export(ExportConfig(model=str(folder), output=str(tmp_path / "q.gguf"), quant="q4_0"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written, no temp file
    out = export(ExportConfig(model=str(folder), output=str(tmp_path / "q.gguf"), quant="q4_0",
                              quant_fallback="f16"))
    types = {n: T(i.ggml_type).name for n, i in read_gguf_header(out).tensors.items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["output.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    err = capsys.readouterr().err
    assert "blk.0.ffn_down.weight: rows of 100 values are not a multiple of Q4_0's block of 32; stored as F16" in err
    with pytest.raises(ValueError, match="the one fallback is f16"):
        ExportConfig(model=str(folder), output=str(tmp_path / "q.gguf"), quant="q4_0", quant_fallback="q8_0")


def test_unknown_quant_lists_the_choices(tmp_path, capsys):
    from leantune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "--quant", "q3_k", "--output", str(tmp_path / "x.gguf")])
    assert e.value.code == 2
    assert "--quant 'q3_k' is not one of f16, bf16, q8_0, q4_0, q4_k_m" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--quant with --lora-only 'q4_0' is not one of f16, bf16, q8_0"):
        ExportConfig(adapter=["a"], lora_only=True, quant="q4_0")
    with pytest.raises(ValueError, match="exactly one --adapter"):
        ExportConfig(adapter=["a", "b"], lora_only=True)
    assert not list(tmp_path.iterdir())


def test_q4_k_m_without_llama_quantize_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    with pytest.raises(ValueError, match="llama-quantize.*cannot make the Q4_K/Q6_K blocks"):
        export(ExportConfig(model=str(tmp_path / "nope"), output=str(tmp_path / "x.gguf"), quant="q4_k_m"))
    monkeypatch.setenv("LLAMA_QUANTIZE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="LLAMA_QUANTIZE=.*missing is not an executable file"):
        export(ExportConfig(model=str(tmp_path / "nope"), output=str(tmp_path / "x.gguf"), quant="q4_k_m"))
    assert not list(tmp_path.iterdir())


def test_q4_k_m_runs_llama_quantize_on_an_f32_export(tmp_path, monkeypatch, folder):
    """The plumbing only (no llama.cpp here): a stand-in llama-quantize records its arguments and copies its
    input; export hands it an F32 GGUF and the type name, and renames its output into place."""
    fake = tmp_path / "llama-quantize"
    fake.write_text(f"#!{sys.executable}\nimport json, shutil, sys\n"
                    f"json.dump(sys.argv[1:], open({str(tmp_path / 'args.json')!r}, 'w'))\n"
                    "shutil.copy(sys.argv[1], sys.argv[2])\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("LLAMA_QUANTIZE", str(fake))
    out = export(ExportConfig(model=str(folder), output=str(tmp_path / "out" / "k.gguf"), quant="q4_k_m"))
    src, dst, qtype = json.loads((tmp_path / "args.json").read_text())
    assert qtype == "Q4_K_M" and src.endswith("f32.gguf")
    assert read_gguf_header(out).tensors["blk.0.attn_q.weight"].ggml_type == int(T.F32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["k.gguf"]  # the work folder is gone


@pytest.mark.parametrize("method,options,message", [
    ("dora", dict(r=4, alpha=8), "DoRA adapter has a magnitude vector"),
    ("adalora", dict(init_r=4, target_r=2), "AdaLoraLinear is not a LoRA layer"),
])
def test_lora_only_refuses_what_a_llamacpp_lora_cannot_hold(tmp_path, folder, one_thread, method, options, message):
    model, _ = leantune.load(folder)
    methods.apply(model, method, targets=["q_proj"], **options)
    methods.save(model, tmp_path / method)
    with pytest.raises(ValueError, match=message):
        export(ExportConfig(model=str(folder), adapter=[str(tmp_path / method)], output=str(tmp_path / "d.gguf"),
                            lora_only=True))
    assert not (tmp_path / "d.gguf").exists()
    # the merged model takes them
    out = export(ExportConfig(model=str(folder), adapter=[str(tmp_path / method)], output=str(tmp_path / "m.gguf")))
    assert read_gguf_header(out).metadata["general.type"] == "model"


# ------------------------------------------------------------------------------------------------
# the embedded SmolLM2-135M
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_export_round_trip(tmp_path, lt_smollm2, smollm2_path):
    """The real 135M model (30 layers) as f16. Its source file was written by llama.cpp's tools, so it is the
    oracle for the layout: the export has the same metadata (beyond general.* descriptions and file type),
    the same vocabulary, merges and token types, the same tensor names and shapes. Every weight read back is
    the f16 rounding of the original, the tokenizer and chat template survive, and the logits move by the f16
    rounding only (measured 0.04 on logits of magnitude ~30; the writer is the one the recipe uses)."""
    from leantune.models.gguf_export import write_model_gguf

    model, tok = lt_smollm2
    out = write_model_gguf(model, tok, tmp_path / "smol.gguf", "f16")
    ours, theirs = read_gguf_header(out), read_gguf_header(smollm2_path)
    md = ours.metadata
    assert md["tokenizer.ggml.pre"] == "smollm" and md["general.architecture"] == "llama"
    # llama.cpp's file also states an unknown token and add_space_prefix (unused by a gpt2 vocabulary)
    extra = {"tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_eos_token"}
    keys = {k for k in set(md) | set(theirs.metadata) if not k.startswith("general.")} - extra
    for k in sorted(keys):
        a, b = md.get(k), theirs.metadata.get(k)
        assert (np.array_equal(a, b) if isinstance(a, (list, np.ndarray)) else a == b), k
    assert {n: i.shape for n, i in ours.tensors.items()} == {n: i.shape for n, i in theirs.tensors.items()}
    assert all(i.ggml_type == int(T.F32) for n, i in ours.tensors.items() if n.endswith("norm.weight"))
    # the source is llama-quantize's Q4_1 mix, whose per-tensor choice is the Q4_0 mix's with Q4_1 for Q4_0:
    # q4_0's plan gives every tensor the type llama.cpp gave it (the tied embedding Q8_0, norms F32)
    from leantune.models.gguf_export import _wanted_type

    for name, info in theirs.tensors.items():
        want = _wanted_type(name, info.shape, "q4_0", tied=True)
        assert (T.Q4_1 if want == T.Q4_0 else want) == T(info.ggml_type), name
    m2, tok2 = leantune.load(out)
    for k, v in model.base_state_dict().items():
        assert torch.equal(m2.get_parameter(k), v if v.dim() == 1 else v.half().float()), k
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text), text
    assert tok2.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tok.encode_chat(msgs, True)])
    assert tok2.encode_chat(msgs, True) == ids[0].tolist()
    with torch.no_grad():
        assert (m2(ids) - model(ids)).abs().max().item() <= 0.1


# ------------------------------------------------------------------------------------------------
# a SentencePiece vocabulary (Llama 2 / Mistral style)
# ------------------------------------------------------------------------------------------------
def test_sentencepiece_tokenizer_round_trip(tmp_path, one_thread):
    """test_gguf's SentencePiece GGUF vocabulary (scores, byte tokens, <unk>) as a model's tokenizer: the
    export writes model 'llama' with scores and byte types, and both leantune and transformers read back a
    tokenizer that encodes and decodes as the original file's does."""
    import transformers as tf
    from test_gguf import spm_tokenizer, write_gguf
    from tiny_folder import make_tiny_model_folder

    from leantune.models.gguf import tokenizer_from_metadata

    src = write_gguf(tmp_path / "spm.gguf", tokenizer=spm_tokenizer)
    tok = tokenizer_from_metadata(read_gguf_header(src).metadata, src)
    folder = make_tiny_model_folder(tmp_path / "model", bos_token_id=1, eos_token_id=2, pad_token_id=None)
    tok.save(folder)
    out = export(ExportConfig(model=str(folder), output=str(tmp_path / "m.gguf")))
    md = read_gguf_header(out).metadata
    assert md["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in md
    assert list(md["tokenizer.ggml.token_type"][:5]) == [2, 3, 3, 6, 6]  # unk, control, control, bytes
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_space_prefix"] is True
    assert md["tokenizer.ggml.unknown_token_id"] == 0
    # llama.cpp merges the adjacent pair whose result scores highest: scores must fall along the merge order
    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    firsts = list(dict.fromkeys("".join(m) for m in merges))
    scores = [float(md["tokenizer.ggml.scores"][md["tokenizer.ggml.tokens"].index(t)]) for t in firsts]
    assert len(firsts) > 5 and all(a > b for a, b in zip(scores, scores[1:]))
    _, _, back = read_gguf(out)
    ref = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    ref_back = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        ids = ref(text).input_ids
        assert back.encode(text) == ids == ref_back(text).input_ids, text
        assert back.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_unrecognized_pre_tokenizer_asks_for_its_llamacpp_name(tmp_path, one_thread):
    """llama.cpp names pre-tokenizers (by a hash of their output); one leantune cannot name stops the export
    before writing, and --tokenizer-pre names it."""
    from tiny_folder import make_tiny_model_folder
    from tokenizers import pre_tokenizers

    from leantune.models.tokenizer import Tokenizer

    folder = make_tiny_model_folder(tmp_path / "model")
    tok = Tokenizer.from_folder(folder)
    tok.tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.save(folder)
    with pytest.raises(ValueError, match="pass --tokenizer-pre NAME"):
        export(ExportConfig(model=str(folder), output=str(tmp_path / "x.gguf")))
    assert not (tmp_path / "x.gguf").exists()
    out = export(ExportConfig(model=str(folder), output=str(tmp_path / "x.gguf"), tokenizer_pre="deepseek-coder"))
    assert read_gguf_header(out).metadata["tokenizer.ggml.pre"] == "deepseek-coder"


def test_base_names_that_name_the_same_model(tmp_path):
    from leantune.recipes.export import _model_name, _same_base

    assert _same_base("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B") and _same_base("Qwen/Qwen3-0.6B", "/models/Qwen3-0.6B")
    assert _same_base(str(tmp_path), str(tmp_path / ".." / tmp_path.name))  # one folder, two spellings
    assert not _same_base("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B")
    assert _model_name(ExportConfig(model="Qwen/Qwen3-0.6B@abc123")) == "Qwen/Qwen3-0.6B"  # a revision of it
    assert ExportConfig(model="Qwen/Qwen3-0.6B", revision="abc123").model == "Qwen/Qwen3-0.6B@abc123"  # --revision
