"""Row shapes: a data row as users write it -> one checked, canonical dict. No tokenizer, no torch.

Shapes, detected from a row's keys in this order (required keys):

- `chat`: OpenAI chat fine-tuning rows, `{"messages": [...], "tools"?: [...]}`
  (https://platform.openai.com/docs/guides/supervised-fine-tuning): roles system/user/assistant/tool, content
  a string or a list of `{"type": "text", "text"}` parts, assistant `tool_calls`
  (`{"id"?, "type": "function", "function": {"name", "arguments": "<JSON>"}}`) and the per-message
  `weight: 0|1` (0 keeps an assistant turn out of the loss).
- `sharegpt`: `{"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value"}], "tools"?}` -> chat.
- `openai_preference`: OpenAI's DPO rows `{"input": {"messages", "tools"?}, "preferred_output": [assistant
  message], "non_preferred_output": [...]}` -> preference.
- `preference`: TRL's `{"prompt", "chosen", "rejected"}`, all strings or all message lists.
- `alpaca` `{"instruction", "input"?, "output"}`, `completion` `{"prompt", "completion"}`,
  `classification` `{"text", "label"}`, `text` `{"text"}`.

Canonical forms: chat `{"messages", "tools"?}` with contents joined to strings and tool-call arguments parsed
to objects (what Hugging Face chat templates expect); preference `{"prompt", "chosen", "rejected", "tools"?}`;
classification `{"text", "label"}` with a label of digits read as an integer class id; the others unchanged.
A null field is an absent one (Parquet and datasets fill missing fields with null), and a field that holds a
list or object may be written as a JSON string (CSV cells can hold nothing else).
"""
from __future__ import annotations

import json

from .readers import DataError, Row, read_rows

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
# Required keys per shape, in detection order (preference before completion: both have "prompt";
# classification before text: both have "text"; OpenAI preference before alpaca: both may have "input").
FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
    "preference": ("prompt", "chosen", "rejected"),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
OPTIONAL_KEYS = ("tools", "input")
# What each shape trains: sft (token cross-entropy), preference (pairs, for DPO), classification.
KIND = {"chat": "sft", "sharegpt": "sft", "alpaca": "sft", "completion": "sft", "text": "sft",
        "openai_preference": "preference", "preference": "preference", "classification": "classification"}
COLUMN_KEYS = tuple(dict.fromkeys(k for keys in FORMATS.values() for k in keys)) + ("tools",)


def _format_list() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMATS.items())


# ---- --columns ---------------------------------------------------------------------------------------
def parse_columns(spec: str | None) -> dict[str, str]:
    """`--columns prompt=question,completion=answer` -> {"prompt": "question", ...} (key: the name leantune
    reads, value: the column in the data). ValueError names an unknown key or a malformed pair."""
    out: dict[str, str] = {}
    for pair in (spec or "").split(","):
        if not pair.strip():
            continue
        key, eq, col = (s.strip() for s in pair.partition("="))
        if not eq or not key or not col:
            raise ValueError(f"--columns: {pair.strip()!r} is not KEY=COLUMN; write e.g. "
                             "--columns prompt=question,completion=answer")
        if key not in COLUMN_KEYS:
            raise ValueError(f"--columns: unknown key {key!r}; the keys are {', '.join(COLUMN_KEYS)} "
                             "(KEY=COLUMN maps your column COLUMN to leantune's KEY)")
        if key in out:
            raise ValueError(f"--columns: key {key!r} is given twice; map each key once")
        out[key] = col
    return out


