"""What `/v1/embeddings` computes: the masked mean of a model's last hidden state over an input's tokens,
L2-normalized (sentence-transformers' mean pooling followed by `Normalize`), from either

- the served decoder (base model or adapter): `decoder_forward`, run in the engine thread between iterations, or
- an encoder given as `leantune serve --embedding-model` (e.g. all-MiniLM-L6-v2, a sentence-transformers folder):
  `Encoder`, loaded through transformers (the `leantune[encoders]` extra, as self-training's encoders: leantune's
  own model zoo is decoder-only) and run in a worker thread, beside the engine.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.llama import ForwardMeta
from ..models.pooling import mean_pool
from ..routing import Routing


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of inputs grouped in order so that each group's padded size (rows x longest) stays within
    `budget` tokens; an input longer than the budget goes alone."""
    groups, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) + 1) * max(longest, n) > budget:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return groups + [cur] if cur else groups


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids (pad id 0: masked out, whatever token it is) and (B,) lengths."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)
    return ids, torch.tensor([len(r) for r in rows], device=device)


# -- the served decoder ------------------------------------------------------------------------------------------
@dataclass
class Held:
    """The adapter an embedding request holds a reference on while its micro-batches run (None: the base)."""

    entry: object | None


def hold(engine, model: str, who: str) -> Held:
    """Engine thread. Resolve `model` and take a reference, as a generation's sequences do: an unload or in-place
    reload between two micro-batches retires the adapter only after the request is done, and --max-loras does
    not evict it from the tree while it is held."""
    entry = engine.resolve(model, who)  # KeyError: unknown to this caller
    if entry is not None:
        entry.refs += 1
    return Held(entry)


def decoder_forward(engine, rows: list[list[int]], held: Held) -> torch.Tensor | None:
    """Engine thread. The embeddings (B, C) of one micro-batch of token-id rows through the held adapter, made
    resident first (--max-loras); None while every resident adapter is in use (call again later).

    Why `engine.call` and not engine work (a scheduled sequence): an embedding needs one forward and no KV cache,
    so it runs as a plain batched forward without a cache (`cache=None`) between two iterations: the paged KV
    cache, the block manager and the scheduler are untouched, the adapter is routed by this forward's own
    `adapter_ids` (no adapter can be loaded or unloaded mid-forward, since commands run in this thread too), and
    there is nothing to abort. The caller bounds each micro-batch to about one iteration's token budget and
    submits the next only when this one is done, so running requests keep decoding in between."""
    slot = engine.adapter_slot(held.entry)  # ValueError: its folder cannot be loaded
    if slot is None:
        return None
    device = engine.runner.device
    ids, lens = _padded(rows, device)  # (B, T), (B,)
    route = Routing(torch.full((len(rows),), slot, device=device), [slot] * len(rows))  # (B,): one adapter
    # causal attention: a row's valid tokens never see its padding, so seq_lens only keeps the pad rows finite
    with torch.no_grad():
        hidden = engine.model.hidden(ids, ForwardMeta(seq_lens=lens, adapter_ids=route))  # (B, T, C)
        return mean_pool(hidden, torch.arange(ids.shape[1], device=device)[None] < lens[:, None]).cpu()


# -- an encoder beside it ----------------------------------------------------------------------------------------
@dataclass
class Encoder:
    """A Hugging Face encoder folder (BERT family; a sentence-transformers folder's `0_Transformer` at its root)
    served under `name`, mean-pooled and L2-normalized."""

    name: str
    model: object  # transformers AutoModel, fp32, eval mode
    tokenizer: object  # transformers AutoTokenizer
    max_len: int  # longest input in tokens (sentence-transformers' max_seq_length, else the position table)
    hidden_size: int
    vocab_size: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time: bounded memory

    @classmethod
    def load(cls, spec: str) -> Encoder:
        """`PATH` or `NAME=PATH` (NAME defaults to the folder's name)."""
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise ValueError(f"--embedding-model must be DIR or NAME=DIR, got {spec!r}")
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"--embedding-model {spec}: {folder} is not a Hugging Face model folder (no config.json)")
        _check_sentence_transformers_config(folder)
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ImportError("--embedding-model loads the encoder through transformers; install the extra: "
                              "pip install 'leantune[encoders]'") from None
        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        st = folder / "sentence_bert_config.json"
        max_len = json.loads(st.read_text())["max_seq_length"] if st.is_file() else model.config.max_position_embeddings
        return cls(name, model, AutoTokenizer.from_pretrained(folder), int(max_len), model.config.hidden_size,
                   model.config.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]  # with the encoder's special tokens ([CLS] ... [SEP])

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Worker thread. The embeddings (B, C) of one micro-batch of token-id rows."""
        ids, lens = _padded(rows, "cpu")  # (B, T), (B,)
        mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()  # (B, T) bidirectional: pads masked
        with self.lock, torch.no_grad():
            return mean_pool(self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


def _check_sentence_transformers_config(folder: Path) -> None:
    """A sentence-transformers folder must pool as served (mean, then Normalize): refuse one that would not."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return  # a plain encoder folder: served mean-pooled and normalized, as the README says
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in json.loads(modules.read_text())]
    pooling = folder / "1_Pooling" / "config.json"
    modes = json.loads(pooling.read_text()) if pooling.is_file() else {}
    on = sorted(k for k, v in modes.items() if k.startswith("pooling_mode_") and v)
    if types[:3] != ["Transformer", "Pooling", "Normalize"] or len(types) > 3 or on != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"--embedding-model {folder}: its sentence-transformers modules {types} with pooling {on} "
                         "are not what leantune serves (Transformer, mean Pooling, Normalize)")
