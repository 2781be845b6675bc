"""The server's Prometheus metrics (prometheus_client, one registry per server so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they double the output and no dashboard here reads them

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("idefics3_requests", "Chat-completion requests answered, by HTTP status",
                                ["status"], registry=r)
        self.finished = Counter("idefics3_finished_rows", "Requests that ran on the model, by how they ended "
                                "(stop, length, cancelled = client went away, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("idefics3_prompt_tokens", "Prompt tokens of requests that ran", registry=r)
        self.completion_tokens = Counter("idefics3_completion_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("idefics3_queue_depth", "Requests waiting for a batch", registry=r)
        self.running = Gauge("idefics3_running_requests", "Requests in the running batch still generating",
                             registry=r)
        self.batch_size = Gauge("idefics3_batch_size", "Rows of the running batch (padding rows included)",
                                registry=r)
        self.batches = Counter("idefics3_batches", "Batches run", registry=r)
        self.ttft = Histogram("idefics3_time_to_first_token_seconds", "From the request reaching the queue to its "
                              "first token", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("idefics3_request_seconds", "From the request reaching the queue to its last "
                                 "token", buckets=LATENCY_BUCKETS, registry=r)
        self.image_cache_hits = Counter("idefics3_image_cache_hits", "Images whose vision features came from the "
                                        "image-feature cache (the same pixels seen before)", registry=r)
        self.image_cache_misses = Counter("idefics3_image_cache_misses", "Images run through the vision tower "
                                          "(not in the image-feature cache)", registry=r)
        self.prefix_reused_tokens = Counter("idefics3_prefix_reused_tokens", "Prompt tokens whose keys and values "
                                            "came from a parked row (a prefix an earlier request computed)",
                                            registry=r)
        self.warmup_seconds = Gauge("idefics3_warmup_seconds", "Seconds the start-up compilation took", registry=r)
        self._image_cache_counted = (0, 0)  # the cache's (hits, misses) already in the two counters

    def count_image_cache(self, cache) -> None:
        """Bring the image-cache counters up to the cache's own `hits` and `misses` (which only grow): each call
        adds what the cache counted since the last, so calling it after every batch counts each lookup once."""
        hits, misses = cache.hits, cache.misses
        counted_hits, counted_misses = self._image_cache_counted
        self.image_cache_hits.inc(hits - counted_hits)
        self.image_cache_misses.inc(misses - counted_misses)
        self._image_cache_counted = (hits, misses)

    def render(self) -> bytes:
        return generate_latest(self.registry)
