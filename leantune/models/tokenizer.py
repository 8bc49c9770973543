"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens and a Jinja2 chat template.

Reads a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`); the GGUF
reader builds the same object from GGUF metadata. Chat templates render the way transformers renders them
(sandboxed Jinja2, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`, and the `{% generation %}` tag
that marks assistant text), and the rendered text is encoded without adding special tokens again, because
templates write BOS themselves.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.ext import Extension
from tokenizers import Tokenizer as _HFTokenizer

# `{% generation %}` / `{%- generation -%}`: a template that marks its assistant text for training masks
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class _GenerationTracker(Extension):
    """The `{% generation %}...{% endgeneration %}` tag of transformers' chat templates: renders its body
    unchanged and, while a render is being tracked, records the body's (start, end) character span in the
    output. As in transformers' AssistantTracker, the start is the length of everything rendered before
    the block, so the template must be rendered with `generate()` and the pieces counted as they come."""

    tags = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        # per render (a server renders on several threads): (pieces rendered so far, spans found)
        self.tracking: ContextVar = ContextVar("leantune_generation", default=None)
        environment.extend(generation_tracker=self)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller) -> str:
        text = caller()
        state = self.tracking.get()
        if state is not None:
            pieces, spans = state
            start = sum(len(p) for p in pieces)
            spans.append((start, start + len(text)))
        return text


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    def __init__(
        self,
        tk: _HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_ids: list[int] | None = None,
    ):
        self.tk = tk
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self.token_to_id(bos_token)
        self.eos_id = self.token_to_id(eos_token)
        pid = self.token_to_id(pad_token)
        self.pad_id = pid if pid is not None else (self.eos_id if self.eos_id is not None else 0)
        # Ids that end generation: eos plus model-declared extras (e.g. Llama 3's <|eot_id|>).
        self.eos_ids = {i for i in [self.eos_id, *(extra_eos_ids or [])] if i is not None}

    # ---- basics -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, tok: str | None) -> int | None:
        return None if tok is None else self.tk.token_to_id(tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------
    def set_chat_template(self, template: str | None) -> None:
        """Replace the chat template (e.g. `--chat-template`), compiled now so that a syntax error
        (jinja2.TemplateSyntaxError) shows before any row is rendered."""
        self.chat_template = template
        self.__dict__.pop("_template", None)
        if template:
            self._template  # noqa: B018 - compiles it

    @property
    def marks_generation(self) -> bool:
        """Whether the chat template marks assistant text with `{% generation %}` (masks come from it)."""
        return bool(self.chat_template and _GENERATION_TAG.search(self.chat_template))

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _GenerationTracker])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render `messages` to text. Raises ValueError when the tokenizer has no chat template."""
        self._require_template()
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special_vars(), **kwargs)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """`apply_chat_template`'s text and the (start, end) character spans of its `{% generation %}`
        blocks, in order (none when the template has no such tag)."""
        self._require_template()
        template = self._template
        tracker = template.environment.generation_tracker
        pieces, spans = [], []
        token = tracker.tracking.set((pieces, spans))
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self._special_vars(), **kwargs):
                pieces.append(piece)
        finally:
            tracker.tracking.reset(token)
        return "".join(pieces), spans

    def _require_template(self) -> None:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; use prompt/completion or text data instead, "
                             "or give one with --chat-template (e.g. chatml)")

    def _special_vars(self) -> dict:
        return dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (no special tokens added) and each token's (start, end) character offsets."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    # ---- I/O ------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{tj} not found: leantune needs a fast tokenizer (tokenizer.json) in the model folder")
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif template is None and (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        extra_eos = []
        gen = path / "generation_config.json"
        if gen.exists():
            e = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
            extra_eos = [e] if isinstance(e, int) else list(e or [])
        return cls(
            _HFTokenizer.from_file(str(tj)),
            chat_template=template,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            extra_eos_ids=extra_eos,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (transformers 5 layout)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(path / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token or self.eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template  # transformers 4 reads it here
            (path / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
