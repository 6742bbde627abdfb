"""The OpenAI protocol: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streamed
as server-sent events when asked, so the official ``openai`` client talks to infuse as is."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from infuse.serve.registry import ServedModel
from infuse.serve.schemas import ChatRequest, CompletionRequest, stop_list
from infuse.serve.service import ApiError, Generation, Result, Service, sse

router = APIRouter(prefix="/v1", tags=["OpenAI"])

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "stop"}


@router.get("/models")
async def models(request: Request) -> dict:
    """The served models, by the names requests use."""
    service: Service = request.app.state.service
    return {"object": "list", "data": [_model_card(m) for m in service.registry.models.values()]}


@router.get("/models/{name:path}")
async def model(name: str, request: Request) -> dict:
    """One served model (404 in OpenAI's shape when it is not served here)."""
    service: Service = request.app.state.service
    return _model_card(service.model(name))


def _model_card(served: ServedModel) -> dict:
    adapter = str(Path(served.adapter_path).expanduser().resolve()) if served.adapter_path else None
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "infuse",
            "root": served.base, "adapter": adapter}  # both absolute, whatever the directory it started in


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    """Complete each prompt; ``echo`` puts the prompt in front of its completion."""
    service: Service = request.app.state.service
    served = service.model(body.model)
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise ApiError(422, "prompt: streaming takes one prompt at a time; send a string, not a list.")
    items = []
    for prompt in prompts:
        ids = service.encode(served, prompt=prompt)
        sampling = service.sampling(served, ids, body.max_tokens, "max_tokens", temperature=body.temperature,
                                    top_p=body.top_p, seed=body.seed, stop=stop_list(body.stop))
        items.append((served, ids, sampling))
    generations = service.start_all(items)
    head = _head("cmpl", "text_completion", served)
    texts = [p if isinstance(p, str) else served.tokenizer.decode(p) for p in prompts] if body.echo else None
    if body.stream:
        prefix = texts[0] if body.echo else ""
        return _stream(generations[0], lambda text, finish: head | {"choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}, prefix)
    results = await asyncio.gather(*(service.run(request, g) for g in generations))
    choices = [{"index": i, "text": (texts[i] if body.echo else "") + result.text, "logprobs": None,
                "finish_reason": FINISH_REASONS[result.finish_reason]} for i, result in enumerate(results)]
    return head | {"choices": choices, "usage": _usage(results)}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> dict | StreamingResponse:
    """Answer a conversation, formatted with the model's own chat template."""
    service: Service = request.app.state.service
    served = service.model(body.model)
    ids = service.encode(served, messages=[m.as_dict() for m in body.messages], tools=body.tools)
    key = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    sampling = service.sampling(served, ids, body.max_completion_tokens or body.max_tokens, key,
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                stop=stop_list(body.stop))
    generation = service.start(served, ids, sampling, chat=True)
    head = _head("chatcmpl", "chat.completion", served)
    callable_names = {tool.get("function", tool).get("name") for tool in body.tools or []}
    if body.tool_choice == "none":
        callable_names = set()
    if body.stream:
        chunk = head | {"object": "chat.completion.chunk"}
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(generation, lambda text, finish: chunk | {"choices": [
            {"index": 0, "delta": text if isinstance(text, dict) else {"content": text} if text else {},
             "logprobs": None, "finish_reason": finish}]},
            first=chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]},
            usage_chunk=chunk if usage else None, tool_names=callable_names)
    result = await service.run(request, generation)
    message, finish = {"role": "assistant", "content": result.text}, FINISH_REASONS[result.finish_reason]
    words, calls = tool_calls_in(result.text, callable_names) if callable_names else (result.text, None)
    if calls:
        message, finish = {"role": "assistant", "content": words or None, "tool_calls": calls}, "tool_calls"
    return head | {"choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                   "usage": _usage([result])}


def may_be_call(text: str) -> bool | None:
    """Whether a reply beginning with ``text`` may be a tool call (JSON, or a ``<tool_call>`` tag);
    None while too little of it is there to tell."""
    start = text.lstrip()
    if not start or ("<tool_call>".startswith(start)):
        return None
    return start[0] in "{[" or start.startswith("<tool_call>")


TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_calls_in(text: str, names: set[str]) -> tuple[str, list[dict] | None]:
    """(words, calls) of an answer to a request with tools: the calls as OpenAI returns them, from the
    JSON that infuse's tool prompt asks for (``{"name", "arguments"}`` or a list of them, after any
    words; ``parameters`` for ``arguments`` as Llama 3.1 writes it), or from ``<tool_call>`` tags
    (Qwen's and Hermes' templates). (text, None) unless every call names one of the request's tools."""
    tagged = TAGGED_CALL.findall(text)
    if tagged:
        words, written = TAGGED_CALL.sub("", text).strip(), tagged
    else:
        start = next((m.start() for m in re.finditer(r"(?m)^\s*[\[{]", text)), None)
        if start is None:
            return text, None
        words, written = text[:start].strip(), [text[start:]]
    calls = []
    for part in written:
        try:
            value = json.loads(part)
        except json.JSONDecodeError:
            return text, None
        for call in value if isinstance(value, list) else [value]:
            if not (isinstance(call, dict) and call.get("name") in names):
                return text, None
            arguments = call.get("arguments", call.get("parameters", {}))
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": call["name"], "arguments": arguments}})
    return words, calls or None


def _head(prefix: str, kind: str, served: ServedModel) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": served.name}


def _usage(results: list[Result]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(generation: Generation, chunk: Callable[[str | dict, str | None], dict], prefix: str = "",
            first: dict | None = None, usage_chunk: dict | None = None,
            tool_names: set[str] | None = None) -> StreamingResponse:
    return StreamingResponse(_chunks(generation, chunk, prefix, first, usage_chunk, tool_names),
                             media_type="text/event-stream")


async def _chunks(generation: Generation, chunk: Callable[[str | dict, str | None], dict], prefix: str,
                  first: dict | None, usage_chunk: dict | None,
                  tool_names: set[str] | None = None) -> AsyncIterator[str]:
    """Server-sent chunks of a generation. With ``tool_names``, a reply that begins like a call is
    held back to its end and sent as one ``tool_calls`` delta if it is one (``chunk`` then gets
    that delta instead of text); any other reply streams as it comes."""
    if first:
        yield sse(first)
    if prefix:
        yield sse(chunk(prefix, None))
    result = Result(prompt_tokens=generation.prompt_tokens)
    held = "" if tool_names else None  # the reply so far, while it may be a call
    async for event in generation:
        if event.error:
            yield sse({"error": {"message": f"Generation failed: {event.error}", "type": "generation_error"}})
            return
        if event.token_id is not None:
            result.tokens.append(event)
        finish = FINISH_REASONS.get(event.finish_reason) if event.finish_reason else None
        text: str | dict = event.text
        if held is not None:
            held += event.text
            begins_a_call = may_be_call(held)
            if begins_a_call is False:
                text, held = held, None
            elif finish is None:
                continue
            else:
                words, calls = tool_calls_in(held, tool_names)
                indexed = [{"index": i, **call} for i, call in enumerate(calls or [])]
                text = {"content": words or None, "tool_calls": indexed} if calls else held
                finish = "tool_calls" if calls else finish
        if text or finish:
            yield sse(chunk(text, finish))
    if usage_chunk is not None:
        yield sse(usage_chunk | {"choices": [], "usage": _usage([result])})
    yield sse("[DONE]")
