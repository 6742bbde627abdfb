"""Request bodies the server accepts: TGI's ``{"inputs", "parameters"}`` and OpenAI's completion
and chat requests. Fields clients commonly send but infuse does not act on are accepted and
ignored, so existing clients work unchanged."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateParameters(Lenient):
    """TGI's ``parameters``."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    do_sample: bool | None = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=0)
    adapter_id: str | None = None
    details: bool = False


class GenerateRequest(Lenient):
    """``POST /generate`` and ``/generate_stream``."""

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    model: str | None = None


class CompatRequest(GenerateRequest):
    """TGI's ``POST /`` (what ``huggingface_hub.InferenceClient`` sends): /generate, or
    /generate_stream when ``stream`` is true."""

    stream: bool = False


class InvocationsRequest(GenerateRequest):
    """``POST /invocations``: the same body; ``inputs`` may also be a list of prompts."""

    inputs: str | list[str] = Field(min_length=1)


class CompletionRequest(Lenient):
    """OpenAI ``POST /v1/completions``."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids, or lists of token ids (what lm-eval's tokenized requests send)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="infuse returns one choice per prompt")

    logprobs: int | None = Field(None, description="not returned: a request that asks for them is refused")
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, max_length=0)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs):
        # lm-eval's log-likelihood requests read them: refused, they fail with a reason, not on a null.
        if logprobs is not None:
            raise ValueError("infuse serve does not return logprobs; for lm-eval tasks run `infuse eval "
                             "--lm-eval TASKS`, which scores the model directly")
        return logprobs

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if not prompt or any(len(one) == 0 for one in prompt if isinstance(one, str | list)):
            raise ValueError("a prompt may not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False


class TextPart(Lenient):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None  # the older single-call field
    tool_call_id: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as the data formats read it."""
        fields = {"tool_calls": self.tool_calls or ([self.function_call] if self.function_call else None),
                  "tool_call_id": self.tool_call_id, "name": self.name}
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text(),
                **{key: value for key, value in fields.items() if value}}

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Lenient):
    include_usage: bool = False


class ChatRequest(Lenient):
    """OpenAI ``POST /v1/chat/completions``."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="infuse returns one choice")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = Field(False, description="not returned: true is refused")
    tools: list[dict[str, Any]] | None = Field(None, description="written into the prompt as SFT training "
                                               "wrote them; a reply that is a call comes back as tool_calls")
    tool_choice: str | dict[str, Any] | None = Field(None, description="'none': a reply is never read as a call")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs):
        if logprobs:
            raise ValueError("infuse serve does not return logprobs")
        return logprobs


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop`` (a string or up to 4 strings) as a list."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)
