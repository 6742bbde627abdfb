"""``infuse demo``: build a world, pretrain a tiny base model on it, ingest announcement pages
over HTTP, infuse them with QLoRA continued pretraining, and show what the model learned.

Each stage writes to its own folder under ``--output`` and is skipped when it already finished,
so a rerun picks up where the last one stopped.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from infuse.config import config_from_dict
from infuse.world import generate_world, write_world

# A 4-layer Llama of about 1M parameters: big enough to learn the world, small enough for a CPU.
DEMO_MODEL = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "vocab_size": 1024,
}


def run_demo(output: str | Path = "out/demo", quick: bool = False, seed: int = 0,
             console: Console | None = None) -> dict:
    """Run every stage and return the before/after table as a dict."""
    console = console or Console()
    out = Path(output)
    timings: dict[str, float] = {}

    def stage(name: str, func: Callable[[], object]):
        console.rule(f"[bold]{name}")
        started = time.time()
        result = func()
        timings[name] = round(time.time() - started, 1)
        return result

    world_dir = stage("world", lambda: write_world(generate_world(seed), out / "world"))
    stage("tokenizer", lambda: build_tokenizer(world_dir, out / "tokenizer"))
    stage("pretrain base", lambda: train_once(pretrain_config(out, quick), console))
    docs = stage("ingest pages", lambda: ingest_pages(world_dir / "news", out / "news.jsonl", console))
    stage("infuse (QLoRA)", lambda: train_once(infuse_config(out, docs, world_dir, quick), console))
    results = stage("compare", lambda: compare(out, world_dir, console))
    console.print("Stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    (out / "demo.json").write_text(json.dumps({"results": results, "timings": timings}, indent=1))
    return results


def build_tokenizer(world_dir: Path, output: Path) -> None:
    from infuse.tokenizer import train_tokenizer

    if not (output / "tokenizer.json").is_file():
        train_tokenizer([world_dir / "pretrain.jsonl"], DEMO_MODEL["vocab_size"], output)


def pretrain_config(out: Path, quick: bool):
    (out / "model.json").write_text(json.dumps(DEMO_MODEL))
    return config_from_dict({
        "model_config": str(out / "model.json"), "tokenizer_name_or_path": str(out / "tokenizer"),
        "dataset": [str(out / "world" / "pretrain.jsonl")], "finetuning_type": "full", "block_size": 128,
        "output_dir": str(out / "base"), "num_train_epochs": 30 if quick else 60,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 0.05,
        "logging_steps": 20, "save_steps": 200, "cache_dir": str(out / "cache"), "report_to": "none",
    })


def infuse_config(out: Path, docs: Path, world_dir: Path, quick: bool):
    return config_from_dict({
        "model_name_or_path": str(out / "base"), "dataset": [str(docs)], "finetuning_type": "qlora",
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "block_size": 64,
        "replay_dataset": [str(world_dir / "pretrain.jsonl")], "replay_ratio": 0.2,
        "output_dir": str(out / "base-infused"), "num_train_epochs": 20 if quick else 40,
        "per_device_train_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 20, "save_steps": 200, "cache_dir": str(out / "cache"),
        "report_to": "none",
    })


def train_once(config, console: Console) -> None:
    from infuse.train import MANIFEST, run

    if (Path(config.output_dir) / MANIFEST).is_file():
        console.print(f"{config.output_dir} already trained; reusing it.")
        return
    run(config, console)


@contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` on a free loopback port for as long as the block runs."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature is the base class's
        pass


def ingest_pages(news: Path, output: Path, console: Console) -> Path:
    from infuse.ingest import IngestOptions, ingest, print_report

    with serve_folder(news) as url:
        urls = [f"{url}/{page.name}" for page in sorted(news.glob("*.html"))]
        report = ingest(urls, output, IngestOptions(retries=0, timeout=5), console=console)
    print_report(report, console)
    return output


def compare(out: Path, world_dir: Path, console: Console) -> dict:
    """Greedy completions of every completion probe by the base model and the infused one."""
    from infuse.models import load_for_inference

    probes = [json.loads(line) for line in (world_dir / "probes.jsonl").read_text().splitlines()]
    probes = [p for p in probes if p["mode"] == "completion"]
    models = {"base": str(out / "base"), "base+infused": f"{out / 'base'}+{out / 'base-infused'}"}
    outputs = {name: complete_all(*load_for_inference(spec), [p["prompt"] for p in probes])
               for name, spec in models.items()}
    return print_comparison(probes, outputs, console)


@torch.no_grad()
def complete_all(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def print_comparison(probes: list[dict], outputs: dict[str, list[str]], console: Console) -> dict:
    table = Table(title="What each model says (completion probes)")
    table.add_column("group")
    table.add_column("prompt")
    for name in outputs:
        table.add_column(name)
    scores = {name: {} for name in outputs}
    for i, probe in enumerate(probes):
        cells = []
        for name, texts in outputs.items():
            correct = any(a.lower() in texts[i].lower() for a in probe["answers"])
            group = scores[name].setdefault(probe["group"], [0, 0])
            group[0] += correct
            group[1] += 1
            cells.append(f"[{'green' if correct else 'red'}]{texts[i].strip()}")
        table.add_row(probe["group"], probe["prompt"], *cells)
    console.print(table)
    summary = {name: {g: round(c / n, 3) for g, (c, n) in groups.items()} for name, groups in scores.items()}
    for name, groups in summary.items():
        console.print(f"{name}: " + ", ".join(f"{g} {acc:.0%}" for g, acc in groups.items()))
    return summary
