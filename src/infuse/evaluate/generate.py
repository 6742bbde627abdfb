"""Answers from a model: a local one (loaded with ``load_for_inference``, batched generation with
left padding) or a running endpoint (see ``endpoint.py``), behind the same small interface.

Chat probes go through the model's chat template with a generation prompt; completion probes are
the raw prompt. Generation stops at eos, and for chat probes also at the template's end-of-turn
marker, so whether it stopped there before ``max_new_tokens`` tells if the model kept the format.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from infuse.errors import InfuseError

# At temperature 0.01 logits 0.1 apart are e^10 to 1 in the softmax: sampling would all but always
# pick the argmax. Decoding it as exactly greedy makes evaluations repeatable (the seed's setting).
GREEDY_TEMPERATURE = 0.01

# Markers of the common chat templates; seeing one inside an answer means the template leaked.
TEMPLATE_MARKERS = (
    "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|eot_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|user|>", "<|assistant|>", "<|system|>",
    "<|endoftext|>", "<start_of_turn>", "<end_of_turn>",
)


@dataclass
class GenerationSettings:
    """How answers are generated; the defaults are the seed experiment's."""

    max_new_tokens: int = 200
    """Longest answer, in tokens."""
    temperature: float = 0.01
    """Sampling temperature; at or below 0.01 decoding is greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass (used only when sampling)."""
    seed: int = 0
    """Seed for sampled decoding, so sampled runs repeat too."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InfuseError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1.")
        if self.temperature < 0:
            raise InfuseError(f"--temperature {self.temperature}: must be 0 or more.")
        if not 0 < self.top_p <= 1:
            raise InfuseError(f"--top-p {self.top_p}: must be in (0, 1].")

    def to_dict(self) -> dict:
        return {**asdict(self), "greedy": self.greedy}


@dataclass
class Generation:
    """One answer. ``stopped``: the model ended it (eos or end-of-turn) before ``max_new_tokens``;
    None when an endpoint does not say. ``leaked``: template markers found in the raw answer."""

    text: str
    stopped: bool | None = None
    tokens: int | None = None
    leaked: tuple[str, ...] = ()


class Backend(Protocol):
    kind: str
    batch_size: int

    def unsupported(self, mode: str) -> str | None:
        """Why probes of ``mode`` cannot be asked (None when they can)."""

    def generate(self, prompts: list[str], mode: str, settings: GenerationSettings) -> list[Generation]:
        """One answer per prompt, in order."""

    def close(self) -> None:
        """Free what the backend holds."""


def leaked_markers(text: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The template markers (and ``extra`` special tokens) that occur in ``text``."""
    return tuple(marker for marker in dict.fromkeys(TEMPLATE_MARKERS + extra) if marker in text)


class LocalModel:
    """A model loaded in this process; ``spec`` is ``PATH`` or ``PATH+ADAPTER``."""

    kind = "local"

    def __init__(self, spec: str, batch_size: int = 8, dtype: str | None = None, device: str | None = None):
        from infuse.models import load_for_inference

        self.model, self.tokenizer = load_for_inference(spec, dtype=dtype, device=device)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        self.eos_ids = self._eos_ids()
        self.turn_end_ids = self._turn_end_ids()
        self.special = tuple(t for t in self.tokenizer.all_special_tokens
                             if t not in (self.tokenizer.unk_token, self.tokenizer.pad_token))

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    def _turn_end_ids(self) -> set[int]:
        """The end-of-turn token of the chat template (``<|im_end|>``), when it is one token."""
        from infuse.data.templates import end_of_turn, is_single_token, resolve_template

        if self.unsupported("chat"):
            return set()
        try:
            marker = end_of_turn(self.tokenizer, resolve_template(self.tokenizer))
        except InfuseError:
            return set()
        if not is_single_token(self.tokenizer, marker):
            return set()
        return set(self.tokenizer(marker, add_special_tokens=False)["input_ids"])

    def unsupported(self, mode: str) -> str | None:
        if mode == "chat" and not self.tokenizer.chat_template:
            return "its tokenizer has no chat template"
        return None

    def prompt_ids(self, prompt: str, mode: str) -> list[int]:
        """Token ids of a probe: the chat template's rendering of one user turn, or the raw prompt."""
        if mode == "chat":
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            # The template writes any bos itself; the tokenizer must not add a second one.
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: list[str], mode: str, settings: GenerationSettings) -> list[Generation]:
        rows = [self.prompt_ids(p, mode) for p in prompts]
        input_ids, attention_mask = left_pad(rows, self.tokenizer.pad_token_id)
        stop_ids = sorted(self.eos_ids | (self.turn_end_ids if mode == "chat" else set()))
        sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p}
        if not settings.greedy:
            torch.manual_seed(settings.seed)
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy, eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id, **sampling,
        )
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        return [self._answer(tokens, set(stop_ids)) for tokens in new_tokens]

    def _answer(self, tokens: list[int], stop_ids: set[int]) -> Generation:
        end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
        kept = tokens if end is None else tokens[:end]
        raw = self.tokenizer.decode(kept, skip_special_tokens=False)
        return Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True), stopped=end is not None,
                          tokens=len(kept), leaked=leaked_markers(raw, self.special))

    @torch.no_grad()
    def perplexity(self, texts: list[str], block_size: int, max_blocks: int | None = None) -> dict:
        """Perplexity on ``texts`` cut into blocks as pretraining cuts them (eos between documents):
        exp of the mean next-token loss over every real token after a block's first. ``max_blocks``
        keeps only the first blocks, for a quicker estimate on a large held-out set."""
        from infuse.data.pretrain import pack_documents

        block_size = min(block_size, self.context_length())
        blocks, stats = pack_documents(texts, self.tokenizer, block_size)
        if max_blocks is not None and len(blocks) > max_blocks:
            blocks = blocks.select(range(max_blocks))
        blocks = blocks.with_format("torch")
        total, count = 0.0, 0
        for start in range(0, len(blocks), self.batch_size):
            batch = blocks[start:start + self.batch_size]
            logits = self.model(input_ids=batch["input_ids"].long().to(self.device),
                                attention_mask=batch["attention_mask"].long().to(self.device)).logits
            labels = batch["labels"].long().to(self.device)[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += losses.item()
            count += int((labels != -100).sum())
        return {"perplexity": math.exp(total / count) if count else float("nan"), "tokens": count,
                "documents": stats.documents, "blocks": len(blocks), "block_size": block_size}

    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids padded on the left (a decoder continues from the right end) and their mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask
