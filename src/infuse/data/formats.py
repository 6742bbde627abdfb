"""Instruction data in its many shapes → one shape: a list of messages.

Each format is a small function registered by name that turns one row into a ``Conversation``:

- ``alpaca``: ``instruction``, optional ``input``, ``output``; optional ``system`` and ``history``
  (a list of ``[question, answer]`` pairs that came before).
- ``sharegpt``: ``conversations`` of ``{"from": ..., "value": ...}`` (or ``role``/``content``)
  with ``human``/``gpt``/``system``/``function_call``/``observation``; optional ``system`` and
  ``tools`` (a list of function specs, or that list as a JSON string).
- ``messages``: OpenAI chat rows, ``{"role": ..., "content": ...}``; optional ``tools``.
- ``text``: text already written in a template (``<s>[INST] q [/INST] a </s>``), kept as it is.

Roles become ``system``, ``user``, ``assistant`` or ``tool``. A function call, a sharegpt
``function_call`` turn or an OpenAI assistant turn's ``tool_calls``, becomes the assistant's
``tool_calls`` in OpenAI's shape, its arguments an object; an ``observation`` is a ``tool`` turn.
Tool descriptions take OpenAI's shape too (``{"type": "function", "function": {...}}``). A row
that cannot be read is a ``bad row``: an error naming the file and row, or (``bad_rows: skip``)
skipped and counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infuse.config import BAD_ROW_POLICIES
from infuse.data.records import is_record_file, missing_source, read_records
from infuse.errors import InfuseError

ROLES = ("system", "user", "assistant", "tool")
ROLE_NAMES = {
    "system": "system", "developer": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class BadRow(InfuseError):
    """A row that cannot be turned into a conversation; the message says why (without the place)."""


@dataclass
class Conversation:
    """One training sample: messages (role + content) and the tools they may call, or raw text.

    ``text`` is set (and ``messages`` empty) for rows already written in a template.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    text: str | None = None
    where: str = ""


@dataclass
class LoadStats:
    """What reading the data found: rows per format and file, rows skipped and why."""

    rows: int = 0
    conversations: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    unfilled_placeholders: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "conversations": self.conversations,
            "formats": dict(self.formats),
            "skipped_rows": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "skipped_examples": list(self.skipped_examples),
            "unfilled_placeholders": dict(self.unfilled_placeholders),
        }


class BadRows:
    """Applies the ``bad_rows`` policy: raise an error naming the row, or count it and go on."""

    def __init__(self, policy: str, skipped: Counter, examples: list[str], keep: int = 5):
        if policy not in BAD_ROW_POLICIES:
            raise InfuseError(f"bad_rows: '{policy}' is not one of {', '.join(BAD_ROW_POLICIES)}.")
        self.policy, self.skipped, self.examples, self.keep = policy, skipped, examples, keep

    def handle(self, where: str, problem: str, reason: str) -> None:
        if self.policy == "error":
            raise InfuseError(
                f"{where}: {problem} Fix the row, or set `bad_rows: skip` to skip such rows "
                "(they are counted)."
            )
        self.skipped[reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {problem}")


# --- the registry -------------------------------------------------------------------------------

FORMATS: dict[str, Callable[[dict], Conversation]] = {}
# The fields that identify each format, checked in this order by detect_format.
SIGNATURES: dict[str, tuple[str, ...]] = {}


def register_format(name: str, *signature: str) -> Callable:
    """Register ``function(row) -> Conversation`` as format ``name``, detected by ``signature`` fields."""

    def register(function: Callable[[dict], Conversation]) -> Callable[[dict], Conversation]:
        FORMATS[name] = function
        SIGNATURES[name] = signature
        return function

    return register


def detect_format(row: dict) -> str | None:
    """The name of the format whose identifying fields ``row`` has, or None."""
    for name, signature in SIGNATURES.items():
        if all(key in row for key in signature):
            return name
    return None


def parse_row(row: dict, format_name: str) -> Conversation:
    """One row as a conversation; raises ``BadRow`` saying what is wrong with it."""
    conversation = FORMATS[format_name](row)
    if conversation.text is None:
        check_messages(conversation.messages)
    return conversation


# --- the formats --------------------------------------------------------------------------------


@register_format("messages", "messages")
def from_messages(row: dict) -> Conversation:
    turns = _list_field(row, "messages")
    messages = [_message(turn, index, "role", "content") for index, turn in enumerate(turns)]
    return Conversation(messages, tools=_tools(row))


def chat_request(messages: list[dict], tools: Any = None) -> Conversation:
    """A chat request's messages (OpenAI's shape) and tools as the training data reads them, so the
    prompt is written as training wrote it; the request has no answer yet, so none is required."""
    try:
        return from_messages({"messages": messages, "tools": tools})  # without parse_row's checks
    except BadRow as e:
        raise InfuseError(f"messages: {e}") from None


@register_format("sharegpt", "conversations")
def from_sharegpt(row: dict) -> Conversation:
    turns = _list_field(row, "conversations")
    messages = [_message(turn, index, "from", "value") for index, turn in enumerate(turns)]
    system = _optional_str(row, "system")
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages, tools=_tools(row))