def rename_columns(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped column under its leantune key (the column's own name is dropped)."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for key, col in columns.items():
        out.pop(key, None)  # the mapped column wins over a column that already has the key's name
        if col in row:
            out[key] = row[col]
    return out


# ---- detection ---------------------------------------------------------------------------------------
def drop_nulls(value):
    """The value with every null object field removed, recursively (null = absent)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def detect_format(row: dict, where: str) -> str:
    """The shape whose required keys the row has; else the shape it has most of them of (so that the row
    check then names the missing key); else a DataError listing the shapes."""
    keys = {k for k, v in row.items() if v is not None}
    for name, required in FORMATS.items():
        if all(k in keys for k in required):
            return name
    # else the shape it has most keys of (then: the fewest missing), so the row check names what is missing
    scores = {name: (sum(k in keys for k in req if k not in OPTIONAL_KEYS), -len(req)) for name, req in FORMATS.items()}
    best = max(scores, key=lambda name: scores[name])  # max() keeps the first of equal scores: detection order
    if scores[best][0]:
        return best
    raise DataError(
        f"{where}: cannot tell the data format from the keys {sorted(row)}; use one of the formats "
        f"(required keys) {_format_list()}, or map your column names with --columns KEY=COLUMN,..."
    )


def check_row(row: dict, fmt: str, where: str) -> None:
    """Raise a DataError naming `where` and the field when `row` does not fit shape `fmt`."""
    canonical(row, fmt, where)


def canonical(row: dict, fmt: str, where: str) -> dict:
    """The checked canonical form of a row of shape `fmt` (see the module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    row = drop_nulls(row)
    for key in FORMATS[fmt]:
        if key not in row:
            raise DataError(
                f"{where}: missing key {key!r} for the {fmt} format (required: {', '.join(FORMATS[fmt])}); "
                "add it (or map a column to it with --columns), and keep one format per file"
            )
    return _CANONICAL[fmt](row, where)


# ---- shapes ------------------------------------------------------------------------------------------
def _chat(row: dict, where: str, key: str = "messages") -> dict:
    if "functions" in row:  # OpenAI's deprecated function calling: dropping it would hide the functions
        raise DataError(f"{where}: 'functions' (OpenAI's deprecated function calling) is not read; write the "
                        "functions as 'tools' ([{\"type\": \"function\", \"function\": {...}}]) and the calls "
                        "as assistant 'tool_calls'")
    messages = _messages(row[key], key, where)
    _need_assistant(messages, where)
    return _with_tools({"messages": messages}, row, where)


def _sharegpt(row: dict, where: str) -> dict:
    turns = _structured(row["conversations"], "conversations", where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] has unknown 'from' {t['from']!r}; allowed: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        extra = {k: v for k, v in t.items() if k not in ("from", "value")}
        messages.append({**extra, "role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _chat({**row, "conversations": messages}, where, key="conversations")


def _openai_preference(row: dict, where: str) -> dict:
    inp = _structured(row["input"], "input", where)
    if not isinstance(inp, dict) or "messages" not in inp:
        raise DataError(f"{where}: 'input' must be an object with 'messages' (OpenAI's preference format: "
                        '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]})')
    pair = {"prompt": inp["messages"], "chosen": row["preferred_output"], "rejected": row["non_preferred_output"]}
    if "tools" in inp:
        pair["tools"] = inp["tools"]
    return _preference(pair, where, names=("input.messages", "preferred_output", "non_preferred_output"))


def _preference(row: dict, where: str, names=("prompt", "chosen", "rejected")) -> dict:
    parts = [_maybe_messages(row[k]) for k in ("prompt", "chosen", "rejected")]
    as_text = [isinstance(p, str) for p in parts]
    if any(as_text) and not all(as_text):
        raise DataError(f"{where}: {', '.join(names)} must all be strings or all be message lists; "
                        "write them the same way")
    if all(as_text):
        prompt, chosen, rejected = parts
    else:
        prompt = _messages(parts[0], names[0], where)
        chosen, rejected = (_completion_messages(p, n, where) for p, n in zip(parts[1:], names[1:]))
    if chosen == rejected:
        raise DataError(f"{where}: {names[1]} equals {names[2]}, so the pair prefers nothing; give the row a "
                        "different rejected answer or remove it")
    return _with_tools({"prompt": prompt, "chosen": chosen, "rejected": rejected}, row, where)


def _completion_messages(msgs, name: str, where: str) -> list[dict]:
    msgs = _messages(msgs, name, where)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: {name} must end with an assistant message (the answer being ranked)")
    return msgs


def _alpaca(row: dict, where: str) -> dict:
    for key in ("instruction", "output"):
        _check_str(row[key], key, where)
    if "input" in row:
        _check_str(row["input"], "input", where)
    return row


def _strings(*keys):
    def check(row: dict, where: str) -> dict:
        for key in keys:
            _check_str(row[key], key, where)
        return row
    return check


def _classification(row: dict, where: str) -> dict:
    _check_str(row["text"], "text", where)
    label = row["label"]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)  # "1" in a CSV is the class id 1 of a JSON file
    elif isinstance(label, float) and label.is_integer():
        label = int(label)  # columnar readers may widen a column of ints to floats
    if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, str) and not label):
        raise DataError(f"{where}: 'label' must be a class id (an integer) or a class name (a non-empty string), "
                        f"got {label!r}")
    return {**row, "label": label}


_CANONICAL = {"chat": _chat, "sharegpt": _sharegpt, "openai_preference": _openai_preference,
              "preference": _preference, "alpaca": _alpaca, "completion": _strings("prompt", "completion"),
              "classification": _classification, "text": _strings("text")}


# ---- messages ----------------------------------------------------------------------------------------
def _messages(messages, key: str, where: str) -> list[dict]:
    messages = _structured(messages, key, where)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} objects")
    return [_message(m, f"{key}[{i}]", where) for i, m in enumerate(messages)]


def _message(m, name: str, where: str) -> dict:
    if not isinstance(m, dict) or "role" not in m:
        raise DataError(f"{where}: {name} must be an object with 'role' and 'content'")
    role = m["role"]
    if role not in ROLES:
        raise DataError(f"{where}: {name} has unknown role {role!r}; allowed roles: {', '.join(ROLES)}")
    out = dict(m)
    if "function_call" in m:
        raise DataError(f"{where}: {name} has 'function_call' (OpenAI's deprecated function calling), which is not "
                        "read; write it as 'tool_calls': [{\"type\": \"function\", \"function\": {\"name\", "
                        "\"arguments\"}}]")
    if "tool_calls" in m:
        if role != "assistant":
            raise DataError(f"{where}: {name} has tool_calls but role {role!r}; only assistant messages call tools")
        out["tool_calls"] = _tool_calls(m["tool_calls"], name, where)
    if "content" in m:
        out["content"] = _content(m["content"], name, where)
    elif "tool_calls" not in m:
        raise DataError(f"{where}: {name} must be an object with 'role' and 'content' (an assistant message may "
                        "give tool_calls instead)")
    if "weight" in m:
        out["weight"] = _weight(m["weight"], role, name, where)
    return out


def _content(content, name: str, where: str) -> str:
    if isinstance(content, list):  # OpenAI content parts: text only, joined as the upload path always did
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise DataError(f"{where}: {name}.content[{j}] must be a text part "
                                '{"type": "text", "text": "..."}; images and other parts are not supported')
        if not content:
            raise DataError(f"{where}: {name}.content is an empty list; give it text")
        return "\n".join(p["text"] for p in content)
    _check_str(content, f"{name}.content", where)
    return content


def _weight(w, role: str, name: str, where: str) -> int:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise DataError(f"{where}: {name} has weight {w!r}; a weight is 0 (leave this assistant turn out of the "
                        "loss) or 1 (train on it); fix it or remove the key")
    if role != "assistant":
        raise DataError(f"{where}: {name} has a weight but role {role!r}; only assistant turns are trained, so "
                        "only they take a weight; remove it")
    return int(w)


def _tool_calls(calls, name: str, where: str) -> list[dict]:
    calls = _structured(calls, f"{name}.tool_calls", where)
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: {name}.tool_calls must be a non-empty list of "
                        '{"type": "function", "function": {"name", "arguments"}} objects')
    return [_tool_call(c, f"{name}.tool_calls[{j}]", where) for j, c in enumerate(calls)]


