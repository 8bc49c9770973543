"""Chat templates -> token ids + the loss mask of the assistant turns.

Two ways to find the assistant tokens, chosen by the template:

- A template with `{% generation %}...{% endgeneration %}` blocks (transformers' convention) marks them
  itself: every token that overlaps a block's characters is an assistant token, the rule of
  `apply_chat_template(return_assistant_tokens_mask=True)`, so the masks equal transformers'.
- Otherwise assistant turn i is the token difference between rendering `messages[:i]` with the generation
  prompt and rendering `messages[:i+1]` (the approach of TRL's and torchtune's masks); the template must
  render every prefix of the conversation as a prefix of the whole, else the row is refused by name.

Either way the loss covers each trained assistant turn and the end-of-turn tokens the template writes after
it (the model learns to stop); a turn with `weight: 0` is left out. Tools go to the template as `tools=`
and assistant `tool_calls` stay on their messages, rendered as the template defines them; a template that
does not mention them would drop them silently, so such a row is refused.

`--chat-template FILE|NAME` replaces the tokenizer's template: a Jinja file, or one of the built-in
templates in `templates/` (BUILTIN_TEMPLATES).
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import jinja2

from .readers import DataError

IGNORE_INDEX = -100
BUILTIN_TEMPLATES = ("chatml", "llama3", "zephyr")
_COMMENT = re.compile(r"{#.*?#}", re.S)
# Exceptions a template raises on a row it cannot render: its own raise_exception (TemplateError), and
# Python errors of its expressions on unexpected values (a missing key, None + str, ...).
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


# ---- --chat-template -----------------------------------------------------------------------------------
def read_chat_template(spec: str) -> str:
    """The Jinja text `--chat-template` names: a file, else a built-in template's name."""
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if spec in BUILTIN_TEMPLATES:
        return resources.files(__package__).joinpath("templates", f"{spec}.jinja").read_text(encoding="utf-8")
    raise ValueError(f"--chat-template {spec!r}: no such file, and not a built-in template "
                     f"({', '.join(BUILTIN_TEMPLATES)}); give a Jinja file or one of those names")


def use_chat_template(tokenizer, spec: str | None) -> None:
    """Replace `tokenizer`'s chat template with the one `spec` names (None: keep it); a template that does not
    compile is refused here, naming its line, rather than on the first row."""
    if not spec:
        return
    try:
        tokenizer.set_chat_template(read_chat_template(spec))
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template {spec}: line {e.lineno}: {e.message}; fix the template") from None


# ---- conversations -> ids and labels -----------------------------------------------------------------
def chat_ids(messages: list[dict], tokenizer, where: str, tools: list | None = None,
             train_from: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels equal to them on the trained assistant turns (those
    at index >= `train_from` without weight 0), -100 elsewhere."""
    if not tokenizer.chat_template:
        raise DataError(
            f"{where}: chat rows need a tokenizer with a chat template, and this one has none; give one with "
            f"--chat-template ({', '.join(BUILTIN_TEMPLATES)} or a Jinja file), use a chat (instruct) model, "
            "or convert the rows to prompt/completion or text"
        )
    _check_tool_support(tokenizer.chat_template, messages, tools, where)
    trained = [i >= train_from and m["role"] == "assistant" and m.get("weight", 1) == 1
               for i, m in enumerate(messages)]
    extra = {"tools": tools} if tools else {}
    if tokenizer.marks_generation:
        return _marked_ids(messages, tokenizer, where, trained, extra)
    return _prefix_ids(messages, tokenizer, where, trained, extra)


def _check_tool_support(template: str, messages: list[dict], tools, where: str) -> None:
    code = _COMMENT.sub("", template)
    if tools and not re.search(r"\btools\b", code):
        raise DataError(f"{where}: the row gives tools but the chat template never renders `tools`, so the model "
                        "would not see them; use a template with a tool format (--chat-template chatml or "
                        "llama3) or drop the tools")
    if any("tool_calls" in m for m in messages) and not re.search(r"\btool_calls\b", code):
        raise DataError(f"{where}: an assistant message has tool_calls but the chat template never renders "
                        "`tool_calls`; use a template with a tool format (--chat-template chatml or llama3)")


def render(tokenizer, messages: list[dict], gen: bool, where: str, **extra) -> str:
    """The template's text for `messages`; a row it cannot render is one DataError naming the row."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, **extra)
    except _RENDER_ERRORS as e:
        raise DataError(f"{where}: the chat template rejected this conversation: {e}; fix the messages, or "
                        "use another --chat-template") from None


def _marked_ids(messages, tokenizer, where, trained, extra) -> tuple[list[int], list[int]]:
    try:
        text, spans = tokenizer.render_chat(messages, add_generation_prompt=False, **extra)
    except _RENDER_ERRORS as e:
        raise DataError(f"{where}: the chat template rejected this conversation: {e}; fix the messages, or "
                        "use another --chat-template") from None
    assistant = [t for t, m in zip(trained, messages) if m["role"] == "assistant"]
    if len(spans) == len(assistant):
        spans = [s for s, t in zip(spans, assistant) if t]
    elif not spans or not all(assistant):
        raise DataError(
            f"{where}: the chat template marks {len(spans)} {{% generation %}} block(s) for the "
            f"{len(assistant)} assistant turn(s) of this row, so the trained turns cannot be told apart; "
            "use a template with one block per assistant turn (or without blocks)")
    ids, offsets = tokenizer.encode_offsets(text)
    labels = [tok if _overlaps(off, spans) else IGNORE_INDEX for tok, off in zip(ids, offsets)]
    if any(assistant) and all(t == IGNORE_INDEX for t in labels):
        raise DataError(f"{where}: the chat template's {{% generation %}} blocks cover no tokens of this row")
    return ids, labels


def _overlaps(off: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    # transformers' rule: a token is an assistant token when its characters overlap a block's
    return any(off[0] < end and off[1] > start for start, end in spans)


def _prefix_ids(messages, tokenizer, where, trained, extra) -> tuple[list[int], list[int]]:
    full = _encode(tokenizer, render(tokenizer, messages, False, where, **extra))
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if not trained[i]:
            continue
        start = _prefix_len(_encode(tokenizer, render(tokenizer, messages[:i], True, where, **extra)), full, i, where)
        end = _prefix_len(_encode(tokenizer, render(tokenizer, messages[: i + 1], False, where, **extra)),
                          full, i, where)
        if end <= start:
            raise DataError(f"{where}: the chat template renders no tokens for assistant messages[{i}]")
        labels[start:end] = full[start:end]
    return full, labels


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _prefix_len(part: list[int], full: list[int], i: int, where: str) -> int:
    if full[: len(part)] != part:
        raise DataError(
            f"{where}: cannot find the tokens of assistant messages[{i}]: the chat template does not render "
            "the conversation up to that turn as a prefix of the whole (it renders earlier turns differently "
            "once later turns exist, or tokens merge across the turn boundary), and it has no {% generation %} "
            "blocks to mark them; use a template whose turns render the same in every prefix or that marks "
            "assistant text with {% generation %}, or split the conversation into prompt/completion rows"
        )
    return len(part)
