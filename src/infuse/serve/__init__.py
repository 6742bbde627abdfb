"""Serving: base models and their adapters side by side behind TGI- and OpenAI-compatible HTTP,
with concurrent requests batched into shared forward passes.

``start_server({"base": "out/base", "infused": "out/base+out/infused"})`` runs one in a
background thread and returns a handle with ``.url`` and ``.stop()``; ``infuse serve`` runs one
in the foreground.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infuse.serve.options import ServeOptions
    from infuse.serve.server import ServerHandle, serve_forever, start_server

__all__ = ["ServeOptions", "ServerHandle", "serve_forever", "start_server"]
_HOMES = {"ServeOptions": "infuse.serve.options", "ServerHandle": "infuse.serve.server",
          "serve_forever": "infuse.serve.server", "start_server": "infuse.serve.server"}


def __getattr__(name: str):
    # Imported on first use, so `infuse --help` does not pay for torch, FastAPI and uvicorn.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'infuse.serve' has no attribute {name!r}")
