"""Formats: data rows -> token ids + labels with -100 on every token the model should not learn.

Four row formats, detected per file from the keys of its first row and checked on every row:

- `chat`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, rendered with the
  tokenizer's chat template. Assistant turn i is found as the token difference between rendering
  `messages[:i]` with the generation prompt and rendering `messages[:i+1]` (the approach of TRL's and
  torchtune's assistant masks), so the loss covers each assistant turn and the end-of-turn tokens the
  template writes after it: the model learns to stop.
- `alpaca`: `{"instruction", "input"?, "output"}` (Stanford Alpaca, Taori et al. 2023).
- `completion`: `{"prompt", "completion"}`.
- `text`: `{"text"}`: loss on every token; BOS in front when the tokenizer has one, EOS at the end.

Alpaca and completion rows become a user turn + an assistant turn when the tokenizer has a chat template;
without one they use the Alpaca prompt text / the raw prompt, and EOS is appended to the answer.

Label convention (Hugging Face's): `labels` is aligned with `input_ids` and the loss shifts it, i.e.
logits at t predict labels[t + 1]. The first label of every example is always -100 (no token precedes
it), so counting `labels != -100` gives exactly the tokens a shifted loss sums over, and a packed row
never asks a sample to predict the first token of the next one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch

from .readers import DataError, read_jsonl_numbered

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ON_TOO_LONG = ("error", "truncate", "drop")
# Required keys per format, in detection order; alpaca's "input" is optional.
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

log = logging.getLogger("leantune.data")


def _format_list() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMATS.items()) + " (alpaca may add input)"


# ---- detection and row checks -------------------------------------------------------------------------
def detect_format(row: dict, where: str) -> str:
    """The format whose required keys the row has; else the first format it has any key of (so that the
    row check then names the missing key); else a DataError listing the formats."""
    for name, keys in FORMATS.items():
        if all(k in row for k in keys):
            return name
    for name, keys in FORMATS.items():
        if any(k in row for k in keys):
            return name
    raise DataError(
        f"{where}: cannot tell the data format from the keys {sorted(row)}; "
        f"use one of the formats (required keys) {_format_list()}"
    )


def check_row(row: dict, fmt: str, where: str) -> None:
    """Raise a DataError naming `where` and the field when `row` does not fit format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for key in FORMATS[fmt]:
        if key not in row:
            raise DataError(
                f"{where}: missing key {key!r} for the {fmt} format (required: {', '.join(FORMATS[fmt])}); "
                "add it, or keep one format per file"
            )
    if fmt == "chat":
        _check_messages(row["messages"], where)
        return
    for key in FORMATS[fmt]:
        _check_str(row[key], key, where)
    if fmt == "alpaca" and row.get("input") is not None:
        _check_str(row["input"], "input", where)


def _check_str(value, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}; quote it as text")


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {m['role']!r}; allowed roles: {', '.join(ROLES)}"
            )
        _check_str(m["content"], f"messages[{i}].content", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
            "add an assistant message or remove the row"
        )


