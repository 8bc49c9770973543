"""Per-forward adapter routing (`leantune.routing`): pure unit tests, and that a serving step works
its routing out once for all adapter layers instead of once per linear (unit tier)."""
import pytest
import torch

from leantune.routing import Routing, token_ids


def test_routing_from_a_list_equals_routing_from_the_tensor():
    ids = torch.tensor([[-1, 3, 5, 3, -1, 7]])
    a, b = Routing(ids, ids.reshape(-1).tolist()), Routing(ids)
    x = torch.randn(1, 6, 4)
    assert a.slots == b.slots == {-1, 3, 5, 7}
    assert a.used({3: "p", 7: "q", 9: "r"}) == [3, 7]
    for slot in (-1, 3, 5, 7):
        want = [i for i, s in enumerate(ids[0]) if s == slot]
        assert a.row_index(x, slot).tolist() == b.row_index(x, slot).tolist() == want
    assert a.rows(x, 3).tolist() == [1, 3] and a.rows(x, 7) == slice(5, 6)  # one run of rows: a slice
    order = (3, 7)  # a stack holding slots 3 and 7 only, rank 2
    hot = a.one_hot(x, order, 2, torch.float32)
    assert hot.shape == (6, 4)
    expect = torch.zeros(6, 4)
    expect[1, 0:2] = expect[3, 0:2] = 1  # slot 3: columns of place 0
    expect[5, 2:4] = 1  # slot 7: place 1; base rows and slot 5 (not in the stack): none
    torch.testing.assert_close(hot, expect)
    torch.testing.assert_close(b.one_hot(x, order, 2, torch.float32), expect)
    assert a.one_hot(x, order, 2, torch.float32) is hot  # memoized: built once per forward


def test_segments_group_tokens_per_adapter_of_a_stack():
    route = Routing(torch.tensor([[-1, 7, 5, 3, 7, 3, 3]]))
    x = torch.randn(1, 7, 4)
    seg = route.segments(x, (3, 7))  # slots -1 and 5 are not in this layer's stack
    assert seg.used is None and seg.k == 3 and seg.padded == 6 and seg.tokens == 5
    assert seg.rows.tolist() == [1, 3, 4, 5, 6]
    # slot 3 (place 0) -> padded rows 0, 1, 2 in token order; slot 7 (place 1) -> rows 3, 4 (5 is padding)
    assert seg.dest.tolist() == [3, 0, 4, 1, 2]
    assert route.segments(x, (3, 7)) is seg  # memoized: built once per forward
    seg = route.segments(x, (1, 3, 5, 7, 9))
    assert seg.used.tolist() == [1, 2, 3] and seg.k == 3 and seg.padded == 9  # places of 3, 5, 7
    assert seg.dest.tolist() == [6, 3, 0, 7, 1, 2]
    every = Routing(torch.tensor([2, 0, 1])).segments(torch.randn(3, 1, 4), (0, 1, 2))
    assert every.rows is None and every.used is None and every.dest.tolist() == [2, 0, 1]
    assert Routing(torch.tensor([-1, -1])).segments(torch.randn(2, 4), (0, 1)) is None


def test_per_row_ids_broadcast_over_tokens():
    route = Routing(torch.tensor([4, -1]))  # (B,) per row
    x = torch.randn(2, 3, 8)  # (B, T, C)
    assert route.token_ids(x).tolist() == [[4, 4, 4], [-1, -1, -1]]
    assert route.rows(x, 4) == slice(0, 3) and route.row_index(x, -1).tolist() == [3, 4, 5]
    assert route.one_hot(x, (4,), 1, torch.float32).reshape(-1).tolist() == [1, 1, 1, 0, 0, 0]
    torch.testing.assert_close(token_ids(torch.tensor([4, -1]), x), route.token_ids(x))


def test_bad_routing_inputs_are_refused():
    with pytest.raises(TypeError, match="integer tensor"):
        Routing(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        token_ids([0, 1], torch.randn(2, 4))
    with pytest.raises(ValueError, match="3 slots given"):
        Routing(torch.tensor([0, 1]), [0, 1, 2])
    with pytest.raises(ValueError, match="adapter_ids has shape"):
        Routing(torch.tensor([0, 1, 2])).token_ids(torch.randn(2, 5, 4))


def test_a_serving_step_routes_once_for_every_adapter_layer(one_thread, monkeypatch):
    """The runner hands one Routing to the model; no LoRA layer builds its own, and the gathered path's
    one-hot mask is built once for the step (the per-linear ops and, on a GPU, host syncs it replaces)."""
    import leantune
    from leantune import routing as routing_mod
    from leantune.methods.base import adapter_slots
    from leantune.serve.runner import ModelRunner, Work
    from lt_tiny import tiny_lt_model

    torch.manual_seed(0)
    model = tiny_lt_model().eval()
    for name in ("a", "b", "c"):
        leantune.apply(model, "lora", adapter_name=name, r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    slots = adapter_slots(model)
    made = []
    original = routing_mod.Routing.__init__

    def counting(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(routing_mod.Routing, "__init__", counting)
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    works = [Work([5 + i], 0, [i], adapter=s, sample=True)
             for i, s in enumerate((-1, slots["a"], slots["b"], slots["c"], slots["a"]))]
    res = runner.step(works)
    assert len(made) == 1, "an adapter layer built its own Routing instead of using the step's"
    assert [k[0] for k in made[0]._memo].count("one_hot") == 1
    for i, w in enumerate(works):  # and each row is what its adapter alone gives
        from leantune.models.llama import ForwardMeta

        ref = model(torch.tensor([w.tokens]), ForwardMeta(adapter_ids=torch.tensor([w.adapter])))[0, -1]
        torch.testing.assert_close(res.logits[i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_deltas_equals_the_per_row_sum(grad, dtype):
    """Slot 3's rows are one run (a slice, added in place without autograd), slot 5's are not (gathered
    and index-added); fp32 deltas on a bf16 result are added before one rounding."""
    torch.manual_seed(0)
    ids = torch.tensor([[-1, 3, 3, 3, 5, -1, 5]])
    x = torch.randn(1, 7, 4)
    result = torch.randn(1, 7, 6).to(dtype)
    W = {"p": torch.randn(6, 4), "q": torch.randn(6, 4)}

    def delta(name, xr):
        return xr @ W[name].T  # fp32

    want = result.float().clone()
    for i, s in enumerate(ids[0].tolist()):
        if s in (3, 5):
            want[0, i] += x[0, i] @ W["p" if s == 3 else "q"].T
    with torch.set_grad_enabled(grad):
        got = Routing(ids).add_deltas(result.clone(), x, {3: "p", 5: "q", 9: "r"}, delta)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype))
