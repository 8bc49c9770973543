"""Grammar-constrained decoding: a LogitsProcessor (serve/requests.py) that lets a request sample only tokens a
grammar allows, for `response_format` (JSON mode, JSON Schema) and forced tool calls.

The grammar engine is llguidance (Microsoft's Earley-parser + token-trie mask builder, the one behind
`guidance` and llama.cpp's `--llguidance`), imported lazily: it is the optional extra `leantune[structured]`.
Chosen over xgrammar 0.2.9 on this project's CPUs for
  - install: llguidance is one abi3 manylinux wheel with no dependencies; xgrammar requires torch, transformers
    and (on Linux x86_64) triton and apache-tvm-ffi, so it would make transformers (a test oracle here) and a
    ~1 GB triton a run-time dependency and put its own bound on the torch version;
  - speed: both are far below a decode step. Measured here on SmolLM2's 49152-token vocabulary and a
    3-property schema, one token's mask: llguidance ~0.04 ms, xgrammar ~0.02 ms; compiling the schema: ~6 ms
    each; a SmolLM2-135M decode step on these CPUs is ~20-40 ms;
  - reach: the same engine takes JSON Schema, Lark (with embedded `%json`, used for tool calls) and regex.
The tokenizer the engine needs is built once per (tokenizer, vocabulary size) from leantune's own tokenizer's
`tokenizer.json` text (its HF `tokenizers` object), so a GGUF-loaded model works as well as a folder.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

EXTRA = "leantune[structured]"

# JSON as json.dumps writes it (", " and ": ", no other whitespace): a model cannot pad the output with
# whitespace forever, and the text reads the same as the examples models were trained on
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar (a schema, a tool's parameters) the engine cannot compile; the API turns it into a 400."""


class GrammarUnavailable(GrammarError):
    """llguidance is not installed."""


def _llg():
    try:
        import llguidance
    except ImportError:
        raise GrammarUnavailable(f"grammar-constrained decoding needs the optional package llguidance: "
                                 f"pip install '{EXTRA}'") from None
    return llguidance


def json_schema_grammar(schema: dict) -> str:
    """The engine's grammar text for JSON valid against `schema` (JSON mode: {"type": "object"})."""
    try:
        return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    except ValueError as e:
        raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None


def lark_grammar(text: str) -> str:
    return _llg().LLMatcher.grammar_from_lark(text)


def regex_grammar(pattern: str) -> str:
    return _llg().LLMatcher.grammar_from_regex(pattern)


class _Cache:
    """Engine tokenizers per (leantune tokenizer, vocabulary size) and compiled grammars per (that, grammar
    text), so a schema sent with every request is compiled once. Compiled grammars are bounded (LRU)."""

    def __init__(self, max_grammars: int = 256):
        self.lock = threading.Lock()
        self.tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.grammars: OrderedDict = OrderedDict()
        self.max_grammars = max_grammars

    def tokenizer(self, tk, vocab_size: int):
        with self.lock:
            per = self.tokenizers.setdefault(tk, {})
            if vocab_size not in per:
                # the vocabulary list comes from tokenizer.json's model (bytes of every token, byte-level or
                # sentencepiece alike); n_vocab: the model's logits may be wider than the tokenizer (padding)
                per[vocab_size] = _llg().LLTokenizer(tk.tk.to_str(), n_vocab=vocab_size,
                                                     eos_token=sorted(tk.eos_ids))
            return per[vocab_size]

    def matcher(self, ltk, grammar: str):
        key = (id(ltk), grammar)
        with self.lock:
            if key in self.grammars:
                self.grammars.move_to_end(key)
                return self.grammars[key][1]
        llg = _llg()
        err = llg.LLMatcher.validate_grammar(grammar, ltk)
        if err:
            raise GrammarError(err)
        m = llg.LLMatcher(ltk, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        with self.lock:
            self.grammars[key] = (ltk, m)  # ltk kept alive with its grammars: id() stays unique
            while len(self.grammars) > self.max_grammars:
                self.grammars.popitem(last=False)
        return m


_CACHE = _Cache()


def compile_grammar(tk, vocab_size: int, grammar: str) -> Callable[[], GrammarProcessor]:
    """A factory of GrammarProcessors for `grammar` (text from *_grammar above), for a model with `vocab_size`
    logits and tokenizer `tk` (leantune's). Compiles (or finds in the cache) now: a bad grammar raises
    GrammarError here, in the request's thread, not in the engine loop."""
    template = _CACHE.matcher(_CACHE.tokenizer(tk, vocab_size), grammar)
    eos = sorted(tk.eos_ids)
    return lambda: GrammarProcessor(template.deep_copy(), vocab_size, eos)


class GrammarProcessor:
    """One sequence's matcher: masks the tokens the grammar forbids to -inf, advances on each accepted token,
    and once the grammar is complete allows only end-of-sequence."""

    def __init__(self, matcher, vocab_size: int, eos_ids: list[int]):
        self.m, self.vocab_size = matcher, vocab_size
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # (ceil(V / 32),) packed bits
        self.eos_only = torch.ones(vocab_size, dtype=torch.bool)
        self.eos_only[eos_ids] = False  # True: forbidden

    def forbidden(self) -> torch.Tensor:
        """(V,) bool: True where the next token may not go."""
        if self.m.is_stopped():
            return self.eos_only
        self.m.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        if self.m.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.m.get_error()}")
        # bit j of word i is token 32 i + j (little-endian words): numpy's unpackbits is ~10x faster here than
        # shifting in torch (0.016 vs 0.16 ms for 49152 tokens)
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")  # (32 ceil(V / 32),) 0/1
        return torch.from_numpy(bits[:self.vocab_size] == 0)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (V,) -> (V,)
        return logits.masked_fill(self.forbidden(), float("-inf"))

    def accept(self, tok: int) -> None:
        if self.m.is_stopped():  # end-of-sequence after the grammar is complete (or ignore_eos past it)
            return
        if not self.m.consume_token(tok):
            raise RuntimeError(f"grammar matcher refused token {tok}: {self.m.get_error()}")