def _tool_call(call, name: str, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
        raise DataError(f"{where}: {name} must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                        "\"arguments\": JSON}}}}")
    args = fn["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {name}.function.arguments is not valid JSON ({e.msg} at column {e.colno}): "
                            f"{fn['arguments'][:80]!r}; write the arguments as a JSON object string, e.g. "
                            "'{\"city\": \"Paris\"}'") from None
    if not isinstance(args, dict):
        raise DataError(f"{where}: {name}.function.arguments must be a JSON object of argument names to values, "
                        f"got {type(args).__name__}")
    # templates (Hugging Face's convention) read the arguments as an object, not as OpenAI's JSON string
    return {**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}}


def _need_assistant(messages: list[dict], where: str) -> None:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                        "add an assistant message or remove the row")
    if all(m.get("weight", 1) == 0 for m in assistant):
        raise DataError(f"{where}: every assistant turn has weight 0, so there is nothing to learn; set weight 1 "
                        "on the turns to train on, or remove the row")


def _with_tools(out: dict, row: dict, where: str) -> dict:
    if "tools" in row:
        tools = _structured(row["tools"], "tools", where)
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError(f"{where}: 'tools' must be a list of tool definitions "
                            '({"type": "function", "function": {"name", "description", "parameters"}})')
        out["tools"] = tools
    return out


# ---- values ------------------------------------------------------------------------------------------
def _structured(value, key: str, where: str):
    """A list/object field given as a JSON string (how CSV and some exports hold them) decoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {key!r} is a string that is not valid JSON ({e.msg} at column {e.colno}); "
                        f"give {key} as a list/object, or as that list/object written in JSON") from None


def _maybe_messages(value):
    """A preference field: a string, a message list, or a message list written as a JSON string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and decoded and all(isinstance(m, dict) and "role" in m for m in decoded):
            return decoded
    return value


def _check_str(value, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}; quote it as text")


# ---- files -------------------------------------------------------------------------------------------
def read_canonical(path, split: str | None = None, columns: dict[str, str] | None = None,
                   fmt: str | None = None, what: str = "--data") -> tuple[str, list[tuple[Row, dict]]]:
    """The shape of the data under `path` (`fmt`, or detected from its first row) and every row with its
    checked canonical form; each row must have that shape."""
    rows = read_rows(path, split, what)
    renamed = [rename_columns(r.data, columns or {}) for r in rows]
    fmt = fmt or detect_format(renamed[0], rows[0].where)
    return fmt, [(r, canonical_in_file(data, fmt, r, rows[0])) for r, data in zip(rows, renamed)]


def canonical_in_file(data: dict, fmt: str, row: Row, first: Row) -> dict:
    """`canonical` for a row of a file whose first row set the shape `fmt`; the error carries the row's number
    and says so when the row is in another shape of its own."""
    try:
        return canonical(data, fmt, row.where)
    except DataError as e:
        try:
            own = detect_format(data, row.where)
        except DataError:
            own = fmt
        if own != fmt and all(k in data for k in FORMATS[own]):
            raise DataError(f"{row.where}: row is in the {own} format but {first.where} (the first row) is in the "
                            f"{fmt} format; keep one format per file", row.n) from None
        raise DataError(str(e), row.n) from None
