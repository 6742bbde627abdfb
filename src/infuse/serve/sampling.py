"""How one request turns logits into tokens and tokens into text: greedy or nucleus sampling with
a per-request seed, incremental detokenization, and stop sequences that never reach the client."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

# At or below this temperature a request is greedy, as TGI treats the seed's temperature 0.01.
GREEDY_TEMPERATURE = 0.01


@dataclass
class Sampling:
    """Decoding settings of one request (TGI ``parameters`` / OpenAI fields, already validated)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    keep_stop: bool = False
    """Whether the text ends with the stop sequence that ended it (TGI's way) or before it (OpenAI's)."""

    @property
    def greedy(self) -> bool:
        """``do_sample: false`` or a temperature at or below 0.01 picks the most likely token."""
        return self.do_sample is False or self.temperature <= GREEDY_TEMPERATURE


class Sampler:
    """Draws one request's next token; a seeded generator of its own makes sampling reproducible
    whatever else shares the batch. Greedy requests are picked by the engine, batch-wide."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.greedy = sampling.greedy
        # A greedy request draws nothing: it has no seed to report (TGI's details.seed is null then).
        self.seed = None if self.greedy else sampling.seed if sampling.seed is not None else random.randrange(2**63)
        self.generator = None if self.greedy else torch.Generator().manual_seed(self.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """A token drawn from one row of float32 logits, after temperature, top-k and top-p."""
        probs = nucleus(logits / self.sampling.temperature, self.sampling.top_p, self.sampling.top_k)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))


def nucleus(logits: torch.Tensor, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Probabilities over the ``top_k`` most likely tokens (0: all) whose cumulative mass first
    reaches ``top_p``; the rest set to zero."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_p < 1.0:
        # Keep a token when the mass before it is still short of top_p: the top token always stays.
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
    if top_k > 0:
        keep[top_k:] = False
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return kept / kept.sum()


class TextStream:
    """Turns a growing list of token ids into text deltas.

    Byte-level tokens can split a character, so text is released only once it decodes cleanly
    (the windowed decoding TGI uses). Text that could be the start of a stop sequence is held
    back until it is known not to be one, and a stop sequence ends the text: before it, or with
    ``keep_stop`` after it.
    """

    def __init__(self, tokenizer, stop: list[str], keep_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.keep_stop = keep_stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one generated token; return the newly decoded text ('' while it is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        delta = full[len(prefix):]
        self.text += delta
        self._cut_at_stop(len(delta))
        return delta

    def flush(self) -> None:
        """At the end, take in whatever the last tokens decode to, an incomplete character included
        (as decoding all the ids at once would)."""
        if self.stopped:
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
            self._cut_at_stop(len(full) - len(prefix))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _cut_at_stop(self, added: int) -> None:
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, len(self.text) - added - longest)
        hits = [(at, stop) for at, stop in ((self.text.find(s, start), s) for s in self.stop) if at >= 0]
        if hits:
            at, stop = min(hits)
            self.text = self.text[:at + len(stop) if self.keep_stop else at]
            self.stopped = True

    def release(self, final: bool = False) -> str:
        """Text not yet handed out that is safe to show: all of it when ``final``, else all but a
        tail that might grow into a stop sequence."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_tail()
        chunk = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return chunk

    def _held_tail(self) -> int:
        for size in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stop):
                return size
        return 0
