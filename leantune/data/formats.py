"""Formats: checked rows (`rows.py`) -> token ids + labels with -100 on every token the model should not learn.

Supervised (SFT) shapes:

- `chat` and `sharegpt`: rendered with the chat template (`chat.py`: assistant masks from `{% generation %}`
  blocks or from rendering prefixes; `weight: 0` turns left out; tools rendered as the template defines them).
- `alpaca`: `{"instruction", "input"?, "output"}` (Stanford Alpaca, Taori et al. 2023).
- `completion`: `{"prompt", "completion"}`.
- `text`: `{"text"}`: loss on every token; BOS in front when the tokenizer has one, EOS at the end.

Alpaca and completion rows become a user turn + an assistant turn when the tokenizer has a chat template;
without one they use the Alpaca prompt text / the raw prompt, and EOS is appended to the answer.
Preference pairs (`preference.py`) and classification rows (`classification.py`) have loaders of their own;
`load_dataset` (SFT) refuses them, naming the objective they need.

Label convention (Hugging Face's): `labels` is aligned with `input_ids` and the loss shifts it, i.e.
logits at t predict labels[t + 1]. The first label of every example is always -100 (no token precedes
it), so counting `labels != -100` gives exactly the tokens a shifted loss sums over, and a packed row
never asks a sample to predict the first token of the next one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import IGNORE_INDEX, chat_ids
from .readers import DataError
from .rows import FORMATS, KIND, ROLES, canonical, check_row, detect_format, read_canonical  # noqa: F401

ON_TOO_LONG = ("error", "truncate", "drop")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# What a data set of each non-SFT kind needs instead of supervised finetuning.
NOT_SFT = {
    "preference": "preference pairs (prompt, chosen, rejected) train with a preference objective (DPO: "
                  "`leantune finetune --objective dpo`), not with supervised finetuning; to finetune on the "
                  "preferred answers, write them as prompt/completion or chat rows",
    "classification": "classification rows (text, label) train a classifier, which `leantune finetune` does not "
                      "do yet; to train a causal LM to answer with the label, write the rows as prompt/completion",
}

log = logging.getLogger("leantune.data")


# ---- formatting ----------------------------------------------------------------------------------------
def format_example(row: dict, tokenizer, fmt: str, where: str = "<row>") -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one row of format `fmt`; `where` prefixes errors."""
    return sft_ids(canonical(row, fmt, where), tokenizer, fmt, where)


def sft_ids(row: dict, tokenizer, fmt: str, where: str) -> tuple[list[int], list[int]]:
    """`format_example` for a row already in canonical form."""
    if KIND[fmt] != "sft":
        raise DataError(f"{where}: {NOT_SFT[KIND[fmt]]}")
    if fmt in ("chat", "sharegpt"):
        ids, labels = chat_ids(row["messages"], tokenizer, where, tools=row.get("tools"))
    elif fmt == "text":
        ids = _bos(tokenizer) + tokenizer.encode(row["text"], add_special_tokens=False) + [_eos(tokenizer)]
        labels = list(ids)
    else:
        prompt, reply = _prompt_reply(row, fmt)
        ids, labels = prompt_reply_ids(prompt, reply, tokenizer, where, _plain_prompt(row, fmt))
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token: it is never a target
    return ids, labels


def prompt_reply_ids(prompt: str, reply: str, tokenizer, where: str,
                     plain_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """A user prompt and its answer: a user + an assistant turn under the chat template, else the plain
    prompt text (`plain_prompt`, default the prompt) followed by the answer and EOS."""
    if tokenizer.chat_template:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return chat_ids(msgs, tokenizer, where)
    return _plain_ids(prompt if plain_prompt is None else plain_prompt, reply, tokenizer)


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
    p = plain_prompt_ids(prompt, tokenizer)
    r = tokenizer.encode(reply, add_special_tokens=False) + [_eos(tokenizer)]
    return p + r, [IGNORE_INDEX] * len(p) + r


def plain_prompt_ids(prompt: str, tokenizer) -> list[int]:
    """A prompt without a chat template: BOS (when the tokenizer has one) + its tokens."""
    return _bos(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)


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
    path: str | Path, tokenizer, max_length: int, on_too_long: str = "error", fmt: str | None = None,
    split: str | None = None, columns: dict[str, str] | None = None, what: str = "--data",
) -> list[Example]:
    """Read, check, tokenize and fit every row under `path` (any container of `readers.py`; `split` picks a
    DatasetDict's split, `columns` maps leantune's keys to the data's column names). `fmt=None` detects the
    format from the first row. `on_too_long`: "error" (stop, naming the row), "truncate" (keep the first
    max_length tokens) or "drop". Examples left without loss tokens are dropped with a warning."""
    check_load_options(max_length, on_too_long, fmt)
    fmt, rows = read_canonical(path, split, columns, fmt, what)
    if KIND[fmt] != "sft":
        raise DataError(f"{path}: {NOT_SFT[KIND[fmt]]}")
    encoded = ((*sft_ids(data, tokenizer, fmt, row.where), row.n, row.source, row.where) for row, data in rows)
    return fit_examples(encoded, max_length, on_too_long, path)


def fit_examples(encoded, max_length: int, on_too_long: str, path) -> list[Example]:
    """Examples of `encoded` rows, (ids, labels, line, source, where) each, fitted into `max_length`: a row too
    long is an error naming it, or cut, or dropped (`on_too_long`); a row left with no loss token is dropped;
    the drops are reported once, and no example left at all is an error naming `path`."""
    examples, too_long, no_loss = [], 0, 0
    for ids, labels, line, source, where in encoded:
        fitted = fit_length(ids, labels, max_length, on_too_long, where)
        if fitted is None:
            too_long += 1
            continue
        ex = Example(*fitted, line, source)
        if ex.num_loss_tokens == 0:
            no_loss += 1
            continue
        examples.append(ex)
    warn_dropped(path, too_long, no_loss, max_length)
    if not examples:
        raise DataError(f"{path}: no examples left after fitting them into max_length={max_length}; "
                        "raise --max-length")
    return examples


def fit_length(ids: list[int], labels: list[int], max_length: int, on_too_long: str,
               where: str) -> tuple[list[int], list[int]] | None:
    """(ids, labels) within max_length: unchanged, cut ("truncate"), None ("drop") or a DataError ("error")."""
    if len(ids) <= max_length:
        return ids, labels
    if on_too_long == "error":
        raise _too_long_error(where, len(ids), max_length)
    if on_too_long == "drop":
        return None
    return ids[:max_length], labels[:max_length]


def check_load_options(max_length: int, on_too_long: str, fmt: str | None) -> None:
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


def warn_dropped(path, too_long: int, no_loss: int, max_length: int) -> None:
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
