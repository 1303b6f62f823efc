"""What the server counts, in Prometheus's text format (GET /metrics), one registry an engine."""

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a CPU's tiny model (milliseconds) to a long queue (a minute)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, slots: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nnxlm_requests", "requests finished, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("nnxlm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("nnxlm_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("nnxlm_queue_depth", "choices waiting for a slot", registry=r)
        self.slots_busy = Gauge("nnxlm_slots_busy", "slots holding a request", registry=r)
        self.slots_total = Gauge("nnxlm_slots", "slots of the engine", registry=r)
        self.slots_total.set(slots)
        self.time_to_first_token = Histogram(
            "nnxlm_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "nnxlm_inter_token_latency_seconds", "between tokens of a choice", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "nnxlm_request_latency_seconds", "submit to last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
