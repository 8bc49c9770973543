"""Benchmark: the cost of JSON-schema decoding (serve/grammar.py, llguidance) on tokens/s, issue 17's goal
< 10%. The engine in-process (no HTTP), SmolLM2-135M (the embedded default) on CPU fp32, greedy.

The same batch of `concurrency` chat requests runs unconstrained (ignore_eos, `tokens` new tokens each) and
with `response_format` json_schema (a list of people: long enough that the grammar rarely ends before `tokens`),
alternated `reps` times; tokens/s = generated tokens / wall seconds of the batch, median over the reps (first
rep of each a warm-up, not counted). `ratio` = constrained / unconstrained tokens/s (goal >= 0.9).

    .venv/bin/python bench/structured.py [--concurrency 1 8] [--tokens 64] [--reps 4] [--threads 1]

`measure()` is the function bench/serve.py calls; it returns the result dict printed here as the JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

PEOPLE = {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                     "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                    "city": {"type": "string"}},
                                     "required": ["name", "age", "city"]}}
PROMPT = [{"role": "user", "content": "List fifty people as a JSON array of objects with name, age and city."}]


def _batch(engine, ids: list[int], n: int, tokens: int, grammar) -> tuple[int, float]:
    """(generated tokens, wall seconds) of n requests run to the end together."""
    from leantune.serve.grammar import compile_grammar
    from leantune.serve.requests import GenRequest

    counts = [0] * n
    for i in range(n):
        req = GenRequest(ids, "model", max_tokens=tokens, temperature=0, ignore_eos=grammar is None)
        if grammar is not None:
            req.processors.append(compile_grammar(engine.tk, engine.model.config.vocab_size, grammar))

        def sink(ev, i=i):
            counts[i] = ev.get("completion_tokens", counts[i])
        engine.add_request(req, sink)
    t0 = time.perf_counter()
    while engine.iteration():
        pass
    return sum(counts), time.perf_counter() - t0


def measure(model_path=None, concurrency=(1, 8), tokens: int = 64, reps: int = 4, threads: int = 1,
            device: str = "cpu") -> dict:
    import leantune
    from leantune.serve import grammar as G
    from leantune.serve.engine import Engine, EngineConfig
    from leantune.serve.store import Store

    torch.set_num_threads(threads)
    model, tk = leantune.load(model_path)
    model = model.to(device)  # the grammar's masks are built on the CPU either way; the logits come back there
    engine = Engine(model.eval(), tk, "model", Store(tempfile.mkdtemp()), EngineConfig())
    ids = tk.encode_chat(PROMPT, add_generation_prompt=True)
    grammar = G.json_schema_grammar(PEOPLE)
    rows = []
    with torch.no_grad():
        for n in concurrency:
            rates = {"free": [], "json": []}
            for rep in range(reps + 1):
                for kind, g in (("free", None), ("json", grammar)):
                    done, secs = _batch(engine, ids, n, tokens, g)
                    if rep:  # rep 0 warms up (and compiles the grammar into the cache)
                        rates[kind].append(done / secs)
            free, js = statistics.median(rates["free"]), statistics.median(rates["json"])
            rows.append({"concurrency": n, "free_tok_s": round(free, 1), "json_tok_s": round(js, 1),
                         "ratio": round(js / free, 3)})
    return {"bench": "structured", "model": str(model_path or "smollm2 (embedded)"), "device": device, "tokens": tokens,
            "threads": threads, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    a = ap.parse_args()
    res = measure(a.model, a.concurrency, a.tokens, a.reps, a.threads, a.device)
    print(f"{'concurrency':>11} {'free tok/s':>10} {'json tok/s':>10} {'ratio':>6}")
    for r in res["rows"]:
        print(f"{r['concurrency']:>11} {r['free_tok_s']:>10} {r['json_tok_s']:>10} {r['ratio']:>6}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
