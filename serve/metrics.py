"""Prometheus text exposition for /metrics, without a client library: a few counters and
histograms fed by the HTTP layer and by the scheduler's Observer hooks."""

from __future__ import annotations

import bisect
import threading
import time

from ..core.runtime.scheduler import Observer

PREFIX = "ernie_hal_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)      # last: +Inf only
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def lines(self, name: str) -> list:
        with self._lock:
            counts, total, count = list(self.counts), self.sum, self.count
        out, running = [], 0
        for le, c in zip(self.buckets, counts):
            running += c
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {count}', f"{name}_sum {total}", f"{name}_count {count}"]
        return out


class ServerMetrics(Observer):
    """Counters of the HTTP layer plus the scheduler's hooks (called on the engine thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests_by_status: dict = {}
        self.finished_by_reason: dict = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    # ---- HTTP layer --------------------------------------------------------------------------
    def http_request(self, status: int) -> None:
        with self._lock:
            self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1

    # ---- scheduler hooks ---------------------------------------------------------------------
    def request_added(self, request) -> None:
        with self._lock:
            self.prompt_tokens += request.prompt_len

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens_generated(self, n: int) -> None:
        with self._lock:
            self.generation_tokens += n

    def preempted(self) -> None:
        with self._lock:
            self.preemptions += 1

    def request_finished(self, request) -> None:
        self.e2e.observe(time.monotonic() - request.arrival)
        with self._lock:
            for s in request.seqs:
                reason = s.finish_reason or "abort"
                self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1

    # ---- exposition --------------------------------------------------------------------------
    def render(self, stats: dict) -> str:
        p = PREFIX
        with self._lock:
            by_status = dict(sorted(self.requests_by_status.items()))
            by_reason = dict(sorted(self.finished_by_reason.items()))
            prompt, gen, pre = self.prompt_tokens, self.generation_tokens, self.preemptions
        out = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {p}{name} {help_text}")
            out.append(f"# TYPE {p}{name} {kind}")
            out.extend(samples)

        metric("requests_total", "counter", "HTTP requests to the /v1 endpoints, by status code.",
               [f'{p}requests_total{{status="{k}"}} {v}' for k, v in by_status.items()])
        metric("sequences_finished_total", "counter", "Finished sequences (choices), by finish reason.",
               [f'{p}sequences_finished_total{{finish_reason="{k}"}} {v}' for k, v in by_reason.items()])
        metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [f"{p}prompt_tokens_total {prompt}"])
        metric("generation_tokens_total", "counter", "Generated tokens.", [f"{p}generation_tokens_total {gen}"])
        metric("preemptions_total", "counter", "Sequences preempted (recomputed later) for lack of KV blocks.",
               [f"{p}preemptions_total {pre}"])
        metric("engine_steps_total", "counter", "Forward passes run by the scheduler.",
               [f"{p}engine_steps_total {stats['num_steps']}"])
        metric("num_requests_waiting", "gauge", "Sequences waiting in the queue.",
               [f"{p}num_requests_waiting {stats['num_waiting']}"])
        metric("num_requests_running", "gauge", "Sequences in the running batch.",
               [f"{p}num_requests_running {stats['num_running']}"])
        metric("kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use (0..1).",
               [f"{p}kv_cache_usage_ratio {stats['kv_usage']}"])
        metric("kv_cache_free_blocks", "gauge", "Free KV-cache blocks.", [f"{p}kv_cache_free_blocks {stats['kv_blocks_free']}"])
        metric("kv_cache_blocks", "gauge", "KV-cache blocks in all.", [f"{p}kv_cache_blocks {stats['kv_blocks_total']}"])
        metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [f"{p}prefix_cache_queries_total {stats.get('prefix_cache_queries', 0)}"])
        metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache (not recomputed).",
               [f"{p}prefix_cache_hits_total {stats.get('prefix_cache_hits', 0)}"])
        metric("time_to_first_token_seconds", "histogram", "Time from arrival to the first token of a choice.",
               self.ttft.lines(f"{p}time_to_first_token_seconds"))
        metric("inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a choice.",
               self.itl.lines(f"{p}inter_token_latency_seconds"))
        metric("e2e_request_latency_seconds", "histogram", "Time from arrival to the end of a request.",
               self.e2e.lines(f"{p}e2e_request_latency_seconds"))
        return "\n".join(out) + "\n"
