"""`/metrics` in Prometheus' text exposition format (version 0.0.4), written by hand: a handful of
counters and gauges read from the engine's `Stats`, no client library needed."""
from __future__ import annotations


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def render(engine) -> str:
    s, b = engine.stats, engine.blocks
    rows = [
        ("counter", "leantune_requests_total", "requests admitted", s.requests),
        ("counter", "leantune_prompt_tokens_total", "prompt tokens admitted", s.prompt_tokens),
        ("counter", "leantune_generation_tokens_total", "tokens generated", s.generated_tokens),
        ("counter", "leantune_finetune_tokens_total", "fine-tuning tokens forwarded in the serving loop", s.ft_tokens),
        ("counter", "leantune_finetune_steps_total", "fine-tuning optimizer steps", s.ft_steps),
        ("counter", "leantune_iterations_total", "engine iterations", s.iterations),
        ("counter", "leantune_preemptions_total", "sequences preempted for KV blocks", s.preemptions),
        ("gauge", "leantune_num_requests_running", "requests running", engine.sched.num_running),
        ("gauge", "leantune_num_requests_waiting", "requests waiting", engine.sched.num_waiting),
        ("gauge", "leantune_kv_blocks_free", "free KV-cache blocks", b.num_free),
        ("gauge", "leantune_kv_blocks_total", "KV-cache blocks", b.num_blocks),
        ("gauge", "leantune_adapters_loaded", "served adapters", len(engine.visible_adapters(None))),
        ("gauge", "leantune_finetune_job_active", "1 while a fine-tuning job trains", int(engine.jobs.active is not None)),
    ]
    out = []
    for kind, name, doc, value in rows:
        out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += ["# HELP leantune_iteration_seconds engine iteration time with inference work (last 1000)",
            "# TYPE leantune_iteration_seconds summary"]
    tp = list(s.tpot)
    for q in (0.5, 0.9, 0.99):
        out.append(f'leantune_iteration_seconds{{quantile="{q}"}} {_quantile(tp, q):.6f}')
    out.append(f"leantune_iteration_seconds_count {len(tp)}")
    for kind, n in sorted(s.completed.items()):
        out.append(f'leantune_requests_completed_total{{kind="{kind}"}} {n}')
    return "\n".join(out) + "\n"
