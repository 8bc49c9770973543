"""Co-serving fine-tuning (FlexLLM phase machine) gives the gradients of a plain training step."""
import pytest
import torch
from test_serve_runner import BS, Pool, _lt

import leantune
from leantune.data.formats import Example
from leantune.methods.base import adapter_slots, trainable_parameters
from leantune.models.llama import ForwardMeta
from leantune.serve.cotrain import CoTrainConfig, CoTrainer
from leantune.serve.runner import ModelRunner, Work


def _examples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((13, 5), (7, 2), (21, 9)):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def _model(family):
    torch.manual_seed(0)
    m = _lt(family)
    leantune.apply(m, "lora", adapter_name="served", r=4, targets="all-linear")
    leantune.apply(m, "lora", adapter_name="job", r=4, targets="all-linear")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def _direct_grads(model, batch, slot):
    """Reference: an ordinary forward/backward of the batch, token-weighted over the batch."""
    from leantune.train.loss import shifted_targets

    n_tok = sum(ex.num_loss_tokens for ex in batch)
    for ex in batch:
        ids = torch.tensor([ex.input_ids])
        logits = model(ids, ForwardMeta(adapter_ids=torch.tensor([slot])))[0]
        tgt = shifted_targets(torch.tensor([ex.labels]))[0]
        (torch.nn.functional.cross_entropy(logits, tgt, reduction="sum", ignore_index=-100) / n_tok).backward()
    return {n: p.grad.clone() for n, p in trainable_parameters(model, "job").items()}


def assert_plain_step_grads(model, batch, slot):
    """The job adapter's accumulated grads (cleared here) equal `_direct_grads` of the batch."""
    got = {n: p.grad.clone() for n, p in trainable_parameters(model, "job").items()}
    for p in trainable_parameters(model, "job").values():
        p.grad = None
    ref = _direct_grads(model, batch, slot)
    assert got.keys() == ref.keys() and len(got) > 0
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=2e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family,chunk,k,loss_share",
                         [("llama", 4, 1, 0.3), ("mistral", 5, 2, None), ("smollm2-tied", 64, 3, 0.05),
                          ("llama", 64, None, 0.3), ("mistral", 4, "mix", 0.3), ("qwen3", 6, 1, 0.3),
                          ("gemma2", 5, 2, 0.3), ("gemma3", 4, 1, 0.3), ("phi3", 5, 1, 0.3)])
def test_chunked_forward_and_layer_sliced_backward_equal_a_plain_step(family, chunk, k, loss_share, one_thread):
    """Forward chunks, loss units of a few tokens (0.3 / 0.05 of a sequence: several units, some with no
    loss token at all, as prompt tokens have none) and k layers per iteration give a plain step's grads;
    so does k=None (all of a sequence's backward at once, its loss in one unit, as the engine does when no
    request is running), and a mix (one unit, then the rest of a sequence's loss and layers at once)."""
    model = _model(family)
    slot = adapter_slots(model)["job"]
    for p in trainable_parameters(model, "served").values():
        p.requires_grad_(False)
    ex = _examples()
    tr = CoTrainer(model, "job", ex, CoTrainConfig(n_epochs=1, batch_size=3, seed=1), loss_share=loss_share)
    batch = list(tr.batch)
    runner, pool = ModelRunner(model, 64, BS), Pool(64)
    complete, iters = False, 0
    while not complete:
        iters += 1
        # an inference request for the other adapter shares every step
        works = [Work([7, 8, 9], 0, pool.context(f"inf{iters}", 3), adapter=adapter_slots(model)["served"],
                      sample=True)]
        if tr.fwd_wanted():
            toks, start = tr.fwd_chunk(min(chunk, tr.fwd_wanted()))
            works.append(Work(toks, start, pool.context(f"ft{tr.batch_i}", start + len(toks)), adapter=slot,
                              capture=True))
        res = runner.step(works)
        if len(works) == 2:
            tr.fwd_done(res.captures)
        if tr.bwd_wanted():
            complete = tr.backward_layers((1 if iters % 2 else None) if k == "mix" else k)
    loss = tr.loss_sum
    assert_plain_step_grads(model, batch, slot)
    assert loss > 0
    m = tr.apply_step()
    assert m["step"] == 1 and tr.done and m["train_loss"] == pytest.approx(loss)


def test_whole_sequences_mixed_with_chunked_ones_equal_a_plain_step(one_thread):
    """An idle iteration trains a whole sequence at once (`train_sequence`); a batch whose sequences go
    either way gets a plain step's grads and loss."""
    model = _model("llama")
    slot = adapter_slots(model)["job"]
    for p in trainable_parameters(model, "served").values():
        p.requires_grad_(False)
    tr = CoTrainer(model, "job", _examples(), CoTrainConfig(n_epochs=1, batch_size=3, seed=1), loss_share=0.3)
    batch = list(tr.batch)
    runner, pool = ModelRunner(model, 64, BS), Pool(64)
    assert not tr.train_sequence() and tr.batch_i == 1 and tr.trained_tokens == len(batch[0])
    while tr.batch_i == 1:  # the second in chunks and layer slices
        if tr.fwd_wanted():
            toks, start = tr.fwd_chunk(min(4, tr.fwd_wanted()))
            tr.fwd_done(runner.step([Work(toks, start, pool.context("s", start + len(toks)), adapter=slot,
                                          capture=True)]).captures)
        else:
            assert not tr.backward_layers(2)
    assert tr.train_sequence()  # the third completes the batch
    loss = tr.loss_sum
    assert_plain_step_grads(model, batch, slot)
    assert loss == pytest.approx(_batch_loss(model, batch, slot), rel=1e-5)


def _batch_loss(model, batch, slot) -> float:
    from leantune.train.loss import shifted_targets

    n_tok = sum(ex.num_loss_tokens for ex in batch)
    total = 0.0
    with torch.no_grad():
        for ex in batch:
            logits = model(torch.tensor([ex.input_ids]), ForwardMeta(adapter_ids=torch.tensor([slot])))[0]
            tgt = shifted_targets(torch.tensor([ex.labels]))[0]
            total += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum", ignore_index=-100))
    return total / n_tok


def test_loss_goes_down_and_config_is_validated(one_thread):
    model = _model("llama")
    for p in trainable_parameters(model, "served").values():
        p.requires_grad_(False)
    ex = _examples()[:1]
    tr = CoTrainer(model, "job", ex, CoTrainConfig(n_epochs=20, batch_size=1, learning_rate=3e-2,
                                                     schedule="constant"))
    runner, pool, losses, n = ModelRunner(model, 8, BS), Pool(8), [], 0
    while not tr.done:
        n += 1
        toks, start = tr.fwd_chunk(tr.fwd_wanted())
        tr.fwd_done(runner.step([Work(toks, start, pool.context("s", len(toks)), adapter=tr.slot,
                                      capture=True)]).captures)
        if tr.backward_layers(99):
            losses.append(tr.apply_step()["train_loss"])
    assert len(losses) == 20 and losses[-1] < 0.9 * losses[0], losses
    for bad in ({"n_epochs": 0}, {"batch_size": "2"}, {"learning_rate": -1.0}, {"learning_rate": float("nan")}):
        with pytest.raises(ValueError):
            CoTrainConfig(**bad)
