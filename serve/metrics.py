"""/metrics in the Prometheus text format, written by prometheus-client (as vLLM and SGLang do):
counters and histograms fed by the HTTP layer and by the scheduler's Observer hooks (engine
thread; the library's metrics are thread-safe), gauges read from the scheduler at scrape time.
Each server has its own registry, so several servers in one process do not share counts."""

from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..core.runtime.scheduler import Observer

PREFIX = "ernie_hal_"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

# no `_created` series beside every counter: the exposition keeps the names it always had
prometheus_client.disable_created_metrics()


class _SchedulerStats:
    """A collector: the scheduler's gauges and counters as they are at scrape time."""

    def __init__(self):
        self.stats = {}

    def collect(self):
        s, p = self.stats, PREFIX
        yield CounterMetricFamily(f"{p}engine_steps_total", "Forward passes run by the scheduler.", s.get("num_steps", 0))
        yield GaugeMetricFamily(f"{p}num_requests_waiting", "Sequences waiting in the queue.", s.get("num_waiting", 0))
        yield GaugeMetricFamily(f"{p}num_requests_running", "Sequences in the running batch.", s.get("num_running", 0))
        yield GaugeMetricFamily(f"{p}kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).",
                                s.get("kv_usage", 0))
        yield GaugeMetricFamily(f"{p}kv_cache_free_blocks", "Free KV-cache blocks.", s.get("kv_blocks_free", 0))
        yield GaugeMetricFamily(f"{p}kv_cache_blocks", "KV-cache blocks in all.", s.get("kv_blocks_total", 0))
        yield CounterMetricFamily(f"{p}prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                                  s.get("prefix_cache_queries", 0))
        yield CounterMetricFamily(f"{p}prefix_cache_hits_total",
                                  "Prompt tokens found in the prefix cache (not recomputed).",
                                  s.get("prefix_cache_hits", 0))
        yield GaugeMetricFamily(f"{p}decode_graphs_on", "1 while decode steps replay captured device graphs, 0 once off.",
                                int(bool(s.get("decode_graphs_on", False))))
        yield CounterMetricFamily(f"{p}decode_graph_eager_steps_total", "Decode steps that ran eager instead of replaying.",
                                  s.get("decode_graph_eager_steps", 0))
        q = s.get("quantization")
        if q:
            g = GaugeMetricFamily(f"{p}weight_bytes", "Bytes the model's weights hold, by weight-only quantization scheme.",
                                  labels=["quantization", "group_size"])
            g.add_metric([q["scheme"], str(q["group_size"])], q["weight_bytes"])
            yield g


class ServerMetrics(Observer):
    """Counters of the HTTP layer plus the scheduler's hooks (called on the engine thread)."""

    def __init__(self):
        p = PREFIX
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{p}requests_total", "HTTP requests to the /v1 endpoints, by status code.",
                                ["status"], registry=r)
        self.finished = Counter(f"{p}sequences_finished_total", "Finished sequences (choices), by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens_total", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens_total", "Generated tokens.", registry=r)
        self.preemptions = Counter(f"{p}preemptions_total",
                                   "Sequences preempted (recomputed later) for lack of KV blocks.", registry=r)
        self._stats = _SchedulerStats()
        r.register(self._stats)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time from arrival to the first token of a choice.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Time between consecutive tokens of a choice.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "Time from arrival to the end of a request.",
                             buckets=E2E_BUCKETS, registry=r)

    # ---- HTTP layer --------------------------------------------------------------------------
    def http_request(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    # ---- scheduler hooks ---------------------------------------------------------------------
    def request_added(self, request) -> None:
        self.prompt_tokens.inc(request.prompt_len)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens_generated(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def preempted(self) -> None:
        self.preemptions.inc()

    def request_finished(self, request) -> None:
        self.e2e.observe(time.monotonic() - request.arrival)
        for s in request.seqs:
            self.finished.labels(finish_reason=s.finish_reason or "abort").inc()

    # ---- exposition --------------------------------------------------------------------------
    def render(self, stats: dict) -> str:
        """The exposition with the scheduler's `stats()` snapshot as the current gauges."""
        self._stats.stats = stats
        return prometheus_client.generate_latest(self.registry).decode()
