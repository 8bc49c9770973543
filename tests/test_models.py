"""Parity tier: leantune's Llama-family model vs `transformers` on tiny random checkpoints of each family."""
import json

import pytest
import torch

from hf_tiny import FAMILIES, tiny_hf_model
from leantune.models.config import ModelConfig
from leantune.models.generate import GenerationConfig, generate, sample_next
from leantune.models.llama import ForwardMeta, LlamaForCausalLM


def ours_from(hf):
    m = LlamaForCausalLM(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_hf_state_dict(hf.state_dict())
    return m.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers(family):
    hf = tiny_hf_model(family)
    m = ours_from(hf)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - m(ids)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_transformers(family):
    hf = tiny_hf_model(family)
    m = ours_from(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 11, 2)]
    ours = generate(m, prompts, GenerationConfig(max_new_tokens=10), pad_id=0)  # one left-padded batch
    for p, o in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o == ref


def test_packed_segments_do_not_attend_across_samples():
    m = ours_from(tiny_hf_model("llama"))
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 7 + [2] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = m(packed, ForwardMeta(positions=pos, segment_ids=seg))
        assert torch.allclose(out[:, :7], m(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], m(b), atol=1e-5)


def test_right_padding_with_seq_lens_matches_unpadded():
    m = ours_from(tiny_hf_model("qwen2"))
    a = torch.randint(0, 256, (1, 6))
    padded = torch.cat([a, torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        out = m(padded, ForwardMeta(seq_lens=torch.tensor([6])))
        assert torch.allclose(out[:, :6], m(a), atol=1e-5)
        assert torch.isfinite(out).all()


def test_config_roundtrip_loads_in_transformers(tmp_path):
    import transformers

    hf = tiny_hf_model("llama3")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ModelConfig.from_hf(back.to_dict()).to_dict() == cfg.to_dict() | {"extra": ModelConfig.from_hf(back.to_dict()).extra}


def test_sampling_controls():
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0]])
    assert sample_next(logits, GenerationConfig(temperature=0), None).item() == 1
    rng = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, GenerationConfig(temperature=1.0, top_k=1), rng).item() for _ in range(20)}
    assert draws == {1}
    draws = {sample_next(logits, GenerationConfig(temperature=5.0, top_p=0.5), rng).item() for _ in range(50)}
    assert 3 not in draws
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


def test_unsupported_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    model_type="gpt2")
