"""Benchmark: MoE decode throughput, the grouped expert path vs a per-expert loop (leantune/models/moe.py).

A random Mixtral of tiny-but-not-trivial shape (hidden 512, 8 experts of 1024, top-2, 4 layers, vocab 4096),
fp32 on the CPU, greedy decode with a KV cache: a 32-token prompt per row, then `--steps` single-token steps,
timed step by step (the two paths alternating; the thread's CPU time with 1 thread, as a busy shared machine
would otherwise time its neighbours); the median step gives tokens/s = batch / step time. Batch sizes 1, 8, 32, 128; the same
model and inputs for both paths in one process. Prints the CPU, a table with the grouped/loop ratio, the path
`EXPERT_PATH = "auto"` picks at each batch, and one JSON line. Not a test: nothing here is asserted.

    .venv/bin/python bench/moe_decode.py [--threads 1] [--steps 16] [--batches 1,8,32,128]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def make_model(seed: int = 0):
    import torch

    from leantune.models.config import ModelConfig
    from leantune.models.llama import LlamaForCausalLM

    cfg = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                      num_kv_heads=2, model_type="mixtral", num_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.02) if not n.endswith("norm.weight") else p.fill_(1.0)
    return model.eval()


def decode_step_s(model, batch: int, steps: int, clock, prompt_len: int = 32) -> dict[str, float]:
    """Median seconds of one decode step of `batch` rows, per expert path. The two paths decode the same rows
    side by side, step by step alternating, so a busy machine slows both alike."""
    import torch

    from leantune.models import moe
    from leantune.models.kv_cache import KVCache
    from leantune.models.llama import ForwardMeta

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g)
    state, times = {}, {"loop": [], "grouped": []}
    with torch.no_grad():
        for path in times:
            moe.Experts.path = path
            cache = KVCache.for_model(model, batch, prompt_len + steps + 2)
            state[path] = (cache, model(ids, ForwardMeta(cache=cache))[:, -1].argmax(-1, keepdim=True))  # prefill
        for _ in range(steps):
            for path in times:
                moe.Experts.path = path
                cache, nxt = state[path]
                t = clock()
                nxt = model(nxt, ForwardMeta(cache=cache))[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                times[path].append(clock() - t)
                state[path] = (cache, nxt)
    moe.Experts.path = "auto"
    return {p: statistics.median(ts[2:]) for p, ts in times.items()}  # the first steps warm up


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)  # 1: busy shared CPUs make 2 OpenMP threads spin
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32,128")
    args = ap.parse_args(argv)
    import torch

    from leantune.models import moe
    from leantune.precision import cpu_info

    torch.set_num_threads(args.threads)
    model = make_model()
    cfg = model.config
    rows = []
    # one thread: its CPU time (time.thread_time) is the step's compute, whatever else the machine runs
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    for b in (int(x) for x in args.batches.split(",")):
        t = decode_step_s(model, b, args.steps, clock)
        loop, grouped = t["loop"], t["grouped"]
        auto = "loop" if b * cfg.num_experts_per_tok <= moe.LOOP_MAX_ASSIGNMENTS else "grouped"
        rows.append({"batch": b, "loop_tok_s": b / loop, "grouped_tok_s": b / grouped, "grouped_over_loop": loop / grouped,
                     "auto_picks": auto})
    print(f"cpu: {cpu_info().describe()}")
    print(f"MoE decode: random Mixtral hidden {cfg.hidden_size}, {cfg.num_experts} experts x {cfg.intermediate_size}, "
          f"top-{cfg.num_experts_per_tok}, {cfg.num_layers} layers, vocab {cfg.vocab_size}; fp32, {args.threads} threads, "
          f"median of {args.steps - 2} steps, {'CPU' if args.threads == 1 else 'wall'} time")
    print(f"  {'batch':>5}  {'loop tok/s':>11}  {'grouped tok/s':>13}  {'grouped/loop':>12}  auto picks")
    for r in rows:
        print(f"  {r['batch']:>5}  {r['loop_tok_s']:>11.1f}  {r['grouped_tok_s']:>13.1f}  {r['grouped_over_loop']:>12.2f}"
              f"  {r['auto_picks']}")
    res = {"bench": "moe_decode", "cpu": cpu_info().as_dict(), "threads": args.threads, "rows": rows}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
