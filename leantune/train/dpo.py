"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) as a training objective.

For a pair (x, y_w, y_l), with log pi(y|x) the SUM of the answer tokens' log-probs (prompt and padding left
out, TRL's default) and the log-ratios r_w = log pi(y_w|x) - log pi_ref(y_w|x), r_l likewise, the per-pair loss
is, as TRL's `DPOTrainer` defines its loss types (trl/trainer/dpo_trainer.py, `_compute_loss`):

- sigmoid (DPO): -log sigmoid(beta (r_w - r_l));
- hinge (SLiC, Zhao et al. 2023): relu(1 - beta (r_w - r_l));
- ipo (IPO, Azar et al. 2023, eq. 17): (r_w / n_w - r_l / n_l - 1 / (2 beta))^2, each log-ratio divided by its
  answer's token count (TRL's length normalization, which the IPO authors confirmed).

The batch loss is the mean over pairs. Implicit rewards are beta * r (summed log-ratios, for every loss type);
each step logs their per-pair means under TRL's names: rewards/chosen, rewards/rejected, rewards/margins
(chosen - rejected), rewards/accuracies (the fraction of pairs with chosen > rejected), logps/chosen and
logps/rejected.

The reference policy pi_ref is the policy at the start of preference training, and never a second resident
model: with adapters that start as the identity (LoRA's B = 0) it is the same model with its adapters bypassed
(`methods.disable_adapters`, as TRL does with a PEFT model), computed in each step under no_grad; when that is
not the starting policy (a method that trains the base's own weights, trainable parameters outside the
adapters, adapters that do not start as the identity, or a model already finetuned by an SFT phase), the
reference log-probs of every pair are computed in one pass before training and kept with the pairs
(`PreferenceExample.ref_logps`), as TRL's `precompute_ref_log_probs` does.

Chosen and rejected sequences go through the model in one forward, chosen rows first (TRL's concatenated
forward); only answer positions reach the LM head, through the fused linear + cross-entropy of `train.loss`,
so (B, T, V) logits are never built. A mixture-of-experts model's load-balancing loss is not added here.
Dropout (a method's `--dropout`) stays as the user set it: the reference is computed without it (eval mode or
adapters bypassed), so with dropout the first step's loss is log 2 only up to its noise (TRL's
`disable_dropout=True` default turns it off instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from .loss import chunked_ce_sum, shifted_targets

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("adapters_off", "precomputed")
# adapters that bypass to exactly the starting policy give equal log-probs; anything else is not a reference
MATCH_ATOL = 1e-3


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from summed sequence log-probs (B,);
    `*_tokens`: the answers' token counts, which the ipo loss divides by."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the answers' token counts")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--dpo-loss must be one of {DPO_LOSSES}, got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass
class PairBatch:
    """B pairs as one (2B, T) batch: the chosen sequences, then the rejected ones."""

    batch: object  # leantune.data.Batch
    ref: torch.Tensor | None  # (2B,) precomputed reference log-probs in the same order; None: computed per step

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    @property
    def pairs(self) -> int:
        return self.batch.input_ids.shape[0] // 2

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        ref = None if self.ref is None else self.ref.to(device, non_blocking=non_blocking)
        return PairBatch(self.batch.to(device, non_blocking=non_blocking), ref)


def pair_batch(pairs: list, with_ref: bool = False) -> PairBatch:
    """One batch of `pairs` (`leantune.data.PreferenceExample`s); with_ref: carry their precomputed reference."""
    from ..data import pad_batch

    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs])
    if not with_ref:
        return PairBatch(batch, None)
    missing = [p.line for p in pairs if p.ref_logps is None]
    if missing:
        raise RuntimeError(f"pairs from lines {missing} have no precomputed reference log-probs")
    ref = [p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs]
    return PairBatch(batch, torch.tensor(ref, dtype=torch.float32))