@register_format("alpaca", "instruction", "output")
def from_alpaca(row: dict) -> Conversation:
    instruction = _str_field(row, "instruction")
    extra = _optional_str(row, "input")
    output = _str_field(row, "output")
    if not (instruction.strip() or extra.strip()):
        raise BadRow("'instruction' and 'input' are both empty: there is no question to answer.")
    messages = []
    system = _optional_str(row, "system")
    if system:
        messages.append({"role": "system", "content": system})
    messages += _history(row)
    question = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": output}]
    return Conversation(messages)


@register_format("text", "text")
def from_text(row: dict) -> Conversation:
    text = _str_field(row, "text")
    if not text.strip():
        raise BadRow("'text' is empty.")
    return Conversation(text=text)


# --- checks shared by the formats ---------------------------------------------------------------


def check_messages(messages: list[dict[str, str]]) -> None:
    """Raise ``BadRow`` unless the messages form a conversation that has something to train on."""
    if not messages:
        raise BadRow("the conversation has no messages.")
    for index, message in enumerate(messages):
        if message["role"] == "system" and index > 0:
            raise BadRow(f"message {index} is a system message; a system message may only come first.")
        if message["role"] == "assistant" and not (message["content"].strip() or message.get("tool_calls")):
            raise BadRow(f"message {index} is an empty assistant turn; there is nothing to train on in it.")
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRow("the conversation has no assistant turn, so no token of it would be trained.")


def _message(turn: Any, index: int, role_key: str, content_key: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BadRow(f"message {index} should be an object, found {type(turn).__name__}.")
    # sharegpt files written by other tools use role/content, OpenAI-like files from/value: take both.
    role_key, content_key = _keys_of(turn, index, role_key, content_key)
    role = turn[role_key]
    if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
        known = ", ".join(sorted(ROLE_NAMES))
        raise BadRow(f"message {index} has unknown role {role!r} ('{role_key}'); known roles: {known}.")
    calls = turn.get("tool_calls") or ([turn["function_call"]] if isinstance(turn.get("function_call"), dict) else None)
    if calls:  # OpenAI: the calls (``function_call``: the older single one), and any words said with them
        if not isinstance(calls, list):
            raise BadRow(f"message {index}: 'tool_calls' should be a list, found {type(calls).__name__}.")
        content = _content(turn, index, content_key) if turn.get(content_key) is not None else ""
        return {"role": "assistant", "content": content, "tool_calls": [_tool_call(call, index) for call in calls]}
    content = _content(turn, index, content_key)
    if role.lower() == "function_call":  # sharegpt: the value is the call (or a list of calls) as JSON
        written = _json_value(content, f"message {index}: a function_call turn")
        calls = written if isinstance(written, list) else [written]
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(call, index) for call in calls]}
    message = {"role": ROLE_NAMES[role.lower()], "content": content}
    if message["role"] == "tool":  # which call it answers, for templates that write it
        message |= {key: turn[key] for key in ("tool_call_id", "name") if isinstance(turn.get(key), str)}
    return message


