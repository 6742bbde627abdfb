"""Between HTTP and the engines: pick the model a request names, check it against the limits,
turn its fields into Sampling, and run it, whole or streamed, cancelling when the client leaves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from infuse.errors import InfuseError
from infuse.serve.engine import Event, Overloaded
from infuse.serve.metrics import Metrics
from infuse.serve.options import ServeOptions
from infuse.serve.registry import Registry, ServedModel
from infuse.serve.sampling import Sampling

DISCONNECT_POLL = 0.2  # seconds between checks that a waiting client is still there


class ApiError(Exception):
    """An HTTP error with a message for the client (shaped as TGI or OpenAI errors by the app)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


@dataclass
class Result:
    """A finished generation."""

    text: str = ""
    tokens: list[Event] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    seed: int | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)


class Generation:
    """One submitted job seen from the event loop: iterate it for Events, ``cancel()`` to stop."""

    def __init__(self, service: Service, served: ServedModel, prompt_ids: list[int], sampling: Sampling,
                 chat: bool):
        self.service, self.served, self.prompt_tokens = service, served, len(prompt_ids)
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # runs on the engine's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                self.job.cancel()

        self.job = served.job(prompt_ids, sampling, sink, chat)
        try:
            served.engine.submit(self.job)
        except Overloaded as e:
            service.metrics.record_rejection()
            raise ApiError(503, f"The server is busy ({e}).", "overloaded", {"Retry-After": "1"}) from None

    def cancel(self) -> None:
        self.job.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        generated, finish = 0, "cancelled"
        try:
            while True:
                event = await self.queue.get()
                generated = event.generated_tokens
                if event.finish_reason:
                    finish = event.finish_reason
                    yield event
                    return
                yield event
        finally:
            self.job.cancel()  # a no-op once finished; otherwise the client left mid-stream
            self.service.metrics.record_generation(self.served.name, self.prompt_tokens, generated, finish)


class Service:
    """What the routes share: the models, the limits and the counters."""

    def __init__(self, registry: Registry, options: ServeOptions, metrics: Metrics):
        self.registry, self.options, self.metrics = registry, options, metrics

    def model(self, name: str | None) -> ServedModel:
        served = self.registry.find(name)
        if served is None:
            raise ApiError(404, f"Model {name!r} is not served here; served models: "
                                f"{', '.join(self.registry.models)}.", "model_not_found")
        return served

    def encode(self, served: ServedModel, prompt: str | list[int] | None = None,
               messages: list[dict] | None = None, tools: list[dict] | None = None) -> list[int]:
        """Prompt token ids (a prompt may be given as ids), checked against the input limit."""
        try:
            if messages is not None:
                ids = served.encode_chat(messages, tools)
            else:
                ids = served.encode(prompt) if isinstance(prompt, str) else served.check_ids(prompt)
        except InfuseError as e:
            raise ApiError(422, str(e)) from None
        limit = self.input_limit(served)
        if len(ids) > limit:
            raise ApiError(422, f"The prompt is {len(ids)} tokens; {served.name} takes at most {limit} "
                                "(max_input_tokens and the model's context). Shorten it.")
        return ids

    def input_limit(self, served: ServedModel) -> int:
        """The longest prompt ``served`` takes: max_input_tokens, within the model's context."""
        return min(self.options.max_input_tokens, (served.context_length or 10**9) - 1)

    def sampling(self, served: ServedModel, prompt_ids: list[int], max_new_tokens: int | None,
                 key: str = "max_new_tokens", **fields) -> Sampling:
        """Sampling with max_new_tokens (the request's ``key``) checked against the cap and the
        model's context."""
        room = (served.context_length or 10**9) - len(prompt_ids)
        if max_new_tokens is None:
            max_new_tokens = min(self.options.default_max_new_tokens, room)
        elif max_new_tokens > self.options.max_new_tokens:
            raise ApiError(422, f"{key} {max_new_tokens} is more than this server allows "
                                f"({self.options.max_new_tokens}).")
        elif max_new_tokens > room:
            raise ApiError(422, f"The prompt ({len(prompt_ids)} tokens) plus {key} "
                                f"({max_new_tokens}) exceeds {served.name}'s context of "
                                f"{served.context_length} tokens.")
        return Sampling(max_new_tokens=max_new_tokens, **fields)

    def start(self, served: ServedModel, prompt_ids: list[int], sampling: Sampling,
              chat: bool = False) -> Generation:
        """Submit now (so a full queue is a 503 before any response starts) and return the stream."""
        return Generation(self, served, prompt_ids, sampling, chat)

    def start_all(self, items: list[tuple[ServedModel, list[int], Sampling]],
                  chat: bool = False) -> list[Generation]:
        """Submit several prompts; when one is refused, cancel those already submitted."""
        started: list[Generation] = []
        try:
            for served, ids, sampling in items:
                started.append(self.start(served, ids, sampling, chat))
        except ApiError:
            for generation in started:
                generation.cancel()
            raise
        return started

    async def run(self, request: Request, generation: Generation) -> Result:
        """Wait for ``generation`` to finish; stop it early when the client disconnects."""
        task = asyncio.ensure_future(collect(generation))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if not task.done() and await request.is_disconnected():
                generation.cancel()  # the engine answers with a "cancelled" event, which ends the task
        return task.result()


async def collect(generation: Generation) -> Result:
    result = Result(prompt_tokens=generation.prompt_tokens)
    async for event in generation:
        if event.error:
            raise ApiError(500, f"Generation failed: {event.error}", "generation_error")
        if event.token_id is not None:
            result.tokens.append(event)
        result.text += event.text
        result.finish_reason = event.finish_reason or result.finish_reason
        result.seed = event.seed if event.seed is not None else result.seed
    return result


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