def pair_batches(pairs: list, batch_size: int, epoch: int, seed: int, with_ref: bool = False) -> list[PairBatch]:
    """The epoch's batches of `batch_size` pairs, shuffled as `data.batches_for_epoch` shuffles examples."""
    from ..data import epoch_order

    if not pairs:
        raise ValueError("no preference pairs to batch")
    order = [pairs[i] for i in epoch_order(len(pairs), epoch, seed)]
    return [pair_batch(order[i:i + batch_size], with_ref) for i in range(0, len(order), batch_size)]


def _device(model) -> torch.device:
    return model.head_module().weight.device


def sequence_logps(model, batch, chunk: int = 1024, adapter_ids=None) -> torch.Tensor:
    """(rows,) sum of the log-probs of each row's labelled tokens (a `data.Batch`, unpacked); adapter_ids: each
    row's adapter slot (a multi-adapter model, as `ForwardMeta` takes them; -1 = the base)."""
    from ..models.llama import ForwardMeta

    meta = ForwardMeta(positions=batch.positions, adapter_ids=adapter_ids)
    hidden = model.hidden(batch.input_ids, meta)  # (R, T, C)
    tgt = shifted_targets(batch.labels)
    head = model.head_module()
    sel = tgt != -100
    # row by row: the fused head gives a sum, and each row's sum is its sequence log-prob
    return torch.stack([-chunked_ce_sum(hidden[r][sel[r]], head, tgt[r][sel[r]], chunk) for r in range(len(tgt))])


def answer_tokens(batch) -> torch.Tensor:
    """(rows,) the number of labelled (answer) tokens of each row."""
    return (shifted_targets(batch.labels) != -100).sum(dim=1)


@torch.no_grad()
def adapters_off_logps(model, batch) -> torch.Tensor:
    """Sequence log-probs of the model with every adapter bypassed (the base policy)."""
    from ..methods.base import disable_adapters

    with disable_adapters(model):
        return sequence_logps(model, batch)


@torch.no_grad()
def _no_grad_logps(model, batch, adapter_ids) -> torch.Tensor:
    return sequence_logps(model, batch, adapter_ids=adapter_ids)


def _route(slot: int, rows: int, device):
    """Every row of a batch on adapter `slot` (-1 = the base)."""
    from ..routing import Routing

    return Routing(torch.full((rows,), slot, dtype=torch.long, device=device), [slot] * rows)


