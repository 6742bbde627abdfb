"""The batching engine: concurrent requests on one base model share every forward pass.

Continuous batching with a KV cache. A worker thread (never the event loop) owns the model and
loops: admit waiting requests and prefill them together, pick one token for every running
request, drop the ones that finished or whose client went away, then run one decoding step for
all the rest. Sequences of different lengths sit in one cache left-padded, with an attention
mask and explicit position ids, so each row computes what it would alone: greedy output is
token-identical to ``model.generate`` on that prompt.

Requests for different adapters of one base share the batch too: peft's mixed-batch forward
(``adapter_names=``) routes each row through its own adapter, or none.
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from infuse.errors import InfuseError
from infuse.serve.sampling import Sampler, Sampling, TextStream

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
MIXED = "__mixed__"  # adapter state: every adapter on, rows routed by adapter_names
UNSET = "__unset__"  # adapter state before the first batch


class Overloaded(Exception):
    """The engine's queue is full; the client should retry later."""


@dataclass
class Event:
    """What a request learns after each step: a token (and the text it released), and at the end
    a finish reason: length | eos_token | stop_sequence | cancelled | error."""

    token_id: int | None = None
    text: str = ""
    logprob: float | None = None
    special: bool = False
    finish_reason: str | None = None
    error: str | None = None
    generated_tokens: int = 0
    seed: int | None = None


@dataclass
class Job:
    """One generation request as the engine sees it. ``sink`` is called from the worker thread
    with every Event; ``cancel()`` stops the generation at the next step."""

    prompt_ids: list[int]
    sampling: Sampling
    tokenizer: Any
    stop_token_ids: frozenset[int]
    sink: Callable[[Event], None]
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class Row:
    """A running request: its sampler, its text so far and how many tokens it has made."""

    def __init__(self, job: Job):
        self.job = job
        self.sampler = Sampler(job.sampling)
        self.stream = TextStream(job.tokenizer, job.sampling.stop, job.sampling.keep_stop)
        self.generated = 0
        self.done = False

    def accept(self, token: int, logprob: float) -> None:
        """Record the token this row picked and tell the client; finish when a stop rule says so."""
        self.generated += 1
        if token in self.job.stop_token_ids:
            self.stream.flush()
            self._send(token, logprob, self.stream.release(final=True), special=True, finish="eos_token")
            return
        self.stream.add(token)
        if self.stream.stopped:
            finish = "stop_sequence"
        elif self.generated >= self.job.sampling.max_new_tokens:
            finish = "length"
            self.stream.flush()
        else:
            finish = None
        self._send(token, logprob, self.stream.release(final=finish is not None), finish=finish)

    def fail(self, message: str) -> None:
        self.done = True
        self.job.sink(Event(finish_reason="error", error=message, generated_tokens=self.generated))

    def _send(self, token: int, logprob: float, text: str, special: bool = False,
              finish: str | None = None) -> None:
        self.done = finish is not None
        self.job.sink(Event(token_id=token, text=text, logprob=logprob, special=special, finish_reason=finish,
                            generated_tokens=self.generated, seed=self.sampler.seed))


@dataclass
class EngineLimits:
    """How much one engine takes on at once."""

    max_batch_size: int = 32  # rows decoded together in one forward pass
    max_queue: int = 256  # requests waiting for a row beyond those; more are refused (503)
    batch_wait: float = 0.005  # seconds an idle engine waits for company before it starts a batch


