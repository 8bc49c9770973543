"""GGUF reader: tiny files written here with gguf.GGUFWriter, transformers' GGUF loader as the oracle, errors."""
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from leantune.models.gguf import (  # noqa: E402
    dequantize,
    llama3_inv_freq_factors,
    llama3_scaling_from_freqs,
    read_gguf,
    read_gguf_header,
    tokenizer_from_metadata,
)

Q8 = gguf.GGMLQuantizationType.Q8_0
CONTROL, USER_DEFINED, BYTE, NORMAL, UNKNOWN = 3, 4, 6, 1, 2

TEXTS = [
    "Hello world",
    "hello  world the quick brown fox",
    " leading space and trailing ",
    "digits 12345 and 3.14159, 2+2=4",
    "newlines\n\nand\ttabs\r\n end",
    "unicode: héllo wörld — 日本語 🤖 ñ",
    "<|im_start|>user\nhi<|im_end|>\n<think>hmm</think>",
    "",
]


# ------------------------------------------------------------------------------------------------
# writing tiny GGUFs
# ------------------------------------------------------------------------------------------------
def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF half-split RoPE rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab():
    from tokenizers import pre_tokenizers

    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("Ġ", "t"), ("Ġt", "he"),
              ("Ġ", "q"), ("u", "i"), ("Ġq", "ui"), ("1", "2"), ("Ã", "©")]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    types = [CONTROL, CONTROL, CONTROL, USER_DEFINED, USER_DEFINED]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    types += [NORMAL] * (len(tokens) - len(types))
    return tokens, types, [f"{a} {b}" for a, b in merges]


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def add_byte_level_tokenizer(w, pre="gpt2", add_bos=False):
    tokens, types, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    return len(tokens)


def write_gguf(path, arch="llama", tensors=None, hparams=None, tokenizer=add_byte_level_tokenizer, name="tiny"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    for k, v in (hparams or {}).items():
        getattr(w, f"add_{k}")(v)
    if tokenizer is not None:
        tokenizer(w)
    for tname, (arr, qtype) in (tensors or {}).items():
        if qtype is None:
            w.add_tensor(tname, arr)
        else:
            w.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HP = dict(block_count=2, context_length=128, embedding_length=64, feed_forward_length=96, head_count=4,
          head_count_kv=2, rope_freq_base=10000.0, layer_norm_rms_eps=1e-6)


def tiny_llama(path, untied=False, bias=False, head_count=4, head_count_kv=2, extra=None, arch="llama", name="tiny"):
    """A 2-layer model; returns (path, HF-layout originals, ggml types). q of layer 0 and the embedding are
    quantized (Q8_0, F16); q/k are stored permuted, as llama.cpp writes them."""
    rng = np.random.default_rng(0)
    vocab, hidden, ffn = len(byte_level_vocab()[0]), 64, 96
    head_dim = hidden // head_count
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    orig, stored = {}, {}

    def put(gname, hfname, arr, qtype=None, permute_heads=None):
        orig[hfname] = arr
        data = llamacpp_permute(arr, permute_heads) if permute_heads and arch == "llama" else arr
        stored[gname] = (np.ascontiguousarray(data), qtype)

    put("token_embd.weight", "model.embed_tokens.weight", r(vocab, hidden), None)
    stored["token_embd.weight"] = (orig["model.embed_tokens.weight"].astype(np.float16), None)
    put("output_norm.weight", "model.norm.weight", r(hidden))
    if untied:
        put("output.weight", "lm_head.weight", r(vocab, hidden))
    for i in range(2):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        put(b + "attn_q.weight", h + "self_attn.q_proj.weight", r(head_count * head_dim, hidden), Q8 if i == 0 else None, head_count)
        put(b + "attn_k.weight", h + "self_attn.k_proj.weight", r(head_count_kv * head_dim, hidden), None, head_count_kv)
        put(b + "attn_v.weight", h + "self_attn.v_proj.weight", r(head_count_kv * head_dim, hidden))
        put(b + "attn_output.weight", h + "self_attn.o_proj.weight", r(hidden, head_count * head_dim))
        if bias:
            put(b + "attn_q.bias", h + "self_attn.q_proj.bias", r(head_count * head_dim), None, head_count)
            put(b + "attn_k.bias", h + "self_attn.k_proj.bias", r(head_count_kv * head_dim), None, head_count_kv)
            put(b + "attn_v.bias", h + "self_attn.v_proj.bias", r(head_count_kv * head_dim))
        put(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", r(ffn, hidden))
        put(b + "ffn_up.weight", h + "mlp.up_proj.weight", r(ffn, hidden))
        put(b + "ffn_down.weight", h + "mlp.down_proj.weight", r(hidden, ffn))
        put(b + "attn_norm.weight", h + "input_layernorm.weight", r(hidden))
        put(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", r(hidden))
    stored.update(extra or {})
    hp = dict(HP, head_count=head_count, head_count_kv=head_count_kv)
    write_gguf(path, arch, stored, hp, name=name)
    return orig


def expected(orig, name):
    """What the reader must return: F16/Q8_0 round trips of the originals (Q8_0 blocks run along rows, so the
    row permutation commutes with quantization)."""
    a = orig[name]
    if name == "model.embed_tokens.weight":
        return a.astype(np.float16).astype(np.float32)
    if name == "model.layers.0.self_attn.q_proj.weight":
        return gguf.quants.dequantize(gguf.quants.quantize(a, Q8), Q8)
    return a


# ------------------------------------------------------------------------------------------------
# tiny files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("untied,bias", [(False, False), (True, True)])
def test_tiny_llama_config_and_tensors(tmp_path, untied, bias):
    orig = tiny_llama(tmp_path / "m.gguf", untied=untied, bias=bias)
    cfg, sd, tok = read_gguf(tmp_path / "m.gguf")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (len(byte_level_vocab()[0]), 64, 96, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.model_type) == (4, 2, 16, "llama")
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 128
    assert cfg.rope_scaling is None
    assert cfg.tie_word_embeddings is (not untied) and cfg.qkv_bias is bias and not cfg.o_bias
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert set(sd) == set(orig)
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.is_contiguous()
        assert torch.equal(v, torch.from_numpy(expected(orig, k))), k
    # the stored q/k really were permuted: reading them raw would not give the originals
    k1 = orig["model.layers.1.self_attn.k_proj.weight"]
    assert not np.array_equal(k1, llamacpp_permute(k1, 2))


def test_tiny_qwen2_is_not_unpermuted_and_has_qkv_bias(tmp_path):
    orig = tiny_llama(tmp_path / "q.gguf", bias=True, arch="qwen2")
    cfg, sd, _ = read_gguf(tmp_path / "q.gguf")
    assert cfg.model_type == "qwen2" and cfg.qkv_bias
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert torch.equal(sd[k], torch.from_numpy(orig[k]))


def test_tiny_qwen3_reads_its_qk_norms_and_runs_as_its_hf_folder(tmp_path):
    rng = np.random.default_rng(1)
    norms = {f"blk.{i}.attn_{w}_norm.weight": (rng.standard_normal(16).astype(np.float32), None)
             for i in range(2) for w in ("q", "k")}
    orig = tiny_llama(tmp_path / "q3.gguf", arch="qwen3", extra=norms)
    cfg, sd, _ = read_gguf(tmp_path / "q3.gguf")
    assert cfg.model_type == "qwen3" and cfg.qk_norm and not cfg.qkv_bias
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], torch.from_numpy(norms["blk.1.attn_k_norm.weight"][0]))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(sd[q], torch.from_numpy(orig[q]))  # qwen3, like qwen2, is stored unpermuted
    from leantune.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(cfg)
    model.load_hf_state_dict(sd)  # every tensor has its place, q_norm/k_norm included
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        out = model(ids)
        model.model.layers[0].self_attn.q_norm.weight.mul_(2.0)
        assert not torch.allclose(model(ids), out)  # the norms are used


def test_gqa_single_kv_head_and_mistral_name(tmp_path):
    orig = tiny_llama(tmp_path / "m.gguf", head_count=2, head_count_kv=1, name="Mistral 7B Instruct v0.3")
    cfg, sd, _ = read_gguf(tmp_path / "m.gguf")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 1, 32)
    assert cfg.model_type == "mistral" and cfg.sliding_window is None  # llama.cpp writes Mistral as arch llama
    for k in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(sd[k], torch.from_numpy(expected(orig, k)))


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 2048}
    freqs = llama3_inv_freq_factors(params, 10000.0, 32).float().numpy()
    tiny_llama(tmp_path / "m.gguf", head_count=2, head_count_kv=1, extra={"rope_freqs.weight": (freqs, None)})
    cfg, sd, _ = read_gguf(tmp_path / "m.gguf")
    assert cfg.rope_scaling == params and "rope_freqs.weight" not in sd
    # Llama 3.1 8B's values, and a file that states its original context length with low_freq_factor 2
    p31 = dict(params, factor=8.0, original_max_position_embeddings=8192)
    assert llama3_scaling_from_freqs(llama3_inv_freq_factors(p31, 500000.0, 128).float().double(), 500000.0, 128, None, "f") == p31
    p2 = dict(params, low_freq_factor=2.0, high_freq_factor=8.0, factor=32.0)
    assert llama3_scaling_from_freqs(llama3_inv_freq_factors(p2, 500000.0, 128).double(), 500000.0, 128, 2048, "f") == p2
    with pytest.raises(ValueError, match="rope_freqs does not follow Llama 3"):
        llama3_scaling_from_freqs(torch.linspace(1, 3, 64, dtype=torch.float64) ** 2, 500000.0, 128, None, "f")


@pytest.mark.parametrize("qname", ["F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_1", "Q4_K", "Q6_K"])
def test_dequantize_equals_gguf_bit_for_bit(qname):
    """Random bytes (random scales, NaN/inf included) through the torch fast paths and the gguf fallback."""
    qtype = gguf.GGMLQuantizationType[qname]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 6, 512
    raw = np.random.default_rng(1).integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales overflow in numpy, as they do in torch
        ours = dequantize(raw.reshape(-1).copy(), int(qtype), (rows, cols))
        ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)).reshape(rows, cols)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)


def test_header_reads_metadata_without_tensors(tmp_path):
    tiny_llama(tmp_path / "m.gguf")
    h = read_gguf_header(tmp_path / "m.gguf")
    assert h.metadata["general.architecture"] == "llama" and h.metadata["llama.block_count"] == 2
    assert h.tensors["blk.0.attn_q.weight"].shape == (64, 64) and h.tensors["blk.0.attn_q.weight"].ggml_type == int(Q8)


# ------------------------------------------------------------------------------------------------
# tokenizers vs transformers' GGUF tokenizer on the same tiny files
# ------------------------------------------------------------------------------------------------
def spm_tokenizer(w):
    pieces = ["▁", "t", "h", "e", "▁t", "he", "▁the", "l", "o", "▁h", "ll", "llo", "▁hello", "w", "r", "d", "▁w",
              "or", "▁wor", "ld", "▁world", "1", "2", "3", "a", "n", "s", "p", "c", "i", "g"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces) + [USER_DEFINED]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


@pytest.fixture(scope="module")
def transformers_tokenizer():
    tf = pytest.importorskip("transformers")
    return lambda path: tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("kind", ["gpt2", "llama-bpe", "qwen2", "gpt2-add-bos", "spm"])
