"""A running model server as an evaluation backend: OpenAI-style ``/v1`` (infuse serve, vLLM, TGI's
Messages API) or TGI's ``/generate``, so served models are compared exactly like local ones.

``URL`` picks the API: ``http://host:port/v1`` is OpenAI, ``http://host:port/generate`` is TGI,
and a bare ``http://host:port`` is OpenAI when ``GET /v1/models`` answers, else TGI. A fragment
names the served model on a server with several (``http://host:port#chat``); without one the
served model of the same name as the report's is used, or the only one served.

Greedy decoding is asked for the way each API spells it (temperature 0 for OpenAI, ``do_sample:
false`` for TGI), so a server and a local run decode alike.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urldefrag

import httpx

from infuse.errors import InfuseError
from infuse.evaluate.generate import Generation, GenerationSettings, leaked_markers

OPENAI, TGI = "openai", "tgi"


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


class Endpoint:
    """Answers from a server; requests go out ``concurrency`` at a time so the server can batch them."""

    def __init__(self, name: str, spec: str, api_key: str | None = None, timeout: float = 300.0,
                 concurrency: int = 8):
        url, fragment = urldefrag(spec)
        self.name, self.spec = name, spec
        self.batch_size = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.base, self.api = self._api_of(url.rstrip("/"))
        self.kind = self.api
        # TGI picks one of several served models (or adapters) by parameters.adapter_id.
        self.served = self._served_model(fragment) if self.api == OPENAI else (fragment or None)

    def _api_of(self, url: str) -> tuple[str, str]:
        if url.endswith("/v1"):
            return url[: -len("/v1")], OPENAI
        if url.endswith("/generate"):
            return url[: -len("/generate")], TGI
        try:
            answer = self.client.get(f"{url}/v1/models")
        except httpx.HTTPError as e:
            raise self._unreachable(url, e) from None
        return url, OPENAI if answer.status_code == 200 else TGI

    def _served_model(self, wanted: str) -> str:
        listing = self._request("GET", "/v1/models")
        served = [m.get("id") for m in listing.get("data", [])]
        for candidate in (wanted, self.name):
            if candidate and candidate in served:
                return candidate
        if not wanted and len(served) == 1:
            return served[0]
        example = served[0] if served else "MODEL"
        listing = ", ".join(served) or "no model"
        raise InfuseError(f"--model {self.name}={self.spec}: the server serves {listing}; "
                          f"name one after '#', e.g. {self.name}={self.base}#{example}.")

    def unsupported(self, mode: str) -> str | None:
        if mode == "chat" and self.api == TGI:
            return "TGI's /generate takes raw text and knows no chat template (use the server's /v1 API)"
        return None

    def generate(self, prompts: list[str], mode: str, settings: GenerationSettings) -> list[Generation]:
        ask = {(OPENAI, "chat"): self._chat, (OPENAI, "completion"): self._completion,
               (TGI, "completion"): self._tgi}[(self.api, mode)]
        with ThreadPoolExecutor(max_workers=max(1, self.batch_size)) as pool:
            return list(pool.map(lambda p: ask(p, settings), prompts))

    def _openai_sampling(self, settings: GenerationSettings) -> dict:
        if settings.greedy:
            return {"max_tokens": settings.max_new_tokens, "temperature": 0.0, "top_p": 1.0}
        return {"max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "seed": settings.seed}

    def _chat(self, prompt: str, settings: GenerationSettings) -> Generation:
        body = {"model": self.served, "messages": [{"role": "user", "content": prompt}],
                **self._openai_sampling(settings)}
        answer = self._request("POST", "/v1/chat/completions", body)
        choice = answer["choices"][0]
        return _generation(choice["message"].get("content") or "", choice.get("finish_reason"), answer)

    def _completion(self, prompt: str, settings: GenerationSettings) -> Generation:
        body = {"model": self.served, "prompt": prompt, **self._openai_sampling(settings)}
        answer = self._request("POST", "/v1/completions", body)
        choice = answer["choices"][0]
        return _generation(choice.get("text") or "", choice.get("finish_reason"), answer)

    def _tgi(self, prompt: str, settings: GenerationSettings) -> Generation:
        parameters = {"max_new_tokens": settings.max_new_tokens, "return_full_text": False, "details": True,
                      "do_sample": not settings.greedy}
        if not settings.greedy:
            parameters.update(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
        if self.served:
            parameters["adapter_id"] = self.served
        answer = self._request("POST", "/generate", {"inputs": prompt, "parameters": parameters})
        if isinstance(answer, list):  # hosted TGI endpoints wrap the answer in a list
            answer = answer[0]
        details = answer.get("details") or {}
        finish = details.get("finish_reason")
        stopped = None if finish is None else finish in ("eos_token", "stop_sequence")
        text = answer.get("generated_text", "")
        return Generation(text=text, stopped=stopped, tokens=details.get("generated_tokens"),
                          leaked=leaked_markers(text))

    def _request(self, method: str, path: str, body: dict | None = None):
        url = f"{self.base}{path}"
        try:
            answer = self.client.request(method, url, json=body)
        except httpx.HTTPError as e:
            raise self._unreachable(url, e) from None
        if answer.status_code != 200:
            raise InfuseError(f"--model {self.name}={self.spec}: {method} {url} answered "
                              f"{answer.status_code}: {answer.text[:300]}")
        return answer.json()

    def _unreachable(self, url: str, error: Exception) -> InfuseError:
        return InfuseError(f"--model {self.name}={self.spec}: cannot reach {url} ({type(error).__name__}: "
                           f"{error}). Start the server first (e.g. `infuse serve --model NAME=PATH`), or "
                           "check host and port.")

    def close(self) -> None:
        self.client.close()


def _generation(text: str, finish_reason: str | None, answer: dict) -> Generation:
    usage = answer.get("usage") or {}
    stopped = None if finish_reason is None else finish_reason == "stop"
    return Generation(text=text, stopped=stopped, tokens=usage.get("completion_tokens"),
                      leaked=leaked_markers(text))
