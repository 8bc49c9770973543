"""Chat templates: `{% generation %}` assistant masks equal transformers' `apply_chat_template(
return_assistant_tokens_mask=True)` on a tiny tokenizer; the built-in templates (chatml, llama3, zephyr) mark
the same tokens with their blocks as without them; --chat-template FILE|NAME; templates that cannot mark
assistant tokens, cannot render a row, or do not render the row's tools are one error naming the row."""
from __future__ import annotations

import re

import pytest
from tiny_folder import build_tokenizer

from leantune.data import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    DataError,
    canonical,
    format_example,
    read_chat_template,
    use_chat_template,
)
from leantune.models.tokenizer import Tokenizer

CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                         "b": {"type": "number"}}}}}]
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"},
                  {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "And 1 2 3?"},
                  {"role": "assistant", "content": "4 5 6"}]},
    {"messages": [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "c1", "content": "3"},
                  {"role": "assistant", "content": "It is 3."}], "tools": TOOLS},
]


def make_tok(template: str | None) -> Tokenizer:
    return Tokenizer(build_tokenizer(), chat_template=template, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                     pad_token="<|endoftext|>")


def unmarked(template: str) -> str:
    """The template without its {% generation %} tags: masks then come from rendering prefixes."""
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def rows_for(name: str) -> list[dict]:
    return [c for c in CONVERSATIONS if name != "zephyr" or "tools" not in c]  # zephyr has no tool format


@pytest.fixture(scope="module")
def hf_fast():
    tf = pytest.importorskip("transformers")

    def make(template: str):
        return tf.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token="<|endoftext|>",
                                          eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template)
    return make


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_generation_masks_equal_transformers(hf_fast, name):
    template = read_chat_template(name)
    tok, hf = make_tok(template), hf_fast(template)
    assert tok.marks_generation
    for row in rows_for(name):
        chat = canonical(row, "chat", "f:1")  # what both render: tool arguments as objects
        ids, labels = format_example(row, tok, "chat")
        out = hf.apply_chat_template(chat["messages"], tools=chat.get("tools"), tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        mask = [int(lab != IGNORE_INDEX) for lab in labels]
        assert mask == list(out["assistant_masks"])
        assert sum(mask) > 0


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_marks_and_prefixes_agree(name):
    """The built-in templates put exactly the tokens that rendering prefixes finds inside their blocks."""
    template = read_chat_template(name)
    marked, plain = make_tok(template), make_tok(unmarked(template))
    assert not plain.marks_generation
    for row in rows_for(name):
        assert format_example(row, marked, "chat") == format_example(row, plain, "chat")
    weighted = {"messages": [{**m, "weight": 0} if m["content"] == "I am fine, thank you." else m
                             for m in CONVERSATIONS[0]["messages"]]}
    ids, labels = format_example(weighted, marked, "chat")
    assert (ids, labels) == format_example(weighted, plain, "chat")
    learned = marked.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert "4 5 6" in learned and "fine" not in learned


def test_chat_template_option(tmp_path):
    tok = make_tok(None)
    row = CONVERSATIONS[0]
    with pytest.raises(DataError, match=r"f:2: chat rows need a tokenizer with a chat template.*--chat-template"):
        format_example(row, tok, "chat", "f:2")
    use_chat_template(tok, "chatml")  # a base model without a template
    ids, _ = format_example(row, tok, "chat")
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", encoding="utf-8")
    use_chat_template(tok, str(f))
    assert tok.chat_template == f.read_text()
    with pytest.raises(ValueError, match=r"--chat-template 'nope': no such file, and not a built-in template \(chatml"):
        use_chat_template(tok, "nope")
    f.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--chat-template {f}: line 2: "):
        use_chat_template(tok, str(f))


def test_rows_a_template_cannot_handle():
    strict = make_tok("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                      + unmarked(read_chat_template("chatml")))
    with pytest.raises(DataError, match=r"f:4: the chat template rejected this conversation: no system role"):
        format_example(CONVERSATIONS[0], strict, "chat", "f:4")
    with pytest.raises(DataError, match=r"f:4: the row gives tools but the chat template never renders `tools`"):
        format_example(CONVERSATIONS[1], make_tok(read_chat_template("zephyr")), "chat", "f:4")
    # one block for the whole conversation: the weighted turns cannot be told apart
    one_block = ("{% generation %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% endgeneration %}")
    weighted = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(DataError, match=r"f:4: the chat template marks 1 \{% generation %\} block\(s\) for the 2"):
        format_example(weighted, make_tok(one_block), "chat", "f:4")
    # a template that marks nothing and does not render prefixes as prefixes cannot mark assistant tokens
    last_differs = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and not loop.last %}[old]"
                    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: "
                    "{% endif %}")
    with pytest.raises(DataError, match=r"f:4: cannot find the tokens of assistant messages\[1\].*generation"):
        format_example({"messages": weighted["messages"][:1] + [{"role": "assistant", "content": "b"}]
                        + weighted["messages"][2:]}, make_tok(last_differs), "chat", "f:4")
