"""Running the app: ``start_server`` in a background thread for programs (the demo, eval, tests)
and ``serve_forever`` in the foreground for ``infuse serve``."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infuse.errors import InfuseError
from infuse.models import adapter_differences
from infuse.serve.app import build_app
from infuse.serve.options import ServeOptions
from infuse.serve.registry import Registry, load_registry

STARTUP_TIMEOUT = 30.0


@dataclass
class ServerHandle:
    """A server running in a background thread: its ``url``, the loaded models, and ``stop()``."""

    url: str
    host: str
    port: int
    app: FastAPI
    registry: Registry
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def models(self) -> list[str]:
        return list(self.registry.models)

    def stop(self) -> None:
        """Stop answering, end running generations and free the engines' threads."""
        self.server.should_exit = True
        self.registry.stop()
        self.thread.join(timeout=15)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(models: dict[str, str], host: str = "127.0.0.1", port: int = 0, *,
                 api_key: str | None = None, options: ServeOptions | None = None,
                 **overrides: Any) -> ServerHandle:
    """Load ``models`` ({NAME: "PATH" or "PATH+ADAPTER"}) and serve them from a background thread.

    ``port=0`` picks a free port; the handle's ``url`` says which. Further ServeOptions fields
    (max_batch_size, max_queue, max_new_tokens, dtype, device, ...) go in ``options`` or as keyword
    arguments. Returns once the server accepts connections; ``handle.stop()`` (or a ``with``
    block) shuts it down.
    """
    options = replace(options or ServeOptions(), host=host, port=port, api_key=api_key, **overrides)
    registry = load_registry(models, options)
    try:
        sock = bind(options.host, options.port)
        app = build_app(registry, options)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                               timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="infuse-http",
                                  daemon=True)
        thread.start()
        _wait_started(server, thread)
    except BaseException:
        registry.stop()
        raise
    bound_port = sock.getsockname()[1]
    return ServerHandle(url=f"http://{_url_host(options.host)}:{bound_port}", host=options.host,
                        port=bound_port, app=app, registry=registry, server=server, thread=thread)


def serve_forever(models: dict[str, str], options: ServeOptions, console: Console | None = None) -> None:
    """Load ``models`` and serve them in the foreground until interrupted (``infuse serve``)."""
    console = console or Console()
    registry = load_registry(models, options)
    try:
        sock = bind(options.host, options.port)
        app = build_app(registry, options)
        url = f"http://{_url_host(options.host)}:{sock.getsockname()[1]}"
        describe(registry, url, options, console)
        uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="off",
                                      timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        registry.stop()


def describe(registry: Registry, url: str, options: ServeOptions, console: Console) -> None:
    table = Table(title=f"infuse serving at {url}")
    for column in ("model", "base", "adapter", "context"):
        table.add_column(column)
    for m in registry.models.values():
        table.add_row(m.name, m.base, m.adapter_path or "-", str(m.context_length or "?"))
    console.print(table)
    for m in registry.models.values():
        for note in adapter_differences(m.base, m.adapter_path):
            console.print(f"[yellow]{escape(m.name)}: {escape(note)}", highlight=False)
    console.print(f"TGI: {url}/generate  OpenAI: {url}/v1  docs: {url}/docs  metrics: {url}/metrics")
    if not options.api_key and not _is_loopback(options.host):
        console.print(f"[yellow]Listening on {options.host} without an API key: anyone who reaches this port "
                      "can use the models. Set --api-key or INFUSE_API_KEY.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or an error that says what is in the way."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfuseError(f"Cannot listen on {host}:{port}: {e.strerror}. Pick another --port (0 picks a "
                          "free one) or stop whatever holds it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise InfuseError("The HTTP server stopped while starting; run with --debug for the reason.")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise InfuseError(f"The HTTP server did not start within {STARTUP_TIMEOUT:.0f} s.")
        time.sleep(0.01)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