def test_tokenizer_matches_transformers(tmp_path, transformers_tokenizer, kind):
    path = tmp_path / "t.gguf"
    if kind == "spm":
        write_gguf(path, tokenizer=spm_tokenizer)
    else:
        pre = kind if kind in ("llama-bpe", "qwen2") else "gpt2"
        write_gguf(path, tokenizer=lambda w: add_byte_level_tokenizer(w, pre=pre, add_bos=kind == "gpt2-add-bos"))
    ours = tokenizer_from_metadata(read_gguf_header(path).metadata, path)
    ref = transformers_tokenizer(path)
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, (kind, text)
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), (kind, text)
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    if kind == "gpt2-add-bos" or kind == "spm":
        assert ours.encode("hello")[0] == ours.bos_id == 1
    if kind != "spm":
        msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "12"}]
        text = ours.apply_chat_template(msgs, add_generation_prompt=True)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.encode_chat(msgs)[:1] == [1]  # <|im_start|> matched whole


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a GGUF file"):
        read_gguf(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "m.gguf"
    tiny_llama(p)
    data = p.read_bytes()
    for cut in (40, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_gguf(tmp_path / "cut.gguf")


def test_unsupported_architecture(tmp_path):
    p = write_gguf(tmp_path / "phi.gguf", arch="phi2", hparams=dict(block_count=1))
    with pytest.raises(ValueError, match=r"phi\.gguf: GGUF architecture 'phi2' is not supported"):
        read_gguf(p)


def test_unsupported_quant_type(tmp_path):
    q81 = gguf.GGMLQuantizationType.Q8_1  # no dequantizer in the gguf package
    block, type_size = gguf.GGML_QUANT_SIZES[q81]
    raw = np.zeros((64, 64 // block * type_size), dtype=np.uint8)
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    for k, v in dict(HP, block_count=1).items():
        getattr(w, f"add_{k}")(v)
    add_byte_level_tokenizer(w)
    w.add_tensor("token_embd.weight", np.zeros((len(byte_level_vocab()[0]), 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=q81)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: ggml type Q8_1 cannot be dequantized"):
        read_gguf(p)


def test_unknown_tensor_and_missing_tensor(tmp_path):
    tiny_llama(tmp_path / "moe.gguf", extra={"blk.0.ffn_gate_exps.weight": (np.zeros((2, 4, 64), np.float32), None)})
    with pytest.raises(ValueError, match="ffn_gate_exps.*dense"):
        read_gguf(tmp_path / "moe.gguf")


def test_unsupported_tokenizer_model(tmp_path):
    def bert(w):
        w.add_tokenizer_model("bert")
        w.add_token_list(["[PAD]", "a"])

    p = write_gguf(tmp_path / "t.gguf", tokenizer=bert)
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_metadata(read_gguf_header(p).metadata, p)


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M vs transformers' GGUF loader
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path, hf_smollm2):
    ref_model, ref_tok = hf_smollm2
    return read_gguf(smollm2_path), ref_model, ref_tok


@pytest.mark.slow
def test_smollm2_tensors_and_config_equal_transformers(smollm2):
    (cfg, sd, _), ref, _ = smollm2
    ref_sd = ref.state_dict()
    assert cfg.tie_word_embeddings and set(ref_sd) - {"lm_head.weight"} == set(sd)
    for k, v in sd.items():
        assert v.shape == ref_sd[k].shape, k
        assert (v - ref_sd[k]).abs().max().item() <= 1e-6, k
    rc = ref.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        rc.vocab_size, rc.hidden_size, rc.intermediate_size, rc.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (rc.num_attention_heads, rc.num_key_value_heads, rc.head_dim)
    assert (cfg.model_type, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        rc.model_type, rc.max_position_embeddings, rc.tie_word_embeddings)
    assert cfg.rope_theta == rc.rope_parameters["rope_theta"] and math.isclose(cfg.rms_norm_eps, rc.rms_norm_eps, rel_tol=1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (rc.bos_token_id, rc.eos_token_id, rc.pad_token_id)


@pytest.mark.slow
def test_smollm2_config_and_weights_give_transformers_logits(smollm2):
    import transformers as tf

    (cfg, sd, tok), ref, _ = smollm2
    hf_cfg = tf.AutoConfig.for_model(**cfg.to_hf())
    ours = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ours.tie_weights()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2):
    (_, _, tok), _, ref = smollm2
    assert tok.vocab_size == len(ref) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    for text in TEXTS + ["def f(x):\n    return x ** 2  # comment", "   many   spaces   ", "Ünïcödé ÆØÅ ½ ² ³ ① ٣"]:
        assert tok.encode(text) == ref(text).input_ids, text
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    for msgs in convs:
        for gen in (False, True):
            text = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.encode_chat(msgs, gen) == ref(text, add_special_tokens=False).input_ids
            assert tok.encode_chat(msgs, gen)[0] == tok.token_to_id("<|im_start|>")


# ------------------------------------------------------------------------------------------------
# mixture of experts: Mixtral (arch llama + expert_count) and qwen3moe, written as llama.cpp's converter does
# ------------------------------------------------------------------------------------------------
def moe_gguf(path, family: str, qtype=None):
    """A GGUF of a tiny transformers MoE model as convert_hf_to_gguf writes it: q/k permuted for `llama`, the
    experts stacked per weight as ffn_gate_exps / ffn_up_exps / ffn_down_exps (E, out, in), the router as
    ffn_gate_inp, and expert_count / expert_used_count (/ expert_feed_forward_length for qwen3moe)."""
    from hf_tiny import tiny_hf_model

    vocab = len(byte_level_vocab()[0])
    over = dict(norm_topk_prob=True, mlp_only_layers=[]) if family == "qwen3-moe" else {}
    hf = tiny_hf_model(family, vocab_size=vocab, **over)  # llama.cpp's qwen3moe renormalizes, every layer sparse
    c = hf.config
    arch = "llama" if family == "mixtral" else "qwen3moe"
    tensors = {}
    names = {"embed_tokens": "token_embd", "norm": "output_norm"}
    for k, v in hf.state_dict().items():
        a = v.numpy()
        if k == "lm_head.weight":
            tensors["output.weight"] = (a, None)
        elif k.startswith("model.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            b = f"blk.{i}."
            if rest.endswith("experts.gate_up_proj"):
                gate, up = np.split(a, 2, axis=1)
                tensors[b + "ffn_gate_exps.weight"] = (np.ascontiguousarray(gate), qtype)
                tensors[b + "ffn_up_exps.weight"] = (np.ascontiguousarray(up), qtype)
            elif rest.endswith("experts.down_proj"):
                tensors[b + "ffn_down_exps.weight"] = (a, qtype)
            else:
                g = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                     "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                     "self_attn.q_norm.weight": "attn_q_norm", "self_attn.k_norm.weight": "attn_k_norm",
                     "mlp.gate.weight": "ffn_gate_inp", "input_layernorm.weight": "attn_norm",
                     "post_attention_layernorm.weight": "ffn_norm"}[rest]
                if arch == "llama" and g in ("attn_q", "attn_k"):
                    a = llamacpp_permute(a, c.num_attention_heads if g == "attn_q" else c.num_key_value_heads)
                tensors[b + g + ".weight"] = (np.ascontiguousarray(a), None)
        else:
            tensors[names[k.split(".")[1]] + ".weight"] = (a, None)
    hp = dict(HP, head_count=c.num_attention_heads, head_count_kv=c.num_key_value_heads, embedding_length=c.hidden_size,
              feed_forward_length=c.intermediate_size, expert_count=c.num_experts, expert_used_count=c.num_experts_per_tok,
              layer_norm_rms_eps=c.rms_norm_eps, rope_freq_base=c.rope_parameters["rope_theta"])
    if arch == "qwen3moe":
        hp.update(expert_feed_forward_length=c.moe_intermediate_size, key_length=c.head_dim, value_length=c.head_dim)
    write_gguf(path, arch, tensors, hp)
    return hf


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_moe_gguf_loads_with_transformers_logits(tmp_path, family):
    import leantune

    hf = moe_gguf(tmp_path / "moe.gguf", family)
    model, _ = leantune.load(tmp_path / "moe.gguf")
    cfg = model.config
    assert cfg.model_type == ("mixtral" if family == "mixtral" else "qwen3_moe")
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_intermediate_size) == (
        hf.config.num_experts, hf.config.num_experts_per_tok,
        hf.config.intermediate_size if family == "mixtral" else hf.config.moe_intermediate_size)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 60, 2]])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_moe_gguf_quantized_experts_dequantize_per_expert(tmp_path):
    """Q8_0 experts: each stacked expert row-block quantized as gguf's reference quantizer does."""
    import leantune

    hf = moe_gguf(tmp_path / "q.gguf", "mixtral", qtype=Q8)
    model, _ = leantune.load(tmp_path / "q.gguf")
    want = hf.state_dict()["model.layers.1.mlp.experts.down_proj"].numpy()
    got = model.model.layers[1].mlp.experts.down_proj.detach().numpy()
    assert np.array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(want, Q8), Q8))
