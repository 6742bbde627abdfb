"""The Text Generation Inference protocol: ``/generate``, ``/generate_stream``, ``/`` (either, as
``stream`` says) and the hosted endpoints' ``/invocations``, so the seed's payloads and TGI clients
work unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from infuse.serve.engine import Event
from infuse.serve.registry import ServedModel
from infuse.serve.schemas import CompatRequest, GenerateParameters, GenerateRequest, InvocationsRequest
from infuse.serve.service import Generation, Result, Service, sse

router = APIRouter(tags=["TGI"])


def tgi_sampling(service: Service, served: ServedModel, prompt_ids: list[int], params: GenerateParameters):
    """TGI samples when ``do_sample`` is on or, if it is not given, when any sampling knob is set;
    a temperature at or below 0.01 stays greedy either way."""
    sample = params.do_sample
    if sample is None:
        sample = any(v is not None for v in (params.temperature, params.top_p, params.top_k))
    return service.sampling(served, prompt_ids, params.max_new_tokens, do_sample=sample,
                            temperature=1.0 if params.temperature is None else params.temperature,
                            top_p=params.top_p or 1.0, top_k=params.top_k or 0, seed=params.seed,
                            stop=params.stop, keep_stop=True)  # TGI's text ends with the stop sequence


def _prepare(service: Service, body: GenerateRequest, inputs: str) -> tuple[ServedModel, list[int], object]:
    served = service.model(body.model or body.parameters.adapter_id)
    ids = service.encode(served, prompt=inputs)
    return served, ids, tgi_sampling(service, served, ids, body.parameters)


def answer(inputs: str, params: GenerateParameters, result: Result, served: ServedModel) -> dict:
    text = inputs + result.text if params.return_full_text else result.text
    reply: dict = {"generated_text": text}
    if params.details:
        reply["details"] = details(result, served)
    return reply


def details(result: Result, served: ServedModel) -> dict:
    return {"finish_reason": result.finish_reason, "generated_tokens": result.generated_tokens,
            "seed": result.seed, "prefill": [],
            "tokens": [token_json(event, served) for event in result.tokens]}


def token_json(event: Event, served: ServedModel) -> dict:
    return {"id": event.token_id, "text": served.tokenizer.decode([event.token_id]),
            "logprob": round(event.logprob, 5), "special": event.special}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict:
    """Generate text for ``inputs``; ``parameters.adapter_id`` (or ``model``) picks the served model."""
    service: Service = request.app.state.service
    served, ids, sampling = _prepare(service, body, body.inputs)
    result = await service.run(request, service.start(served, ids, sampling))
    return answer(body.inputs, body.parameters, result, served)


@router.post("/", response_model=None)
async def compat(body: CompatRequest, request: Request) -> dict | StreamingResponse:
    """TGI's root route: ``/generate_stream`` when ``stream`` is true, else ``/generate``."""
    return await (generate_stream if body.stream else generate)(body, request)


@router.post("/invocations")
async def invocations(body: InvocationsRequest, request: Request) -> list[dict]:
    """The hosted-endpoint route: the /generate body, the answer wrapped in a list (one per input)."""
    service: Service = request.app.state.service
    inputs = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    prepared = [_prepare(service, body, text) for text in inputs]
    generations = service.start_all([(served, ids, sampling) for served, ids, sampling in prepared])
    results = await asyncio.gather(*(service.run(request, g) for g in generations))
    return [answer(text, body.parameters, result, served)
            for text, (served, _, _), result in zip(inputs, prepared, results, strict=True)]


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Server-sent events, one per token; the last carries ``generated_text`` and ``details``."""
    service: Service = request.app.state.service
    served, ids, sampling = _prepare(service, body, body.inputs)
    generation = service.start(served, ids, sampling)
    return StreamingResponse(_events(generation, body.inputs, body.parameters, served),
                             media_type="text/event-stream")


async def _events(generation: Generation, inputs: str, params: GenerateParameters,
                  served: ServedModel) -> AsyncIterator[str]:
    result = Result(prompt_tokens=generation.prompt_tokens)
    async for event in generation:
        if event.error:
            yield sse({"error": event.error, "error_type": "generation"})
            return
        if event.token_id is None:
            return  # cancelled before its first token
        result.tokens.append(event)
        result.text += event.text
        done = event.finish_reason is not None
        if done:
            result.finish_reason, result.seed = event.finish_reason, event.seed
        token = {"id": event.token_id, "text": event.text, "logprob": round(event.logprob, 5),
                 "special": event.special}
        text = answer(inputs, params, result, served)["generated_text"] if done else None
        yield sse({"index": len(result.tokens), "token": token, "generated_text": text,
                   "details": details(result, served) | {"tokens": []} if done else None})