class Engine:
    """Generation for one loaded model (a base, perhaps with several peft adapters)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, limits: EngineLimits | None = None,
                 name: str = "engine"):
        self.model = model
        self.pad_token_id = pad_token_id
        self.limits = limits or EngineLimits()
        self.name = name
        self.device = next(model.parameters()).device
        self.has_adapters = hasattr(model, "peft_config")
        self.cache_argument = _cache_argument(model)
        self.adapter_state: str | None = UNSET  # which adapter the model has switched on (None: none)
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 where a real token sits
        self.logits: torch.Tensor | None = None  # [rows, vocab], the next-token logits of each row
        self.waiting: collections.deque[Job] = collections.deque()
        self.wakeup = threading.Condition()
        self.stopping = False
        self.stats = {"forward_passes": 0, "batched_rows": 0, "generated_tokens": 0, "prompt_tokens": 0}
        self.thread = threading.Thread(target=self._loop, name=f"infuse-{name}", daemon=True)

    # ------------------------------------------------------------ public

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise Overloaded when the engine already holds all it may."""
        with self.wakeup:
            if len(self.waiting) + len(self.rows) >= self.limits.max_batch_size + self.limits.max_queue:
                raise Overloaded(f"{self.name}: {len(self.rows)} requests running and {len(self.waiting)} "
                                 "waiting; try again shortly")
            self.waiting.append(job)
            self.wakeup.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.rows), len(self.waiting)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            new = self._take_waiting()
            if self.stopping:
                break
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    if self.rows:
                        self._step()
            except Exception as e:  # one failed batch must not take the server down with it
                logger.exception("generation failed in %s", self.name)
                running = {id(row.job) for row in self.rows}
                for row in self.rows + [Row(job) for job in new if id(job) not in running]:
                    row.fail(f"{type(e).__name__}: {e}")
                self._reset()
        for row in self.rows:
            row.fail("the server is shutting down")
        for job in self.waiting:
            Row(job).fail("the server is shutting down")

    def _take_waiting(self) -> list[Job]:
        """Jobs to admit now: whatever fits when a batch is running; when idle, block for the first
        job and then wait ``batch_wait`` for others to arrive with it."""
        with self.wakeup:
            if not self.rows:
                while not self.waiting and not self.stopping:
                    self.wakeup.wait()
                deadline = time.monotonic() + self.limits.batch_wait
                while (len(self.waiting) < self.limits.max_batch_size and not self.stopping
                       and (left := deadline - time.monotonic()) > 0):
                    self.wakeup.wait(left)
            room = self.limits.max_batch_size - len(self.rows)
            taken = []
            while self.waiting and len(taken) < room:
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    job.sink(Event(finish_reason="cancelled"))
                else:
                    taken.append(job)
            return taken

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the new prompts together (left-padded) and append their rows to the batch."""
        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [job.adapter for job in jobs])
        _zero_padding(cache, mask)
        self.stats["prompt_tokens"] += int(mask.sum())
        self.rows.extend(Row(job) for job in jobs)
        if self.cache is None:
            self.cache, self.mask, self.logits = cache, mask, logits
        else:
            self.mask = _merge_caches(self.cache, self.mask, cache, mask)
            self.logits = torch.cat([self.logits, logits])

    def _step(self) -> None:
        """Pick a token for every row, retire finished rows, decode one position for the rest."""
        # Greedy picks and log-probabilities for the whole batch at once: one device sync, not one a row.
        best = self.logits.argmax(dim=-1).tolist()
        picked = [best[i] if row.sampler.greedy else row.sampler.sample(self.logits[i])
                  for i, row in enumerate(self.rows)]
        tokens = torch.tensor(picked, device=self.logits.device)[:, None]
        chosen = torch.log_softmax(self.logits, dim=-1).gather(1, tokens)[:, 0]
        for row, token, logprob in zip(self.rows, picked, chosen.tolist(), strict=True):
            if row.job.cancelled.is_set():
                row.done = True
                row.job.sink(Event(finish_reason="cancelled", generated_tokens=row.generated))
            else:
                row.accept(token, logprob)
                self.stats["generated_tokens"] += 1
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            self._reset()
            return
        if len(keep) < len(self.rows):
            self._retire(keep)
        tokens = torch.tensor([[picked[i]] for i in keep], device=self.device)  # cancelled rows are gone
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=-1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        adapters = [row.job.adapter for row in self.rows]
        self.logits = self._forward(tokens, self.mask, positions, self.cache, adapters)

    def _retire(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # Columns that were padding for every remaining row only cost time: cut them.
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _reset(self) -> None:
        self.rows, self.cache, self.mask, self.logits = [], None, None, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[str | None]) -> torch.Tensor:
        """Next-token logits [rows, vocab] in float32; ``cache`` grows by ``ids``' length."""
        extra = self._adapter_routing(adapters)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_argument: cache}, **extra)
        self.stats["forward_passes"] += 1
        self.stats["batched_rows"] += ids.shape[0]
        return out.logits[:, -1, :].float()

    def _adapter_routing(self, adapters: list[str | None]) -> dict[str, Any]:
        """Route rows through their adapters. A batch on one adapter (or on none) runs with that
        adapter switched on the model, the fastest path; a mix goes through peft's per-row
        ``adapter_names``. Switching costs a walk over every module, so it happens only on change."""
        if not self.has_adapters:
            return {}
        names = set(adapters)
        if len(names) > 1:
            self._switch_adapters(MIXED)
            return {"adapter_names": [name or BASE_ADAPTER for name in adapters]}
        self._switch_adapters(adapters[0])
        return {}

    def _switch_adapters(self, state: str | None) -> None:
        if state == self.adapter_state:
            return
        lora = self.model.base_model
        if state is None:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            if state != MIXED:
                self.model.set_adapter(state)
        self.adapter_state = state


# ---------------------------------------------------------------- KV cache surgery


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    unsupported = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if unsupported:
        raise InfuseError(f"The batching engine keeps a plain per-layer KV cache; this model uses "
                          f"{', '.join(sorted(unsupported))} layers. Serve it with --engine vllm.")
    return layers


def _zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Padding positions are masked out of attention, but a NaN there would still poison the
    weighted sum (0 x NaN); store zeros instead of whatever the model computed for them."""
    pad = (mask == 0)[:, None, :, None]
    if pad.any():
        for layer in _layers(cache):
            layer.keys.masked_fill_(pad, 0)
            layer.values.masked_fill_(pad, 0)


def _merge_caches(cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache,
                  new_mask: torch.Tensor) -> torch.Tensor:
    """Append ``new_cache``'s rows to ``cache`` (in place), left-padding the shorter one; return the
    merged attention mask."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(_layers(cache), _layers(new_cache), strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(new_layer.keys, width, 2)])
        layer.values = torch.cat([_pad_left(layer.values, width, 2), _pad_left(new_layer.values, width, 2)])
    return torch.cat([_pad_left(mask, width, 1), _pad_left(new_mask, width, 1)])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
