"""`leantune serve`: the base model and its adapters behind an OpenAI-compatible HTTP API, with
fine-tuning jobs trained inside the serving loop (setup -> engine thread -> uvicorn)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..fields import opt
from ..precision import parse_dtype, resolve_device, resolve_precision
from ..serve.ft_defaults import FineTuneDefaults, invalid


@dataclass
class ServeConfig:
    model: str | None = opt(None, "HF model folder, .gguf file, or model id in the local Hugging Face cache "
                                           "(ORG/NAME[@REVISION]; default: the embedded SmolLM2-135M-Instruct)")
    revision: str | None = opt(None, "branch, tag or commit of a --model id in the Hugging Face cache (default: main)")
    adapter: list[str] = opt([], "serve a PEFT adapter folder as NAME=DIR; repeat for several. A folder that "
                                 "changes the base's own weights (a SaRA sparse diff) is merged into the base at "
                                 "start-up, which is then served as NAME (at most one such folder)",
                             metavar="NAME=DIR")
    embedding_model: str | None = opt(None, "an encoder folder (e.g. a sentence-transformers one such as "
                                            "all-MiniLM-L6-v2) also served at /v1/embeddings, mean-pooled and "
                                            "L2-normalized, as NAME=DIR or DIR (NAME: the folder's name); needs "
                                            "pip install 'leantune[encoders]'", metavar="[NAME=]DIR")
    host: str = opt("127.0.0.1", "address to bind (loopback unless told otherwise)")
    port: int = opt(8000, "TCP port")
    api_key: list[str] = opt([], "API key clients must send as a Bearer token; repeat for several "
                                 "(also read from LEANTUNE_API_KEYS, comma-separated)", metavar="KEY")
    data_dir: str = opt("leantune-data", "where uploaded files, jobs, checkpoints and adapters are kept")
    served_model_name: str | None = opt(None, "the base model's name in the API (default: the folder or file name)")
    max_upload_mb: int = opt(64, "largest accepted upload, in MiB")
    num_blocks: int = opt(1024, "KV-cache blocks")
    block_size: int = opt(16, "tokens per KV-cache block")
    max_tokens_per_step: int = opt(256, "token budget of one engine iteration (inference first, the rest fine-tunes)")
    max_seqs: int = opt(64, "most requests running at once")
    max_model_len: int = opt(2048, "longest prompt + completion")
    ft_max_chunk: int = opt(32, "most fine-tuning forward tokens per iteration")
    ft_bwd_layers: int = opt(1, "fine-tuning backward layers per iteration while requests run")
    checkpoint_every: int = opt(10, "fine-tuning steps between job checkpoints")
    ft_time_share: float = opt(0.10, "while requests run, fine-tuning may add at most this fraction to their "
                                     "iterations' time, so latency holds; inf: no bound, the leftover token "
                                     "budget alone decides (FlexLLM's rule)")
    ft_rank: int = opt(FineTuneDefaults.rank, "LoRA rank of a fine-tuning job's adapter")
    ft_alpha: float = opt(FineTuneDefaults.alpha, "LoRA alpha of a fine-tuning job's adapter")
    ft_max_length: int = opt(FineTuneDefaults.max_length, "fine-tuning examples are truncated to this many tokens")
    ft_lr: float = opt(FineTuneDefaults.lr, "fine-tuning learning rate at learning_rate_multiplier 1 (a job's "
                                            "\"auto\")")
    ft_beta: float = opt(FineTuneDefaults.beta, "DPO beta of a method.type \"dpo\" job whose beta is \"auto\"")
    max_loras: int | None = opt(None, "most adapters resident in the model at once (default: all); more are kept "
                                      "least-recently-used in host memory up to --max-cpu-loras, beyond that "
                                      "reloaded from their folder; a request waits while every resident one is "
                                      "in use")
    max_cpu_loras: int | None = opt(None, "most adapters held in memory, the resident ones included (>= --max-loras; "
                                          "default: --max-loras)")
    lora_dir: str | None = opt(None, "a request whose model names an unknown adapter NAME loads the PEFT folder "
                                     "DIR/NAME on first use (vLLM's LoRA resolver), for every key", metavar="DIR")
    quantize: str | None = opt(None, "serve the base model 4-bit (nf4 or fp4, blocksize 64, double quantization: "
                                     "QLoRA's defaults), so QLoRA adapters run on the base they were trained on")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")
    dtype: str = opt("auto", "compute precision: auto (bf16 on CUDA and on a CPU with native bf16, i.e. "
                             "AVX512_BF16 or AMX: decoding is memory-bound and bf16 halves the bytes; else "
                             "fp32), fp32 or bf16")
    ft_eval_every: int = opt(FineTuneDefaults.eval_every, "steps between a fine-tuning job's validation metrics "
                                                            "(with a validation_file; a job's eval_every overrides)")
    max_jobs_per_key: int | None = opt(None, "most unfinished fine-tuning jobs per API key (429 past it; default: "
                                             "no limit)")
    max_storage_mb_per_key: int | None = opt(None, "most MiB of stored files per API key (uploads past it: 413; "
                                                   "default: no limit)")

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.max_upload_mb < 1:
            raise ValueError(f"--max-upload-mb must be >= 1, got {self.max_upload_mb}")
        parse_dtype(self.dtype)
        from ..models.hub_cache import with_revision

        self.model, self.revision = with_revision(self.model, self.revision), None  # one spec: ORG/NAME@REV
        if not self.ft_time_share > 0:  # also refuses nan
            raise ValueError(f"--ft-time-share must be > 0 (e.g. 0.1, or inf for no bound), got {self.ft_time_share}")
        flags = {"max_jobs_per_key": "--max-jobs-per-key", "max_storage_bytes_per_key": "--max-storage-mb-per-key"}
        bad = invalid(self._finetune(), lambda f: flags.get(f, "--ft-" + f.replace("_", "-")))
        if bad:
            raise ValueError(bad)
        if self.quantize is not None:
            from ..quant import Quant4bitConfig

            try:
                Quant4bitConfig(self.quantize)
            except ValueError:
                raise ValueError(f"--quantize must be nf4 or fp4, got {self.quantize!r}") from None
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--adapter must be NAME=DIR, got {spec!r}")

    def engine_config(self):
        from ..serve.engine import EngineConfig

        return EngineConfig(num_blocks=self.num_blocks, block_size=self.block_size,
                            max_tokens_per_step=self.max_tokens_per_step, max_seqs=self.max_seqs,
                            max_model_len=self.max_model_len, ft_max_chunk=self.ft_max_chunk,
                            ft_bwd_layers=self.ft_bwd_layers, checkpoint_every=self.checkpoint_every,
                            finetune=FineTuneDefaults(**self._finetune()),
                            ft_time_share=None if math.isinf(self.ft_time_share) else self.ft_time_share,
                            max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras, lora_dir=self.lora_dir)

    def _finetune(self) -> dict:
        """The --ft-* values as FineTuneDefaults' fields."""
        return {"rank": self.ft_rank, "alpha": self.ft_alpha, "max_length": self.ft_max_length, "lr": self.ft_lr,
                "beta": self.ft_beta, "eval_every": self.ft_eval_every, "max_jobs_per_key": self.max_jobs_per_key,
                "max_storage_bytes_per_key": None if self.max_storage_mb_per_key is None
                else self.max_storage_mb_per_key << 20}

    def keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("LEANTUNE_API_KEYS", "").split(",") if k.strip()]
        return list(self.api_key) + env


