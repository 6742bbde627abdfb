"""Serving: base models and their adapters side by side behind TGI- and OpenAI-compatible HTTP,
with concurrent requests batched into shared forward passes.

``start_server({"base": "out/base", "infused": "out/base+out/infused"})`` runs one in a
background thread and returns a handle with ``.url`` and ``.stop()``; ``infuse serve`` runs one
in the foreground.
"""

from infuse.serve.options import ServeOptions
from infuse.serve.server import ServerHandle, serve_forever, start_server

__all__ = ["ServeOptions", "ServerHandle", "serve_forever", "start_server"]
