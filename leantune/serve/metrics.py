"""`/metrics` in Prometheus' text format, through `prometheus-client`, one `CollectorRegistry` per engine (never
the library's global one: two servers in one process must not clash).

- vLLM's request metrics under leantune's prefix: `leantune:time_to_first_token_seconds`,
  `leantune:time_per_output_token_seconds`, `leantune:e2e_request_latency_seconds`,
  `leantune:request_queue_time_seconds` (histograms, vLLM's buckets), `leantune:prompt_tokens_total`,
  `leantune:generation_tokens_total` (counters), `leantune:num_requests_running` / `_waiting` (gauges).
- `vllm:lora_requests_info`, the LoRA gauge Kubernetes' Gateway API Inference Extension reads for adapter
  affinity (its model-server protocol; the endpoint picker's default `--lora-info-metric`): one series whose
  labels are `running_lora_adapters` and `waiting_lora_adapters` (comma-separated adapter names) and `max_lora`
  (how many adapters may be resident: --max-loras, or the number loaded when unbounded), valued at the scrape's
  Unix time as vLLM's.
- leantune's own counters and gauges of the engine (`leantune_requests_total`, KV blocks, fine-tuning tokens
  and steps, ...), read from `Stats` at scrape time.

Per-request times are taken in the engine thread (`arrived`, `step`, `finished`), and a scrape is rendered there
too (`scrape`, between iterations), so nothing reads the engine's tables while they change. A sequence's time per
output token is (finish - first token) / (tokens - 1), vLLM's definition.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from .adapter_cache import Tier

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
LORA_INFO = "vllm:lora_requests_info"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Times:
    __slots__ = ("arrival", "scheduled", "first", "tokens")

    def __init__(self, arrival: float):
        self.arrival, self.scheduled, self.first, self.tokens = arrival, None, None, 0


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("leantune:time_to_first_token_seconds", "time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("leantune:time_per_output_token_seconds", "time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("leantune:e2e_request_latency_seconds", "end-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("leantune:request_queue_time_seconds", "time from arrival to the first scheduled step",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("leantune:prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("leantune:generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("leantune:num_requests_running", "requests running", registry=r)
        self.waiting = Gauge("leantune:num_requests_waiting", "requests waiting (for KV blocks or an adapter place)",
                             registry=r)
        self.lora_info = Gauge(LORA_INFO, "running and waiting LoRA adapters (Gateway API Inference Extension)",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
        r.register(_EngineCollector(engine))
        self.clock = time.perf_counter
        self._times: dict[str, _Times] = {}

    # -- engine thread -------------------------------------------------------------------------------
    def arrived(self, sid: str, prompt_tokens: int) -> None:
        self._times[sid] = _Times(self.clock())
        self.prompt_tokens.inc(prompt_tokens)

    def step(self, plan) -> None:
        """A packed step ran: its sequences were scheduled, those with `sample` chunks get a token now."""
        now = self.clock()
        for c in plan.chunks:
            t = self._times.get(c.seq.seq_id)
            if t is None:
                continue
            if t.scheduled is None:
                t.scheduled = now
                self.queue.observe(now - t.arrival)
            if c.sample:
                t.tokens += 1
                if t.first is None:
                    t.first = now
                    self.ttft.observe(now - t.arrival)
        self.generation_tokens.inc(sum(1 for c in plan.chunks if c.sample and c.seq.seq_id in self._times))

    def finished(self, sid: str) -> None:
        t = self._times.pop(sid, None)
        if t is None:
            return
        now = self.clock()
        self.e2e.observe(now - t.arrival)
        if t.tokens > 1:
            self.tpot.observe((now - t.first) / (t.tokens - 1))

    def refresh(self) -> None:
        """The gauges read off the engine (its thread: the request tables change only there)."""
        e = self.engine
        running, waiting = e.lora_requests()
        n_wait = e.sched.num_waiting + len(e._adapter_wait)
        self.running.set(e.sched.num_running)
        self.waiting.set(n_wait)
        max_lora = e.adapter_cache.max_loras
        if max_lora is None:
            max_lora = len(e.visible_adapters(None))
        self.lora_info.clear()  # one series: the current sets, not every set ever seen
        self.lora_info.labels(",".join(sorted(running)), ",".join(sorted(waiting)), str(max_lora)).set(time.time())

    def scrape(self) -> bytes:
        """The exposition text; run in the engine thread, so every engine table is read between iterations."""
        self.refresh()
        return generate_latest(self.registry)


class _EngineCollector:
    """leantune's engine counters and gauges (names kept from the hand-written exporter), read at scrape."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []  # collected at scrape time only

    def collect(self):
        e = self.engine
        s, b = e.stats, e.blocks
        for name, doc, value in (
                ("leantune_requests", "requests admitted", s.requests),
                ("leantune_prompt_tokens", "prompt tokens admitted", s.prompt_tokens),
                ("leantune_generation_tokens", "tokens generated", s.generated_tokens),
                ("leantune_finetune_tokens", "fine-tuning tokens forwarded in the serving loop", s.ft_tokens),
                ("leantune_finetune_steps", "fine-tuning optimizer steps", s.ft_steps),
                ("leantune_iterations", "engine iterations", s.iterations),
                ("leantune_preemptions", "sequences preempted for KV blocks", s.preemptions)):
            yield CounterMetricFamily(name, doc, value=value)
        done = CounterMetricFamily("leantune_requests_completed", "finished HTTP requests by kind", labels=["kind"])
        for kind, n in sorted(s.completed.items()):
            done.add_metric([kind], n)
        yield done
        for name, doc, value in (
                ("leantune_num_requests_running", "requests running", e.sched.num_running),
                ("leantune_num_requests_waiting", "requests waiting", e.sched.num_waiting),
                ("leantune_kv_blocks_free", "free KV-cache blocks", b.num_free),
                ("leantune_kv_blocks_total", "KV-cache blocks", b.num_blocks),
                ("leantune_adapters_loaded", "served adapters", len(e.visible_adapters(None))),
                ("leantune_adapters_resident", "adapters in the model tree (--max-loras bounds them)",
                 len(e.adapter_cache.names(Tier.DEVICE))),
                ("leantune_finetune_job_active", "1 while a fine-tuning job trains", int(e.jobs.active is not None))):
            yield GaugeMetricFamily(name, doc, value=value)
        tp = sorted(s.tpot)
        yield SummaryMetricFamily("leantune_iteration_seconds", "engine iteration time with inference work "
                                  "(last 1000)", count_value=len(tp), sum_value=sum(tp))
