"""The models a server holds: ``NAME=PATH[+ADAPTER]`` specs, loaded so that every base is in
memory once and its adapters sit side by side on it (peft multi-adapter), one engine per base."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infuse.errors import InfuseError
from infuse.models import (
    CONTEXT_FIELDS,
    TOKENIZER_FILES,
    check_adapter_dir,
    check_model_dir,
    peft_quietly,
    split_spec,
)
from infuse.serve.engine import Engine, Event, Job
from infuse.serve.options import ServeOptions
from infuse.serve.sampling import Sampling

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ServedModel:
    """One name a client can ask for: a base model alone, or a base with one adapter."""

    name: str
    base: str
    adapter_path: str | None
    adapter: str | None  # the adapter's name inside its base's peft model
    tokenizer: Any
    engine: Engine
    context_length: int | None
    stop_token_ids: frozenset[int]
    end_of_turn_ids: frozenset[int] = frozenset()
    vocab_size: int | None = None  # rows of the model's input embeddings
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, special tokens added as the tokenizer does by default."""
        return list(self.tokenizer(text).input_ids)

    def check_ids(self, ids: list[int]) -> list[int]:
        """Token ids given as a prompt, each one the model has an embedding for."""
        rows = self.vocab_size or len(self.tokenizer)
        wrong = [i for i in ids if not 0 <= i < rows]
        if wrong:
            raise InfuseError(f"prompt: token id {wrong[0]} is not in {self.name}'s vocabulary of {rows} ids.")
        return list(ids)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the assistant's turn.
        Tool calls and tools are written as SFT training wrote them (``chat_inputs``)."""
        from infuse.data.formats import chat_request
        from infuse.data.templates import chat_inputs, resolve_template

        if not self.has_chat_template:
            raise InfuseError(f"Model {self.name} has no chat template (its tokenizer_config.json sets no "
                              "chat_template), so it cannot take chat messages: send a plain prompt instead.")
        conversation = chat_request(messages, tools)
        messages, tools = chat_inputs(conversation.messages, conversation.tools, resolve_template(self.tokenizer))
        try:
            encoded = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                         tokenize=True)
        except Exception as e:  # the template's own checks (role order, allowed roles) raise jinja errors
            raise InfuseError(f"{self.name}'s chat template rejects these messages: {e}") from None
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def job(self, prompt_ids: list[int], sampling: Sampling, sink: Callable[[Event], None],
            chat: bool = False) -> Job:
        """A Job for this model's engine; chat jobs also stop at the template's end-of-turn token."""
        stops = self.stop_token_ids | (self.end_of_turn_ids if chat else frozenset())
        return Job(prompt_ids, sampling, self.tokenizer, stops, sink, adapter=self.adapter)

    def generate(self, prompt_ids: list[int], sampling: Sampling, chat: bool = False) -> Iterator[Event]:
        """Blocking generation through the engine, one Event per step (for the terminal chat and tests)."""
        import queue

        events: queue.Queue[Event] = queue.Queue()
        job = self.job(prompt_ids, sampling, events.put, chat)
        self.engine.submit(job)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason:
                    return
        finally:
            job.cancel()


class Registry:
    """Served models by name; the first one answers requests that name none."""

    def __init__(self, models: dict[str, ServedModel], engines: list[Engine]):
        self.models = models
        self.engines = engines

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def find(self, name: str | None) -> ServedModel | None:
        """The model called ``name`` (or whose adapter path is ``name``); the default for None."""
        if not name:
            return self.default
        if name in self.models:
            return self.models[name]
        return next((m for m in self.models.values() if m.adapter_path and m.adapter_path == name), None)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()


# ---------------------------------------------------------------- parsing


def parse_model_specs(items: list[str]) -> dict[str, str]:
    """``["NAME=PATH[+ADAPTER]", ...]`` → {NAME: SPEC}; a bare PATH is named after its last folder."""
    models: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = Path(item.split("+")[-1]).name, item
        if not NAME.fullmatch(name) or not spec:
            raise InfuseError(f"--model {item!r}: expected NAME=PATH or NAME=PATH+ADAPTER, NAME made of "
                              "letters, digits and . _ - : / (e.g. --model "
                              "chat-infused=out/chat+out/infused).")
        if name in models:
            raise InfuseError(f"--model {item!r}: the name {name} is given twice; each model needs its own "
                              "name.")
        models[name] = spec
    if not models:
        raise InfuseError("No models to serve: give at least one --model NAME=PATH[+ADAPTER].")
    return models


# ---------------------------------------------------------------- loading


def load_registry(models: dict[str, str], options: ServeOptions | None = None) -> Registry:
    """Load every model in ``models`` ({NAME: PATH[+ADAPTER]}) and start one engine per base, with
    the dtype, device, remote-code and batching settings of ``options``."""
    options = options or ServeOptions()
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for name, spec in models.items():
        base, adapter = split_spec(spec)
        check_safetensors(base, adapter)
        groups.setdefault(str(Path(base).expanduser().resolve()), []).append((name, adapter))
    served: dict[str, ServedModel] = {}
    engines = []
    for base, members in groups.items():
        model, tokenizer = load_base(base, options)
        model, adapter_names = attach_adapters(model, [adapter for _, adapter in members if adapter])
        engine = Engine(model, tokenizer.pad_token_id, options.engine_limits(), name=Path(base).name).start()
        engines.append(engine)
        for name, adapter in members:
            served[name] = _served(name, base, adapter, adapter_names.get(adapter), tokenizer, engine, model)
    ordered = {name: served[name] for name in models}
    return Registry(ordered, engines)


def _served(name: str, base: str, adapter_path: str | None, adapter: str | None, base_tokenizer: Any,
            engine: Engine, model: torch.nn.Module) -> ServedModel:
    tokenizer = base_tokenizer
    if adapter_path and any((Path(adapter_path) / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        from infuse.models import ensure_pad_token

        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(adapter_path))
    return ServedModel(name=name, base=base, adapter_path=adapter_path, adapter=adapter, tokenizer=tokenizer,
                       engine=engine, context_length=context_length(model.config),
                       vocab_size=model.get_input_embeddings().num_embeddings,
                       stop_token_ids=frozenset(eos_ids(model, tokenizer)),
                       end_of_turn_ids=frozenset(end_of_turn_ids(tokenizer)))


def load_base(base: str, options: ServeOptions) -> tuple[torch.nn.Module, Any]:
    """A base model and its tokenizer, in eval mode on ``options.device``."""
    dtype = DTYPES.get(options.dtype)
    if dtype is None:
        raise InfuseError(f"--dtype {options.dtype}: expected one of {', '.join(DTYPES)}.")
    if not options.trust_remote_code:
        from infuse.models import load_for_inference

        return load_for_inference(base, dtype=dtype, device=options.device)
    # load_for_inference never runs shipped code; this path does, because the user asked for it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infuse.models import ensure_pad_token

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device, use_safetensors=True,
                                                 trust_remote_code=True).eval()
    return model, ensure_pad_token(AutoTokenizer.from_pretrained(base, trust_remote_code=True))


def attach_adapters(model: torch.nn.Module, paths: list[str]) -> tuple[torch.nn.Module, dict[str, str]]:
    """Load each distinct adapter in ``paths`` once onto ``model``; return the (peft) model and
    {adapter path: adapter name inside it}."""
    names: dict[str, str] = {}
    for path in dict.fromkeys(paths):
        names[path] = f"adapter_{len(names)}"
        model = _attach(model, path, names[path])
    return model.eval(), names


def _attach(model: torch.nn.Module, path: str, name: str) -> torch.nn.Module:
    from peft import PeftModel

    with peft_quietly():
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name)
                return model
            return PeftModel.from_pretrained(model, path, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise InfuseError(f"Adapter {path} does not fit its base model ({str(e).splitlines()[0]}). "
                              "Pair the adapter with the base it was trained on.") from None


def check_safetensors(base: str, adapter: str | None) -> None:
    """Refuse pickled weights (.bin): loading them can run arbitrary code."""
    folder = check_model_dir(base)
    if not any(folder.glob("*.safetensors")):
        raise InfuseError(f"{folder} holds its weights only as pickled .bin files, which the server refuses "
                          "to load (unpickling can run code). Convert them: load the model with transformers "
                          "and save_pretrained it again, which writes model.safetensors.")
    if adapter:
        adapter_dir = check_adapter_dir(adapter)
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise InfuseError(f"Adapter {adapter_dir} has no adapter_model.safetensors (only pickled .bin "
                              "weights or none); the server loads safetensors only. Save it again with a "
                              "recent peft.")


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for, if its config says."""
    text_config = getattr(config, "text_config", None) or config
    for name in CONTEXT_FIELDS:
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the generation config's eos ids (what ``model.generate``
    stops on) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """The special token a chat template closes an assistant turn with (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Llama 2's </s>), found by rendering a short exchange; chat replies stop there."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    marker = "\u2063marker\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # templates may insist on their own role order; then there is nothing to learn
        return set()
    tail = text.split(marker, 1)[-1] if marker in text else ""
    special = set(tokenizer.all_special_ids)
    for token in tokenizer(tail, add_special_tokens=False).input_ids:
        if token in special:
            return {token}
        if tokenizer.decode([token]).strip():
            break
    return set()
