"""``infuse chat PATH[+ADAPTER]``: talk to a model in the terminal. The conversation is kept and
sent whole each turn through the model's chat template; replies stream token by token.
``/reset`` forgets the conversation, ``/exit`` or ``/quit`` (or end of input) leaves."""

from __future__ import annotations

import re
from collections.abc import Iterator

from rich.console import Console

from infuse.errors import InfuseError
from infuse.serve.options import ServeOptions
from infuse.serve.registry import ServedModel, load_registry
from infuse.serve.sampling import Sampling

COMMANDS = "/reset forgets the conversation, /exit leaves"
EXIT = ("/exit", "/quit")
# A line that is one slash word is a command, never a message: a mistyped command sent to the model
# would become part of the conversation. "/etc/hosts?" and "/ hello" are messages.
COMMAND_WORD = re.compile(r"/[A-Za-z]+")


def chat(spec: str, console: Console | None = None, *, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None, device: str | None = None,
         dtype: str = "auto") -> list[dict[str, str]]:
    """Chat with the model at ``spec`` (PATH or PATH+ADAPTER) reading lines from the terminal or a
    pipe; return the conversation as it stood at the end (after the last /reset)."""
    console = console or Console()
    registry = load_registry({"chat": spec}, ServeOptions(device=device, dtype=dtype, max_batch_size=1))
    try:
        model = registry.default
        if not model.has_chat_template:
            raise InfuseError(f"{spec} has no chat template (its tokenizer_config.json sets none), so there "
                              "is no way to format a conversation for it. Use a chat model, or train one "
                              "with stage: sft and template: chatml.")
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return _converse(model, sampling, console, system)
    finally:
        registry.stop()


def _converse(model: ServedModel, sampling: Sampling, console: Console,
              system: str | None) -> list[dict[str, str]]:
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    adapter = f" + {model.adapter_path}" if model.adapter_path else ""
    console.print(f"[dim]Chatting with {model.base}{adapter}. {COMMANDS}.[/dim]", highlight=False)
    for line in _lines(console):
        text = line.strip()
        if text in EXIT:
            break
        if text == "/reset":
            history = list(start)
            console.print("[dim]Conversation forgotten.[/dim]")
            continue
        if COMMAND_WORD.fullmatch(text):
            console.print(f"[dim]No command {text}: {COMMANDS}.[/dim]", highlight=False)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        history = _fit(model, history, sampling.max_new_tokens, console)
        reply = _stream_reply(model, history, sampling, console)
        history.append({"role": "assistant", "content": reply})
    return history


def _lines(console: Console) -> Iterator[str]:
    while True:
        try:
            yield console.input("[bold cyan]you>[/bold cyan] ")
        except EOFError:
            return


def _fit(model: ServedModel, history: list[dict[str, str]], room: int,
         console: Console) -> list[dict[str, str]]:
    """Drop the oldest exchanges until the conversation and the reply fit the model's context."""
    limit = (model.context_length or 10**9) - room
    while len(model.encode_chat(history)) > limit:
        first_turn = 1 if history[0]["role"] == "system" else 0
        if len(history) - first_turn <= 1:
            raise InfuseError(f"The message alone is longer than the model's context ({model.context_length} "
                              f"tokens, {room} of them kept for the reply). Send a shorter one.")
        del history[first_turn:first_turn + 2]
        console.print("[dim]Forgot the oldest exchange to stay within the model's context.[/dim]")
    return history


def _stream_reply(model: ServedModel, history: list[dict[str, str]], sampling: Sampling,
                  console: Console) -> str:
    console.print("[bold green]model>[/bold green] ", end="")
    reply = ""
    for event in model.generate(model.encode_chat(history), sampling, chat=True):
        if event.error:
            raise InfuseError(f"Generation failed: {event.error}")
        console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
        reply += event.text
    console.print()
    return reply
