"""``infuse serve --engine vllm``: the same ``NAME=PATH[+ADAPTER]`` specs handed to vLLM, one base
with its adapters as LoRA modules, for GPU throughput beyond what the built-in engine gives."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from rich.console import Console

from infuse.errors import InfuseError
from infuse.models import split_spec
from infuse.serve.options import ServeOptions

# The LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(models: dict[str, str], options: ServeOptions) -> list[str]:
    """The ``vllm serve`` command line for ``models`` ({NAME: PATH[+ADAPTER]}) under ``options``:
    the shared base, names for it, every adapter as ``--lora-modules NAME=PATH``, and host, port,
    API key, dtype and remote-code settings mapped to vLLM's flags."""
    bases: dict[str, str] = {}
    adapters: dict[str, str] = {}
    plain: list[str] = []
    for name, spec in models.items():
        base, adapter = split_spec(spec)
        bases.setdefault(str(Path(base).expanduser().resolve()), base)
        if adapter:
            adapters[name] = adapter
        else:
            plain.append(name)
    if len(bases) > 1:
        raise InfuseError(f"vLLM serves one base model per process; these models have {len(bases)}: "
                          f"{', '.join(bases.values())}. Start one `infuse serve --engine vllm` per base "
                          "(on separate ports), or use the built-in engine, which serves several.")
    base = next(iter(bases.values()))
    command = ["vllm", "serve", base, "--host", options.host, "--port", str(options.port)]
    if plain:
        command += ["--served-model-name", *plain]
    if adapters:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
                    "--max-loras", str(len(adapters)), "--max-lora-rank", str(_max_rank(adapters.values()))]
    if options.api_key:
        command += ["--api-key", options.api_key]
    if options.dtype != "auto":
        command += ["--dtype", options.dtype]
    if options.trust_remote_code:
        command += ["--trust-remote-code"]
    return command


def _max_rank(adapters) -> int:
    import json

    ranks = [json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8) for path in adapters]
    needed = max(ranks, default=8)
    fitting = [rank for rank in VLLM_LORA_RANKS if rank >= needed]
    if not fitting:
        raise InfuseError(f"An adapter has LoRA rank {needed}; vLLM takes at most {VLLM_LORA_RANKS[-1]}. "
                          "Merge it with `infuse merge` and serve the merged model instead.")
    return fitting[0]


def vllm_installed() -> bool:
    return shutil.which("vllm") is not None or importlib.util.find_spec("vllm") is not None


def run_vllm(models: dict[str, str], options: ServeOptions, console: Console | None = None) -> int:
    """Run vLLM in the foreground on ``models``; return its exit status."""
    console = console or Console()
    command = vllm_command(models, options)
    if not vllm_installed():
        raise InfuseError("--engine vllm needs vLLM, which is not installed here: "
                          "`pip install 'infuse-llm[vllm]'` (Linux with a CUDA GPU). Or leave out --engine "
                          "to use the built-in engine.")
    shown = ["***" if i and command[i - 1] == "--api-key" else part for i, part in enumerate(command)]
    console.print(f"[dim]$ {' '.join(shown)}[/dim]", highlight=False)
    return subprocess.call(command)
