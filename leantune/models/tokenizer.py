"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens and a Jinja2 chat template.

Reads a Hugging Face folder (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`); the GGUF
reader builds the same object from GGUF metadata. Chat templates render the way transformers renders them
(sandboxed Jinja2, trim_blocks + lstrip_blocks, `raise_exception`, `tojson`), and the rendered text is
encoded without adding special tokens again, because templates write BOS themselves.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


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
    @cached_property
    def _template(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render `messages` to text. Raises ValueError when the tokenizer has no chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; use prompt/completion or text data instead")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

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
