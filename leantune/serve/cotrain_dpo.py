"""A DPO fine-tuning job inside the serving loop: OpenAI's `method: {"type": "dpo"}` on preference pairs.

The objective is `train.dpo.DPOObjective` (sigmoid loss, TRL's metrics), the same one `leantune finetune
--objective dpo` trains with. The job's adapter is a fresh LoRA (B = 0), so the reference policy is the served
base model: the pair's rows routed to slot -1 in the same model tree, computed under no_grad; nothing is
switched off for the requests and no second model is resident.

Unlike the SFT co-trainer, a pair is not forwarded in token chunks nor back-propagated in layer slices: the DPO
loss couples the chosen and the rejected sequence through their summed log-probs, so a unit of work here is one
pair's policy + reference forward and backward at once (both rows in one forward). In an iteration that also
serves requests that unit is a longer stall than one layer slice; the engine's time-share admission charges
its measured time (`admission.TimeShare`, `bwd_seconds`), so on average fine-tuning still takes only its share.
The optimizer step after `batch_size` pairs uses the mean loss over the batch's pairs, as `train.loop` does.
"""
from __future__ import annotations

import torch

from ..train.dpo import DPOObjective, pair_batch
from .cotrain import CoTrainConfig, CoTrainer

# the per-step metrics a DPO job reports (TRL's names), beside train_loss; means over the step's pairs
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


class DPOCoTrainer(CoTrainer):
    """The co-trainer of a DPO job: same data order, schedule, optimizer and checkpoints as `CoTrainer`
    (examples are `data.PreferenceExample`s); only the unit of work and the loss differ."""

    # no token accuracy: a pair's loss is over its two sequences' summed log-probs, not per token
    event_keys = ("step", "train_loss", "lr", "total_steps") + DPO_METRICS
    forwards_in_backward = True

    def __init__(self, model, adapter: str, pairs: list, cfg: CoTrainConfig, step: int = 0):
        # the job's adapter starts as the identity, so its base rows are the starting policy (module docstring)
        self.objective = DPOObjective(beta=cfg.beta, loss_type="sigmoid", reference="adapters_off")
        super().__init__(model, adapter, pairs, cfg, step)

    def _start_batch(self) -> None:
        super()._start_batch()
        self.sums = dict.fromkeys(DPO_METRICS, 0.0)

    def _batch_weight(self) -> int:
        return len(self.batch)  # the loss is a mean over pairs

    # no token-chunked forward: the engine only asks for backward units, each one whole pair
    def fwd_wanted(self) -> int:
        return 0

    def at_sequence_start(self) -> bool:
        return False

    def bwd_wanted(self) -> bool:
        return not self.done

    def backward_layers(self, k: int | None) -> bool:
        """Train the batch's next pair (forward, loss, backward; `k` has no meaning for a pair); True when the
        batch's gradients are complete."""
        pair = self.seq
        with torch.enable_grad():
            loss, n, metrics = self.objective.loss_sum(self.model, pair_batch([pair]), slot=self.slot)
            (loss / len(self.batch)).backward()
        self.loss_sum += float(loss.detach()) / len(self.batch)
        for key in DPO_METRICS:
            self.sums[key] += metrics[key]
        self.trained_tokens += len(pair.chosen) + len(pair.rejected)
        self.batch_i += 1
        return self.batch_i == len(self.batch)

    def apply_step(self) -> dict:
        means = {k: v / len(self.batch) for k, v in self.sums.items()}  # before the step starts the next batch
        return {**super().apply_step(), **means}

    def valid_metrics(self, pairs: list) -> dict:
        """The mean DPO loss of the held-out pairs, one pair per batch (no padding); no token accuracy."""
        return {"valid_loss": self.objective.evaluate(self.model, pairs, _OneByOne(seed=self.cfg.seed), slot=self.slot)}


class _OneByOne:
    """The batching options `DPOObjective.batches` reads."""

    batch_size = 1

    def __init__(self, seed: int):
        self.seed = seed
