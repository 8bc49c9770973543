"""Preference pairs -> `PreferenceExample`s: the prompt's tokens and the chosen and rejected sequences with
loss masks on their answers, what a pairwise objective (DPO, Rafailov et al. 2023) scores.

Rows are OpenAI's preference fine-tuning shape (`{"input": {"messages", "tools"?}, "preferred_output",
"non_preferred_output"}`) or TRL's (`{"prompt", "chosen", "rejected"}`, strings or message lists), checked
by `rows.py` (a pair whose chosen equals its rejected is refused there). A message-list pair renders
prompt + answer with the chat template and trains only the answer's assistant turns; a string pair is a user
prompt and an assistant answer under the chat template, or plain text without one, as prompt/completion rows
are (`formats.prompt_reply_ids`). Both sequences start with `prompt_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .chat import IGNORE_INDEX, chat_ids, render
from .formats import (
    KIND,
    Example,
    check_load_options,
    fit_length,
    plain_prompt_ids,
    prompt_reply_ids,
    read_canonical,
    warn_dropped,
)
from .readers import DataError


@dataclass
class PreferenceExample:
    """One pair: `chosen` and `rejected` each hold the whole sequence (prompt + answer) with labels only on the
    answer; `prompt_ids` is the prompt both begin with."""

    prompt_ids: list[int]
    chosen: Example
    rejected: Example
    line: int = 0
    source: str = field(default="", compare=False)
    # the reference policy's summed log-probs of (chosen, rejected) when a DPO run computes them before
    # training (`train.dpo.precompute_reference`); None otherwise
    ref_logps: tuple[float, float] | None = field(default=None, compare=False)


def format_pair(row: dict, tokenizer, where: str) -> tuple[list[int], tuple, tuple]:
    """(prompt_ids, (chosen ids, labels), (rejected ids, labels)) of a canonical preference row."""
    prompt, tools = row["prompt"], row.get("tools")
    if isinstance(prompt, str) and not tokenizer.chat_template:
        seqs = [prompt_reply_ids(prompt, row[k], tokenizer, where) for k in ("chosen", "rejected")]
        return _checked(plain_prompt_ids(prompt, tokenizer), seqs, where)
    if isinstance(prompt, str):  # a user turn and an assistant turn, as prompt/completion rows under a template
        prompt = [{"role": "user", "content": prompt}]
        answers = [[{"role": "assistant", "content": row[k]}] for k in ("chosen", "rejected")]
    else:
        answers = [row["chosen"], row["rejected"]]
    extra = {"tools": tools} if tools else {}
    prompt_ids = tokenizer.encode(render(tokenizer, prompt, True, where, **extra), add_special_tokens=False)
    seqs = [chat_ids(prompt + a, tokenizer, where, tools=tools, train_from=len(prompt)) for a in answers]
    return _checked(prompt_ids, seqs, where)


def _checked(prompt_ids: list[int], seqs: list, where: str) -> tuple[list[int], tuple, tuple]:
    for name, (ids, labels) in zip(("chosen", "rejected"), seqs):
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{where}: the chat template renders the prompt differently when the {name} answer "
                            "follows it, so the answer's tokens cannot be scored apart from the prompt; use a "
                            "template whose turns render the same in every prefix")
        if all(t == IGNORE_INDEX for t in labels):
            raise DataError(f"{where}: the {name} answer has no trained tokens (weight 0 or empty); give it an "
                            "assistant answer to rank")
        labels[0] = IGNORE_INDEX  # nothing precedes the first token
    return prompt_ids, seqs[0], seqs[1]


def load_preference_dataset(
    path: str | Path, tokenizer, max_length: int, on_too_long: str = "error", split: str | None = None,
    columns: dict[str, str] | None = None, what: str = "--data",
) -> list[PreferenceExample]:
    """Every pair under `path`, tokenized and fitted into max_length like `load_dataset` (a pair is cut or
    dropped as a whole; one left without answer tokens on either side is dropped with a warning)."""
    check_load_options(max_length, on_too_long, None)
    fmt, rows = read_canonical(path, split, columns, None, what)
    if KIND[fmt] != "preference":
        raise DataError(f"{path}: has no preference pairs (its rows are {fmt} rows); {what} of a preference "
                        "objective (--objective dpo) needs rows with prompt/chosen/rejected (TRL) or "
                        "input/preferred_output/non_preferred_output (OpenAI); to finetune on these rows, drop "
                        "--objective dpo (supervised finetuning)")
    out, too_long, no_loss = [], 0, 0
    for row, data in rows:
        prompt_ids, *seqs = format_pair(data, tokenizer, row.where)
        fitted = [fit_length(ids, labels, max_length, on_too_long, row.where) for ids, labels in seqs]
        if any(f is None for f in fitted):
            too_long += 1
            continue
        chosen, rejected = (Example(ids, labels, row.n, row.source) for ids, labels in fitted)
        if not chosen.num_loss_tokens or not rejected.num_loss_tokens:
            no_loss += 1
            continue
        out.append(PreferenceExample(prompt_ids, chosen, rejected, row.n, row.source))
    warn_dropped(path, too_long, no_loss, max_length)
    if not out:
        raise DataError(f"{path}: no pairs left after fitting them into max_length={max_length}; raise --max-length")
    return out