@torch.no_grad()
def precompute_reference(model, pairs: list, batch_size: int) -> None:
    """Set `ref_logps` (chosen, rejected) of every pair to the model's log-probs now, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            logps = sequence_logps(model, pair_batch(chunk).batch.to(_device(model))).tolist()
            for i, p in enumerate(chunk):
                p.ref_logps = (logps[i], logps[i + len(chunk)])
    finally:
        model.train(was_training)


@dataclass
class DPOObjective:
    """The DPO objective for `train.loop.Trainer` (protocol in `train.objectives`)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    reference: str = "adapters_off"  # see REFERENCES and the module docstring
    name: ClassVar[str] = "dpo"
    weight_name: ClassVar[str] = "pairs"

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.loss_type not in DPO_LOSSES or not self.beta > 0:
            raise ValueError(f"DPO needs a loss type in {DPO_LOSSES} and beta > 0, got {self.loss_type!r}, "
                             f"{self.beta}")

    def batches(self, examples: list, epoch: int, cfg) -> list[PairBatch]:
        return pair_batches(examples, cfg.batch_size, epoch, cfg.seed, with_ref=self.reference == "precomputed")

    def weight(self, batch: PairBatch) -> int:
        return batch.pairs

    def terms(self, model, batch: PairBatch, slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor, torch.Tensor]:
        """(per-pair losses, chosen rewards, rejected rewards, (2B,) policy log-probs) of one batch. slot: the
        policy is that one adapter of a multi-adapter model (a serving job's), and the reference its base rows
        (slot -1), so the adapters other requests use are neither switched off nor trained."""
        batch = batch.to(_device(model))
        policy = reference = None
        if slot is not None:
            policy, reference = (_route(s, batch.batch.input_ids.shape[0], batch.input_ids.device)
                                 for s in (slot, -1))
        logps = sequence_logps(model, batch.batch, adapter_ids=policy)
        ref = batch.ref
        if ref is None:
            if self.reference == "precomputed":
                raise RuntimeError("the reference log-probs were not precomputed (train.dpo.precompute_reference)")
            ref = (adapters_off_logps(model, batch.batch) if reference is None else
                   _no_grad_logps(model, batch.batch, reference))
        n, b = answer_tokens(batch.batch), batch.pairs
        losses, rc, rr = dpo_loss(logps[:b], logps[b:], ref[:b].to(logps), ref[b:].to(logps), self.beta,
                                  self.loss_type, n[:b], n[b:])
        return losses, rc, rr, logps.detach()

    def loss_sum(self, model, batch: PairBatch, slot: int | None = None) -> tuple[torch.Tensor, int, dict]:
        losses, rc, rr, logps = self.terms(model, batch, slot)
        b = batch.pairs
        metrics = {"rewards/chosen": rc.sum(), "rewards/rejected": rr.sum(), "rewards/margins": (rc - rr).sum(),
                   "rewards/accuracies": (rc > rr).float().sum(), "logps/chosen": logps[:b].sum(),
                   "logps/rejected": logps[b:].sum()}
        return losses.sum(), b, {k: float(v) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, model, examples: list, cfg, slot: int | None = None) -> float:
        """Mean per-pair loss over `examples`, in eval mode (slot: as in `terms`)."""
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            for batch in self.batches(examples, 0, cfg):
                total += float(self.terms(model, batch, slot)[0].sum())
        finally:
            model.train(was_training)
        return total / len(examples)


def adapters_hold_all_trainable(model) -> bool:
    """True when the model has adapter layers and every trainable parameter belongs to one of their adapters,
    so bypassing the adapters leaves nothing that training changed."""
    from ..methods.base import adapter_layers

    layers = [layer for _, layer in adapter_layers(model)]
    held = {id(p) for layer in layers for n in layer.adapter_names for p in layer.adapter_parameters(n)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(layers) and bool(trainable) and all(id(p) in held for p in trainable)


@torch.no_grad()
def adapters_off_is_policy(model, probe: PairBatch) -> bool:
    """Does bypassing the adapters give the policy's own log-probs now (on `probe`, in eval mode)?"""
    was_training = model.training
    model.eval()
    try:
        batch = probe.batch.to(_device(model))
        return torch.allclose(sequence_logps(model, batch), adapters_off_logps(model, batch), rtol=0,
                              atol=MATCH_ATOL)
    finally:
        model.train(was_training)


def build_dpo(model, cfg, train: list, evals: list, trains_base: bool, snapshot: bool = False,
              log: Callable[[str], None] = print) -> DPOObjective:
    """The DPO objective for `model` as it is now (the start of preference training): its reference is the
    adapters switched off where that is this model (unless `cfg.dpo_precompute_ref`), else log-probs
    precomputed for every pair of `train` and `evals`. trains_base: the method trains the base's own weights; snapshot: the model was already trained
    (an SFT phase), so its adapters are not the identity: precompute."""
    probe = pair_batch(train[: cfg.batch_size])
    off = not (trains_base or snapshot or cfg.dpo_precompute_ref) and adapters_hold_all_trainable(model) \
        and adapters_off_is_policy(model, probe)
    objective = DPOObjective(cfg.beta, cfg.dpo_loss, "adapters_off" if off else "precomputed")
    if off:
        log("DPO reference: the model with its adapters switched off")
    else:
        precompute_reference(model, train + evals, cfg.batch_size)
        log(f"DPO reference: log-probs of the starting model precomputed for {len(train) + len(evals)} pairs")
    return objective