# ---- formatting ----------------------------------------------------------------------------------------
def format_example(row: dict, tokenizer, fmt: str, where: str = "<row>") -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one row of format `fmt`; `where` prefixes errors."""
    check_row(row, fmt, where)
    if fmt == "chat":
        ids, labels = _chat_ids(row["messages"], tokenizer, where)
    elif fmt == "text":
        ids = _bos(tokenizer) + tokenizer.encode(row["text"], add_special_tokens=False) + [_eos(tokenizer)]
        labels = list(ids)
    else:
        prompt, reply = _prompt_reply(row, fmt)
        if tokenizer.chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            ids, labels = _chat_ids(msgs, tokenizer, where)
        else:
            ids, labels = _plain_ids(_plain_prompt(row, fmt), reply, tokenizer)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token: it is never a target
    return ids, labels


def _prompt_reply(row: dict, fmt: str) -> tuple[str, str]:
    """User text and answer of an alpaca / completion row, for chat templates."""
    if fmt == "completion":
        return row["prompt"], row["completion"]
    extra = row.get("input") or ""
    return row["instruction"] + ("\n\n" + extra if extra else ""), row["output"]


def _plain_prompt(row: dict, fmt: str) -> str:
    """Prompt text of an alpaca / completion row for a tokenizer without a chat template."""
    if fmt == "completion":
        return row["prompt"]
    if row.get("input"):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def _eos(tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise ValueError(
            "the tokenizer has no eos_token, so the model cannot learn to stop; "
            "set eos_token in the model folder's tokenizer_config.json"
        )
    return tokenizer.eos_id


def _plain_ids(prompt: str, reply: str, tokenizer) -> tuple[list[int], list[int]]:
    # Prompt and answer are encoded apart, as generation will see them: encode(prompt), then continue.
    p = _bos(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(reply, add_special_tokens=False) + [_eos(tokenizer)]
    return p + r, [IGNORE_INDEX] * len(p) + r


def _render(tokenizer, messages: list[dict], gen: bool, where: str) -> list[int]:
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=gen)
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: the chat template rejected this conversation: {e}; fix the messages") from None


def _chat_ids(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not tokenizer.chat_template:
        raise DataError(
            f"{where}: chat rows need a tokenizer with a chat template, and this one has none; use a chat "
            "(instruct) model, or convert the rows to prompt/completion or text"
        )
    full = _render(tokenizer, messages, False, where)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _prefix_len(_render(tokenizer, messages[:i], True, where), full, i, where)
        end = _prefix_len(_render(tokenizer, messages[: i + 1], False, where), full, i, where)
        if end <= start:
            raise DataError(f"{where}: the chat template renders no tokens for assistant messages[{i}]")
        labels[start:end] = full[start:end]
    return full, labels


def _prefix_len(part: list[int], full: list[int], i: int, where: str) -> int:
    if full[: len(part)] != part:
        raise DataError(
            f"{where}: cannot find the tokens of assistant messages[{i}]: the chat template does not render "
            "the conversation up to that turn as a prefix of the whole (it renders earlier turns differently "
            "once later turns exist, or tokens merge across the turn boundary); use a template whose turns "
            "render the same in every prefix, or split the conversation into prompt/completion rows"
        )
    return len(part)


# ---- data sets -----------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized training example; `line` is its line in the data file (0 when not from a file)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.labels)


def load_dataset(
    path: str | Path, tokenizer, max_length: int, on_too_long: str = "error", fmt: str | None = None
) -> list[Example]:
    """Read, check, tokenize and fit every row of a JSONL file. `fmt=None` detects the format from the first
    row. `on_too_long`: "error" (stop, naming the line), "truncate" (keep the first max_length tokens) or
    "drop". Examples left without loss tokens are dropped with a warning."""
    _check_load_options(max_length, on_too_long, fmt)
    rows = read_jsonl_numbered(path)
    fmt = fmt or detect_format(rows[0][1], f"{path}:{rows[0][0]}")
    examples, too_long, no_loss = [], 0, 0
    for line, row in rows:
        where = f"{path}:{line}"
        ids, labels = format_example(row, tokenizer, fmt, where)
        if len(ids) > max_length:
            if on_too_long == "error":
                raise _too_long_error(where, len(ids), max_length)
            if on_too_long == "drop":
                too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        ex = Example(ids, labels, line, str(path))
        if ex.num_loss_tokens == 0:
            no_loss += 1
            continue
        examples.append(ex)
    _warn_dropped(path, too_long, no_loss, max_length)
    if not examples:
        raise DataError(f"{path}: no examples left after fitting them into max_length={max_length}; "
                        "raise --max-length")
    return examples


def _check_load_options(max_length: int, on_too_long: str, fmt: str | None) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}; set --max-length")
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long must be one of {', '.join(ON_TOO_LONG)}, got {on_too_long!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)} or leave it unset")


def _too_long_error(where: str, n: int, max_length: int) -> DataError:
    return DataError(
        f"{where}: example has {n} tokens, more than max_length={max_length}; raise --max-length to at "
        f"least {n}, or pass --truncate to cut long examples (on_too_long='truncate'), "
        "or skip them with on_too_long='drop'"
    )


def _warn_dropped(path, too_long: int, no_loss: int, max_length: int) -> None:
    if too_long:
        log.warning("%s: dropped %d example(s) longer than max_length=%d", path, too_long, max_length)
    if no_loss:
        log.warning(
            "%s: dropped %d example(s) with no loss tokens left (the answer was cut off by max_length=%d, "
            "or empty)", path, no_loss, max_length,
        )


def split_eval(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, eval) split: a `seed`-ed permutation picks round(n * fraction) eval examples
    (at least one when the fraction is > 0); both parts keep file order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}; set --eval-fraction")
    if eval_fraction == 0.0:
        return list(examples), []
    n = len(examples)
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise DataError(
            f"eval_fraction={eval_fraction} of {n} example(s) leaves nothing to train on; "
            "lower --eval-fraction or add data"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]
