"""LiST's self-training numerics: Wang et al. 2022, "LiST: Lite Prompted Self-training Makes Parameter-efficient
Few-shot Learners" (microsoft/LiST @4d461bc, src/trainer.py `meta`, `compute_un_loss`, `train`).

A teacher trained on the labelled few gives soft labels (class probabilities) to unlabeled rows; a student with
only its adapter (and classification head) trainable learns them under `sum_i w_i KL(p_T(x_i) || p_S(x_i))`, the
weights w from meta re-weighting (Ren et al. 2018, "Learning to Reweight Examples"): one differentiable SGD step
on `sum_i eps_i l_i` from eps = 0, the labelled loss after it, `w = clamp(-dL_meta/d eps, 0)` normalized. A
pseudo-label whose gradient opposes the labelled loss's gets weight 0. Then the student finetunes on the labelled
few and becomes the next teacher.

The model is any sequence classifier called as `model(input_ids=..., attention_mask=...).logits` (an encoder
with a head, e.g. transformers' `AutoModelForSequenceClassification`); the recipe is `recipes.self_train`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call


def soft_label_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) per example, (B,); a zero teacher probability contributes 0 (0 log 0 = 0)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    return (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_s).sum(-1)


def meta_scores(params: list[torch.Tensor], per_example_loss: Callable, meta_loss: Callable,
                inner_lr: float) -> torch.Tensor:
    """`-dL_meta(theta - inner_lr * sum_i eps_i grad l_i) / d eps_i` at eps = 0, (B,), which equals
    `inner_lr * grad L_meta . grad l_i`: how much a step on example i lowers the labelled loss.

    `per_example_loss(params) -> (B,)` and `meta_loss(params) -> scalar` are functions of the trainable tensors,
    so the step is taken on copies and the model's own parameters stay untouched."""
    losses = per_example_loss(params)
    eps = torch.zeros_like(losses, requires_grad=True)
    grads = torch.autograd.grad((eps * losses).sum(), params, create_graph=True, allow_unused=True)
    stepped = [p if g is None else p - inner_lr * g for p, g in zip(params, grads)]
    (g_eps,) = torch.autograd.grad(meta_loss(stepped), eps)
    return -g_eps.detach()


def normalized_weights(scores: torch.Tensor) -> torch.Tensor:
    """LiST's weights from meta scores: negatives clipped to 0, then divided by their sum (+1e-6, so an all-zero
    batch trains on nothing rather than dividing by zero)."""
    w = scores.clamp(min=0)
    return w / (w.sum() + 1e-6)


@dataclass
class StudentSettings:
    """One student session: `steps` on unlabeled batches of `unlabeled_batch`, uniform weights for the first
    `warmup` fraction (LiST's `meta_st_warmup`), meta weights after, their inner step at `meta_lr`."""

    steps: int
    unlabeled_batch: int
    labeled_batch: int
    lr: float
    weight_decay: float
    meta_lr: float
    warmup: float
    seed: int


def collate(ids: list[list[int]], pad_id: int) -> dict:
    """Right-padded `input_ids` and `attention_mask`, (B, T)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` index batches drawn epoch by epoch from seeded shuffles of range(n), so a run repeats exactly."""
    rng, order, out = random.Random(seed), [], []
    while len(out) < steps:
        if len(order) < min(batch, n):
            order = order + rng.sample(range(n), n)
        out.append(order[:batch])
        order = order[batch:]
    return out


def trainable(model) -> tuple[list[str], list[torch.nn.Parameter]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return names, [params[n] for n in names]


@torch.no_grad()
def predict_probs(model, ids: list[list[int]], pad_id: int, batch: int = 64) -> torch.Tensor:
    """Class probabilities of every row, (N, C), in eval mode (no dropout): the teacher's soft labels."""
    was = model.training
    model.eval()
    out = [F.softmax(model(**collate(ids[i:i + batch], pad_id)).logits.float(), -1) for i in range(0, len(ids), batch)]
    model.train(was)
    return torch.cat(out)


def accuracy(model, examples: list, pad_id: int) -> float:
    """Share of `examples` (`.input_ids`, `.label`) whose most probable class is the label."""
    probs = predict_probs(model, [e.input_ids for e in examples], pad_id)
    return float((probs.argmax(-1) == torch.tensor([e.label for e in examples])).float().mean())


def _optimizer(params, lr: float, weight_decay: float):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _step(opt, loss: torch.Tensor, what: str, step: int) -> float:
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"self-train {what}: loss {float(loss)} at step {step + 1}; lower --lr")
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def fit_labeled(model, examples: list, steps: int, batch: int, lr: float, weight_decay: float, seed: int,
                pad_id: int) -> list[float]:
    """Cross-entropy on the labelled few, `steps` AdamW steps on the trainable parameters; the step losses."""
    _, params = trainable(model)
    opt, losses = _optimizer(params, lr, weight_decay), []
    model.train()
    for step, idx in enumerate(batch_order(len(examples), batch, steps, seed)):
        logits = model(**collate([examples[i].input_ids for i in idx], pad_id)).logits
        labels = torch.tensor([examples[i].label for i in idx])
        losses.append(_step(opt, F.cross_entropy(logits.float(), labels), "labelled", step))
    return losses


def _example_weights(model, names, params, inputs: dict, probs: torch.Tensor, labeled: dict, labels, meta_lr):
    """LiST's meta weights of one unlabeled batch against one labelled batch, with the model in eval mode as
    LiST runs it (dropout would make the two forwards disagree on what a step does)."""
    was = model.training
    model.eval()

    def per_example(ps):
        return soft_label_kl(functional_call(model, dict(zip(names, ps)), args=(), kwargs=inputs).logits, probs)

    def meta(ps):
        logits = functional_call(model, dict(zip(names, ps)), args=(), kwargs=labeled).logits
        return F.cross_entropy(logits.float(), labels)

    w = normalized_weights(meta_scores(params, per_example, meta, meta_lr))
    model.train(was)
    return w


def fit_student(model, unlabeled: list[list[int]], teacher_probs: torch.Tensor, labeled: list, s: StudentSettings,
                pad_id: int) -> dict:
    """One student session on the teacher's soft labels; {"losses", "mean_zero_weight"}: the step losses and the
    mean share of pseudo-labels the meta weights set to 0 (how many it judged harmful)."""
    names, params = trainable(model)
    opt, losses, zeroed = _optimizer(params, s.lr, s.weight_decay), [], []
    warm = int(s.warmup * s.steps)
    lab_order = batch_order(len(labeled), s.labeled_batch, s.steps, s.seed + 1)
    model.train()
    for step, idx in enumerate(batch_order(len(unlabeled), s.unlabeled_batch, s.steps, s.seed)):
        inputs, probs = collate([unlabeled[i] for i in idx], pad_id), teacher_probs[idx]
        if step < warm:  # LiST's warm-up: confidence weighting at threshold 0, i.e. uniform
            w = torch.full((len(idx),), 1.0 / len(idx))
        else:
            lab = lab_order[step]
            w = _example_weights(model, names, params, inputs, probs,
                                 collate([labeled[i].input_ids for i in lab], pad_id),
                                 torch.tensor([labeled[i].label for i in lab]), s.meta_lr)
            zeroed.append(float((w == 0).float().mean()))
        loss = (w * soft_label_kl(model(**inputs).logits, probs)).sum()
        losses.append(_step(opt, loss, "student", step))
    return {"losses": losses, "mean_zero_weight": sum(zeroed) / len(zeroed) if zeroed else 0.0}
