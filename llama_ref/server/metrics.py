"""What the server reports about itself: Prometheus metrics (`GET /metrics`) and one JSON
access-log line per request (docs/reliability.md, "Observability").

Each app has its own registry, so that two servers in one process count apart. Request
counts and latencies are recorded as requests pass (`RequestLog`, `timed`); queue depth,
batch size and the prefix cache are read from the engines when scraped (`EngineCollector`).
No prompt, output or `user` is ever logged.
"""
import json
import logging
import time
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

access_log = logging.getLogger("llama_ref.access")

# seconds; decoding a token on a CPU takes from a few ms (135M) to about a second (13B)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RequestRecord:
    """One request, as the access log shows it."""
    request_id: str
    method: str
    route: str
    status: int = 0
    duration_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


# The record of the request being served: the routes add its tokens, the middleware logs it.
current_request: ContextVar[RequestRecord | None] = ContextVar("current_request", default=None)


class Metrics:
    def __init__(self, engines: dict):
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_ref_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram("llama_ref_request_duration_seconds", "end-to-end latency of a request",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token_seconds = Histogram("llama_ref_time_to_first_token_seconds", "from admission (queueing "
                                             "included) to the first token", buckets=LATENCY_BUCKETS,
                                             registry=self.registry)
        self.inter_token_seconds = Histogram("llama_ref_inter_token_latency_seconds", "between a request's "
                                             "consecutive tokens", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("llama_ref_prompt_tokens", "tokens read: prompts and embedding inputs",
                                     registry=self.registry)
        self.generation_tokens = Counter("llama_ref_generation_tokens", "tokens generated", registry=self.registry)
        self.registry.register(EngineCollector(engines))

    def finished(self, record: RequestRecord) -> None:
        self.requests.labels(record.route, str(record.status)).inc()
        self.request_seconds.labels(record.route).observe(record.duration_ms / 1000)

    async def timed(self, events):
        """The events of one request, passed on; its time to first token, the time between its
        tokens and their count go to the metrics and to its access-log record."""
        record, start, last = current_request.get(), time.perf_counter(), None
        async with aclosing(events):      # closed at once when the client leaves: that cancels the request
            async for event in events:
                now = time.perf_counter()
                (self.first_token_seconds if last is None else self.inter_token_seconds).observe(now - (last or start))
                last = now
                self.generation_tokens.inc()
                if record is not None:
                    record.completion_tokens += 1
                yield event

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        record = current_request.get()
        if record is not None:
            record.prompt_tokens += prompt_tokens


class EngineCollector:
    """The engines' state at scrape time, summed over the served models."""

    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        engines = self.engines.values()
        gauges = [("llama_ref_requests_waiting", "requests in the queue", lambda e: len(e.waiting)),
                  ("llama_ref_running_sequences", "sequences in the batch (the batch size)", lambda e: e.running_sequences),
                  ("llama_ref_kv_cache_reserved_bytes", "KV memory held for admitted requests", lambda e: e.reserved)]
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=sum(value(engine) for engine in engines))
        counters = [("llama_ref_batch_steps", "forward passes of the batch", lambda e: e.steps),
                    ("llama_ref_prefix_cache_hits", "requests that reused a cached prompt prefix",
                     lambda e: e.prefix.hits if e.prefix else 0),
                    ("llama_ref_prefix_cache_reused_tokens", "prompt tokens not computed again thanks to the prefix "
                     "cache", lambda e: e.prefix.reused_tokens if e.prefix else 0)]
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=sum(value(engine) for engine in engines))


def log_request(record: RequestRecord) -> None:
    """One JSON line per request: ids, route, status, tokens and durations, never content."""
    access_log.info(json.dumps(asdict(record)))