def _tool_call(call: Any, index: int) -> dict[str, Any]:
    """One call as OpenAI writes it, ``{"type": "function", "function": {"name", "arguments"}}``, with
    the arguments as an object (chat templates write them with ``tojson``), from that shape or the
    bare ``{"name", "arguments"}``."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise BadRow(f"message {index}: a tool call should be an object with a 'name' (and 'arguments'), "
                     f"found {json.dumps(call, ensure_ascii=False)[:80]}.")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json_value(arguments, f"message {index}: the arguments of {function['name']}") if arguments else {}
    if not isinstance(arguments, dict):
        raise BadRow(f"message {index}: the arguments of {function['name']} should be an object.")
    written = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    return written | ({"id": call["id"]} if isinstance(call.get("id"), str) else {})


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(f"{what} is not valid JSON ({e.msg}).") from None


def _keys_of(turn: dict, index: int, role_key: str, content_key: str) -> tuple[str, str]:
    pairs = [(role_key, content_key), ("role", "content"), ("from", "value")]
    for role, content in pairs:
        if role in turn and (content in turn or "tool_calls" in turn):
            return role, content
    fields = ", ".join(sorted(turn)) or "none"
    raise BadRow(f"message {index} needs '{role_key}' and '{content_key}' fields (fields found: {fields}).")


def _content(turn: dict, index: int, key: str) -> str:
    content = turn.get(key)
    if isinstance(content, list):  # OpenAI content parts: keep the text ones, refuse the rest
        if all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            return "".join(str(part.get("text", "")) for part in content)
        raise BadRow(f"message {index}: '{key}' holds non-text parts; only text can be trained on.")
    if not isinstance(content, str):
        raise BadRow(f"message {index}: '{key}' should be a string, found {type(content).__name__}.")
    return content


def _history(row: dict) -> list[dict[str, str]]:
    history = row.get("history") or []
    if not isinstance(history, list):
        found = type(history).__name__
        raise BadRow(f"'history' should be a list of [question, answer] pairs, found {found}.")
    messages = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise BadRow(f"'history' item {index} should be a [question, answer] pair of strings.")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _tools(row: dict) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):  # glaive-style rows store the list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRow(f"'tools' is a string but not valid JSON ({e.msg}).") from None
    if not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        raise BadRow("'tools' should be a list of function descriptions (objects).")
    described = [tool.get("function", tool) for tool in tools]
    if not all(isinstance(function, dict) and isinstance(function.get("name"), str) for function in described):
        raise BadRow("each of 'tools' should describe a function with a 'name' (and 'parameters').")
    return [tool if tool.get("type") == "function" and "function" in tool else {"type": "function", "function": tool}
            for tool in tools] or None


def _list_field(row: dict, key: str) -> list:
    value = _required(row, key)
    if not isinstance(value, list):
        raise BadRow(f"'{key}' should be a list of messages, found {type(value).__name__}.")
    return value


def _str_field(row: dict, key: str) -> str:
    value = _required(row, key)
    if not isinstance(value, str):
        raise BadRow(f"'{key}' should be a string, found {type(value).__name__}.")
    return value


def _optional_str(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"'{key}' should be a string, found {type(value).__name__}.")
    return value


def _required(row: dict, key: str) -> Any:
    if key not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise BadRow(f"the '{key}' field is missing (fields found: {fields}).")
    return row[key]


# --- placeholders -------------------------------------------------------------------------------


def fill_placeholders(conversation: Conversation, values: dict[str, str], unfilled: Counter) -> Conversation:
    """Replace ``{{key}}`` with ``values[key]`` everywhere in the conversation; count the keys left."""

    def fill(text: str) -> str:
        def replace(match: re.Match) -> str:
            key = match.group(1)
            if key in values:
                return str(values[key])
            unfilled[key] += 1
            return match.group(0)

        return PLACEHOLDER.sub(replace, text)

    if conversation.text is not None:
        conversation.text = fill(conversation.text)
    for message in conversation.messages:
        message["content"] = fill(message["content"])
    return conversation


# --- reading files ------------------------------------------------------------------------------


def record_files(sources: Iterable[str | Path]) -> list[Path]:
    """The record files named by ``sources``: files as given, folders searched for record files."""
    files = []
    for name in sources:
        source = Path(name)
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.is_file() and is_record_file(p))
            if not found:
                raise InfuseError(f"{source}: the folder holds no .json, .jsonl or .parquet file of rows.")
            files += found
        elif source.is_file():
            if not is_record_file(source):
                raise InfuseError(
                    f"{source}: SFT data must be a .json, .jsonl or .parquet file of conversations "
                    "(alpaca, sharegpt, messages or text rows)."
                )
            files.append(source)
        else:
            raise missing_source(name, "Download the file of conversations and give its path.")
    return files


def load_conversations(
    sources: Iterable[str | Path],
    dataset_format: str = "auto",
    bad_rows: str = "error",
    placeholders: dict[str, str] | None = None,
) -> tuple[list[Conversation], LoadStats]:
    """Read every row of ``sources`` as a Conversation (with ``where`` = file and row).

    ``dataset_format`` is a registered format name, or ``auto`` to detect it row by row (a file
    may mix formats). Returns the conversations and the counts of what was read and skipped.
    """
    if dataset_format != "auto" and dataset_format not in FORMATS:
        raise InfuseError(f"dataset_format: '{dataset_format}' is not one of auto, {', '.join(FORMATS)}.")
    stats = LoadStats()
    policy = BadRows(bad_rows, stats.skipped, stats.skipped_examples)
    conversations = []
    for path in record_files(sources):
        for conversation in _read_file(path, dataset_format, policy, stats):
            fill_placeholders(conversation, placeholders or {}, stats.unfilled_placeholders)
            conversations.append(conversation)
    stats.conversations = len(conversations)
    return conversations, stats


def _read_file(path: Path, dataset_format: str, policy: BadRows, stats: LoadStats) -> Iterator[Conversation]:
    fixed = None if dataset_format == "auto" else dataset_format
    found: set[str] = set()
    format_name = None
    for row, where in read_records(path, on_bad_line=lambda where, problem: policy.handle(where, problem, "not_json")):
        stats.rows += 1
        # A row with the fields of no format is read as the format it comes closest to, to say what it lacks.
        format_name = fixed or detect_format(row) or closest_format(row) or format_name
        if format_name is None:
            policy.handle(where, unknown_format(row), reason="unknown_format")
            continue
        found.add(format_name)
        try:
            conversation = parse_row(row, format_name)
        except BadRow as e:
            policy.handle(where, f"not a valid {format_name} row: {e}", reason=format_name)
            continue
        conversation.where = where
        yield conversation
    if found or fixed:
        stats.formats[str(path)] = "+".join(sorted(found)) or fixed


def closest_format(row: dict) -> str | None:
    """The format most of whose identifying fields ``row`` has (alpaca for an ``instruction`` without
    ``output``), or None when it has none of any format's."""
    shares = {name: sum(key in row for key in signature) / len(signature) for name, signature in SIGNATURES.items()}
    name = max(shares, key=shares.get)
    return name if shares[name] > 0 else None


def unknown_format(row: dict) -> str:
    fields = ", ".join(sorted(row)) or "none"
    expected = "; ".join(f"{n}: {'/'.join(s)}" for n, s in SIGNATURES.items())
    return (f"cannot tell the data format from this row (fields found: {fields}). Expected the fields of one "
            f"of ({expected}), or set `dataset_format:` to name the format.")
