"""Chat templates: the tokenizer's own (``template: auto``) or a built-in one, looked up by name.

The template used for training is set on the tokenizer (``apply_template``), so the tokenizer
saved next to the trained model carries it and serving and evaluation format prompts exactly as
training did.

Built-ins, for tokenizers without a template of their own:

- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n``; tool results are ``tool`` turns and
  the tool descriptions go into the system turn.
- ``llama2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nquestion [/INST] answer </s>``. Llama 2
  knows only user and assistant turns, so a tool result is folded into a user turn, written
  ``[INST] Function result: ... [/INST]``, and the tool descriptions into the system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infuse.errors import InfuseError

TEMPLATES: dict[str, str] = {}

TOOLS_INTRO = (
    "You may call these functions. To call one, answer with only a JSON object "
    '{"name": <function name>, "arguments": <arguments object>}.'
)


def register_template(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register the Jinja template returned by the decorated function under ``name``."""

    def register(function: Callable[[], str]) -> Callable[[], str]:
        TEMPLATES[name] = function()
        return function

    return register


@register_template("chatml")
def chatml() -> str:
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- if tools -%}"
        "{%- set system = (system + '\n\n' if system else '') + '" + TOOLS_INTRO + "\n<tools>\n'"
        " + (tools | map('tojson') | join('\n')) + '\n</tools>' -%}"
        "{%- endif -%}"
        "{%- if system -%}{{- '<|im_start|>system\n' + system + '<|im_end|>\n' -}}{%- endif -%}"
        "{%- for message in turns -%}"
        "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    )


@register_template("llama2")
def llama2() -> str:
    return (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- if tools -%}"
        "{%- set system = (system + '\n\n' if system else '') + '" + TOOLS_INTRO + "\n'"
        " + (tools | map('tojson') | join('\n')) -%}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'assistant') != (loop.index0 % 2 == 1) -%}"
        "{{- raise_exception('llama2 needs turns that alternate user (or tool) and assistant, "
        "after an optional system message') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- ' ' + (message['content'] | trim) + ' ' + eos_token -}}"
        "{%- else -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if message['role'] == 'tool' -%}{%- set content = 'Function result: ' + content -%}{%- endif -%}"
        "{%- if loop.first and system -%}"
        "{%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content -%}"
        "{%- endif -%}"
        "{{- bos_token + '[INST] ' + content + ' [/INST]' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def chat_inputs(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                template: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """What to give ``template`` for a conversation, in training and in serving alike: the messages,
    with tool calls written out as text where the template has no place for ``tool_calls``, and
    the tool descriptions written into the system turn where it does not render ``tools`` (a model
    cannot learn to call functions it was not shown); and the tools for the template to render."""
    if "tool_calls" not in template:
        messages = [calls_as_text(message) for message in messages]
    if not tools or "tools" in template:
        return [dict(message) for message in messages], tools or None
    described = "\n".join([TOOLS_INTRO, *(json.dumps(tool, ensure_ascii=False) for tool in tools)])
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{described}"}, *messages[1:]], None
    return [{"role": "system", "content": described}, *messages], None


def calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's ``tool_calls`` as the text TOOLS_INTRO asks for: ``{"name": ..., "arguments":
    {...}}`` for one call, a list of them for several, after any words said with them."""
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    written = [{"name": call["function"]["name"], "arguments": call["function"]["arguments"]} for call in calls]
    text = json.dumps(written[0] if len(written) == 1 else written, ensure_ascii=False)
    words = message.get("content") or ""
    return {"role": message["role"], "content": f"{words}\n{text}" if words.strip() else text}


def resolve_template(tokenizer, name: str = "auto") -> str:
    """The Jinja text of template ``name``: ``auto`` (the tokenizer's own), a built-in name, or a
    path to a ``.jinja`` file."""
    if name == "auto":
        own = tokenizer.chat_template
        if isinstance(own, dict):  # a tokenizer may carry several named templates
            own = own.get("default")
        if not own:
            raise InfuseError(
                "template: auto, but the tokenizer has no chat template of its own. Set `template: chatml` "
                "(or `template: llama2` for Llama 2 style data) to use a built-in one."
            )
        return own
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name.endswith(".jinja"):
        if not Path(name).is_file():
            raise InfuseError(f"template: {name}: no such file. Give the path of a Jinja chat template file.")
        return Path(name).read_text(encoding="utf-8")
    raise InfuseError(
        f"template: '{name}' is not known. Use auto (the tokenizer's own), one of "
        f"{', '.join(TEMPLATES)}, or a path to a .jinja file."
    )


def apply_template(tokenizer, name: str = "auto") -> str:
    """Set template ``name`` on ``tokenizer`` (so ``save_pretrained`` writes it) and return its text.

    Raises InfuseError if the template does not close an assistant turn with an end-of-turn marker:
    a model trained on it would never learn to stop.
    """
    template = resolve_template(tokenizer, name)
    end_of_turn(tokenizer, template)
    tokenizer.chat_template = template
    return template


def render(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    """``messages`` rendered as text by ``template``; template errors become InfuseError."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except (TemplateError, ValueError, TypeError) as e:
        raise InfuseError(f"the chat template cannot render this conversation: {e}") from None


PROBE = [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]


def end_of_turn(tokenizer, template: str) -> str:
    """The text ``template`` writes after an assistant's words to end the turn (``<|im_end|>``,
    ``</s>``, ``<|eot_id|>``): what the model must learn to say, and what generation stops on."""
    prompt = render(tokenizer, template, PROBE[:1], add_generation_prompt=True)
    full = render(tokenizer, template, PROBE)
    answer = PROBE[1]["content"]
    tail = full[full.find(answer, len(prompt) if full.startswith(prompt) else 0):]
    marker = tail[len(answer):].strip() if tail.startswith(answer) else ""
    if not marker:
        raise InfuseError(
            "the chat template does not end an assistant turn with an end-of-turn marker (such as the eos "
            "token), so a model trained with it would never learn to stop. Use a template that does, "
            "e.g. `template: chatml` or `template: llama2`."
        )
    return marker


# The markers a built-in template writes around every turn, beyond its end of turn.
TURN_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>")}


def missing_markers(tokenizer, name: str, template: str) -> list[str]:
    """The turn markers of ``template`` (template ``name``) that are not one token of ``tokenizer``:
    its end of turn, and for a built-in template every marker it writes."""
    markers = dict.fromkeys([*TURN_MARKERS.get(name, ()), end_of_turn(tokenizer, template)])
    return [marker for marker in markers if not is_single_token(tokenizer, marker)]


def is_single_token(tokenizer, text: str) -> bool:
    """Whether ``text`` is one token of ``tokenizer`` (generation can stop on its id)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1
