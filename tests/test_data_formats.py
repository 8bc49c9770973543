"""leantune.data beyond JSONL: every container (JSONL, JSON array, CSV, Parquet, datasets folder, shards, glob)
gives the same examples for the same rows; the row shapes (OpenAI chat with tools/tool calls/weights,
ShareGPT, alpaca, completion, text, classification, OpenAI and TRL preference pairs); --columns; the optional
extras; and the bad-input catalogue, each error naming file and row."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from tiny_folder import build_tokenizer

from leantune.data import (
    IGNORE_INDEX,
    DataError,
    canonical,
    detect_format,
    format_example,
    format_pair,
    load_classification_dataset,
    load_dataset,
    load_preference_dataset,
    parse_columns,
    read_chat_template,
    read_rows,
)
from leantune.models.tokenizer import Tokenizer

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                  {"role": "assistant", "content": "It is sunny."}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Wrong.", "weight": 0},
                  {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi!", "weight": 1}]},
]
PREF_ROWS = [
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Rome."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
]
SHAPES = {
    "chat": CHAT_ROWS,
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
                 {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Bye"},
                                    {"from": "gpt", "value": "Goodbye."}]}],
    "alpaca": [{"instruction": "Name the capital.", "input": "France", "output": "Paris."},
               {"instruction": "Say hi.", "output": "Hi."}],
    "completion": [{"prompt": "The quick brown fox", "completion": " jumps."}, {"prompt": "1 2 3", "completion": " 4"}],
    "text": [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Numbers: 1 2 3."}],
    "preference": PREF_ROWS,
    "classification": [{"text": "I am fine, thank you.", "label": 1}, {"text": "The lazy dog.", "label": 0}],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_tokenizer(), chat_template=read_chat_template("chatml"), bos_token=None,
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---- writing one set of rows in every container ---------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Lists and objects as JSON text in their cells, as CSV exports hold them."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if k not in r else r[k] if isinstance(r[k], str) else json.dumps(r[k]) for k in cols])
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would take the first row's keys only
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in cols}), path)
    return path


def write_datasets(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    full = [{k: r.get(k) for k in cols} for r in rows]  # every row with every column, as a table holds them
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(full), test=datasets.Dataset.from_list(full[:1]))
    dd.save_to_disk(str(path))
    return path


def containers(tmp: Path, rows: list[dict]) -> dict[str, tuple[str, str | None]]:
    """{container: (path, split)} holding `rows`."""
    tmp.mkdir(parents=True, exist_ok=True)
    shards = tmp / "shards"
    shards.mkdir()
    write_parquet(shards / "part-0.parquet", rows[:1])
    write_jsonl(shards / "part-1.jsonl", rows[1:])
    (tmp / "globbed").mkdir()
    write_csv(tmp / "globbed" / "a-0.csv", rows[:1])
    write_json(tmp / "globbed" / "a-1.json", rows[1:])
    return {
        "jsonl": (str(write_jsonl(tmp / "d.jsonl", rows)), None),
        "json": (str(write_json(tmp / "d.json", rows)), None),
        "csv": (str(write_csv(tmp / "d.csv", rows)), None),
        "parquet": (str(write_parquet(tmp / "d.parquet", rows)), None),
        "datasets": (str(write_datasets(tmp / "ds", rows)), "train"),
        "shards": (str(shards), None),
        "glob": (str(tmp / "globbed" / "a-*"), None),
    }


def load_any(path: str, tok, split: str | None, kind: str):
    if kind == "preference":
        pairs = load_preference_dataset(path, tok, 2048, split=split)
        return [(p.prompt_ids, p.chosen.input_ids, p.chosen.labels, p.rejected.input_ids, p.rejected.labels)
                for p in pairs]
    if kind == "classification":
        examples, names = load_classification_dataset(path, tok, 2048, split=split)
        return [(e.input_ids, e.label) for e in examples], names
    return [(e.input_ids, e.labels) for e in load_dataset(path, tok, 2048, split=split)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_container_gives_the_same_examples(tmp_path, tok, shape):
    rows = SHAPES[shape]
    kind = {"preference": "preference", "classification": "classification"}.get(shape, "sft")
    found = {name: load_any(path, tok, split, kind)
             for name, (path, split) in containers(tmp_path / shape, rows).items()}
    reference = found["jsonl"]
    assert len(reference if kind != "classification" else reference[0]) == len(rows)
    for name, got in found.items():
        assert got == reference, name


def test_rows_name_their_file_and_line(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    jl = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r.where for r in jl] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:2"]
    arr = read_rows(write_json(tmp_path / "d.json", rows))  # indent=2: objects start on lines 2 and 5
    assert [r.n for r in arr] == [2, 5] and arr[0].data == {"text": "a"}
    cs = read_rows(write_csv(tmp_path / "d.csv", rows))
    assert [r.where for r in cs] == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:3"]
    pq = read_rows(write_parquet(tmp_path / "d.parquet", rows))
    assert [r.where for r in pq] == [f"{tmp_path / 'd.parquet'} row 1", f"{tmp_path / 'd.parquet'} row 2"]
    ds = read_rows(write_datasets(tmp_path / "ds", rows), split="test")
    assert [r.where for r in ds] == [f"{tmp_path / 'ds'}[test] row 1"]
    # a .json file holding JSON Lines is read as JSON Lines, as Hugging Face's json loader does
    assert [r.data for r in read_rows(write_jsonl(tmp_path / "l.json", rows))] == rows


def test_without_the_data_extra(tmp_path, monkeypatch, tok):
    rows = SHAPES["completion"]
    parquet, folder = write_parquet(tmp_path / "d.parquet", rows), write_datasets(tmp_path / "ds", rows)
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    for path in (parquet, folder):
        with pytest.raises(DataError, match=r"pip install 'leantune\[data\]'") as e:
            load_dataset(path, tok, 2048, split="train" if path == folder else None)
        assert str(path) in str(e.value)
    expected = [(e.input_ids, e.labels) for e in load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, 64)]
    for path in (write_json(tmp_path / "d.json", rows), write_csv(tmp_path / "d.csv", rows)):
        assert [(e.input_ids, e.labels) for e in load_dataset(path, tok, 64)] == expected


# ---- shapes -------------------------------------------------------------------------------------------
def test_detect_every_shape():
    for shape, rows in SHAPES.items():
        assert detect_format(rows[0], "f:1") == shape
    openai = {"input": {"messages": [{"role": "user", "content": "q"}]},
              "preferred_output": [{"role": "assistant", "content": "a"}],
              "non_preferred_output": [{"role": "assistant", "content": "b"}]}
    assert detect_format(openai, "f:1") == "openai_preference"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}, "f:1") == "preference"
    assert detect_format({"prompt": "only"}, "f:1") == "completion"  # then: missing 'completion'


def test_sharegpt_is_chat(tok):
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]}
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "A"}]}
    assert format_example(share, tok, "sharegpt") == format_example(chat, tok, "chat")
    with pytest.raises(DataError, match=r"f:3: conversations\[0\] has unknown 'from' 'bot'"):
        format_example({"conversations": [{"from": "bot", "value": "x"}]}, tok, "sharegpt", "f:3")


def spans(tok, ids, labels) -> list[str]:
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            out.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return out + ([tok.decode(cur, skip_special_tokens=False)] if cur else [])


def test_weight_zero_turn_is_not_learned(tok):
    ids, labels = format_example(CHAT_ROWS[2], tok, "chat")
    assert "Wrong." in tok.decode(ids, skip_special_tokens=False)
    assert spans(tok, ids, labels) == ["Hi!<|im_end|>\n"]
    both = {"messages": [{**m, "weight": 1} if m["role"] == "assistant" else m for m in CHAT_ROWS[2]["messages"]]}
    assert spans(tok, *format_example(both, tok, "chat")) == ["Wrong.<|im_end|>\n", "Hi!<|im_end|>\n"]


def test_tools_and_tool_calls_rendered_by_the_template(tok):
    ids, labels = format_example(CHAT_ROWS[1], tok, "chat")
    text = tok.decode(ids, skip_special_tokens=False)
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tool's schema, as ChatML-Hermes writes it
    assert "<tool_response>\nsunny\n</tool_response>" in text
    # the call is learned, with its arguments as a JSON object; the tool's answer is not
    assert spans(tok, ids, labels) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n',
        "It is sunny.<|im_end|>\n",
    ]


def test_columns_map_names(tmp_path, tok):
    cols = parse_columns("prompt=question, completion=answer")
    assert cols == {"prompt": "question", "completion": "answer"}
    mine = write_csv(tmp_path / "q.csv", [{"question": "1 2 3", "answer": " 4", "id": "7"}])
    theirs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 2 3", "completion": " 4"}])
    assert load_dataset(mine, tok, 64, columns=cols)[0].input_ids == load_dataset(theirs, tok, 64)[0].input_ids
    with pytest.raises(ValueError, match="--columns: unknown key 'question'; the keys are messages"):
        parse_columns("question=prompt")
    with pytest.raises(ValueError, match="is not KEY=COLUMN"):
        parse_columns("prompt")


def test_preference_pairs(tok):
    pair = canonical(PREF_ROWS[0], "preference", "f:1")
    prompt_ids, (c_ids, c_labels), (r_ids, r_labels) = format_pair(pair, tok, "f:1")
    assert c_ids[: len(prompt_ids)] == prompt_ids == r_ids[: len(prompt_ids)]
    assert all(lab == IGNORE_INDEX for lab in c_labels[: len(prompt_ids)])
    assert spans(tok, c_ids, c_labels) == ["Paris.<|im_end|>\n"] and spans(tok, r_ids, r_labels) == ["Rome.<|im_end|>\n"]
    # OpenAI's preference shape and TRL's string shape give the same pair as TRL's message lists
    openai = {"input": {"messages": PREF_ROWS[0]["prompt"]}, "preferred_output": PREF_ROWS[0]["chosen"],
              "non_preferred_output": PREF_ROWS[0]["rejected"]}
    assert format_pair(canonical(openai, "openai_preference", "f:1"), tok, "f:1") == (prompt_ids, (c_ids, c_labels),
                                                                                      (r_ids, r_labels))
    strings = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    assert format_pair(canonical(strings, "preference", "f:1"), tok, "f:1")[1] == (c_ids, c_labels)
    with pytest.raises(DataError, match="must all be strings or all be message lists"):
        canonical({**strings, "chosen": PREF_ROWS[0]["chosen"]}, "preference", "f:1")


def test_preference_without_template_is_plain_text():
    plain = Tokenizer(build_tokenizer(), chat_template=None, eos_token="<|im_end|>")
    prompt_ids, (c_ids, c_labels), _ = format_pair({"prompt": "1 2 3", "chosen": " 4", "rejected": " 5"}, plain, "f")
    assert prompt_ids == plain.encode("1 2 3", False) and c_ids == prompt_ids + plain.encode(" 4", False) + [2]
    assert c_labels == [IGNORE_INDEX] * len(prompt_ids) + plain.encode(" 4", False) + [2]


def test_classification_labels(tmp_path, tok):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "ok", "label": "pos"}]
    examples, names = load_classification_dataset(write_jsonl(tmp_path / "c.jsonl", rows), tok, 64)
    assert names == ["neg", "pos"] and [e.label for e in examples] == [1, 0, 1]
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: label 'pos' is a str but the first row's is a int"):
        load_classification_dataset(mixed, tok, 64)


def test_sft_refuses_pairs_and_classification(tmp_path, tok):
    with pytest.raises(DataError, match=r"p\.jsonl: preference pairs .* \(DPO: `leantune finetune --objective dpo`\), not with supervised"):
        load_dataset(write_jsonl(tmp_path / "p.jsonl", PREF_ROWS), tok, 64)
    with pytest.raises(DataError, match=r"c\.jsonl: classification rows"):
        load_dataset(write_jsonl(tmp_path / "c.jsonl", SHAPES["classification"]), tok, 64)
    with pytest.raises(DataError, match=r"s\.jsonl: has no preference pairs \(its rows are completion rows\)"):
        load_preference_dataset(write_jsonl(tmp_path / "s.jsonl", SHAPES["completion"]), tok, 64)


# ---- bad input: one error naming file, row and fix ----------------------------------------------------
def bad(path, tok, match: str, loader=load_dataset, **kw) -> str:
    with pytest.raises(DataError, match=match) as e:
        loader(path, tok, 2048, **kw)
    return str(e.value)


def test_chosen_equals_rejected(tmp_path, tok):
    same = {**PREF_ROWS[1], "rejected": PREF_ROWS[1]["chosen"]}
    p = write_jsonl(tmp_path / "p.jsonl", [PREF_ROWS[0], same])
    msg = bad(p, tok, rf"{p}:2: chosen equals rejected", load_preference_dataset)
    assert "different rejected answer or remove it" in msg
    openai = {"input": {"messages": [{"role": "user", "content": "q"}]},
              "preferred_output": [{"role": "assistant", "content": "a"}],
              "non_preferred_output": [{"role": "assistant", "content": "a"}]}
    p = write_parquet(tmp_path / "o.parquet", [openai])
    bad(p, tok, rf"{p} row 1: preferred_output equals non_preferred_output", load_preference_dataset)


def test_tool_arguments_not_json(tmp_path, tok):
    row = json.loads(json.dumps(CHAT_ROWS[1]))
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    p = write_jsonl(tmp_path / "t.jsonl", [CHAT_ROWS[0], row])
    msg = bad(p, tok, rf"{p}:2: messages\[1\].tool_calls\[0\].function.arguments is not valid JSON")
    assert "'{city: Paris}'" in msg and "write the arguments as a JSON object string" in msg


@pytest.mark.parametrize("weight", [2, 0.5, "1", True])
def test_weight_not_0_or_1(tmp_path, tok, weight):
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": weight}]}
    p = write_jsonl(tmp_path / "w.jsonl", [CHAT_ROWS[0], row])
    assert "a weight is 0 (leave this assistant turn out of the loss) or 1" in bad(
        p, tok, rf"{p}:2: messages\[1\] has weight {weight!r}")


def test_parquet_without_needed_columns(tmp_path, tok):
    p = write_parquet(tmp_path / "x.parquet", [{"question": "q", "answer": "a"}])
    msg = bad(p, tok, rf"{p} row 1: cannot tell the data format from the keys \['answer', 'question'\]")
    assert "--columns KEY=COLUMN" in msg
    assert load_dataset(p, tok, 64, columns=parse_columns("prompt=question,completion=answer"))  # the fix


def test_csv_ragged_row(tmp_path, tok):
    p = tmp_path / "r.csv"
    p.write_text('prompt,completion\n"1, 2",3\n4,5,6\n', encoding="utf-8")
    assert "quote fields that hold commas" in bad(p, tok, rf"{p}:3: row has 3 field\(s\) but the header has 2")


def test_bad_json_array_names_the_line(tmp_path, tok):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n', encoding="utf-8")
    bad(p, tok, rf"{p}:4: malformed JSON")
    p.write_text('[{"text": "a"} {"text": "b"}]', encoding="utf-8")
    bad(p, tok, rf"{p}:1: expected ',' or ']'")


def test_splits(tmp_path, tok):
    folder = write_datasets(tmp_path / "ds", SHAPES["completion"])
    assert "choose one with --split" in bad(folder, tok, r"is a DatasetDict with splits \['train', 'test'\]")
    bad(folder, tok, r"has no split 'dev'; its splits are", split="dev")
    bad(write_jsonl(tmp_path / "d.jsonl", SHAPES["completion"]), tok, r"a split \('train'\) applies to a Hugging Face",
        split="train")
    bad(str(tmp_path / "nothing-*.jsonl"), tok, "the pattern matches no files")


def test_deprecated_function_calling_is_refused_not_dropped(tok):
    fc = {"messages": [{"role": "user", "content": "a"},
                       {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]}
    with pytest.raises(DataError, match=r"f:1: messages\[1\] has 'function_call' .* write it as 'tool_calls'"):
        format_example(fc, tok, "chat", "f:1")
    with pytest.raises(DataError, match=r"f:1: 'functions' .* write the functions as 'tools'"):
        format_example({**CHAT_ROWS[0], "functions": [{"name": "f"}]}, tok, "chat", "f:1")


def test_pairs_fit_max_length_as_a_whole(tmp_path, tok):
    p = write_jsonl(tmp_path / "p.jsonl", PREF_ROWS)
    full = load_preference_dataset(p, tok, 2048)
    size = [max(len(x.chosen), len(x.rejected)) for x in full]
    k, n = size.index(max(size)), max(size) - 1  # only pair k is one token too long
    with pytest.raises(DataError, match=rf"{p}:{full[k].line}: example has {n + 1} tokens, more than max_length={n}"):
        load_preference_dataset(p, tok, n)
    cut = load_preference_dataset(p, tok, n, on_too_long="truncate")
    assert cut[k].chosen.input_ids == full[k].chosen.input_ids[:n] and cut[k].prompt_ids == full[k].prompt_ids
    assert cut[k].rejected.input_ids == full[k].rejected.input_ids[:n] and cut[1 - k] == full[1 - k]
    assert load_preference_dataset(p, tok, n, on_too_long="drop") == [full[1 - k]]