def base_name(model_path: str | None, override: str | None) -> str:
    if override:
        return override
    if model_path is None:
        return "SmolLM2-135M-Instruct"
    from ..models.hub_cache import looks_like_model_id

    p = Path(model_path)
    if not p.exists() and looks_like_model_id(model_path):
        return model_path.partition("@")[0]  # a model id from the Hugging Face cache
    return p.stem if p.suffix == ".gguf" else p.resolve().name


def split_base_changes(cfg: ServeConfig) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """(NAME, DIR) of the --adapter that changes the base's own weights (a sparse diff: merged into the base at
    start-up and served as NAME), or None; and the other adapters as (NAME, DIR)."""
    from ..methods.registry import changes_base_weights

    pairs = [tuple(spec.partition("=")[::2]) for spec in cfg.adapter]
    into_base = [(n, p) for n, p in pairs if changes_base_weights(p) is not None]
    if len(into_base) > 1:
        raise ValueError(f"--adapter {', '.join(f'{n}={p}' for n, p in into_base)}: each changes the base's own "
                         "weights and this server holds one copy of them; combine them first (leantune merge "
                         "--adapter DIR ...) and serve the merged folder as --model")
    if into_base and cfg.served_model_name:
        raise ValueError(f"--served-model-name {cfg.served_model_name!r} and --adapter {into_base[0][0]}=... (merged "
                         "into the base and served under that name) both name the base model; give one of them")
    return (into_base[0] if into_base else None), [(n, p) for n, p in pairs if (n, p) not in into_base]


