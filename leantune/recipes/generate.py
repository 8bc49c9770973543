"""`leantune generate`, `leantune chat` and `leantune merge`: load a model (+ adapters) and use it."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..fields import opt
from ..precision import Precision, parse_dtype, resolve_precision


@dataclass
class GenerateConfig:
    model: str | None = opt(None, "HF model folder, .gguf file, or model id in the local Hugging Face cache "
                                           "(ORG/NAME[@REVISION]; default: the embedded SmolLM2-135M-Instruct)")
    revision: str | None = opt(None, "branch, tag or commit of a --model id in the Hugging Face cache (default: main)")
    adapter: list[str] = opt([], "adapter folder to apply (PEFT format, or a method's own such as a sparse diff); "
                                 "repeat to compose several (see `leantune merge --help`)", metavar="DIR")
    prompt: list[str] = opt([], "prompt text; repeat the flag for a batch", metavar="TEXT")
    system: str | None = opt(None, "system message for chat-template models")
    raw: bool = opt(False, "send the prompt as is, without the chat template")
    max_new_tokens: int = opt(128, "most tokens to generate per prompt")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    top_k: int = opt(0, "sample among the k most likely tokens (0 = off)")
    stop: list[str] = opt([], "stop string; repeat for several", metavar="TEXT")
    seed: int | None = opt(None, "sampling seed")
    dtype: str = opt("auto", "compute precision: auto (bf16 on a CPU with native bf16, i.e. AVX512_BF16 or AMX, "
                             "else fp32), fp32 or bf16")

    def __post_init__(self):
        parse_dtype(self.dtype)
        self.adapter = adapter_list(self.adapter)
        from ..models.hub_cache import with_revision

        self.model, self.revision = with_revision(self.model, self.revision), None  # one spec: ORG/NAME@REV

    def generation(self):
        from ..models.generate import GenerationConfig

        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, stop_strings=list(self.stop), seed=self.seed)


def adapter_list(adapter) -> list[str]:
    """--adapter as a list: one folder (a str, as the Python API took it before) or several, or none."""
    if adapter is None:
        return []
    return [adapter] if isinstance(adapter, str) else [str(a) for a in adapter]


def load_with_adapter(model_path: str | None, adapter, precision: Precision):
    """(model, tokenizer) with every --adapter applied, in order: adapters with layers of their own (LoRA)
    are all active together (their changes add up); a sparse diff (SaRA, LT-SFT) is added into the base
    weights as it loads, so several compose as base + diff1 + diff2, and where two carry the same dense
    parameter (a head) the later one's replaces the earlier one's."""
    from .. import methods
    from ..models.loader import load_model
    from ..quant import Quant4bitConfig
    from .export import _quant_sidecar

    adapters = adapter_list(adapter)
    # A QLoRA adapter runs on (and merges onto) the same 4-bit base it was trained against.
    quant = _quant_sidecar(adapters)
    model, tok = load_model(model_path, precision, quantize=Quant4bitConfig(**quant) if quant else None)
    names = []
    for i, path in enumerate(adapters):
        name = "default" if len(adapters) == 1 else f"adapter{i}"
        model = methods.load_adapter(model, path, adapter_name=name)  # a side-network method returns a wrapper
        if name in methods.list_adapters(model):  # not a diff already added into the base
            names.append(name)
    if len(names) > 1:
        methods.set_adapter(model, names)
    return model, tok


def _precision(cfg: GenerateConfig) -> Precision:
    precision = resolve_precision(cfg.dtype, "cpu")
    print(precision.describe(), file=sys.stderr, flush=True)
    return precision


def encode_prompt(tok, text: str, cfg: GenerateConfig, history: list[dict] | None = None) -> list[int]:
    if cfg.raw or not tok.chat_template:
        return tok.encode(text)
    msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + (history or [])
    return tok.encode_chat(msgs + [{"role": "user", "content": text}], add_generation_prompt=True)


class StopStream:
    """Streams a reply to stdout as it is generated, cut where a stop string begins, so the streamed text
    equals the returned one: a tail that could still grow into a stop string is held back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            sys.stdout.write(self.text[self.sent:upto])
            sys.stdout.flush()
            self.sent = upto

    def __call__(self, _row: int, delta: str) -> None:
        if self.stopped:
            return
        self.text += delta
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        self.stopped = cut >= 0
        self._emit(cut if self.stopped else len(self.text) - self.hold)

    def finish(self, final: str) -> None:
        """Write what is still missing of the final (already cut) text, then a newline."""
        if final.startswith(self.text[:self.sent]):
            self.text = final
            self._emit(len(final))
        print(flush=True)


def generate(cfg: GenerateConfig) -> list[str]:
    from ..models.generate import generate_text

    if not cfg.prompt:
        raise ValueError("--prompt is required (repeat it for a batch of prompts)")
    model, tok = load_with_adapter(cfg.model, cfg.adapter, _precision(cfg))
    prompts = [encode_prompt(tok, p, cfg) for p in cfg.prompt]
    if len(prompts) == 1:  # one prompt: stream it as it is generated
        stream = StopStream(cfg.stop)
        texts = generate_text(model, tok, prompts, cfg.generation(), on_text=stream)
        stream.finish(texts[0])
        return texts
    texts = generate_text(model, tok, prompts, cfg.generation())
    for p, t in zip(cfg.prompt, texts):
        print(f"### {p}\n{t}\n")
    return texts


def chat(cfg: GenerateConfig, stdin=None) -> None:
    """Interactive chat: streams each reply; /reset clears the history, /exit (or EOF) quits."""
    from ..models.generate import generate_text

    stdin = stdin or sys.stdin
    model, tok = load_with_adapter(cfg.model, cfg.adapter, _precision(cfg))
    history: list[dict] = []
    print("leantune chat: type a message; /reset clears the history, /exit quits.", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            continue
        ids = encode_prompt(tok, text, cfg, history)
        stream = StopStream(cfg.stop)
        reply = generate_text(model, tok, [ids], cfg.generation(), on_text=stream)[0]
        stream.finish(reply)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


@dataclass
class MergeConfig:
    model: str | None = opt(None, "base model: HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    adapter: list[str] = opt([], "adapter folder to merge (required): PEFT format, or a method's own such as a "
                                 "sparse diff; repeat to compose several: LoRA changes and sparse diffs add up "
                                 "(base + diff1 + diff2), and a dense parameter (an LT-SFT head) carried by "
                                 "several is taken from the last one given", metavar="DIR")
    output: str = opt("out/merged", "folder for the merged plain Hugging Face model")
    dtype: str = opt("float32", "dtype of the saved weights: float32, bfloat16 or float16")

    def __post_init__(self):
        self.adapter = adapter_list(self.adapter)


def merge(cfg: MergeConfig) -> str:
    """Merge the adapters into the full-precision base and write a plain HF folder transformers loads."""
    import torch

    from .. import methods
    from ..models.loader import save_hf_folder

    if not cfg.adapter:
        raise ValueError("--adapter is required: the adapter folder to merge into --model (repeat it for several)")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {list(dtypes)}, got {cfg.dtype!r}")
    from .export import refuse_side_networks

    refuse_side_networks(cfg.adapter, "merged")
    # merged in fp32 whatever the CPU: W + s*BA is summed once, exactly, then cast to --dtype
    model, tok = load_with_adapter(cfg.model, cfg.adapter, resolve_precision("fp32"))
    methods.merge_and_unload(model)
    if any(methods.read_sidecar(a) is not None for a in cfg.adapter):  # QLoRA: layers not adapted are 4-bit still
        from .export import _dequantize_rest

        _dequantize_rest(model)
    out = save_hf_folder(model, tok, cfg.output, dtypes[cfg.dtype])
    print(f"merged model written to {out}")
    return str(out)
