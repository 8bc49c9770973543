"""Log-probabilities in OpenAI's response shapes, from the engine's per-token records
(`{"id", "logprob", "top": [(id, logprob), ...]}`, serve/requests.py: the model's log-softmax at each output
position).

Chat (`logprobs: true`, `top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}], "refusal": null}`. Completions (`logprobs: k`): `{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, offsets counted in the completion's
text from 0. A token's text is its own decoding (special tokens kept); a byte-level token that is part of one
UTF-8 character decodes to U+FFFD, as in vLLM. The EOS that ends a request is not reported (it is not output
text, and `completion_tokens` omits it); the tokens that held a stop string are.
"""
from __future__ import annotations


def _text(tk, tok: int) -> str:
    return tk.decode([tok], skip_special_tokens=False)


def _entry(tk, tok: int, lp: float) -> dict:
    t = _text(tk, tok)
    return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}


def chat(tk, records: list[dict]) -> dict:
    return {"content": [{**_entry(tk, r["id"], r["logprob"]), "top_logprobs": [_entry(tk, i, v) for i, v in r["top"]]}
                        for r in records], "refusal": None}


def completion(tk, records: list[dict], offset: int = 0) -> dict:
    """`offset`: where the first record's token starts in the completion's text (a stream's earlier chunks)."""
    tokens = [_text(tk, r["id"]) for r in records]
    starts = []
    for t in tokens:
        starts.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [_top_dict(tk, r["top"]) for r in records], "text_offset": starts}


def _top_dict(tk, top: list) -> dict:
    """{token text: logprob}, likeliest first; tokens that decode to the same text keep the likeliest's value
    (the legacy shape is keyed by text, so they cannot all appear)."""
    out: dict = {}
    for i, v in top:
        out.setdefault(_text(tk, i), v)
    return out
