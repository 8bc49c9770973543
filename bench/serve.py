"""Serving benchmark (not a test): requests/s and TTFT / TPOT p50 / p99 of `leantune serve` at 1, 8 and 32
concurrent clients, base-only vs 16 adapters vs 64 adapters under --max-loras 16, and the cost of JSON-schema
decoding on tokens/s (bench/structured.py's `measure`, goal: < 10%) (issue 17).

An in-process server (uvicorn on loopback, the real HTTP path) driven by the official `openai` async client
with streaming completions (TTFT: first streamed token; TPOT: (last - first) / (tokens - 1)). Adapters are
random rank-8 LoRAs on every linear; each request picks one round-robin. Prints a table and a JSON line.

    python bench/serve.py [--model DIR] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's leantune, run as a script

def _adapters(model_path, n: int, out: Path, rank: int) -> list[str]:
    import leantune
    from leantune.methods import save_adapter

    model, _ = leantune.load(model_path)
    leantune.apply(model, "lora", r=rank, targets="all-linear")
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        paths.append(f"a{i}={save_adapter(model, out / f'a{i}')}")
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cfg):
    import uvicorn

    from leantune.recipes.serve import build_server

    app, engine = build_server(cfg)
    engine.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, engine


async def _one(client, model: str, prompt: str, max_tokens: int) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            n += 1
    first = first or time.perf_counter()
    return first - t0, (last - first) / (n - 1) if n > 1 and last else None


async def _load(base_url: str, models: list[str], clients: int, requests: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    queue = list(range(requests))
    ttft, tpot = [], []

    async def worker():
        while queue:
            i = queue.pop()
            a, b = await _one(client, models[i % len(models)], f"Request {i}: tell me about the sea.", max_tokens)
            ttft.append(a)
            if b is not None:
                tpot.append(b)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return requests / wall, ttft, tpot


def _pct(xs, q):
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny settings")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--skip-structured", action="store_true", help="leave out the JSON-schema decoding rows")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (serve's --device)")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or auto (serve's --dtype)")
    args = ap.parse_args(argv)
    from leantune.precision import cpu_info
    from leantune.recipes.serve import ServeConfig

    quick = args.quick
    clients = [1, 2] if quick else [1, 8, 32]
    scenarios = [("base", 0, None), ("16 adapters", 2 if quick else 16, None),
                 ("64 adapters, --max-loras 16", 4 if quick else 64, 2 if quick else 16)]
    max_tokens = args.max_tokens or (4 if quick else 16)
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="leantune-bench-serve-"))
    paths = _adapters(args.model, max(n for _, n, _ in scenarios), tmp / "adapters", 8)
    for label, n_adapters, max_loras in scenarios:
        cfg = ServeConfig(model=args.model, adapter=paths[:n_adapters], port=_free_port(), dtype=args.dtype,
                          device=args.device,
                          data_dir=str(tmp / f"data-{n_adapters}"), max_loras=max_loras, threads=args.threads,
                          max_model_len=256)
        server, thread, engine = _start(cfg)
        models = [p.split("=")[0] for p in paths[:n_adapters]] or [engine.base_name]
        try:
            for c in clients:
                reqs = max(2 * c, 4) if quick else max(4 * c, 16)
                rps, ttft, tpot = asyncio.run(_load(f"http://127.0.0.1:{cfg.port}/v1", models, c, reqs, max_tokens))
                rows.append({"scenario": label, "clients": c, "requests": reqs, "req_per_s": rps,
                             "ttft_p50": _pct(ttft, 0.5), "ttft_p99": _pct(ttft, 0.99),
                             "tpot_p50": _pct(tpot, 0.5), "tpot_p99": _pct(tpot, 0.99)})
                r = rows[-1]
                print(f"{label:30s} {c:3d} clients {r['req_per_s']:7.2f} req/s  TTFT p50 {r['ttft_p50']*1e3:8.1f} "
                      f"p99 {r['ttft_p99']*1e3:8.1f} ms  TPOT p50 {r['tpot_p50']*1e3:7.1f} p99 "
                      f"{r['tpot_p99']*1e3:7.1f} ms", flush=True)
        finally:
            server.should_exit = True
            thread.join(10)
            engine.stop()
    where = f"CPU: {cpu_info().describe()}" if args.device == "cpu" else f"--device {args.device}"
    print(f"\n{where}, --dtype {args.dtype}, max_tokens {max_tokens}, "
          f"rank-8 LoRA on all linears, streaming completions; model {args.model or 'SmolLM2-135M-Instruct'}")
    print("| scenario | clients | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['clients']} | {r['req_per_s']:.2f} | {r['ttft_p50']*1e3:.0f} | "
              f"{r['ttft_p99']*1e3:.0f} | {r['tpot_p50']*1e3:.1f} | {r['tpot_p99']*1e3:.1f} |")
    structured = None
    if not args.skip_structured:
        from bench.structured import measure

        structured = measure(args.model, concurrency=(1,) if quick else (1, 8), tokens=8 if quick else 64,
                             reps=1 if quick else 4, threads=args.threads or 1,
                             device="cuda" if args.device == "auto" and torch.cuda.is_available() else
                             ("cpu" if args.device == "auto" else args.device))
        print("\nJSON-schema decoding (response_format json_schema, llguidance) vs free decoding, greedy, engine "
              "in-process:")
        print("| concurrency | free tok/s | json_schema tok/s | ratio |")
        print("|---|---|---|---|")
        for r in structured["rows"]:
            print(f"| {r['concurrency']} | {r['free_tok_s']} | {r['json_tok_s']} | {r['ratio']} |")
    print(json.dumps({"bench": "serve", "cpu": cpu_info().describe(), "quick": quick, "rows": rows,
                      "structured": structured}))


if __name__ == "__main__":
    sys.exit(main())
