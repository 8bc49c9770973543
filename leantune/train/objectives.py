"""Training objectives: what the Trainer (`train.loop`) computes on a batch. Methods decide WHAT trains;
an objective decides the loss it trains on, so any method trains under any objective (DESIGN.md).

An objective is an object with
- `batches(examples, epoch, cfg) -> list`: the epoch's batches, a pure function of (examples, seed, epoch) so
  a resumed run rebuilds them; each batch has `input_ids` (for the token count and the device) and `to()`;
- `weight(batch) -> int`: what the window's loss is a mean over (loss tokens for SFT, pairs for DPO);
- `loss_sum(model, batch) -> (loss sum, weight, {metric: sum})`: the loss summed over the batch's weight units,
  with metrics summed the same way (the Trainer divides both by the window's weight);
- `evaluate(model, examples, cfg) -> float`: the held-out loss, in the same units;
- `weight_name`: the key of the window's weight in each step record.

`SFTObjective` is token cross-entropy; `train.dpo.DPOObjective` is Direct Preference Optimization.
"""
from __future__ import annotations

from .loss import heldout_loss, lm_loss_sum, shifted_targets

OBJECTIVES = ("sft", "dpo", "s3ft", "self-train")  # self-train: LiST, its own loop (train.self_train)
# objectives whose training is token cross-entropy on SFT examples: S3FT only chooses the answers first
SFT_TRAINED = ("sft", "s3ft")


def count_loss_tokens(batch) -> int:
    return int((shifted_targets(batch.labels, batch.segment_ids) != -100).sum())


class SFTObjective:
    """Token cross-entropy on the labelled tokens; every loss token of a window weighs the same."""

    name = "sft"
    weight_name = "loss_tokens"

    def batches(self, examples: list, epoch: int, cfg) -> list:
        from ..data import batches_for_epoch

        return batches_for_epoch(examples, cfg.batch_size, epoch, cfg.seed, pack=cfg.pack, max_length=cfg.max_length)

    def weight(self, batch) -> int:
        return count_loss_tokens(batch)

    def loss_sum(self, model, batch) -> tuple:
        loss, n = lm_loss_sum(model, batch)
        return loss, n, {}

    def evaluate(self, model, examples: list, cfg) -> float:
        return heldout_loss(model, examples, cfg.batch_size, cfg.max_length, cfg.seed)