def _wrapping_adapters(adapters: list[str]) -> list[tuple[str, object]]:
    """(folder, method) of the --adapter folders whose method runs beside the model (a `wrap` hook: QST's side
    network) rather than inside its layers."""
    from ..methods.registry import spec_for_folder

    out = []
    for spec in adapters:
        path = spec.partition("=")[2]
        method = spec_for_folder(path) if Path(path).is_dir() else None
        if method is not None and method.wrap is not None:
            out.append((path, method))
    return out


def _wrapping_quantization(adapters: list[str]):
    """The 4-bit base a side-network adapter was trained beside (its `leantune.json`), so the server computes what
    it was trained on; None: the base as --dtype says (LoRA adapters, QLoRA's included, are served so)."""
    from ..methods import read_sidecar
    from ..quant import Quant4bitConfig

    quants = {json.dumps(q, sort_keys=True) for path, _ in _wrapping_adapters(adapters) if (q := read_sidecar(path))}
    if len(quants) > 1:
        raise ValueError("--adapter: the side-network adapters were trained beside differently quantized bases "
                         f"({sorted(quants)}); serve them from separate servers")
    return Quant4bitConfig(**json.loads(quants.pop())) if quants else None


def _base_quantization(cfg: ServeConfig):
    """The 4-bit base to serve: --quantize, or what a side-network adapter was trained beside; None: float."""
    from ..quant import Quant4bitConfig

    side = _wrapping_quantization(cfg.adapter)
    if cfg.quantize is None:
        return side
    asked = Quant4bitConfig(cfg.quantize)
    if side is not None and side != asked:
        raise ValueError(f"--quantize {cfg.quantize}: the side-network --adapter was trained beside another base "
                         f"({side}); drop --quantize or serve it from another server")
    return asked


def _wrap_for_adapters(model, adapters: list[str]):
    """The model the engine holds: wrapped by a side-network method (its `wrap` hook) when an --adapter needs it,
    so that the engine's `load_adapter` adds the adapter to the wrapper."""
    methods = {m.name: m for _, m in _wrapping_adapters(adapters)}
    if len(methods) > 1:
        raise ValueError(f"--adapter: adapters of several side-network methods {sorted(methods)} cannot share one "
                         "server; serve them from separate servers")
    return next(iter(methods.values())).wrap(model) if methods else model


def build_server(cfg: ServeConfig):
    """(FastAPI app, Engine) ready to run; adapters from the command line and the data dir are loaded."""
    import torch

    from ..models.loader import load_model
    from ..serve.api import build_app
    from ..serve.engine import Engine
    from ..serve.store import Store

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    into_base, adapters = split_base_changes(cfg)  # checked before any weight is read
    precision = resolve_precision(cfg.dtype, resolve_device(cfg.device))
    print(f"leantune: {precision.describe()}", flush=True)
    model, tok = load_model(cfg.model, precision, quantize=_base_quantization(cfg))
    model = _wrap_for_adapters(model, cfg.adapter)
    model.eval()
    served = cfg.served_model_name
    if into_base is not None:  # one copy of the weights: the changed base is what this server serves
        from ..methods import load_adapter

        served, path = into_base
        load_adapter(model, path)
        print(f"leantune: {path} changes the base's own weights: merged into the base, served as {served!r}",
              flush=True)
    store = Store(Path(cfg.data_dir))
    engine = Engine(model, tok, base_name(cfg.model, served), store, cfg.engine_config())
    for name, path in adapters:
        engine.load_adapter(name, path, owner=None)
    for rec in store.list_adapters():
        if rec["name"] not in engine.adapters and Path(rec["path"]).is_dir():
            engine.load_adapter(rec["name"], rec["path"], rec["owner"])
    embedder = None
    if cfg.embedding_model:
        from ..serve.embed import Encoder

        embedder = Encoder.load(cfg.embedding_model)
        if embedder.name == engine.base_name or embedder.name in engine.adapters:
            raise ValueError(f"--embedding-model: the name {embedder.name!r} is the base model's or an adapter's; "
                             "name it: --embedding-model NAME=DIR")
    app = build_app(engine, cfg.keys(), cfg.max_upload_mb << 20, str(cfg.model or "embedded"), embedder)
    return app, engine


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app, engine = build_server(cfg)
    engine.start()
    print(f"leantune: serving {engine.base_name} (+{len(engine.adapters)} adapters) on http://{cfg.host}:{cfg.port}/v1"
          f"{' (API keys required)' if cfg.keys() else ''}", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.stop()
