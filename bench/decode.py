"""Benchmark: decode throughput of the serving engine in bf16 vs fp32 on this machine (the goal on a CPU
with native bf16: >= 1.6x, since decoding is memory-bound and bf16 halves the weight bytes moved).

Runs `bench/coserve.py`'s serve phase (a closed-loop load of `--concurrency` greedy requests through
`leantune.serve.engine.Engine`, no fine-tuning job) once per precision, each on a freshly loaded model:
fp32, and bf16 as `leantune serve --dtype bf16` loads it. Prints the CPU, generated tokens/s, TPOT and
the ratio, and one JSON line. Any `bench/coserve.py` option may follow (e.g. --phase-s, --threads).

    .venv/bin/python bench/decode.py [--model smollm2] [--concurrency 16] [--prompt-len 32] [--output-len 32]
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coserve  # noqa: E402


def decode_tok_s(args, dtype: str) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, tok, base = coserve.load_model(args.model, tmp, args.device, getattr(torch, dtype))
        engine, _ = coserve.make_engine(model, tok, base, tmp, args, dtype)
        return coserve.phase_serve(engine, base, coserve.prompts(tok, 64, args.prompt_len), args)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--model": "smollm2", "--concurrency": "16", "--prompt-len": "32", "--output-len": "32",
                "--skip-adapters": None}
    for flag, value in defaults.items():  # this bench's defaults, unless given
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag] + ([value] if value is not None else [])
    args = coserve.parse(argv)
    import torch

    from leantune.precision import cpu_info

    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        coserve._CLOCK[0] = __import__("time").thread_time
    torch.set_grad_enabled(False)
    res = {"bench": "decode", "cpu": cpu_info().as_dict(), "model": args.model, "concurrency": args.concurrency,
           "prompt_len": args.prompt_len, "output_len": args.output_len, "threads": args.threads, "clock": args.clock}
    for dtype in ("float32", "bfloat16"):
        res[dtype] = decode_tok_s(args, dtype)
    ratio = res["bfloat16"]["gen_tok_s"] / res["float32"]["gen_tok_s"]
    res["bf16_over_fp32"] = ratio
    print(f"cpu: {cpu_info().describe()}")
    print(f"decode: {args.model}, {args.concurrency} concurrent requests of {args.prompt_len} + {args.output_len} "
          f"tokens, greedy, {args.threads} threads, {args.clock} clock")
    for dtype in ("float32", "bfloat16"):
        r = res[dtype]
        print(f"  {dtype:<9} {r['gen_tok_s']:8.1f} tok/s   TPOT p50 {r.get('tpot_p50_ms', float('nan')):7.1f} ms")
    print(f"  bf16 / fp32 throughput: {ratio:.2f}   (goal on a CPU with native bf16: >= 1.6)")
    print(json.dumps(coserve._clean(res)))
    return res


if __name__ == "__main__":
    main()
