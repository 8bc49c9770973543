"""Supervised rows as (prompt, gold answer) pairs, for objectives that replace the answer before training
(S3FT, `train.s3ft`): read them, build the token ids that ask the model for an answer, and tokenize a row with
another answer in the gold's place, the same way `formats.load_dataset` tokenizes the row itself.

Accepted shapes: chat / ShareGPT rows whose last message is an assistant turn (its text is the gold answer;
the messages before it are the prompt and only that last turn is trained), alpaca and prompt/completion rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .chat import IGNORE_INDEX, chat_ids, render
from .formats import _plain_ids, _plain_prompt, _prompt_reply, fit_examples, plain_prompt_ids
from .readers import DataError
from .rows import KIND, read_canonical

ANSWER_SHAPES = "chat or ShareGPT rows ending in an assistant turn, alpaca (instruction/output) or prompt/completion"


@dataclass
class Query:
    """What the model is asked: chat messages (rendered with the chat template) and the same request as plain
    text, used when the tokenizer has no chat template (None for chat rows, which need one)."""

    messages: list[dict]
    plain: str | None = None
    tools: list | None = None

    @classmethod
    def of_text(cls, text: str) -> "Query":
        return cls([{"role": "user", "content": text}], text)

    @property
    def text(self) -> str:
        """The last user message: what a judge sees as the prompt."""
        users = [m.get("content") or "" for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass
class AnswerRow:
    """One row of the data: its prompt (`query`), its gold answer, where it came from (for errors)."""

    index: int  # 0-based position in the data
    query: Query
    gold: str
    where: str = ""
    line: int = 0
    source: str = field(default="", compare=False)


def read_answer_rows(path: str | Path, split: str | None = None, columns: dict | None = None,
                     what: str = "--data", purpose: str = "--objective s3ft") -> list[AnswerRow]:
    """Every row under `path` as an AnswerRow; a shape without a single gold answer is one DataError naming the
    file (or row) and the shapes accepted."""
    fmt, rows = read_canonical(path, split, columns, None, what)
    if KIND[fmt] != "sft" or fmt == "text":
        raise DataError(f"{what} {path}: {purpose} needs a prompt and a gold answer per row, and these rows are "
                        f"in the {fmt} format; give {ANSWER_SHAPES}")
    out = []
    for i, (row, data) in enumerate(rows):
        query, gold = _split(data, fmt, row.where, purpose)
        out.append(AnswerRow(i, query, gold, row.where, row.n, row.source))
    return out


def _split(data: dict, fmt: str, where: str, purpose: str) -> tuple[Query, str]:
    if fmt not in ("chat", "sharegpt"):
        prompt, gold = _prompt_reply(data, fmt)
        return Query([{"role": "user", "content": prompt}], _plain_prompt(data, fmt)), gold
    msgs = data["messages"]
    last = msgs[-1]
    if last["role"] != "assistant" or "tool_calls" in last or last.get("weight", 1) == 0:
        raise DataError(f"{where}: {purpose} takes the last message as the gold answer, and it is not a trained "
                        "assistant turn with text (it is another role, has tool_calls, or weight 0); end each row "
                        "with the assistant answer to learn")
    context = [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:-1]]
    return Query(context, None, data.get("tools")), last.get("content") or ""


def query_ids(query: Query, tokenizer, where: str = "<query>") -> list[int]:
    """Token ids that ask for the answer: the chat template with its generation prompt, else the plain prompt."""
    if tokenizer.chat_template:
        extra = {"tools": query.tools} if query.tools else {}
        return tokenizer.encode(render(tokenizer, query.messages, True, where, **extra), add_special_tokens=False)
    return plain_prompt_ids(_need_plain(query, where), tokenizer)


def answer_ids(query: Query, answer: str, tokenizer, where: str = "<row>") -> tuple[list[int], list[int]]:
    """(ids, labels) of the query answered by `answer`, loss on the answer's tokens only (as SFT's)."""
    if tokenizer.chat_template:
        msgs = query.messages + [{"role": "assistant", "content": answer}]
        ids, labels = chat_ids(msgs, tokenizer, where, tools=query.tools, train_from=len(query.messages))
    else:
        ids, labels = _plain_ids(_need_plain(query, where), answer, tokenizer)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token (formats.sft_ids' convention)
    return ids, labels


def _need_plain(query: Query, where: str) -> str:
    if query.plain is None:
        raise DataError(f"{where}: chat rows need a tokenizer with a chat template, and this one has none; give "
                        "one with --chat-template, or convert the rows to prompt/completion")
    return query.plain


def answer_examples(rows: list[AnswerRow], answers: list[str], tokenizer, max_length: int,
                    on_too_long: str = "error", path: str | Path = "--data") -> list:
    """SFT examples of `rows` answered by `answers` (one each), fitted into `max_length` as `load_dataset`
    fits its rows: too long is an error naming the row, or cut, or dropped; no loss tokens left: dropped."""
    encoded = ((*answer_ids(row.query, answer, tokenizer, row.where), row.line, row.source, row.where)
               for row, answer in zip(rows, answers, strict=True))
    return fit_examples(encoded, max_length, on_too_long, path)
