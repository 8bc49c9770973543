"""The model shows its stages (DESIGN.md): a family whose skeleton differs from Llama's only in the stages it
overrides is served and co-trained without a change in serve/ (unit tier, tiny models)."""
import pytest
import torch
from hf_tiny import tiny_hf_model
from test_cotrain import _examples, assert_plain_step_grads
from test_serve_runner import BS, Pool
from torch import nn

import leantune
from leantune.methods.base import adapter_slots
from leantune.models.config import ModelConfig
from leantune.models.llama import LlamaForCausalLM
from leantune.serve.cotrain import CoTrainConfig, CoTrainer
from leantune.serve.runner import ModelRunner, Work


class SoftCap(nn.Module):
    def __init__(self, inner: nn.Module, cap: float):
        super().__init__()
        self.inner, self.cap = inner, cap

    def forward(self, h, adapter_ids=None):
        y = self.inner(h) if adapter_ids is None else self.inner(h, adapter_ids)
        return self.cap * torch.tanh(y / self.cap)


class GemmaLike(LlamaForCausalLM):
    """Another skeleton, as Gemma's: embeddings scaled by sqrt(C), logits soft-capped."""

    def embed(self, input_ids):
        return super().embed(input_ids) * self.config.hidden_size ** 0.5

    def head_module(self):
        return SoftCap(self.lm_head, 2.0)


def _models():
    hf = tiny_hf_model("llama", seed=1)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    out = []
    for cls in (LlamaForCausalLM, GemmaLike):
        m = cls(cfg)
        m.load_hf_state_dict(hf.state_dict())
        out.append(m.eval())
    return out


def test_the_runner_follows_the_stages(one_thread):
    plain, model = _models()
    toks = torch.randint(3, 250, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    runner, pool = ModelRunner(model, 16, BS), Pool(16)
    first = runner.step([Work(toks[:6], 0, pool.context("s", 6))])  # a prefill chunk, no sampling
    assert first.logits is None
    res = runner.step([Work(toks[6:], 6, pool.context("s", 9), sample=True)])
    with torch.no_grad():
        ref, other = model(torch.tensor([toks]))[0, -1], plain(torch.tensor([toks]))[0, -1]
    torch.testing.assert_close(res.logits[0], ref, atol=1e-5, rtol=1e-5)
    assert res.logits[0].abs().max() <= 2.0 and not torch.allclose(ref, other, atol=1e-3)  # the stages count


def test_the_co_trainer_follows_the_stages(one_thread):
    """Chunked forward, loss units over `head_module` and layer-sliced backward give the grads of a plain
    step through the model's own forward."""
    _, model = _models()
    torch.manual_seed(0)
    leantune.apply(model, "lora", adapter_name="job", r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    slot = adapter_slots(model)["job"]
    tr = CoTrainer(model, "job", _examples(), CoTrainConfig(n_epochs=1, batch_size=3, seed=1), loss_share=0.3)
    batch = list(tr.batch)
    runner, pool, complete = ModelRunner(model, 64, BS), Pool(64), False
    while not complete:
        if tr.fwd_wanted():
            toks, start = tr.fwd_chunk(min(4, tr.fwd_wanted()))
            tr.fwd_done(runner.step([Work(toks, start, pool.context(f"s{tr.batch_i}", start + len(toks)),
                                          adapter=slot, capture=True)]).captures)
        else:
            complete = tr.backward_layers(2)
    assert_plain_step_grads(model, batch, slot)


def test_compile_blocks_compiles_each_stage_layer():
    """`train.compile_blocks` finds the decoder blocks through the stages, not `model.model.layers`."""
    from lt_tiny import tiny_lt_model
    from leantune.train import compile_blocks

    model = tiny_lt_model()
    compile_blocks(model)  # compiling happens at the first call; here only the wrapping is checked
    assert all(model.layer_module(i)._compiled_call_impl is not None for i in range(model.num_layers))
    with pytest.raises(ValueError, match="shows its decoder blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
