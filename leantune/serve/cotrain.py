"""Fine-tuning inside the serving loop: FlexLLM's co-serving (arXiv 2402.18789; `anchors.md` §5.2).

A fine-tuning job trains one LoRA adapter of the served model, a little in every iteration of the
serving loop, with whatever token budget inference leaves over:

- **forward in token chunks.** The current training sequence is fed through the same packed forward as
  the inference tokens (no grad), like a chunked prefill: its K/V go into the paged cache so the next
  chunk attends to the earlier ones, and every layer's input is kept for the training tokens only.
- **backward in layer slices.** Once the sequence is forwarded, the loss and dL/dh of the last layer are
  computed from the kept output, a few tokens per unit (the LM head is ~8 layers' worth of work on
  SmolLM2: in one piece it would be the longest stall a request sees); then each iteration recomputes `k`
  layers, top-down, from their kept inputs with full causal attention and back-propagates through them. Frozen weights keep nothing; the
  adapter's gradients accumulate across the slices.
- **optimizer step** after `batch_size` sequences, with the loss normalized by the loss tokens of the
  whole batch (token-weighted, as `train.loop` does), so the update equals a plain training step on that
  batch (tested).

The trainer holds only explicit state: where it is in the data, the phase, the kept activations and the
gradient flowing down. The engine decides how many tokens and layers it gets per iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import epoch_order
from ..methods.base import adapter_slots, trainable_parameters
from ..models.llama import ForwardMeta
from ..optim import build_optimizer
from ..routing import Routing
from ..train.loss import chunked_ce_sum, shifted_targets
from ..train.step import StepRule, optimizer_step
from .ft_defaults import FineTuneDefaults


@dataclass
class CoTrainConfig:
    n_epochs: int = FineTuneDefaults.n_epochs
    batch_size: int = FineTuneDefaults.batch_size  # sequences per optimizer step
    learning_rate: float = FineTuneDefaults.lr
    warmup_steps: int = 0
    schedule: str = "linear"  # as OpenAI's fine-tuning decays the lr
    seed: int = 0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # a DPO job's (`serve.cotrain_dpo`); TRL's and the DPO paper's default

    def __post_init__(self):
        for name in ("n_epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")


def token_hits(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> int:
    """How many `targets` (n,) are the argmax of the LM head on `hidden` (n, C): a token accuracy's numerator.
    No grad; in chunks, so no (n, V) logits are ever whole."""
    with torch.no_grad():
        return sum(int((head(h).argmax(-1) == t).sum()) for h, t in zip(hidden.split(chunk), targets.split(chunk)))


def loss_unit_share(model) -> float:
    """The fraction of a sequence whose loss costs about one layer's backward: the LM head's forward and
    backward over n tokens is ~4 n V C FLOPs, a layer's recomputed forward and backward over T tokens
    ~4 T P_layer, so n / T = P_layer / (V C)."""
    c = model.config
    layer = sum(p.numel() for p in model.layer_module(0).parameters())
    return min(1.0, layer / (c.vocab_size * c.hidden_size))


class CoTrainer:
    """The phase machine of one job: FWD (chunks) -> LOSS -> BWD (layer slices) -> next sequence."""

    # the metrics of each step that go into the job's "metrics" events (OpenAI's event data)
    event_keys: tuple = ("step", "train_loss", "train_mean_token_accuracy", "lr", "total_steps")
    # does a backward unit forward its own sequence (instead of the engine's forward chunks)?
    forwards_in_backward: bool = False

    def __init__(self, model, adapter: str, examples: list, cfg: CoTrainConfig, step: int = 0,
                 loss_share: float | None = None):
        """loss_share: tokens of a loss unit as a fraction of the sequence (default: what makes a unit cost
        about one layer's backward, `loss_unit_share`)."""
        if not examples:
            raise ValueError("a fine-tuning job needs at least one example")
        self.model, self.adapter, self.examples, self.cfg = model, adapter, examples, cfg
        self.loss_share = loss_unit_share(model) if loss_share is None else loss_share
        self.slot = adapter_slots(model)[adapter]
        self.params = list(trainable_parameters(model, adapter).values())
        self.opt = build_optimizer("adamw", self.params, lr=cfg.learning_rate, weight_decay=0.0)
        self.steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.n_epochs
        self.rule = StepRule(cfg.learning_rate, self.total_steps, cfg.warmup_steps, cfg.schedule,
                             max_grad_norm=cfg.max_grad_norm)
        self.step = step  # optimizer steps done
        self.trained_tokens = 0
        self._start_batch()

    # -- where we are in the data ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _start_batch(self) -> None:
        self.phase, self.pos, self.batch_i, self.loss_sum = "fwd", 0, 0, 0.0
        self.batch_start_tokens = self.trained_tokens  # what a checkpoint of the last step records
        self.hits = 0  # loss tokens of the batch so far whose target is the head's argmax (token accuracy)
        self.caps: list[list[torch.Tensor]] = []
        self.grad = None
        if self.done:
            self.batch = []
            return
        order = epoch_order(len(self.examples), self.epoch, self.cfg.seed)
        b = self.step % self.steps_per_epoch
        self.batch = [self.examples[i] for i in order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]]
        self.batch_tokens = self._batch_weight()

    def _batch_weight(self) -> int:
        """What the batch's loss is a mean over: its loss tokens (token-weighted, as `train.loop`)."""
        return sum(ex.num_loss_tokens for ex in self.batch)

    @property
    def seq(self):
        return self.batch[self.batch_i]

    # -- forward chunks ------------------------------------------------------------------------------
    def fwd_wanted(self) -> int:
        """Tokens of the current sequence still to forward (0 outside the forward phase)."""
        return len(self.seq) - self.pos if self.phase == "fwd" and not self.done else 0

    def fwd_chunk(self, n: int) -> tuple[list[int], int]:
        """(token ids, start position) of the next n tokens to put in the packed step."""
        return self.seq.input_ids[self.pos:self.pos + n], self.pos

    def fwd_done(self, captures: list[torch.Tensor]) -> bool:
        """Keep the chunk's layer inputs; True when the whole sequence has been forwarded."""
        n = captures[0].shape[0]
        if not self.caps:
            self.caps = [[] for _ in captures]
        for kept, c in zip(self.caps, captures):
            kept.append(c)
        self.pos += n
        if self.pos == len(self.seq):
            self.caps = [torch.cat(c) for c in self.caps]  # (T, C) per layer boundary
            self.phase = "loss"
            return True
        return False

    def at_sequence_start(self) -> bool:
        """Is the current sequence still untouched (so `train_sequence` may take it whole)?"""
        return self.fwd_wanted() > 0 and self.pos == 0

    def train_sequence(self) -> bool:
        """The current sequence's forward, loss and backward at once, as a plain training step does (its
        activations kept by autograd, no recompute), when it has not begun its chunked forward: what an
        iteration with no request in it does (nothing waits on it). True when the batch's grads are complete.
        The gradients equal the chunked path's (tested)."""
        assert self.at_sequence_start(), "the sequence is under way"
        ex, dev = self.seq, next(self.model.parameters()).device
        ids = torch.tensor([ex.input_ids], device=dev)  # (1, T)
        route = Routing(torch.tensor([self.slot], device=dev), [self.slot])
        # lm_loss_sum's path, spelled out for its hidden states (the token accuracy); no MoE aux loss, as the
        # chunked path (`_loss`) has none
        tgt = shifted_targets(torch.tensor([ex.labels], device=dev))  # (1, T)
        sel = tgt != -100
        with torch.enable_grad():
            hidden = self.model.hidden(ids, ForwardMeta(positions=torch.arange(len(ex), device=dev)[None],
                                                        adapter_ids=route))  # (1, T, C)
            h = hidden[sel]  # (n, C)
            loss = chunked_ce_sum(h, self.model.head_module(), tgt[sel]) / self.batch_tokens
            loss.backward()
        self.hits += token_hits(self.model.head_module(), h.detach(), tgt[sel])
        self.loss_sum += float(loss.detach())
        return self._sequence_done()

    # -- backward slices ----------------------------------------------------------------------------
    def bwd_wanted(self) -> bool:
        return self.phase in ("loss", "bwd")

    def _loss(self, rest: bool = False) -> None:
        """One loss unit: the final norm, LM head and cross-entropy of the next few tokens (with `rest`, all
        the tokens left), and their rows of dL/dh (the last layer's output); per-token math, so the units add
        up to the whole sequence's."""
        m, out = self.model, self.caps[-1]  # (T, C): the last layer's output
        T = out.shape[0]
        if self.grad is None:
            self.grad, self.loss_pos = torch.zeros_like(out)[None], 0
        a = self.loss_pos
        b = T if rest else min(T, a + max(1, math.ceil(self.loss_share * T)))
        # on the host: which rows carry a loss is known without waiting for the device
        tgt = shifted_targets(torch.tensor([self.seq.labels]))[0, a:b]
        keep = (tgt != -100).nonzero()[:, 0]
        if keep.numel():
            x = out[a:b].detach().requires_grad_()  # (n, C)
            h = m.final_norm(x).index_select(0, keep.to(out.device))
            target = tgt[keep].to(out.device)
            loss = chunked_ce_sum(h, m.head_module(), target) / self.batch_tokens
            loss.backward()
            self.loss_sum += float(loss.detach())
            self.hits += token_hits(m.head_module(), h.detach(), target)
            self.grad[0, a:b] = x.grad
        self.loss_pos = b
        if b == T:
            self.layer, self.phase = m.num_layers - 1, "bwd"

    def _layer_backward(self, i: int) -> None:
        m, x0 = self.model, self.caps[i]
        T = x0.shape[0]
        x = x0[None].requires_grad_()  # (1, T, C)
        pos = torch.arange(T, device=x.device)[None]
        # one slot for the whole sequence: the layer's linears and SwiGLU take the fused LoRA ops
        meta = ForwardMeta(positions=pos, adapter_ids=Routing(torch.tensor([self.slot], device=x.device), [self.slot]))
        y = m.layer_forward(i, x, m.layer_context(x, meta))  # full causal attention over the sequence
        y.backward(self.grad)
        self.grad = x.grad
        self.caps[i + 1] = None  # its last use was as this layer's output; free it

    def backward_layers(self, k: int | None) -> bool:
        """Run up to k units of backward: the loss units first, then layers top-down; True when the
        batch's grads are complete. k=None: all that is left of the sequence's backward, its loss in one unit
        (nothing waits on it: on a CPU the LM head's fixed cost makes 8 units of 8 tokens cost 2.3x one of
        64 on SmolLM2)."""
        with torch.enable_grad():
            for _ in range(k if k is not None else 1 + self.model.num_layers):
                if self.phase == "loss":
                    self._loss(rest=k is None)
                elif self.layer >= 0:
                    self._layer_backward(self.layer)
                    self.layer -= 1
                else:
                    break
        if self.phase == "loss" or self.layer >= 0:
            return False
        return self._sequence_done()

    def _sequence_done(self) -> bool:
        self.trained_tokens += len(self.seq)
        self.batch_i, self.pos, self.caps, self.grad, self.phase = self.batch_i + 1, 0, [], None, "fwd"
        return self.batch_i == len(self.batch)

    def valid_metrics(self, examples: list) -> dict:
        """OpenAI's validation metrics of `examples` under the job's adapter: the token-mean loss (equal to
        `train.loss.heldout_loss`, tested) and the token accuracy; no grad, one example at a time (no padding,
        no more memory than a training sequence takes)."""
        m, total, hits, n = self.model, 0.0, 0, 0
        dev = next(m.parameters()).device
        route = Routing(torch.tensor([self.slot], device=dev), [self.slot])
        with torch.no_grad():
            for ex in examples:
                tgt = shifted_targets(torch.tensor([ex.labels], device=dev))  # (1, T)
                sel = tgt != -100
                if not sel.any():
                    continue
                hidden = m.hidden(torch.tensor([ex.input_ids], device=dev),
                                  ForwardMeta(positions=torch.arange(len(ex), device=dev)[None], adapter_ids=route))
                total += float(chunked_ce_sum(hidden[sel], m.head_module(), tgt[sel]))
                hits += token_hits(m.head_module(), hidden[sel], tgt[sel])
                n += int(sel.sum())
        return {"valid_loss": total / max(n, 1), "valid_mean_token_accuracy": hits / max(n, 1)}

    def apply_step(self) -> dict:
        """Clip, step the optimizer with the scheduled lr, and move to the next batch; returns metrics."""
        if not math.isfinite(self.loss_sum):  # before the step: a NaN update never reaches the adapter
            raise FloatingPointError(f"training loss became {self.loss_sum} at step {self.step + 1}; "
                                     "lower learning_rate_multiplier or check the training file")
        # no train hooks: the job trains a plain LoRA adapter, and the hooks of the served model belong to the
        # adapters it serves
        lr, gnorm = optimizer_step(self.opt, self.params, self.rule, self.step)
        self.step += 1
        metrics = {"step": self.step, "train_loss": self.loss_sum, "lr": lr, "grad_norm": gnorm,
                   "epoch": self.epoch, "total_steps": self.total_steps}
        if "train_mean_token_accuracy" in self.event_keys:
            metrics["train_mean_token_accuracy"] = self.hits / max(self.batch_tokens, 1)
        self._start_batch()
        return metrics
