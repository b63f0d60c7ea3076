"""Prometheus metrics of the server (`GET /metrics`), in vLLM's spirit under `jaxinfer_` names.

The engine's own counters (`Engine.stats()`: running, waiting, pages, prefix cache, preemptions)
are read once per step on the engine thread into a snapshot that a custom collector reports,
so a scrape never touches the engine. Token counts and the latency histograms are observed
from each step's deltas: time to first token from the request's arrival at the server, and
inter-token latency per token (a burst of k tokens that arrives dt after the previous one
counts k latencies of dt / k, since the engine emits several decode steps per host sync).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.stats: dict = {}
        self.registry.register(self)  # collect() below: the engine snapshot
        self.prompt_tokens = Counter("jaxinfer_prompt_tokens", "Prompt tokens of the requests submitted",
                                     registry=self.registry)
        self.generation_tokens = Counter("jaxinfer_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("jaxinfer_requests", "Requests finished, by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds", "Arrival at the server to the first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("jaxinfer_inter_token_latency_seconds", "Time between consecutive tokens of a sample",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self._last: dict[tuple[int, int], float] = {}  # (request, sample) -> time of its previous token

    def describe(self):
        return []  # the snapshot's families are dynamic; describing none keeps registration cheap

    def collect(self):
        s = self.stats
        for name, key, doc in (
            ("jaxinfer_num_requests_running", "running", "Samples in a decode slot"),
            ("jaxinfer_num_requests_waiting", "waiting", "Samples queued for a slot"),
            ("jaxinfer_kv_pages_used", "pages_used", "KV pages referenced by a running sample"),
            ("jaxinfer_kv_pages_free", "pages_free", "KV pages an allocation may take"),
            ("jaxinfer_kv_pages_cached", "pages_cached", "Full KV pages registered in the prefix cache"),
            ("jaxinfer_prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prompt tokens reused / prompt tokens admitted"),
        ):
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        yield CounterMetricFamily("jaxinfer_preemptions", "Samples preempted to free KV pages",
                                  value=float(s.get("preemptions", 0)))

    def observe_submit(self, handle) -> None:
        """Runs on the engine thread for every accepted request: its prompt counts once."""
        self.prompt_tokens.inc(len(handle.output.prompt_token_ids))

    def observe_step(self, deltas, handles, stats: dict) -> None:
        """Runs on the engine thread after every step."""
        self.stats = stats
        for d in deltas:
            k = len(d.token_ids)
            self.generation_tokens.inc(k)
            key = (d.request_id, d.sample)
            if k:
                prev = self._last.get(key)
                if prev is None:
                    h = handles.get(d.request_id)
                    if h is not None:
                        self.ttft.observe(max(0.0, d.time - h.arrival))
                    prev, k = d.time, k - 1  # the first token's latency is the TTFT
                for _ in range(k):
                    self.itl.observe(max(0.0, d.time - prev) / max(k, 1))
                self._last[key] = d.time
            if d.finish_reason is not None:
                self._last.pop(key, None)
                self.requests.labels(d.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
