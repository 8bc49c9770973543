"""The paged KV cache and the packed runner equal a plain forward (unit tier, tiny models)."""
import pytest
import torch
from hf_tiny import tiny_hf_model

from leantune.models.config import ModelConfig
from leantune.models.llama import LlamaForCausalLM
from leantune.serve.runner import ModelRunner, Work

BS = 4  # block size: sequences span several, non-contiguous blocks


def _lt(family):
    hf = tiny_hf_model(family, seed=1)
    m = LlamaForCausalLM(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_hf_state_dict(hf.state_dict())
    return m.eval()


class Pool:
    """A minimal slot allocator for these tests (the real one is serve.block_manager)."""

    def __init__(self, blocks):
        self.free = list(reversed(range(blocks)))  # hand out blocks out of order on purpose
        self.tables = {}

    def context(self, sid, n):
        t = self.tables.setdefault(sid, [])
        while len(t) * BS < n:
            t.append(self.free.pop(0))
        return [t[p // BS] * BS + p % BS for p in range(n)]


@pytest.mark.parametrize("family", ["llama", "mistral", "smollm2-tied", "qwen2", "qwen3", "gemma2", "gemma3",
                                    "phi3"])
def test_chunked_prefill_and_decode_equal_plain_forward(family, one_thread):
    torch.manual_seed(0)
    model = _lt(family)
    runner, pool = ModelRunner(model, num_blocks=64, block_size=BS), Pool(64)
    seqs = {s: torch.randint(3, 250, (n,)).tolist() for s, n in (("a", 11), ("b", 3), ("c", 17))}
    done = {s: 0 for s in seqs}
    chunk = 5
    out = {s: [] for s in seqs}
    for _ in range(12):  # each step: every sequence advances by up to `chunk` tokens (or 1 when decoding)
        works, order = [], []
        for s, toks in seqs.items():
            n = min(chunk, len(toks) - done[s])
            works.append(Work(toks[done[s]:done[s] + n], done[s], pool.context(s, done[s] + n),
                              sample=done[s] + n == len(toks)))
            order.append((s, n))
        res = runner.step(works)
        i = 0
        for (s, n), w in zip(order, works):
            done[s] += n
            if w.sample:
                ref = model(torch.tensor([seqs[s]]))[0, -1]
                torch.testing.assert_close(res.logits[i], ref, atol=1e-4, rtol=1e-4)
                nxt = int(res.logits[i].argmax())
                seqs[s].append(nxt)
                out[s].append(nxt)
                i += 1
    assert all(len(v) >= 3 for v in out.values())


def test_mixed_adapters_in_one_step_equal_each_alone(one_thread):
    import leantune
    from leantune.methods.base import adapter_slots

    torch.manual_seed(0)
    model = _lt("llama")
    for name in ("x", "y"):
        leantune.apply(model, "lora", adapter_name=name, r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    slots = adapter_slots(model)
    runner, pool = ModelRunner(model, 32, BS), Pool(32)
    prompt = [5, 9, 30, 7, 100, 3]
    works = [Work(prompt, 0, pool.context(s, len(prompt)), adapter=a, sample=True)
             for s, a in (("base", -1), ("x", slots["x"]), ("y", slots["y"]))]
    res = runner.step(works)
    for i, a in enumerate((-1, slots["x"], slots["y"])):
        ref = model(torch.tensor([prompt]), _meta(a))[0, -1]
        torch.testing.assert_close(res.logits[i], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(res.logits[0], res.logits[1])


def _meta(slot):
    from leantune.models.llama import ForwardMeta

    return ForwardMeta(adapter_ids=torch.tensor([slot]))


def test_capture_returns_each_layer_input(one_thread):
    model = _lt("llama")
    runner, pool = ModelRunner(model, 16, BS), Pool(16)
    toks = [4, 8, 15, 16, 23, 42]
    res = runner.step([Work(toks, 0, pool.context("t", 6), capture=True)])
    acts = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: acts.append(args[0][0].clone()))
             for layer in model.model.layers]
    last = model.hidden(torch.tensor([toks]))
    for h in hooks:
        h.remove()
    assert res.logits is None and len(res.captures) == model.config.num_layers + 1
    for got, ref in zip(res.captures, acts):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.norm(res.captures[-1]), last[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra,path", [(0, "one_hot"), (5, "segments"), (9, "segments")])
def test_gathered_lora_path_equals_the_grouped_one(one_thread, monkeypatch, extra, path):
    """Many adapters in one decode batch take a gathered path: with a few loaded, all adapters' A at once and
    a one-hot mask; with many (9, 13), rows grouped per adapter (SGMV-like). Either must
    equal the per-adapter grouping, including base rows, different ranks and an adapter that skips some
    layers (so a row's slot is missing from those layers' stacks)."""
    import leantune
    from leantune.methods.base import adapter_slots
    from leantune.routing import Routing
    from leantune.models.llama import ForwardMeta

    torch.manual_seed(0)
    model = _lt("llama")
    for i, name in enumerate(("a", "b", "c", "d") + tuple(f"e{j}" for j in range(extra))):
        targets = ["q_proj", "v_proj"] if name == "d" else "all-linear"
        leantune.apply(model, "lora", adapter_name=name, r=2 + 2 * (i % 4), targets=targets)
    taken = set()
    for what in ("segments", "one_hot"):
        original = getattr(Routing, what)
        monkeypatch.setattr(Routing, what, lambda self, *a, _f=original, _w=what: taken.add(_w) or _f(self, *a))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    slots = adapter_slots(model)
    ids = torch.randint(3, 250, (10, 1))
    rows = torch.tensor([-1, slots["a"], slots["b"], slots["c"], slots["d"], -1, slots["d"], slots["a"], 7, slots["c"]])
    with torch.no_grad():
        fast = model(ids, ForwardMeta(adapter_ids=rows))
    assert taken == {path}
    with torch.enable_grad():
        slow = model(ids, ForwardMeta(adapter_ids=rows)).detach()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # weights changed in place: the cached stack must not be used
        for n, p in model.named_parameters():
            if "lora_B" in n and ".b." in n:
                p.mul_(3)
        fast2 = model(ids, ForwardMeta(adapter_ids=rows))
    with torch.enable_grad():
        slow2 = model(ids, ForwardMeta(adapter_ids=rows)).detach()
    torch.testing.assert_close(fast2, slow2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast2[2], fast[2])


def test_gathered_lora_path_takes_fp32_adapters_on_a_bf16_base(one_thread, monkeypatch):
    """Adapters stay fp32 on a bf16 base (as PEFT keeps them); the gathered path must still be taken
    (else a 16-adapter decode on a GPU loops over slots) and equal the grouped path."""
    import leantune
    from leantune.methods.base import adapter_slots
    from leantune.methods.lora import LoraLinear
    from leantune.models.llama import ForwardMeta

    torch.manual_seed(0)
    model = _lt("llama").to(torch.bfloat16)
    for name in ("a", "b", "c"):
        leantune.apply(model, "lora", adapter_name=name, r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                assert p.dtype == torch.float32
                p.normal_(0, 0.1)
    slots = adapter_slots(model)
    taken = []
    original = LoraLinear._add_gathered

    def spy(self, result, x, route, stack):
        out = original(self, result, x, route, stack)
        taken.append(isinstance(out, torch.Tensor))
        return out

    monkeypatch.setattr(LoraLinear, "_add_gathered", spy)
    ids = torch.randint(3, 250, (6, 1))
    rows = torch.tensor([-1, slots["a"], slots["b"], slots["c"], slots["a"], -1])
    with torch.no_grad():
        fast = model(ids, ForwardMeta(adapter_ids=rows))
    assert taken and all(taken)
    monkeypatch.setattr(LoraLinear, "_stacked", lambda self: None)  # not stackable: the per-adapter loop
    with torch.no_grad():
        slow = model(ids, ForwardMeta(adapter_ids=rows))
    torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)
