"""Counters for ``GET /metrics`` in the Prometheus text format, kept by hand: a handful of
numbers does not need a client library."""

from __future__ import annotations

import threading
from collections import defaultdict

from infuse.serve.registry import Registry


class Metrics:
    """Request counts and latencies by endpoint and status; token counts and outcomes by model."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.finished: dict[tuple[str, str], int] = defaultdict(int)
        self.generated: dict[str, int] = defaultdict(int)
        self.prompt: dict[str, int] = defaultdict(int)
        self.rejected = 0

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, str(status)] += 1
            self.seconds[endpoint] += seconds

    def record_generation(self, model: str, prompt_tokens: int, generated_tokens: int,
                          finish_reason: str) -> None:
        with self.lock:
            self.prompt[model] += prompt_tokens
            self.generated[model] += generated_tokens
            self.finished[model, finish_reason] += 1

    def record_rejection(self) -> None:
        with self.lock:
            self.rejected += 1

    def render(self) -> str:
        """The Prometheus exposition text."""
        lines: list[str] = []
        with self.lock:
            _family(lines, "infuse_requests_total", "counter", "HTTP requests by endpoint and status.",
                    {f'endpoint="{e}",status="{s}"': n for (e, s), n in sorted(self.requests.items())})
            _family(lines, "infuse_request_seconds_total", "counter", "Seconds spent answering, by endpoint.",
                    {f'endpoint="{e}"': round(v, 6) for e, v in sorted(self.seconds.items())})
            _family(lines, "infuse_prompt_tokens_total", "counter", "Prompt tokens read, by model.",
                    {f'model="{m}"': n for m, n in sorted(self.prompt.items())})
            _family(lines, "infuse_generated_tokens_total", "counter", "Tokens generated, by model.",
                    {f'model="{m}"': n for m, n in sorted(self.generated.items())})
            _family(lines, "infuse_generations_total", "counter", "Finished generations by model and reason.",
                    {f'model="{m}",reason="{r}"': n for (m, r), n in sorted(self.finished.items())})
            _family(lines, "infuse_rejected_total", "counter", "Requests refused with 503 (queue full).",
                    {"": self.rejected})
        engines = self.registry.engines
        _family(lines, "infuse_running_requests", "gauge", "Requests in the running batch, by engine.",
                {f'engine="{e.name}"': e.load[0] for e in engines})
        _family(lines, "infuse_waiting_requests", "gauge", "Requests waiting for a batch slot, by engine.",
                {f'engine="{e.name}"': e.load[1] for e in engines})
        _family(lines, "infuse_forward_passes_total", "counter", "Batched forward passes, by engine.",
                {f'engine="{e.name}"': e.stats["forward_passes"] for e in engines})
        _family(lines, "infuse_batched_rows_total", "counter",
                "Rows over all forward passes (divide by passes for the mean batch size), by engine.",
                {f'engine="{e.name}"': e.stats["batched_rows"] for e in engines})
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, text: str, samples: dict[str, float]) -> None:
    lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"
              for labels, value in samples.items()]
