"""A DPO job's co-trainer (`serve.cotrain_dpo`) gives the gradients, loss and metrics of a plain DPO step computed
from full logits, trains only its own adapter (a served one beside it is untouched) and its reward accuracy
rises."""
import pytest
import torch
import torch.nn.functional as F
from test_cotrain import _model

from leantune.data.formats import Example
from leantune.data.preference import PreferenceExample
from leantune.methods.base import adapter_slots, trainable_parameters
from leantune.models.llama import ForwardMeta
from leantune.serve.cotrain import CoTrainConfig
from leantune.serve.cotrain_dpo import DPOCoTrainer


def _pairs(n=3):
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 250, (4 + i,), generator=g).tolist()
        chosen, rejected = (torch.randint(3, 250, (3 + i + j,), generator=g).tolist() for j in (0, 2))
        seqs = [Example(prompt + a, [-100] * len(prompt) + a) for a in (chosen, rejected)]
        out.append(PreferenceExample(prompt, *seqs, line=i + 1))
    return out


def _logp(model, ex, slot) -> torch.Tensor:
    """Summed log-prob of the answer tokens from the full (1, T, V) logits: an oracle independent of the
    fused head the objective uses."""
    logits = model(torch.tensor([ex.input_ids]), ForwardMeta(adapter_ids=torch.tensor([slot])))[0, :-1]
    tgt = torch.tensor(ex.labels[1:])
    keep = tgt != -100
    return F.log_softmax(logits[keep], -1).gather(1, tgt[keep][:, None]).sum()


def _plain_step(model, pairs, slot, beta):
    """(mean loss, reward accuracy), with the grads of a plain DPO step on `pairs` left in the job adapter."""
    losses, correct = [], 0
    for p in pairs:
        with torch.no_grad():
            ref_c, ref_r = _logp(model, p.chosen, -1), _logp(model, p.rejected, -1)
        rc, rr = beta * (_logp(model, p.chosen, slot) - ref_c), beta * (_logp(model, p.rejected, slot) - ref_r)
        losses.append(-F.logsigmoid(rc - rr))
        correct += int(rc > rr)
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss.detach()), correct / len(pairs)


def test_pair_units_equal_a_plain_dpo_step_on_the_job_adapter_only(one_thread):
    model = _model("llama")  # a served adapter and the job's, both with B != 0 (so the policy is not the base)
    slot = adapter_slots(model)["job"]
    served = trainable_parameters(model, "served")
    for p in served.values():
        p.requires_grad_(False)
    tr = DPOCoTrainer(model, "job", _pairs(), CoTrainConfig(n_epochs=1, batch_size=3, seed=1, beta=0.5))
    batch = list(tr.batch)
    assert tr.fwd_wanted() == 0 and not tr.at_sequence_start() and tr.bwd_wanted()
    assert [tr.backward_layers(1) for _ in batch] == [False, False, True]
    got = {n: p.grad.clone() for n, p in trainable_parameters(model, "job").items()}
    for p in trainable_parameters(model, "job").values():
        p.grad = None
    loss, acc = _plain_step(model, batch, slot, 0.5)
    ref = {n: p.grad for n, p in trainable_parameters(model, "job").items()}
    assert got.keys() == ref.keys() and got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=2e-6, rtol=1e-4, msg=n)
    assert all(p.grad is None for p in served.values())
    assert tr.trained_tokens == sum(len(p.chosen) + len(p.rejected) for p in batch)
    m = tr.apply_step()
    assert m["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert m["rewards/accuracies"] == pytest.approx(acc)
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
    assert set(tr.event_keys) <= set(m) and "rewards/accuracies" in tr.event_keys and tr.done


def test_fresh_adapter_starts_at_log2_and_learns_the_preference(one_thread):
    """A fresh job adapter (B = 0) is the reference itself: the first loss is log 2 and rewards 0; training
    drives the reward accuracy to 1 and the loss down."""
    from leantune import apply
    from test_serve_runner import _lt

    torch.manual_seed(0)
    model = _lt("llama")
    apply(model, "lora", adapter_name="job", r=4, targets="all-linear")
    pairs = _pairs(2)
    tr = DPOCoTrainer(model, "job", pairs, CoTrainConfig(n_epochs=15, batch_size=2, learning_rate=2e-2,
                                                          schedule="constant", beta=0.5))
    steps = []
    while not tr.done:
        if tr.backward_layers(None):
            steps.append(tr.apply_step())
    assert steps[0]["train_loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/rejected"] == 0
    assert steps[-1]["rewards/accuracies"] == 1.0 and steps[-1]["train_loss"] < 0.5 * steps[0]["train_loss"]
    assert 0 < tr.valid_metrics(pairs)["valid_loss"] < steps[0]["train_loss"]
    with pytest.raises(ValueError, match="beta"):
        CoTrainConfig(beta=0)
