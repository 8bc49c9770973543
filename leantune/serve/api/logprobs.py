"""Log-probabilities in OpenAI's response shapes, from the engine's per-token records
(`{"id", "logprob", "top": [(id, logprob), ...]}`, serve/requests.py: the model's log-softmax at each output
position).

Chat (`logprobs: true`, `top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}], "refusal": null}`. Completions (`logprobs: k`): `{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, offsets counted in the completion's
text from 0. A token's text is its own decoding (special tokens kept); a byte-level token that is part of one
UTF-8 character decodes to U+FFFD, as in vLLM. The EOS that ends a request is not reported (it is not output
text, and `completion_tokens` omits it); the tokens that held a stop string are.

Completions with `echo` put the prompt's tokens first, in the same four lists: the first prompt token's
logprob and top_logprobs are null (it has no context), as at OpenAI and vLLM. vLLM's `prompt_logprobs`:
`[null, {token id: {"logprob", "rank", "decoded_token"}}, ...]`, each position's own token and its k likeliest.
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


def completion(tk, records: list[dict], offset: int = 0, prompt_ids: list[int] | None = None,
               prompt_records: list[dict] | None = None, k: int = 0) -> dict:
    """`offset`: where the first token starts in the choice's text (a stream's earlier chunks). With `prompt_ids`
    (echo), the prompt's tokens lead: the first with null logprobs, the others from `prompt_records` (top `k`)."""
    tokens = [_text(tk, r["id"]) for r in records]
    lps = [r["logprob"] for r in records]
    tops = [_top_dict(tk, r["top"]) for r in records]
    if prompt_ids is not None:
        tokens = [_text(tk, t) for t in prompt_ids] + tokens
        lps = [None] + [r["logprob"] for r in prompt_records] + lps
        tops = [None] + [_top_dict(tk, r["top"][:k]) for r in prompt_records] + tops
    starts = []
    for t in tokens:
        starts.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": starts}


def prompt_logprobs(tk, prompt_ids: list[int], records: list[dict], k: int) -> list:
    """vLLM's `prompt_logprobs` of a prompt from its records (one per prompt token from the second on)."""
    out: list = [None]
    for r in records:
        d = {str(r["id"]): {"logprob": r["logprob"], "rank": r["rank"], "decoded_token": _text(tk, r["id"])}}
        for rank, (i, v) in enumerate(r["top"][:k], 1):
            d.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": _text(tk, i)})
        out.append(d)
    return out


def _top_dict(tk, top: list) -> dict:
    """{token text: logprob}, likeliest first; tokens that decode to the same text keep the likeliest's value
    (the legacy shape is keyed by text, so they cannot all appear)."""
    out: dict = {}
    for i, v in top:
        out.setdefault(_text(tk, i), v)
    return out
