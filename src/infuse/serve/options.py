"""Everything ``infuse serve`` can be told, in one dataclass; each field says what it limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infuse.serve.engine import EngineLimits


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class ServeOptions:
    """How the server loads models, whom it answers and how much it takes on."""

    host: str = _help("Interface to bind; 127.0.0.1 keeps the server off the network.", "127.0.0.1")
    port: int = _help("TCP port; 0 picks a free one.", 8080)
    api_key: str | None = _help("Bearer token every request must carry (also INFUSE_API_KEY).", None)
    dtype: str = _help("auto (as saved) | float32 | bfloat16 | float16.", "auto")
    device: str | None = _help("cpu, cuda, cuda:1, ...; default the GPU when there is one.", None)
    trust_remote_code: bool = _help("Run modelling code shipped inside model dirs.", False)
    max_input_tokens: int = _help("Longest prompt in tokens (also capped by the model's context).", 4096)
    max_new_tokens: int = _help("Most tokens one request may ask for.", 1024)
    default_max_new_tokens: int = _help("Tokens generated when a request does not say.", 256)
    max_body_bytes: int = _help("Largest request body; bigger ones get 413.", 1_000_000)
    max_batch_size: int = _help("Requests decoded together in one forward pass, per base model.", 32)
    max_queue: int = _help("Requests waiting beyond a full batch, per base model; more get 503.", 256)
    batch_wait_ms: float = _help("How long an idle engine waits for more requests to batch with.", 5.0)

    def engine_limits(self) -> EngineLimits:
        from infuse.serve.engine import EngineLimits

        return EngineLimits(max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                            batch_wait=self.batch_wait_ms / 1000)
